//! Workloads whose kernel allocations are known in advance.
//!
//! `hold-eventfds N`: creates N eventfds (each kmallocs one `struct eventfd_ctx` in
//! do_eventfd), prints `ready`, and holds them until standard input reaches EOF.
//! `churn-eventfds N`: creates and closes N eventfds, one at a time, then prints `done`.
use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
};

fn eventfd() -> std::io::Result<libc::c_int> {
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn raise_fd_limit(needed: u64) {
    let limit = libc::rlimit {
        rlim_cur: needed + 64,
        rlim_max: needed + 64,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

fn run(args: &[String]) -> Result<(), String> {
    let [command, count] = args else {
        return Err("usage: memleak-fixture hold-eventfds|churn-eventfds N".into());
    };
    let count: u64 = count.parse().map_err(|_| format!("bad count `{count}`"))?;
    match command.as_str() {
        "hold-eventfds" => {
            raise_fd_limit(count);
            let fds = (0..count)
                .map(|_| eventfd())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| format!("eventfd: {error}"))?;
            say("ready");
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            for fd in fds {
                unsafe { libc::close(fd) };
            }
            Ok(())
        }
        "churn-eventfds" => {
            for _ in 0..count {
                let fd = eventfd().map_err(|error| format!("eventfd: {error}"))?;
                unsafe { libc::close(fd) };
            }
            say("done");
            Ok(())
        }
        other => Err(format!("unknown workload `{other}`")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("memleak-fixture: {message}");
            ExitCode::FAILURE
        }
    }
}
