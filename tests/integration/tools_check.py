#!/usr/bin/env python3
"""Checks for the alloctop/allocsnoop integration tests.

  tools_check.py alloctop TRUTH TOP_JSONL            per-thread figures within 5%, sites +-10%
  tools_check.py alloctop-exit TRUTH TOP_JSONL       final per-thread figures only (read at exit)
  tools_check.py allocsnoop TRUTH SNOOP_JSONL FOLDED PPROF
                                                     sites +-10%, leak found with its stack,
                                                     folded and pprof parse and agree
  tools_check.py heap TRUTH HEAP_JSONL FOLDED PPROF  allocsnoop --heap: the leaks found with their sizes,
                                                     allocated shares of the sites +-10%, folded
                                                     (live bytes) and pprof agree
  tools_check.py pprof FILE                          parse a profile.proto, print a summary

Shares are compared relatively: |measured/expected - 1| <= 10%.  Expected shares come from
the workload's own exact truth; the sampled total also contains the large allocations of
large_site (not a site of interest), so expected shares are taken over sites + large bytes.
"""
import json
import re
import sys

SITES = ("site_a", "site_b", "site_c")
failures = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        failures.append(msg)


def within(measured, expected, tol):
    return expected > 0 and abs(measured / expected - 1.0) <= tol


def expected_shares(truth):
    total = sum(truth["sites"].values()) + truth["large"] * (2 << 20) + truth.get("large_leaks", 0) * (3 << 20)
    return {s: truth["sites"][s] / total for s in SITES}


# ---- protobuf (wire format only, enough for profile.proto) --------------------------------
def varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i


def fields(b):
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(b, i)
        elif wt == 2:
            n, i = varint(b, i)
            v = b[i:i + n]
            i += n
        elif wt == 1:
            v = b[i:i + 8]
            i += 8
        elif wt == 5:
            v = b[i:i + 4]
            i += 4
        else:
            raise ValueError("bad wire type %d" % wt)
        yield f, wt, v


def packed(v, wt):
    if wt == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = varint(v, i)
        out.append(x)
    return out


def parse_pprof(path):
    data = open(path, "rb").read()
    prof = {"sample_type": [], "sample": [], "location": {}, "function": {}, "strings": []}
    for f, wt, v in fields(data):
        if f == 1:
            d = {ff: vv for ff, _, vv in fields(v)}
            prof["sample_type"].append((d.get(1, 0), d.get(2, 0)))
        elif f == 2:
            locs, vals = [], []
            for ff, w2, vv in fields(v):
                if ff == 1:
                    locs += packed(vv, w2)
                elif ff == 2:
                    vals += packed(vv, w2)
            prof["sample"].append((locs, vals))
        elif f == 4:
            lid, lines = 0, []
            for ff, _, vv in fields(v):
                if ff == 1:
                    lid = vv
                elif ff == 4:
                    lines.append({f3: v3 for f3, _, v3 in fields(vv)}.get(1, 0))
            prof["location"][lid] = lines
        elif f == 5:
            d = {ff: vv for ff, _, vv in fields(v)}
            prof["function"][d.get(1, 0)] = d.get(2, 0)
        elif f == 6:
            prof["strings"].append(v.decode())
    s = prof["strings"]
    assert s and s[0] == "", "string_table[0] must be empty"
    prof["types"] = [s[t] for t, _ in prof["sample_type"]]
    for locs, vals in prof["sample"]:
        assert len(vals) == len(prof["sample_type"]), "value count != sample types"
        for l in locs:
            assert l in prof["location"], "sample references unknown location %d" % l
            for fid in prof["location"][l]:
                assert fid in prof["function"], "location references unknown function %d" % fid
                assert prof["function"][fid] < len(s), "function name index out of range"
    return prof


def pprof_stacks(prof):
    """Yield (function names innermost first, values)."""
    s = prof["strings"]
    for locs, vals in prof["sample"]:
        names = [s[prof["function"][fid]] for l in locs for fid in prof["location"][l]]
        yield names, vals


def site_of(names):
    for n in names:
        if n in SITES:
            return n
    return None


