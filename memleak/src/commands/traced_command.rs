//! The command of `memleak run --user`, started under ptrace so that it is held at its first
//! instruction until the uprobes are attached, and again as it exits, while its mappings still
//! exist, so that its stacks can be symbolized after it is gone.
//!
//! Only the exit of the process COMMAND starts is waited on (its main thread, through exec):
//! its other threads run untraced and their allocations are recorded like the main thread's;
//! the processes it forks are not followed. Signals it receives are passed on unchanged.
use std::{
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Command, ExitStatus},
    sync::mpsc,
    thread,
};

use anyhow::{Context as _, Result, anyhow, bail};
use memleak::kernel::process::ProcessMaps;

/// What the command left when it exited.
pub struct Exited {
    pub status: ExitStatus,
    /// Its mappings as it exited (`None` if they could not be read then).
    pub maps: Option<ProcessMaps>,
}

pub struct TracedCommand {
    pub pid: u32,
    go: mpsc::Sender<bool>,
    tracer: thread::JoinHandle<Result<Exited>>,
}

impl TracedCommand {
    /// Starts `program`, stopped after its exec. Every ptrace request must come from the
    /// thread that started it, so one thread does all of them.
    pub fn start(program: &str, arguments: &[String]) -> Result<Self> {
        let (started_tx, started_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<bool>();
        let program = program.to_owned();
        let arguments = arguments.to_vec();
        let tracer = thread::spawn(move || -> Result<Exited> {
            let child = unsafe {
                Command::new(&program)
                    .args(&arguments)
                    .pre_exec(|| {
                        if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    })
                    .spawn()
            };
            let child = match child.with_context(|| format!("starting {program}")) {
                Ok(child) => child,
                Err(error) => {
                    let _ = started_tx.send(Err(error));
                    bail!("not started");
                }
            };
            let pid = child.id() as libc::pid_t;
            // The exec stops it with SIGTRAP before its first instruction.
            let status = wait(pid)?;
            if !libc::WIFSTOPPED(status) {
                let _ = started_tx.send(Err(anyhow!("{program} ended before it started")));
                bail!("not started");
            }
            let _ = started_tx.send(Ok(pid as u32));
            if !go_rx.recv().unwrap_or(false) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = wait(pid);
                bail!("not traced");
            }
            let options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC;
            ptrace(libc::PTRACE_SETOPTIONS, pid, options as usize)?;
            ptrace(libc::PTRACE_CONT, pid, 0)?;
            let mut maps = None;
            loop {
                let status = wait(pid)?;
                if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    return Ok(Exited {
                        status: ExitStatus::from_raw(status),
                        maps,
                    });
                }
                let event = status >> 16;
                let signal = if event == libc::PTRACE_EVENT_EXIT {
                    maps = ProcessMaps::read(pid as u32).ok();
                    0
                } else if event != 0 {
                    0
                } else {
                    libc::WSTOPSIG(status)
                };
                // Fails only if it was killed meanwhile; the next wait says so.
                let _ = ptrace(libc::PTRACE_CONT, pid, signal as usize);
            }
        });
        match started_rx.recv() {
            Ok(Ok(pid)) => Ok(Self { pid, go, tracer }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(tracer
                .join()
                .map_err(|_| anyhow!("the command's tracer thread panicked"))?
                .err()
                .unwrap_or_else(|| anyhow!("the command did not start"))),
        }
    }

    /// Lets the command run, and waits for it to exit.
    pub fn run(self) -> Result<Exited> {
        self.go
            .send(true)
            .map_err(|_| anyhow!("the command's tracer thread has ended"))?;
        self.tracer
            .join()
            .map_err(|_| anyhow!("the command's tracer thread panicked"))?
    }

    /// Kills the command before it has run an instruction.
    pub fn abandon(self) {
        let _ = self.go.send(false);
        let _ = self.tracer.join();
    }
}

fn wait(pid: libc::pid_t) -> Result<libc::c_int> {
    let mut status = 0;
    loop {
        if unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } == pid {
            return Ok(status);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error).context("waitpid");
        }
    }
}

/// The type of ptrace's request argument: glibc declares it unsigned, musl (the static build)
/// signed.
#[cfg(target_env = "musl")]
type Request = libc::c_int;
#[cfg(not(target_env = "musl"))]
type Request = libc::c_uint;

fn ptrace(request: Request, pid: libc::pid_t, data: usize) -> Result<()> {
    if unsafe { libc::ptrace(request, pid, 0, data) } == -1 {
        return Err(std::io::Error::last_os_error()).context("ptrace");
    }
    Ok(())
}
