//! A tracer running as a child process: started, awaited until it has attached, stopped with
//! SIGINT, and reaped with its resource usage.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How long a tracer may take to attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a tracer may take to exit after SIGINT, report included.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RunningTracer {
    name: String,
    pid: libc::pid_t,
    /// Collects the tracer's stdout and stderr until it exits.
    output: JoinHandle<String>,
}

pub struct TracerExit {
    /// From SIGINT to exit: for memleak, the time to detach and build the report.
    pub stop_time: Duration,
    pub max_rss_bytes: u64,
}

/// Starts `command` and returns once a line of its output (stdout or stderr) contains
/// `ready_marker`, plus `settle`.
pub fn start(mut command: Command, ready_marker: &str, settle: Duration) -> Result<RunningTracer> {
    let name = command.get_program().to_string_lossy().into_owned();
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let child = command
        .stdin(Stdio::null())
        .stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    // Close our copies of the pipe's write end, so the reader sees EOF when the tracer exits.
    drop(command);
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;

    let (ready_sender, ready) = mpsc::sync_channel(1);
    let ready_marker = ready_marker.to_owned();
    let output = std::thread::spawn(move || {
        let mut output = String::new();
        for line in BufReader::new(reader).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            if line.contains(&ready_marker) {
                let _ = ready_sender.try_send(());
            }
            output.push_str(&line);
            output.push('\n');
        }
        output
    });
    let tracer = RunningTracer { name, pid, output };
    match ready.recv_timeout(ATTACH_TIMEOUT) {
        Ok(()) => {
            std::thread::sleep(settle);
            Ok(tracer)
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let name = tracer.name.clone();
            let output = tracer.kill()?;
            bail!("{name} exited before attaching: {}", one_line(&output))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let name = tracer.name.clone();
            let output = tracer.kill()?;
            bail!(
                "{name} did not attach within {ATTACH_TIMEOUT:?}: {}",
                one_line(&output)
            )
        }
    }
}

impl RunningTracer {
    /// Sends SIGINT and waits for a successful exit (killing the tracer after `EXIT_TIMEOUT`).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub fn stop(self) -> Result<TracerExit> {
        let interrupted = Instant::now();
        unsafe { libc::kill(self.pid, libc::SIGINT) };
        let Some((status, usage)) = reap(self.pid, interrupted + EXIT_TIMEOUT)? else {
            let name = self.name.clone();
            self.kill()?;
            bail!("{name} did not exit within {EXIT_TIMEOUT:?} of SIGINT; killed it");
        };
        let stop_time = interrupted.elapsed();
        let output = self.output.join().unwrap_or_default();
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            bail!(
                "{} failed (wait status {status:#x}): {}",
                self.name,
                one_line(&output)
            );
        }
        Ok(TracerExit {
            stop_time,
            // Linux reports ru_maxrss in KiB.
            max_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        })
    }

    /// Kills and reaps the tracer, and returns what it printed.
    fn kill(self) -> Result<String> {
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid, Instant::now() + EXIT_TIMEOUT)?
            .with_context(|| format!("{} survived SIGKILL", self.name))?;
        Ok(self.output.join().unwrap_or_default())
    }
}

/// Waits for `pid` to exit until `deadline`; its wait status and resource usage, or `None`
/// if it is still running.
fn reap(pid: libc::pid_t, deadline: Instant) -> Result<Option<(libc::c_int, libc::rusage)>> {
    loop {
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        match unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) } {
            0 if Instant::now() >= deadline => return Ok(None),
            0 => std::thread::sleep(Duration::from_millis(2)),
            -1 => return Err(std::io::Error::last_os_error()).context("waiting for a tracer"),
            _ => return Ok(Some((status, usage))),
        }
    }
}

/// A tracer's output as one line, for an error message.
fn one_line(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    if lines.is_empty() {
        "(no output)".to_owned()
    } else {
        lines.join(" / ")
    }
}
