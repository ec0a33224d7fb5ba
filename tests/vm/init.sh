#!/bin/busybox sh
# /init of the guests that `cargo xtask vm-test` boots: it loads tests/kmod/leaky under two
# memleak tracers at once (and asks kmemleak, where the kernel has it) and sends their exit
# statuses and reports to the host on the second serial port (/dev/ttyS1), framed by
# "memleak-vm:" lines. The host judges; this script only collects. LEAKY_N (objects per kind)
# comes from the kernel command line.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
# memleak run --cache scans over loopback TCP where the kernel has networking.
ip link set lo up 2>/dev/null
mkdir -p /results
exec 3>/dev/ttyS1
stty -F /dev/ttyS1 raw

say() { echo "memleak-vm: $*" >&3; }
send() {
    say "begin $1"
    cat "/results/$1" >&3 2>/dev/null
    echo >&3
    say "end $1"
}

say "kernel $(uname -r)"
# The module loads once per boot, so both checks trace the same load: the outer run is scoped to
# the clean function (it must pass: exit 0), the inner one to the module (it must fail: exit 1).
memleak run --fail-on-leak --function clean_alloc --grace 1s --top 1000000 --format json \
    --output /results/clean.json -- \
    sh -c 'memleak run --fail-on-leak --module leaky --grace 1s --top 1000000 --format json \
               --output /results/leaky.json --junit /results/leaky.xml \
               -- insmod /leaky.ko n="$LEAKY_N" 2>/results/leaky.stderr
           echo $? >/results/leaky.status' \
    2>/results/clean.stderr
echo $? >/results/clean.status

# With the module's leaked objects still in leaky_cache: the content scan of that cache (it needs
# kernel BTF; without, memleak must refuse in one line) and a short classify.
memleak scan --cache leaky_cache --format json --output /results/scan.json 2>/results/scan.stderr
echo $? >/results/scan.status
memleak classify --duration 2s --interval 1s --format json --output /results/classify.json \
    2>/results/classify.stderr
echo $? >/results/classify.status
files_scan="scan.status scan.json scan.stderr classify.status classify.json classify.stderr"

# The host reads which fields the classic event has: on Linux 6.1 it does not name the cache.
cp /sys/kernel/tracing/events/kmem/kmem_cache_alloc/format /results/kmem_cache_alloc.format
files="kmem_cache_alloc.format leaky.status leaky.json leaky.xml leaky.stderr clean.status"
files="$files clean.json clean.stderr $files_scan"
# Whether the guest has kernel BTF: where it does, the host requires memleak to have read the
# module's cache name from kernel memory (it cannot take memleak's note that it could not).
if [ -e /sys/kernel/btf/vmlinux ]; then echo yes; else echo no; fi >/results/btf
files="$files btf"
# Whether /proc/timer_list prints the jiffies count (CONFIG_TICK_ONESHOT): where it does, the
# host requires memleak to have timed allocations in jiffies (the kmemleak kernel's does not).
if grep -q '^jiffies:' /proc/timer_list 2>/dev/null; then echo yes; else echo no; fi \
    >/results/timer_list_jiffies
files="$files timer_list_jiffies"

# Free-path churn (CHURN from the kernel command line: NAME:CYCLES,...): workloads that free all
# they allocate through kfree_rcu and bulk frees. memleak follows those frees with fentry, which
# needs kernel BTF; the host requires that none of them is reported.
if [ -e /sys/kernel/btf/vmlinux ]; then
    for workload in $(echo "$CHURN" | tr , ' '); do
        name=${workload%%:*}
        memleak run --grace 2s --top 1000000 --format json --output "/results/churn-$name.json" \
            -- memleak-fixture "churn-$name" "${workload#*:}" \
            >/dev/null 2>"/results/churn-$name.stderr"
        echo $? >"/results/churn-$name.status"
        files="$files churn-$name.status churn-$name.json churn-$name.stderr"
    done
else
    echo "no kernel BTF (/sys/kernel/btf/vmlinux)" >/results/churn.skipped
    files="$files churn.skipped"
fi

# A kernel with kmemleak: its verdict on the same load, for the host to compare. kmemleak
# reports objects only once they are 5 s old.
if [ -e /sys/kernel/debug/kmemleak ]; then
    sleep 5
    memleak kmemleak --format json --top 1000 --output /results/kmemleak.json \
        2>/results/kmemleak.stderr
    echo $? >/results/kmemleak.status
    files="$files kmemleak.status kmemleak.json kmemleak.stderr"
fi

for file in $files; do
    send "$file"
done
dmesg >/results/dmesg
send dmesg
say done
exec 3>&-
# qemu runs with -no-reboot, so a reboot ends it; powering off would need ACPI in the kernel.
reboot -f
