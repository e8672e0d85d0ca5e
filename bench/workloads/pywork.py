"""A realistic Python 3 script for the allocator benchmark: the kind of data munging a
service or a build tool does.  JSON round trips, records as dicts and small objects,
string building and formatting, regex tokenising, sorting and grouping, and dropping most
of it again.  Scale with argv[1] (default 1.0)."""
import json, re, sys, collections

scale = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
N = int(60000 * scale)


class Item:
    __slots__ = ("id", "name", "tags", "score")

    def __init__(self, i, name, tags, score):
        self.id, self.name, self.tags, self.score = i, name, tags, score


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
         "omicron pi rho sigma tau upsilon phi chi psi omega").split()
check = 0
for rnd in range(3):
    records = []
    for i in range(N):
        w = WORDS[(i * 7 + rnd) % len(WORDS)]
        records.append({"id": i, "name": f"{w}-{i:06d}", "tags": [w, WORDS[i % 5], str(i % 97)],
                        "score": (i * 2654435761) % 1000 / 7.0, "meta": {"r": rnd, "odd": i & 1}})
    text = json.dumps(records)
    back = json.loads(text)
    items = [Item(r["id"], r["name"].upper(), tuple(r["tags"]), r["score"]) for r in back]
    groups = collections.defaultdict(list)
    for it in items:
        groups[it.tags[1]].append(it)
    for k, v in groups.items():
        v.sort(key=lambda it: (-it.score, it.name))
        check += len(v) + int(v[0].score)
    tok = re.compile(r"[A-Z]+|\d+")
    words = collections.Counter()
    for it in items[: N // 2]:
        words.update(tok.findall(it.name))
    lines = "\n".join(f"{it.id},{it.name},{it.score:.3f},{'|'.join(it.tags)}" for it in items)
    check += len(lines) + len(words)
    del records, back, items, groups, lines, text
print(f"check={check}")
