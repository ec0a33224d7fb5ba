#!/bin/busybox sh
# /init of `memleak vm`'s guest: mounts what memleak needs, runs /vm/run.sh (the leak checks
# around loading the modules, the command and unloading them; see module_ci.rs) and sends every
# file of /results to the host on the second serial port (/dev/ttyS1), framed by "memleak-vm:"
# lines. The host judges; this script only collects.
/bin/busybox --install -s /bin
export PATH=/bin:/work
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
ip link set lo up 2>/dev/null
exec 3>/dev/ttyS1
stty -F /dev/ttyS1 raw
say() { echo "memleak-vm: $*" >&3; }

say "kernel $(uname -r)"
sh /vm/run.sh
dmesg >/results/dmesg
for name in $(ls /results); do
    say "begin $name"
    cat "/results/$name" >&3
    echo >&3
    say "end $name"
done
say done
exec 3>&-
# qemu runs with -no-reboot, so a reboot ends it; powering off would need ACPI in the kernel.
reboot -f
