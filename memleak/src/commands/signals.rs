//! SIGINT and SIGTERM, for the commands that end their window early and still report.
use anyhow::{Context as _, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Handlers for SIGINT and SIGTERM, or none where they cannot be installed.
pub struct StopSignals {
    handlers: Option<(Signal, Signal)>,
}

impl StopSignals {
    /// tokio's signal handling needs a Unix socket pair and panics when it cannot make one
    /// (kernels built without CONFIG_UNIX). There the signals keep their default action, which
    /// ends memleak without a report, and a warning says so.
    pub fn install() -> Result<Self> {
        if let Err(error) = std::os::unix::net::UnixStream::pair() {
            eprintln!(
                "memleak: warning: no Unix sockets on this kernel ({error}): Ctrl-C and \
                 SIGTERM will end memleak without a report"
            );
            return Ok(Self { handlers: None });
        }
        let interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
        let terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
        Ok(Self {
            handlers: Some((interrupt, terminate)),
        })
    }

    /// The next SIGINT or SIGTERM to arrive; never resolves without handlers.
    pub async fn next(&mut self) -> libc::c_int {
        let Some((interrupt, terminate)) = &mut self.handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = interrupt.recv() => libc::SIGINT,
            _ = terminate.recv() => libc::SIGTERM,
        }
    }
}