# ---- checks ------------------------------------------------------------------------------
def check_alloctop(truth_path, top_path, exit_only=False):
    truth = json.load(open(truth_path))
    objs = [json.loads(l) for l in open(top_path) if l.startswith("{")]
    check(len(objs) >= (1 if exit_only else 2), "alloctop printed %d JSON objects" % len(objs))
    final = objs[-1]
    check(final.get("final") is True, "last object is the final report")
    procs = [p for p in final["processes"] if p["pid"] == truth["pid"]]
    check(len(procs) == 1, "final report has the workload's pid %d" % truth["pid"])
    if not procs:
        return
    p = procs[0]
    for key in ("rss", "rss_anon", "mapped", "resident", "active", "fragmentation"):
        check(key in p, "process field %s present" % key)
    if all(k in p for k in ("rss", "rss_anon", "resident", "active", "fragmentation")):
        check(0 < p["rss_anon"] <= p["rss"], "anonymous RSS %d within RSS %d" % (p["rss_anon"], p["rss"]))
        cap = p["rss_anon"] or p["rss"]
        bound = min(p["resident"], cap) if cap else p["resident"]
        want = min(1.0, max(0.0, 1 - p["active"] / bound)) if bound else 0.0
        check(abs(p["fragmentation"] - want) < 1e-3,
              "fragmentation %.4f is 1 - active/min(resident, anonymous rss) = %.4f" % (p["fragmentation"], want))
    check(all(v == 0 for v in final["lost"].values()), "no lost events: %s" % final["lost"])
    by_tid = {t["tid"]: t for t in p["threads"]}
    for wt in truth["threads"]:
        t = by_tid.get(wt["tid"])
        check(t is not None, "thread %s (tid %d) reported" % (wt["name"], wt["tid"]))
        if not t:
            continue
        check(t["comm"] == wt["name"], "thread %d comm %r == %r" % (wt["tid"], t["comm"], wt["name"]))
        for k in ("alloc_bytes", "alloc_count", "free_bytes", "free_count"):
            check(within(t[k], wt[k], 0.05), "%s %s %d within 5%% of truth %d" % (wt["name"], k, t[k], wt[k]))
        check(t["large"] >= wt["large"], "%s large %d >= %d" % (wt["name"], t["large"], wt["large"]))
    heavy, light = (by_tid.get(w["tid"]) for w in truth["threads"])
    if heavy and light:
        tr = truth["threads"][0]["alloc_bytes"] / truth["threads"][1]["alloc_bytes"]
        check(within(heavy["alloc_bytes"] / light["alloc_bytes"], tr, 0.05),
              "heavy/light ratio %.2f vs truth %.2f" % (heavy["alloc_bytes"] / light["alloc_bytes"], tr))
    fails = sum(t["failures"] for t in p["threads"])
    check(fails == truth["failures"], "failures %d == %d" % (fails, truth["failures"]))
    if exit_only:
        return
    # Rates: some interval while the workers ran must show them allocating.
    saw_rate = any(t.get("alloc_bps", 0) > 0 for o in objs for pp in o["processes"] for t in pp["threads"]
                   if t["tid"] in (w["tid"] for w in truth["threads"]))
    check(saw_rate, "non-zero alloc rate seen for the workers")
    sites = {s["function"]: s for s in p.get("sites", [])}
    exp = expected_shares(truth)
    for s in SITES:
        got = sites.get(s, {}).get("share", 0.0)
        check(within(got, exp[s], 0.10), "alloctop site %s share %.3f vs %.3f (+-10%%)" % (s, got, exp[s]))


