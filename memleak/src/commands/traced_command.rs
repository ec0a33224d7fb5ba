//! The command of `memleak run --user`, started under ptrace so that it is held at its first
//! instruction until the uprobes are attached, and again as it exits, while its mappings still
//! exist, so that its stacks can be symbolized after it is gone.
//!
//! The processes it forks are held at their first instruction too: with `--follow-forks` each
//! is added to the followed processes before it runs (and forgotten when it exits or exec
//! replaces its program, whose heap is then another program's), otherwise it is let go and
//! counted. Threads run untraced: the hooks see every thread of a followed process. Signals
//! are passed on unchanged.
use std::{
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Command, ExitStatus},
    sync::mpsc,
    thread,
};

use anyhow::{Context as _, Result, anyhow, bail};
use hashbrown::HashSet;
use memleak::{bpf::uprobes::FollowedProcesses, kernel::process::ProcessMaps};

/// What the command left when it exited.
pub struct Exited {
    pub status: ExitStatus,
    /// Its mappings as it exited (`None` if they could not be read then).
    pub maps: Option<ProcessMaps>,
    pub forks: Forks,
}

/// What the tracer thread is told once the hooks are attached, or could not be.
enum Go {
    Run(Option<FollowedProcesses>),
    Kill,
}

/// The processes the command and its followed children forked.
#[derive(Debug, Default)]
pub struct Forks {
    /// Forked while not followed (without `--follow-forks`, or the map was full): let go.
    pub not_followed: u64,
    /// Followed from their first instruction.
    pub followed: u64,
    /// Followed processes whose program exec replaced: their blocks from before are gone
    /// with their old program, and what they ran after is not followed.
    pub replaced: HashSet<u32>,
    /// Followed processes still running when the command exited.
    pub still_running: u64,
    /// The command itself exec'ed after it had forked: its children's frames are named from
    /// the mappings of its last program.
    pub command_replaced_after_fork: bool,
}

pub struct TracedCommand {
    pub pid: u32,
    go: mpsc::Sender<Go>,
    exited: mpsc::Receiver<Exited>,
    /// Ends once no process it traces is left, which may be after the command's exit.
    tracer: thread::JoinHandle<Result<()>>,
}

impl TracedCommand {
    /// Starts `program`, stopped after its exec. Every ptrace request must come from the
    /// thread that started it, so one thread does all of them.
    pub fn start(program: &str, arguments: &[String]) -> Result<Self> {
        let (started_tx, started_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<Go>();
        let (exited_tx, exited) = mpsc::channel();
        let program = program.to_owned();
        let arguments = arguments.to_vec();
        let tracer = thread::spawn(move || -> Result<()> {
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
            let Ok(Go::Run(followed)) = go_rx.recv() else {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = wait(pid);
                bail!("not traced");
            };
            // Forked children inherit these options, so theirs are held and followed too.
            let options = libc::PTRACE_O_TRACEEXIT
                | libc::PTRACE_O_TRACEEXEC
                | libc::PTRACE_O_TRACEFORK
                | libc::PTRACE_O_TRACEVFORK;
            ptrace(libc::PTRACE_SETOPTIONS, pid, options as usize)?;
            ptrace(libc::PTRACE_CONT, pid, 0)?;
            follow(pid, followed, &exited_tx)
        });
        match started_rx.recv() {
            Ok(Ok(pid)) => Ok(Self {
                pid,
                go,
                exited,
                tracer,
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(tracer
                .join()
                .map_err(|_| anyhow!("the command's tracer thread panicked"))?
                .err()
                .unwrap_or_else(|| anyhow!("the command did not start"))),
        }
    }

    /// Lets the command run, and waits for it to exit. With `followed`, the processes it forks
    /// are followed too.
    pub fn run(self, followed: Option<FollowedProcesses>) -> Result<Exited> {
        self.go
            .send(Go::Run(followed))
            .map_err(|_| anyhow!("the command's tracer thread has ended"))?;
        match self.exited.recv() {
            // The thread goes on, for the children still running.
            Ok(exited) => Ok(exited),
            Err(_) => Err(self
                .tracer
                .join()
                .map_err(|_| anyhow!("the command's tracer thread panicked"))?
                .err()
                .unwrap_or_else(|| anyhow!("the command's tracer thread ended before it"))),
        }
    }

    /// Kills the command before it has run an instruction.
    pub fn abandon(self) {
        let _ = self.go.send(Go::Kill);
        let _ = self.tracer.join();
    }
}

/// Runs the command and the children it forks, and sends what the command left when it
/// exits. Its children still running then stay followed, and this goes on until none is
/// left: a child whose first stop (its SIGSTOP) were left unanswered when this thread ended
/// would take that SIGSTOP once the kernel detached it, and stay stopped. This thread is the
/// only one of memleak's to wait for child processes while it runs.
fn follow(
    command: libc::pid_t,
    mut followed: Option<FollowedProcesses>,
    exited: &mpsc::Sender<Exited>,
) -> Result<()> {
    let mut maps = None;
    let mut forks = Forks::default();
    let mut command_exited = false;
    // Followed children that have passed their first stop and not exited.
    let mut children: HashSet<libc::pid_t> = HashSet::new();
    loop {
        let (pid, status) = match wait_any() {
            Ok(waited) => waited,
            // No process left to trace.
            Err(_) if command_exited => return Ok(()),
            Err(error) => return Err(error),
        };
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            if pid == command {
                command_exited = true;
                forks.still_running = children.len() as u64;
                let _ = exited.send(Exited {
                    status: ExitStatus::from_raw(status),
                    maps: maps.take(),
                    forks: std::mem::take(&mut forks),
                });
                continue;
            }
            if children.remove(&pid)
                && let Some(followed) = &mut followed
            {
                followed.forget(pid as u32);
            }
            continue;
        }
        let signal = match status >> 16 {
            libc::PTRACE_EVENT_EXIT if pid == command => {
                maps = ProcessMaps::read(pid as u32).ok();
                0
            }
            libc::PTRACE_EVENT_EXEC if pid == command => {
                forks.command_replaced_after_fork |= forks.followed > 0;
                0
            }
            libc::PTRACE_EVENT_EXEC => {
                // Its heap went with its old program; the new one is not followed.
                if let Some(followed) = &mut followed {
                    followed.forget(pid as u32);
                }
                children.remove(&pid);
                forks.replaced.insert(pid as u32);
                let _ = ptrace(libc::PTRACE_DETACH, pid, 0);
                continue;
            }
            0 if pid != command && !children.contains(&pid) => {
                // A forked child's first stop (its SIGSTOP), before its first instruction.
                let held = followed
                    .as_mut()
                    .is_some_and(|followed| followed.follow(pid as u32).is_ok());
                if !held {
                    forks.not_followed += 1;
                    let _ = ptrace(libc::PTRACE_DETACH, pid, 0);
                    continue;
                }
                forks.followed += 1;
                children.insert(pid);
                0
            }
            0 => libc::WSTOPSIG(status),
            // Fork events: the child's own first stop handles it.
            _ => 0,
        };
        // Fails only if it was killed meanwhile; the next wait says so.
        let _ = ptrace(libc::PTRACE_CONT, pid, signal as usize);
    }
}

/// The next tracee to change state, with its status.
fn wait_any() -> Result<(libc::pid_t, libc::c_int)> {
    let mut status = 0;
    loop {
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if pid > 0 {
            return Ok((pid, status));
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error).context("waitpid");
        }
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
