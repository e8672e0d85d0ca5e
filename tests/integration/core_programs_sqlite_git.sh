#!/usr/bin/env bash
# sqlite3 and git under LD_PRELOAD=liblumalloc.so give byte-identical output to glibc:
#  - sqlite3 builds a file database (200k rows through recursive CTEs, indexes, a join, group by,
#    window functions, JSON, a large blob, deletes, VACUUM, integrity_check) and queries it;
#  - git builds a repository (a fast-import stream of 1500 commits over 200 files, then
#    porcelain commits, branches and a merge, fixed dates so hashes are deterministic), runs gc
#    and repack (multi-threaded pack-objects), fsck, log/rev-list/diff/blame.
# Usage: core_programs_sqlite_git.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
for p in sqlite3 git; do
  command -v $p >/dev/null || { [ "${CI:-}" = true ] && fail "$p missing"; echo "SKIP: $p missing"; exit 0; }
done

compare() { # name: $work/NAME.glibc vs $work/NAME.lum
  cmp -s "$work/$1.glibc" "$work/$1.lum" || { diff "$work/$1.glibc" "$work/$1.lum" | head -20 || true; fail "$1 output differs"; }
  echo "ok: $1 ($(wc -l < "$work/$1.lum") lines identical)"
}

# ---- sqlite3 ----
cat > "$work/db.sql" <<'SQL'
PRAGMA journal_mode = WAL;
PRAGMA cache_size = -20000;
CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, city TEXT, meta TEXT);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER REFERENCES customer(id),
                     amount REAL, note TEXT, payload BLOB);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
INSERT INTO customer SELECT i, 'cust' || i || substr('abcdefghijklmnopqrstuvwxyz', 1 + i % 26),
  'city' || (i % 97), json_object('i', i, 'tags', json_array(i % 3, i % 5, 'x' || i)) FROM n;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 180000)
INSERT INTO orders SELECT i, 1 + (i * 7919) % 20000, ((i * 104729) % 100000) / 100.0,
  printf('%.*c', 1 + i % 300, 'n'), CASE WHEN i % 5000 = 0 THEN zeroblob(400000) ELSE randomblob(0) END FROM n;
CREATE INDEX orders_customer ON orders(customer);
CREATE INDEX customer_city ON customer(city, name);
SELECT count(*), sum(amount), max(length(note)), sum(length(payload)) FROM orders;
SELECT c.city, count(*), round(sum(o.amount), 2), round(avg(o.amount), 4)
  FROM orders o JOIN customer c ON c.id = o.customer GROUP BY c.city ORDER BY 3 DESC LIMIT 10;
SELECT customer, amount, rank() OVER (PARTITION BY customer ORDER BY amount DESC, id) AS r
  FROM orders WHERE customer < 40 ORDER BY customer, r LIMIT 60;
SELECT json_extract(meta, '$.tags[2]'), count(*) FROM customer WHERE json_extract(meta, '$.tags[0]') = 1
  GROUP BY 1 ORDER BY 1 LIMIT 5;
SELECT group_concat(name, ';') FROM (SELECT name FROM customer WHERE city = 'city7' ORDER BY name);
DELETE FROM orders WHERE id % 3 = 0;
UPDATE customer SET meta = json_set(meta, '$.big', printf('%.*c', 5000, 'b')) WHERE id % 50 = 0;
VACUUM;
PRAGMA integrity_check;
SELECT count(*), round(sum(amount), 2), sum(length(payload)) FROM orders;
SELECT city, count(DISTINCT customer) FROM orders JOIN customer c ON c.id = customer
  GROUP BY city HAVING count(*) > 1300 ORDER BY city;
SQL
rm -f "$work/a.db"*
timeout 120 sqlite3 "$work/a.db" < "$work/db.sql" > "$work/sqlite.glibc" 2>&1 || fail "sqlite3 under glibc"
rm -f "$work/a.db"*
LD_PRELOAD=$lib timeout 120 sqlite3 "$work/a.db" < "$work/db.sql" > "$work/sqlite.lum" 2>&1 || fail "sqlite3 under lumalloc"
grep -qx ok "$work/sqlite.lum" || fail "integrity_check under lumalloc"
compare sqlite
# and reading the database lumalloc wrote, with glibc
sqlite3 "$work/a.db" 'PRAGMA integrity_check; SELECT count(*) FROM orders;' | tr '\n' ' ' | grep -q '^ok 120000 $' \
  || fail "the database written under lumalloc does not check under glibc"
echo "ok: database written under lumalloc checks under glibc"

# ---- git ----
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.com GIT_COMMITTER_NAME=t \
  GIT_COMMITTER_EMAIL=t@example.com GIT_AUTHOR_DATE='1700000000 +0000' \
  GIT_COMMITTER_DATE='1700000000 +0000' GIT_CONFIG_NOSYSTEM=1 HOME=$work
python3 - > "$work/stream.fi" <<'PY'
import random
r = random.Random(3)
files = {f"dir{i % 10}/file{i}.txt": [f"line {j} of {i}\n" for j in range(r.randint(5, 200))] for i in range(200)}
mark = 0
out = []
for c in range(1, 1501):
    changed = r.sample(sorted(files), r.randint(1, 6))
    ops = []
    for f in changed:
        lines = files[f]
        for _ in range(r.randint(1, 5)):
            k = r.randrange(len(lines) + 1)
            lines.insert(k, f"commit {c} inserted {r.random()}\n")
        if len(lines) > 20 and r.random() < 0.3:
            del lines[r.randrange(len(lines))]
        data = "".join(lines).encode()
        ops.append(f"M 100644 inline {f}\ndata {len(data)}\n".encode() + data + b"\n")
    msg = f"commit {c}: touch {' '.join(changed)}\n".encode()
    out.append(f"commit refs/heads/main\nmark :{c}\ncommitter t <t@example.com> {1700000000 + c} +0000\n".encode()
               + f"data {len(msg)}\n".encode() + msg + (f"from :{c - 1}\n".encode() if c > 1 else b"") + b"".join(ops))
import sys
sys.stdout.buffer.write(b"".join(out))
PY
cat > "$work/git.sh" <<'SH'
set -euo pipefail
repo=$1
git init -q -b main "$repo"
cd "$repo"
git config pack.threads 2
git fast-import --quiet < "$2"
git checkout -q main
git checkout -q -b side HEAD~300
for i in $(seq 1 30); do echo "side $i" >> side.txt; git add side.txt; git commit -q -m "side $i"; done
git checkout -q main
for i in $(seq 1 30); do echo "main $i" >> main.txt; git add main.txt; git commit -q -m "main $i"; done
git merge -q --no-edit side
git gc -q
git repack -q -a -d -f --window=50
git fsck --full --strict 2>&1
git count-objects -v | grep -v -e size -e prune
git log --stat --format='%H %s' | sha1sum
git rev-list --all --objects | sort | sha1sum
git diff --stat HEAD~200 HEAD | tail -1
git blame -s dir3/file3.txt | sha1sum
git log --oneline | wc -l
SH
timeout 200 bash "$work/git.sh" "$work/repo.glibc" "$work/stream.fi" > "$work/git.glibc" 2>&1 || { tail "$work/git.glibc"; fail "git under glibc"; }
LD_PRELOAD=$lib timeout 200 bash "$work/git.sh" "$work/repo.lum" "$work/stream.fi" > "$work/git.lum" 2>&1 || { tail "$work/git.lum"; fail "git under lumalloc"; }
compare git
