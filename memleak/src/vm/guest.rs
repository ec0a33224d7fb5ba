//! Boots the guest under qemu and reads what it sends back on its second serial port.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Every line of the guest's protocol starts with this (tests/vm/init.sh writes them).
const MARKER: &str = "memleak-vm: ";

pub struct Boot<'a> {
    /// An uncompressed vmlinux (booted through its PVH entry, at fixed addresses) or a
    /// bzImage (through the decompressor, with KASLR).
    pub kernel_image: &'a Path,
    pub initramfs: &'a Path,
    /// Appended to the kernel command line; `KEY=value` words become /init's environment.
    pub init_environment: &'a str,
    pub console_log: PathBuf,
    pub results_log: PathBuf,
    pub timeout: Duration,
}

impl Boot<'_> {
    /// Boots, waits for the guest to power off, and returns what /dev/ttyS1 received.
    pub fn run(&self) -> Result<GuestResults> {
        for log in [&self.console_log, &self.results_log] {
            if log.exists() {
                fs::remove_file(log).with_context(|| format!("removing {}", log.display()))?;
            }
        }
        let serial = |log: &Path| format!("file:{}", log.display());
        let mut qemu = Command::new("qemu-system-x86_64")
            // The host's /dev/kvm is paravirtual and stock kernels crash under it; TCG is slower
            // but runs any kernel. One host thread runs both vCPUs in turn: with a thread each,
            // a guest once died in CI executing a call site that attaching a tracepoint was
            // rewriting on the other vCPU (Debian's 6.12, RIP inside the `call` of
            // kmem_cache_free's tracepoint), where a real CPU's text_poke protocol is safe.
            .args([
                "-accel",
                "tcg,thread=single",
                "-cpu",
                "max",
                "-smp",
                "2",
                "-m",
                "1G",
            ])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(self.kernel_image)
            .arg("-initrd")
            .arg(self.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet {}",
                self.init_environment
            ))
            // ttyS0: the console, streamed to a log as it runs; ttyS1: the results.
            .arg("-serial")
            .arg(serial(&self.console_log))
            .arg("-serial")
            .arg(serial(&self.results_log))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(self.qemu_log())
                    .with_context(|| format!("creating {}", self.qemu_log().display()))?,
            )
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = qemu.try_wait().context("waiting for qemu")? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = qemu.kill();
                let _ = qemu.wait();
                bail!(
                    "the guest did not power off within {} s; the console ended with:\n{}",
                    self.timeout.as_secs(),
                    self.console_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        if !status.success() {
            let stderr = fs::read_to_string(self.qemu_log()).unwrap_or_default();
            bail!("qemu failed ({status}): {}", stderr.trim());
        }
        let sent = fs::read(&self.results_log)
            .with_context(|| format!("reading {}", self.results_log.display()))?;
        let results = GuestResults::parse(&String::from_utf8_lossy(&sent));
        if !results.done {
            bail!(
                "the guest stopped before sending all its results; the console ended with:\n{}",
                self.console_tail()
            );
        }
        Ok(results)
    }

    fn qemu_log(&self) -> PathBuf {
        self.console_log.with_file_name("qemu.log")
    }

    fn console_tail(&self) -> String {
        let console = fs::read(&self.console_log).unwrap_or_default();
        let console = String::from_utf8_lossy(&console);
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// What the guest sent: named files, framed by `begin NAME` / `end NAME` lines, then `done`.
#[derive(Debug, Default)]
pub struct GuestResults {
    pub files: BTreeMap<String, String>,
    pub done: bool,
}

impl GuestResults {
    /// A finished guest's results made of named files (recorded or built by tests).
    pub fn from_files<Name: ToString, Text: ToString>(
        files: impl IntoIterator<Item = (Name, Text)>,
    ) -> Self {
        Self {
            files: files
                .into_iter()
                .map(|(name, text)| (name.to_string(), text.to_string()))
                .collect(),
            done: true,
        }
    }

    pub fn parse(sent: &str) -> Self {
        let mut results = Self::default();
        let mut open: Option<(String, Vec<&str>)> = None;
        for line in sent.lines().map(|line| line.trim_end_matches('\r')) {
            let Some(message) = line.strip_prefix(MARKER) else {
                if let Some((_, lines)) = open.as_mut() {
                    lines.push(line);
                }
                continue;
            };
            if let Some(name) = message.strip_prefix("begin ") {
                open = Some((name.to_owned(), Vec::new()));
            } else if let Some(name) = message.strip_prefix("end ") {
                if let Some((open_name, lines)) = open.take()
                    && open_name == name
                {
                    let text = lines.join("\n").trim_end().to_owned();
                    results.files.insert(open_name, text);
                }
            } else if message == "done" {
                results.done = true;
            }
        }
        results
    }

    /// The file the guest sent under `name`.
    pub fn file(&self, name: &str) -> Result<&str> {
        self.files
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("the guest sent no {name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_framed_files_and_ignores_unframed_lines() {
        let sent = "noise\r\nmemleak-vm: begin a.status\r\n1\r\n\r\nmemleak-vm: end a.status\r\n\
                    memleak-vm: begin b.json\n{\n  \"x\": 1\n}\n\nmemleak-vm: end b.json\n\
                    memleak-vm: begin cut\npartial\n\
                    memleak-vm: done\n";
        let results = GuestResults::parse(sent);
        assert!(results.done);
        assert_eq!(results.file("a.status").unwrap(), "1");
        assert_eq!(results.file("b.json").unwrap(), "{\n  \"x\": 1\n}");
        // A file whose end never came is not trusted.
        assert!(results.file("cut").is_err());
    }

    #[test]
    fn a_guest_that_stopped_early_is_not_done() {
        let results = GuestResults::parse("memleak-vm: begin a\n1\nmemleak-vm: end a\n");
        assert!(!results.done);
        assert_eq!(results.file("a").unwrap(), "1");
    }
}
