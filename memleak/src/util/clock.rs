//! The clocks memleak reads: the kernel's monotonic ones (the eBPF programs' timestamps) and
//! the wall clock (the watch's history).

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    now_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC as of the last tick, when jiffies last advanced.
pub fn monotonic_coarse_now_ns() -> u64 {
    now_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; both clocks exist on every Linux memleak runs on.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
