//! One module per subcommand: orchestration only (attach, wait, build the model, render, exit
//! status). Models and logic live in the library, rendering in `memleak::output`.
pub mod classify;
pub mod documentation;
pub mod kmemleak;
pub mod listen;
pub mod scan;
pub mod signals;
pub mod trace;
pub mod traced_command;
pub mod vm;
pub mod watch;

use anyhow::{Result, bail};

/// `--pid PID` names a live process, not one of its threads: the programs filter on the
/// thread-group id.
fn require_process(pid: u32) -> Result<()> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        bail!("--pid {pid}: no such process");
    }
    if let Some(tgid) = thread_group_of(pid)
        && tgid != pid
    {
        bail!(
            "--pid {pid} is a thread of process {tgid}; memleak follows whole processes: \
             use --pid {tgid}"
        );
    }
    Ok(())
}

/// The process (thread group) a task id belongs to, from /proc/ID/status.
fn thread_group_of(id: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{id}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Waits until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