def check_allocsnoop(truth_path, snoop_path, folded_path, pprof_path):
    truth = json.load(open(truth_path))
    recs = [json.loads(l) for l in open(snoop_path) if l.startswith("{")]
    summ = [r for r in recs if r.get("type") == "summary"]
    check(len(summ) == 1, "one summary record")
    if summ:
        check(all(v == 0 for v in summ[0]["lost"].values()), "no lost events: %s" % summ[0]["lost"])
        check(summ[0]["events"]["alloc_failure"] == truth["failures"],
              "alloc_failure events %d == %d" % (summ[0]["events"]["alloc_failure"], truth["failures"]))
        check(summ[0]["events"]["large_alloc"] >= truth["large"], "large_alloc events >= %d" % truth["large"])
    exp = expected_shares(truth)
    sites = {r["function"]: r for r in recs if r.get("type") == "site" and r["pid"] == truth["pid"]}
    for s in SITES:
        got = sites.get(s, {}).get("share", 0.0)
        check(within(got, exp[s], 0.10), "allocsnoop site %s share %.3f vs %.3f (+-10%%)" % (s, got, exp[s]))
    # The leak: the top live stack goes through leak_site, with about the leaked bytes.
    live = [r for r in recs if r.get("type") == "live" and r["pid"] == truth["pid"]]
    check(len(live) >= 1, "live-bytes report present")
    if live:
        top = live[0]
        check("leak_site" in top["stack"] and "main" in top["stack"],
              "top live stack names leak_site and main: %s" % top["stack"][:6])
        check(within(top["bytes"], truth["leak_bytes"], 0.35),
              "leaked bytes %d ~ truth %d (+-35%%, sampled)" % (top["bytes"], truth["leak_bytes"]))
        # Sampled large leaks may show up as a second live stack: ignore stacks through large_leak_site.
        others = sum(r["bytes"] for r in live[1:] if "large_leak_site" not in r["stack"])
        check(others < 0.2 * truth["leak_bytes"], "little else reported live (%d bytes)" % others)
    if truth.get("large_leaks"):
        ll = [r for r in recs if r.get("type") == "live_large" and r["pid"] == truth["pid"]]
        check(len(ll) == 1, "one live large-block stack (got %d)" % len(ll))
        if ll:
            check(ll[0]["blocks"] == truth["large_leaks"] and ll[0]["bytes"] == truth["large_leak_bytes"],
                  "live large blocks exact: %d blocks %d bytes vs %d / %d" % (ll[0]["blocks"], ll[0]["bytes"],
                  truth["large_leaks"], truth["large_leak_bytes"]))
            check("large_leak_site" in ll[0]["stack"], "live large stack names large_leak_site: %s"
                  % ll[0]["stack"][:4])
    # Folded: "a;b;c N" lines; shares of the sites agree.
    tot, per = 0, {s: 0 for s in SITES}
    nlines = 0
    for line in open(folded_path):
        m = re.match(r"^(\S.*) (\d+)$", line.rstrip("\n"))
        check(m is not None, "folded line parses") if m is None else None
        if not m:
            continue
        nlines += 1
        frames = m.group(1).split(";")
        v = int(m.group(2))
        tot += v
        st = site_of(reversed(frames))
        if st:
            per[st] += v
    check(nlines > 0, "folded file has %d stacks" % nlines)
    for s in SITES:
        got = per[s] / tot if tot else 0
        check(within(got, exp[s], 0.10), "folded %s share %.3f vs %.3f" % (s, got, exp[s]))
    # pprof: parses, has the four sample types, agrees with the folded totals.
    try:
        prof = parse_pprof(pprof_path)
    except Exception as e:  # noqa: BLE001 - any parse error is a failure
        check(False, "pprof parses: %s" % e)
        return
    check(prof["types"] == ["alloc_objects", "alloc_space", "inuse_objects", "inuse_space"],
          "pprof sample types %s" % prof["types"])
    ptot, pper, leak_inuse = 0, {s: 0 for s in SITES}, 0
    for names, vals in pprof_stacks(prof):
        ptot += vals[1]
        st = site_of(names)
        if st:
            pper[st] += vals[1]
        if "leak_site" in names:
            leak_inuse += vals[3]
    check(abs(ptot - tot) <= max(1, tot * 0.001), "pprof alloc_space total %d == folded total %d" % (ptot, tot))
    for s in SITES:
        got = pper[s] / ptot if ptot else 0
        check(within(got, exp[s], 0.10), "pprof %s share %.3f vs %.3f" % (s, got, exp[s]))
    check(within(leak_inuse, truth["leak_bytes"], 0.35), "pprof inuse_space under leak_site %d ~ %d"
          % (leak_inuse, truth["leak_bytes"]))


