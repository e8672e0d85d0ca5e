#!/usr/bin/env bash
# redis-server under LD_PRELOAD=liblumalloc.so (Debian's redis calls malloc/free/realloc/
# malloc_usable_size, which the preload takes over from its libjemalloc) on 127.0.0.1 and a free
# non-default port: a known data set loaded through `redis-cli --pipe` (strings of 1 B to 300 KiB,
# lists, hashes), redis-benchmark (bounded -n, random keys, in another db), deletes and
# overwrites, a BGSAVE (fork of a loaded process) and DEBUG RELOAD (save + reload in process);
# after each step the data set's digest, computed by a Lua script inside redis, must equal the one
# computed here, and the whole run must give the same answers as with redis's own allocator (jemalloc).  The server must
# shut down cleanly (exit 0).  Usage: core_programs_redis.sh LIBLUMALLOC.so BUILD_DIR
set -euo pipefail
lib=$(realpath "$1")
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$work/redis.log" ] && tail -20 "$work/redis.log"; exit 1; }

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  [ "${CI:-}" = true ] && fail "redis-server/redis-benchmark missing (apt-get install redis-server redis-tools)"
  echo "SKIP: redis-server missing"; exit 0
fi

N=20000
# The data set, its RESP encoding for --pipe, and its digest as the Lua script below computes it.
python3 - "$work" $N <<'PY'
import hashlib, random, sys
work, n = sys.argv[1], int(sys.argv[2])
r = random.Random(42)
def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)
strings = {}
for i in range(1, n + 1):
    size = 300 * 1024 + i if i % 1000 == 0 else r.choice([1, 8, 24, 100, 700, 2000, r.randint(1, 5000)])
    strings[i] = bytes(r.choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(min(size, 64))) * (size // 64 + 1)
    strings[i] = strings[i][:size]
lists = {i: [b"e%d-%d" % (i, j) * (1 + j % 7) for j in range(100)] for i in range(1, 501)}
hashes = {i: {b"f%d" % j: b"v%d-%d" % (i, j) * (1 + j % 5) for j in range(50)} for i in range(1, 501)}
def digest(strings):
    parts = [strings.get(i, b"-") for i in range(1, n + 1)]
    parts += [b",".join(lists[i]) for i in range(1, 501)]
    parts += [b",".join(hashes[i][b"f%d" % j] for j in range(50)) for i in range(1, 501)]
    return hashlib.sha1(b"|".join(parts)).hexdigest()
with open(f"{work}/load.resp", "wb") as f:
    for i, v in strings.items():
        f.write(resp("SET", f"k:{i}", v))
    for i, l in lists.items():
        f.write(resp("RPUSH", f"l:{i}", *l))
    for i, h in hashes.items():
        f.write(resp("HSET", f"h:{i}", *[x for kv in h.items() for x in kv]))
with open(f"{work}/digest.loaded", "w") as f:
    f.write(digest(strings) + "\n")
# Second phase: delete every third key, overwrite every fifth with a new value.
with open(f"{work}/mutate.resp", "wb") as f:
    for i in range(1, n + 1):
        if i % 3 == 0:
            f.write(resp("DEL", f"k:{i}")); del strings[i]
        elif i % 5 == 0:
            strings[i] = b"new-%d-" % i * (1 + i % 300)
            f.write(resp("SET", f"k:{i}", strings[i]))
with open(f"{work}/digest.mutated", "w") as f:
    f.write(digest(strings) + "\n")
with open(f"{work}/dbsize.mutated", "w") as f:
    f.write(f"{len(strings) + 1000}\n")
PY

cat > "$work/digest.lua" <<'LUA'
local n = tonumber(ARGV[1])
local parts = {}
for i = 1, n do parts[#parts + 1] = redis.call('GET', 'k:' .. i) or '-' end
for i = 1, 500 do parts[#parts + 1] = table.concat(redis.call('LRANGE', 'l:' .. i, 0, -1), ',') end
for i = 1, 500 do
  local f = {}
  for j = 0, 49 do f[#f + 1] = redis.call('HGET', 'h:' .. i, 'f' .. j) end
  parts[#parts + 1] = table.concat(f, ',')
end
return redis.sha1hex(table.concat(parts, '|'))
LUA

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run() { # name, env...  -> $work/NAME.answers
  local name=$1; shift
  local port; port=$(free_port)
  local cli=(timeout 60 redis-cli -h 127.0.0.1 -p "$port")
  mkdir -p "$work/$name"
  env "$@" timeout -s KILL 200 redis-server --port "$port" --bind 127.0.0.1 --save "" \
    --appendonly no --dir "$work/$name" --dbfilename dump.rdb --enable-debug-command yes \
    --logfile "$work/redis.log" --daemonize no &
  pid=$!
  for _ in $(seq 100); do "${cli[@]}" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  "${cli[@]}" ping | grep -q PONG || fail "$name: redis-server did not start"
  local out="$work/$name.answers"
  : > "$out"
  digest() { "${cli[@]}" --eval "$work/digest.lua" , $N; }

  "${cli[@]}" --pipe < "$work/load.resp" > "$work/$name.pipe" 2>&1 || fail "$name: load"
  grep -q "errors: 0, replies: $((N + 1000))" "$work/$name.pipe" || { cat "$work/$name.pipe"; fail "$name: load replies"; }
  [ "$(digest)" = "$(cat "$work/digest.loaded")" ] || fail "$name: digest after load"
  echo "dbsize loaded $("${cli[@]}" dbsize)" >> "$out"

  timeout 120 redis-benchmark -h 127.0.0.1 -p "$port" --dbnum 1 -n 15000 -c 20 -r 5000 -d 200 -q \
    -t set,get,incr,lpush,lpop,sadd,hset,spop,zadd,lrange_100,mset > "$work/$name.bench" 2>&1 \
    || { cat "$work/$name.bench"; fail "$name: redis-benchmark"; }
  [ "$(digest)" = "$(cat "$work/digest.loaded")" ] || fail "$name: digest after the benchmark"

  "${cli[@]}" --pipe < "$work/mutate.resp" > "$work/$name.pipe2" 2>&1 || fail "$name: mutate"
  grep -q "errors: 0" "$work/$name.pipe2" || { cat "$work/$name.pipe2"; fail "$name: mutate replies"; }
  [ "$(digest)" = "$(cat "$work/digest.mutated")" ] || fail "$name: digest after deletes and overwrites"
  [ "$("${cli[@]}" dbsize)" = "$(cat "$work/dbsize.mutated")" ] || fail "$name: dbsize after mutation"
  echo "dbsize mutated $("${cli[@]}" dbsize)" >> "$out"
  for k in 1 2 4 5 7 1000 2000 4999 10000 19999; do
    echo "get k:$k $("${cli[@]}" get "k:$k" | sha1sum)" >> "$out"
  done
  echo "lrange l:17 $("${cli[@]}" lrange l:17 0 -1 | sha1sum)" >> "$out"
  echo "hgetall-sorted h:33 $("${cli[@]}" hgetall h:33 | paste - - | sort | sha1sum)" >> "$out"

  # fork a loaded process (BGSAVE), then save and reload the data set in process
  "${cli[@]}" bgsave | grep -q "Background saving started" || fail "$name: bgsave"
  for _ in $(seq 300); do
    "${cli[@]}" info persistence | grep -q "rdb_bgsave_in_progress:0" && break; sleep 0.1
  done
  "${cli[@]}" info persistence | grep -q "rdb_last_bgsave_status:ok" || fail "$name: bgsave status"
  "${cli[@]}" debug reload | grep -q OK || fail "$name: debug reload"
  [ "$(digest)" = "$(cat "$work/digest.mutated")" ] || fail "$name: digest after reload"
  "${cli[@]}" -n 1 flushdb | grep -q OK || fail "$name: flushdb 1"
  "${cli[@]}" memory doctor > /dev/null
  "${cli[@]}" info memory | grep '^used_memory_human' | sed "s/^/$name /"

  "${cli[@]}" shutdown nosave 2>/dev/null || true
  local rc=0; wait "$pid" || rc=$?; pid=
  [ "$rc" = 0 ] || fail "$name: redis-server exited with $rc"
  grep -q "ready to exit" "$work/redis.log" || fail "$name: no clean shutdown in the log"
  rm -f "$work/redis.log"
  echo "ok: $name ($(tr '\n' ' ' < "$work/$name.bench" | grep -o '[A-Z_0-9]*: [0-9.]* requests' | head -3 | tr '\n' ' ')...)"
}

start=$(date +%s)
run default LUMALLOC_UNUSED=1   # Debian links redis with libjemalloc
run lumalloc LD_PRELOAD="$lib"
cmp -s "$work/default.answers" "$work/lumalloc.answers" || { diff "$work/default.answers" "$work/lumalloc.answers" || true; fail "answers differ"; }
echo "redis: same answers under its own allocator (jemalloc) and lumalloc in $(( $(date +%s) - start )) s"
