#!/bin/sh
# Records the /proc texts `memleak classify` samples, for its unit tests (run as root):
#   record.sh DIR SAMPLES
# writes DIR/meminfo.N, slabinfo.N, vmallocinfo.N, zoneinfo.N for N = 0..SAMPLES-1, one second apart,
# DIR/times (milliseconds since the first sample, one line per sample), and once
# DIR/reclaim_account and DIR/aliases (`NAME VALUE` and `NAME TARGET` for every entry of
# /sys/kernel/slab; TARGET is the merged cache a name links to, or the name itself).
# vmallocinfo's `unpurged vm_area` lines (freed areas not yet unmapped, which classify skips)
# are left out to keep the files small.
set -eu
dir=$1
samples=$2
mkdir -p "$dir"
for entry in /sys/kernel/slab/*; do
    name=${entry##*/}
    case $name in :*) continue ;; esac
    echo "$name $(cat "$entry/reclaim_account")"
done >"$dir/reclaim_account"
for entry in /sys/kernel/slab/*; do
    name=${entry##*/}
    case $name in :*) continue ;; esac
    target=$(readlink "$entry" || true)
    echo "$name ${target:-$name}" | sed 's| .*/| |'
done >"$dir/aliases"
start=$(date +%s%3N)
: >"$dir/times"
n=0
while [ "$n" -lt "$samples" ]; do
    echo $(($(date +%s%3N) - start)) >>"$dir/times"
    cat /proc/meminfo >"$dir/meminfo.$n"
    cat /proc/slabinfo >"$dir/slabinfo.$n"
    cat /proc/zoneinfo >"$dir/zoneinfo.$n"
    grep -v ' unpurged vm_area$' /proc/vmallocinfo >"$dir/vmallocinfo.$n"
    n=$((n + 1))
    if [ "$n" -lt "$samples" ]; then sleep 1; fi
done