def check_heap(truth_path, heap_path, folded_path, pprof_path):
    truth = json.load(open(truth_path))
    pid = truth["pid"]
    recs = [json.loads(l) for l in open(heap_path) if l.startswith("{")]
    heap = [r for r in recs if r.get("type") == "heap"]
    check(len(heap) == 1 and heap[0]["pid"] == pid, "one heap record for pid %d" % pid)
    if heap:
        check(heap[0]["dropped"] == 0 and heap[0]["stacks"] > 0, "stacks %d, none dropped" % heap[0]["stacks"])
    # What was allocated since the process started: the sites' shares of the sampled bytes.
    exp = expected_shares(truth)
    sites = {r["function"]: r for r in recs if r.get("type") == "site" and r["pid"] == pid}
    for s in SITES:
        got = sites.get(s, {}).get("share", 0.0)
        check(within(got, exp[s], 0.10), "site %s allocated share %.3f vs %.3f (+-10%%)" % (s, got, exp[s]))
    # The live heap: the leak (4 KiB blocks, sampled) and the large leaks (3 MiB blocks: each is
    # sampled for sure, its weight its size).  Nothing else of note is live.
    live = [r for r in recs if r.get("type") == "live" and r["pid"] == pid]
    leak = [r for r in live if "leak_site" in r["stack"] and "main" in r["stack"]]
    large = [r for r in live if "large_leak_site" in r["stack"]]
    check(len(leak) == 1, "one live stack through leak_site (got %d)" % len(leak))
    if leak:
        check(within(leak[0]["bytes"], truth["leak_bytes"], 0.25),
              "leaked bytes %d ~ truth %d (+-25%%, sampled)" % (leak[0]["bytes"], truth["leak_bytes"]))
    check(len(large) == 1, "one live stack through large_leak_site (got %d)" % len(large))
    if large:
        check(within(large[0]["bytes"], truth["large_leak_bytes"], 0.01),
              "large leaks %d ~ truth %d (+-1%%)" % (large[0]["bytes"], truth["large_leak_bytes"]))
    others = sum(r["bytes"] for r in live if r not in leak and r not in large)
    check(others < 0.2 * truth["leak_bytes"], "little else live (%d bytes)" % others)
    # Folded holds the live bytes: the leak's line carries the report's figure.
    tot, leak_folded = 0, 0
    for line in open(folded_path):
        m = re.match(r"^(\S.*) (\d+)$", line.rstrip("\n"))
        check(m is not None, "folded line parses: %r" % line) if m is None else None
        if not m:
            continue
        tot += int(m.group(2))
        if "leak_site" in m.group(1).split(";"):
            leak_folded += int(m.group(2))
    if leak:
        check(abs(leak_folded - leak[0]["bytes"]) <= 1, "folded live bytes under leak_site %d == %d"
              % (leak_folded, leak[0]["bytes"]))
    try:
        prof = parse_pprof(pprof_path)
    except Exception as e:  # noqa: BLE001 - any parse error is a failure
        check(False, "pprof parses: %s" % e)
        return
    inuse = sum(vals[3] for names, vals in pprof_stacks(prof))
    check(abs(inuse - tot) <= max(2, tot * 0.001), "pprof inuse_space %d == folded total %d" % (inuse, tot))
    pper = {s: 0 for s in SITES}
    ptot = 0
    for names, vals in pprof_stacks(prof):
        ptot += vals[1]
        st = site_of(names)
        if st:
            pper[st] += vals[1]
    for s in SITES:
        got = pper[s] / ptot if ptot else 0
        check(within(got, exp[s], 0.10), "pprof %s alloc_space share %.3f vs %.3f" % (s, got, exp[s]))


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    mode = sys.argv[1]
    if mode == "alloctop":
        check_alloctop(*sys.argv[2:4])
    elif mode == "alloctop-exit":
        check_alloctop(*sys.argv[2:4], exit_only=True)
    elif mode == "allocsnoop":
        check_allocsnoop(*sys.argv[2:6])
    elif mode == "heap":
        check_heap(*sys.argv[2:6])
    elif mode == "pprof":
        prof = parse_pprof(sys.argv[2])
        print("types", prof["types"], "samples", len(prof["sample"]), "locations", len(prof["location"]),
              "functions", len(prof["function"]))
    else:
        print(__doc__)
        return 2
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
