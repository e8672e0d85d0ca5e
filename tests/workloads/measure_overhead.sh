#!/bin/bash
# Overhead of the tools on an allocation-heavy run of tools_workload: medians over N runs of
# the workload's own wall time (workers start..join) and CPU time (user+sys of the whole
# process: uprobe traps count as its sys time), plus the tool's own CPU.
# usage: measure_overhead.sh BUILD_DIR [runs] [MiB]   (as root)
B=${1:?build dir}; N=${2:-7}; M=${3:-2048}
T=$B/tools; LIB=$B/lib/liblumalloc.so
W="$T/tools_workload -m $M"
tmp=$(mktemp -d); trap 'rm -rf $tmp' EXIT
run() { # label, command...
    local label=$1; shift
    /usr/bin/time -f "%U %S" -o "$tmp/time" "$@" > /dev/null 2>&1
    python3 - "$tmp/t.json" "$tmp/time" >> "$tmp/$label" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
u, s = map(float, open(sys.argv[2]).read().split()[-2:])
# time(1) includes the waited-for workload: the tool's own CPU is the difference.
print(t["elapsed_ms"], t["cpu_ms"], max(0.0, (u + s) * 1e3 - t["cpu_ms"]), t.get("samples", 0))
PY
}
for i in $(seq "$N"); do
    run none env LD_PRELOAD=$LIB $W -o $tmp/t.json
    run alloctop "$T/alloctop/alloctop" -c "$W -o $tmp/t.json" --preload "$LIB" -b 1
    run alloctop_sites "$T/alloctop/alloctop" -c "$W -o $tmp/t.json" --preload "$LIB" --sites -b 1
    run allocsnoop "$T/allocsnoop/allocsnoop" -c "$W -o $tmp/t.json" --preload "$LIB" -q --folded $tmp/f
    run allocsnoop_U "$T/allocsnoop/allocsnoop" -c "$W -o $tmp/t.json" --preload "$LIB" -U
done
col() { awk -v c="$2" '{print $c}' "$tmp/$1" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
bw=$(col none 1); bc_=$(col none 2)
printf "%-13s %10s %8s %10s %8s %12s\n" run wall_ms Δwall cpu_ms Δcpu tool_cpu_ms
for l in none alloctop alloctop_sites allocsnoop allocsnoop_U; do
    w=$(col $l 1); c=$(col $l 2); tc=$(col $l 3)
    printf "%-13s %10.1f %+7.1f%% %10.1f %+7.1f%% %12.1f\n" $l "$w" "$(echo "($w/$bw-1)*100" | bc -l)" \
        "$c" "$(echo "($c/$bc_-1)*100" | bc -l)" "$tc"
done
