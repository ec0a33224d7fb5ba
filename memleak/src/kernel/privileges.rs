//! What the process must be allowed to do before it touches the kernel.
use anyhow::{Result, bail};

/// Loading tracing programs needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN) and reading real
/// addresses from /proc/kallsyms needs CAP_SYSLOG; root is the simple, honest requirement.
pub fn require_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "memleak must run as root (it loads eBPF programs and reads kernel addresses): run it with sudo"
        );
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so map creation does not
/// fail there. Newer kernels account through memory cgroups and ignore it.
pub fn lift_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
