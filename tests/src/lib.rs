//! Shared pieces of the end-to-end tests: finding the binaries, running the tracer as a user
//! would, and reading its JSON report into memleak's own report types (a field renamed or
//! removed there breaks these tests' build, or their parse, instead of reading as null).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use memleak::trace::report::{Entry, Report};
use serde::{Deserialize as _, de::DeserializeOwned};
use serde_json::Value;

/// Held by every end-to-end test for its whole run: tracers see the whole system, so one
/// test's fixture would show up in another test's report if they overlapped. (Cargo runs the
/// test binaries one after another; this orders the tests inside one binary.)
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that failed while holding the lock leaves nothing behind that others depend on.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The environment variable that skips the end-to-end and VM tests on purpose (`1`): without
/// it, running them as another user than root is a failure, not a silent pass.
pub const SKIP_VARIABLE: &str = "MEMLEAK_SKIP_E2E";

/// A 4-second JSON trace in each slab attach mode, with the `attach` its report must name:
/// BTF tracepoints (the default here), raw tracepoints and classic tracepoints.
pub const ATTACH_MODES: [(&[&str], &str); 3] = [
    (&["--duration", "4s", "--format", "json"], "tp_btf"),
    (
        &["--duration", "4s", "--format", "json", "--attach", "raw"],
        "raw_tp",
    ),
    (
        &[
            "--duration",
            "4s",
            "--format",
            "json",
            "--attach",
            "classic",
        ],
        "tracepoint",
    ),
];

/// Starts an end-to-end test: the lock that keeps end-to-end tests apart (see [`exclusive`]),
/// or `None`, after a `skipped:` line (see [`skip`]), when MEMLEAK_SKIP_E2E=1 asks to skip them.
/// Panics when not running as root without that variable: a test that loads no eBPF program
/// proves nothing and must not pass.
pub fn end_to_end() -> Option<MutexGuard<'static, ()>> {
    if skip_requested() {
        skip("MEMLEAK_SKIP_E2E=1");
        return None;
    }
    require_root("end-to-end tests load eBPF programs and read /proc");
    Some(exclusive())
}

/// Whether MEMLEAK_SKIP_E2E=1 asks to skip the tests that need root.
pub fn skip_requested() -> bool {
    std::env::var(SKIP_VARIABLE).is_ok_and(|value| value == "1")
}

/// Panics, saying how to skip on purpose, unless running as root.
pub fn require_root(why: &str) {
    assert!(
        is_root(),
        "this test needs root ({why}); run it as root (`./x test` uses sudo), or set \
         {SKIP_VARIABLE}=1 to skip it knowingly"
    );
}

/// Says that the current test is skipped, on a line of its own that `./x test` counts:
/// `skipped: TEST: REASON`. It goes straight to standard error, which the test harness does
/// not capture (it captures only `eprintln!`), so it shows for passing tests too.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = std::io::stderr().write_all(format!("\nskipped: {test}: {reason}\n").as_bytes());
}

/// The memleak binary of this workspace, built once per test run with the same profile.
pub fn memleak_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_memleak().map_err(|error| format!("{error:#}")))
        .clone()
        .map_err(|message| anyhow!(message))
}

fn build_memleak() -> Result<PathBuf> {
    let profile_dir = profile_dir()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--package", "memleak", "--bin", "memleak"]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().context("running cargo build for memleak")?;
    ensure!(status.success(), "cargo build -p memleak failed: {status}");
    let binary = profile_dir.join("memleak");
    ensure!(binary.exists(), "{} was not built", binary.display());
    Ok(binary)
}

/// The cache of a 64-byte System V message with its 48-byte header (112 bytes, the 128-byte
/// size class): load_msg allocates with GFP_KERNEL_ACCOUNT, from its own bucket set since Linux
/// 6.11, else from the accounted kmalloc caches (the plain ones when the kernel has no memcg
/// accounting, and so no such caches).
pub fn message_cache() -> &'static str {
    ["msg_msg-128", "kmalloc-cg-128"]
        .into_iter()
        .find(|cache| Path::new("/sys/kernel/slab").join(cache).exists())
        .unwrap_or("kmalloc-128")
}

/// `cargo xtask TASK`, with the release build of xtask that `./x test` already made; the task
/// prints its own progress and verdict.
pub fn xtask(task: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "xtask",
            "--",
            task,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .with_context(|| format!("running cargo xtask {task}"))?;
    ensure!(
        status.success(),
        "cargo xtask {task} failed ({status}); its output above says why"
    );
    Ok(())
}

/// A child process that is killed when the test lets go of it, pass or fail.
pub struct Guard(Option<Child>);

impl Guard {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("a guard holds its child until into_child")
    }

    /// Hands the child over: it is no longer killed on drop.
    pub fn into_child(mut self) -> Child {
        self.0
            .take()
            .expect("a guard holds its child until into_child")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `memleak trace ARGS` and waits until its programs are attached.
pub fn start_tracer(args: &[&str]) -> Result<(Guard, ChildStderr)> {
    start_attached("trace", args)
}

/// Starts `memleak SUBCOMMAND ARGS` (`trace`, `run`) and waits until its programs are attached.
pub fn start_attached(subcommand: &str, args: &[&str]) -> Result<(Guard, ChildStderr)> {
    let mut child = Command::new(memleak_binary()?)
        .arg(subcommand)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting memleak {subcommand}"))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut guard = Guard::new(child);
    let mut lines = BufReader::new(stderr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let read = lines
            .read_line(&mut line)
            .context("reading memleak's stderr")?;
        if read == 0 {
            let status = guard.child().wait()?;
            bail!("memleak exited ({status}) before attaching: {seen}");
        }
        if line.contains("attached") {
            return Ok((guard, lines.into_inner()));
        }
        seen.push_str(&line);
        ensure!(
            Instant::now() < deadline,
            "memleak did not attach within 60s: {seen}"
        );
    }
}

/// Starts `memleak trace TRACER_ARGS --top 100000`, then the fixture `WORKLOAD COUNT`; once the
/// fixture says `ready` or `done`, waits for the tracer's report. The fixture is still running
/// (holding what it allocated until its standard input closes) when this returns.
pub fn trace_around(tracer_args: &[&str], workload: &str, count: u64) -> Result<(Report, Guard)> {
    // Every site, not the default top 10: on a busy machine other sites can outgrow the
    // fixture's within the window.
    let mut args = tracer_args.to_vec();
    args.extend(["--top", "100000"]);
    let (tracer, _stderr) = start_tracer(&args)?;
    let (fixture, line) = start_fixture(workload, count)?;
    ensure!(line == "ready" || line == "done", "fixture said {line:?}");
    let report = finish_tracer(tracer)?;
    Ok((report, fixture))
}

/// Starts the fixture `WORKLOAD COUNT` (which holds what it allocated until its standard
/// input closes) and returns it with its first line, trimmed.
pub fn start_fixture(workload: &str, count: u64) -> Result<(Guard, String)> {
    let mut command = Command::new(fixture_binary()?);
    command.args([workload, &count.to_string()]);
    start_program(command)
}

/// Starts `command` with its standard input and output piped, and returns it with its first
/// line, trimmed.
pub fn start_program(mut command: Command) -> Result<(Guard, String)> {
    let mut fixture = Guard::new(
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?,
    );
    let stdout = fixture.child().stdout.take().context("fixture stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the fixture")?;
    Ok((fixture, line.trim().to_owned()))
}

/// The fixture program of this package, which cargo builds beside the integration tests.
pub fn fixture_binary() -> Result<PathBuf> {
    let binary = profile_dir()?.join("memleak-fixture");
    ensure!(binary.exists(), "{} was not built", binary.display());
    Ok(binary)
}

/// target/<profile>, from target/<profile>/deps/<test binary>.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    Ok(exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable is not under target/<profile>/deps")?
        .to_path_buf())
}

/// Waits for the tracer (or any memleak subcommand) to exit by itself and parses its JSON
/// report from stdout as `R`: a trace report, another subcommand's, or the untyped JSON.
pub fn finish_tracer<R: DeserializeOwned>(tracer: Guard) -> Result<R> {
    let output = tracer
        .into_child()
        .wait_with_output()
        .context("waiting for memleak")?;
    ensure!(
        output.status.success(),
        "memleak failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "reading memleak's JSON report as {}",
            std::any::type_name::<R>()
        )
    })
}

/// Entries of `report.stacks` any of whose frames' symbols contain `needle`.
pub fn entries_through<'a>(report: &'a Report, needle: &str) -> Vec<&'a Entry> {
    report
        .stacks
        .iter()
        .filter(|entry| {
            entry.frames.iter().any(|frame| {
                frame
                    .symbol
                    .as_deref()
                    .is_some_and(|symbol| symbol.contains(needle))
            })
        })
        .collect()
}

/// Names of the BPF programs loaded in the kernel right now.
pub fn loaded_program_names() -> Result<Vec<String>> {
    aya::programs::loaded_programs()
        .map(|info| {
            let info = info.context("listing loaded BPF programs")?;
            Ok(info.name_as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// memleak's programs loaded in the kernel now (by their names), whoever loaded them.
pub fn memleak_program_count() -> Result<usize> {
    Ok(loaded_program_names()?
        .iter()
        .filter(|name| {
            name.ends_with("_btf") || name.contains("_classic") || name.starts_with("kmem_cache_")
        })
        .count())
}

/// memleak's programs still loaded once the tracers of earlier tests are gone: their teardown is
/// asynchronous (RCU), so a count taken right after one exits can still include its programs.
/// Waits up to 10 s for none to be left and returns what is left then.
pub fn settled_program_count() -> Result<usize> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let count = memleak_program_count()?;
        if count == 0 || std::time::Instant::now() >= deadline {
            return Ok(count);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Waits up to 10 s for memleak's loaded programs to be back to `before` (program teardown
/// is asynchronous in the kernel: RCU); fails saying how many are left.
pub fn wait_for_programs_gone(before: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let after = memleak_program_count()?;
        if after <= before {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "programs still loaded after exit: {before} -> {after}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// What [`trace_churn_beside_held`] saw: the report, and the pid of the fixture that held
/// its eventfds through the whole window.
pub struct ChurnTrace {
    pub report: Report,
    /// The same report as memleak wrote it, for the checks of its layout that the typed
    /// report cannot make: it reads an optional field left out as `None`.
    pub json: Value,
    pub holder_pid: u32,
}

/// Starts `memleak trace --duration WINDOW --format json --top 100000`, then the fixture
/// `hold-eventfds HELD` and, once it is `ready`, the fixture `CHURN COUNT`, which must say `done`
/// at least two seconds before the window ends (it frees all it allocates before that). Waits
/// for the report, then lets the holder release its eventfds.
pub fn trace_churn_beside_held(
    window: Duration,
    held: u64,
    churn: &str,
    count: u64,
) -> Result<ChurnTrace> {
    let duration = format!("{}ms", window.as_millis());
    let (tracer, _stderr) = start_tracer(&[
        "--duration",
        &duration,
        "--format",
        "json",
        "--top",
        "100000",
    ])?;
    let started = Instant::now();
    let (mut holder, line) = start_fixture("hold-eventfds", held)?;
    let holder_pid = holder.child().id();
    ensure!(line == "ready", "holding fixture said {line:?}");
    let churned = Command::new(fixture_binary()?)
        .args([churn, &count.to_string()])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running the fixture {churn} {count}"))?;
    ensure!(
        churned.status.success() && String::from_utf8_lossy(&churned.stdout).trim() == "done",
        "{churn} {count} failed ({}): {}{}",
        churned.status,
        String::from_utf8_lossy(&churned.stdout),
        String::from_utf8_lossy(&churned.stderr)
    );
    let took = started.elapsed();
    ensure!(
        took + Duration::from_secs(2) <= window,
        "{churn} {count} took {took:?} of the {window:?} window: too close to its end for its \
         frees to be seen"
    );
    let json: Value = finish_tracer(tracer)?;
    drop(holder.child().stdin.take());
    holder.child().wait()?;
    let report = Report::deserialize(&json).context("reading memleak's JSON as a trace report")?;
    Ok(ChurnTrace {
        report,
        json,
        holder_pid,
    })
}

/// Entries of `report.stacks` allocated (in part) by processes named `comm`, each with the
/// most of its objects those processes can hold: its count less what the other processes
/// listed for it hold (an entry lists at most five processes, so a workload of many short
/// processes is mostly unlisted).
pub fn entries_of_comm<'a>(report: &'a Report, comm: &str) -> Vec<(&'a Entry, u64)> {
    report
        .stacks
        .iter()
        .filter_map(|entry| {
            let (mine, others): (Vec<_>, Vec<_>) = entry
                .processes
                .iter()
                .partition(|process| process.comm.as_deref() == Some(comm));
            if mine.is_empty() {
                return None;
            }
            let others: u64 = others.iter().map(|process| process.count).sum();
            Some((entry, entry.count.saturating_sub(others)))
        })
        .collect()
}

/// The objects and bytes that process `pid` holds in `entries`, from each entry's `processes`
/// (other processes may allocate through the same stacks while the test runs).
pub fn share_of<'a>(entries: impl IntoIterator<Item = &'a Entry>, pid: u64) -> (u64, u64) {
    entries
        .into_iter()
        .flat_map(|entry| &entry.processes)
        .filter(|process| u64::from(process.pid) == pid)
        .fold((0, 0), |(count, bytes), process| {
            (count + process.count, bytes + process.bytes)
        })
}

/// Entries of `report.stacks` of `kind` whose call site (the function that called the
/// allocator) is `symbol`.
pub fn entries_at<'a>(report: &'a Report, kind: &str, symbol: &str) -> Vec<&'a Entry> {
    report
        .stacks
        .iter()
        .filter(|entry| entry.kind == kind && entry.call_site.symbol.as_deref() == Some(symbol))
        .collect()
}

/// A fixture started as `wait-then-WORKLOAD COUNT`: it allocates nothing until [`Waiting::go`],
/// so a tracer filtering on its pid (or its name) can attach first.
pub struct Waiting {
    pub fixture: Guard,
    pub pid: u32,
}

impl Waiting {
    pub fn start(workload: &str, count: u64) -> Result<Self> {
        let mut fixture = Guard::new(
            Command::new(fixture_binary()?)
                .args([&format!("wait-then-{workload}"), &count.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the fixture")?,
        );
        let pid = fixture.child().id();
        Ok(Self { fixture, pid })
    }

    /// Tells the fixture to start and returns its first line (`ready` or `done`).
    pub fn go(&mut self) -> Result<String> {
        use std::io::Write as _;
        let stdin = self
            .fixture
            .child()
            .stdin
            .as_mut()
            .context("fixture stdin")?;
        writeln!(stdin, "go")?;
        stdin.flush()?;
        let stdout = self
            .fixture
            .child()
            .stdout
            .take()
            .context("fixture stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the fixture")?;
        Ok(line.trim().to_owned())
    }

    /// Closes the fixture's standard input (it frees what it holds) and waits for it.
    pub fn release(mut self) -> Result<()> {
        drop(self.fixture.child().stdin.take());
        let status = self.fixture.child().wait()?;
        ensure!(status.success(), "the fixture failed: {status}");
        Ok(())
    }
}

/// Traces, filtered on its pid for `window`, a fixture running `WORKLOAD COUNT` that frees all
/// it allocates, and returns the report. Filtered so that the counters are the fixture's
/// own: they prove the churn was seen and its frees matched, which no machine-wide counter can.
/// Also returns the fixture's pid.
pub fn trace_churning_fixture(workload: &str, count: u64, window: &str) -> Result<(Report, u32)> {
    let mut churn = Waiting::start(workload, count)?;
    let pid = churn.pid;
    let (tracer, _stderr) = start_tracer(&[
        "--duration",
        window,
        "--format",
        "json",
        "--top",
        "100000",
        "--pid",
        &pid.to_string(),
    ])?;
    let said = churn.go()?;
    ensure!(said == "done", "fixture said {said:?}");
    churn.release()?;
    Ok((finish_tracer(tracer)?, pid))
}

/// A port nobody listens on now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// GET `url` with curl; the body.
pub fn http_get(url: &str) -> Result<String> {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "5", url])
        .output()
        .context("running curl")?;
    ensure!(
        output.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `memleak-fixture watch-mix RATE SECONDS` (a leak of RATE eventfds a second beside a steady
/// pool and churn) watched by `memleak watch --listen` for `duration`, every second, all
/// objects traced.
pub struct ListeningWatch {
    pub workload: Guard,
    pub watch: Guard,
    /// Kept open to the end: a watch whose stderr is closed dies at its next line.
    pub stderr: BufReader<ChildStderr>,
    pub port: u16,
}

impl ListeningWatch {
    pub fn start(rate: u32, seconds: u32, duration: &str) -> Result<Self> {
        let mut workload = Guard::new(
            Command::new(fixture_binary()?)
                .args(["watch-mix", &rate.to_string(), &seconds.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .context("starting memleak-fixture watch-mix")?,
        );
        let stdout = workload
            .child()
            .stdout
            .take()
            .context("the fixture's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(line.trim() == "ready", "the fixture said `{}`", line.trim());

        let port = free_port()?;
        let mut watch = Guard::new(
            Command::new(memleak_binary()?)
                .args(["watch", "--pid", &workload.child().id().to_string()])
                .args(["--interval", "1s", "--sample-rate", "1", "--settle", "5s"])
                .args(["--duration", duration, "--no-history", "--format", "json"])
                .args(["--listen", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting memleak watch --listen")?,
        );
        let mut stderr = BufReader::new(watch.child().stderr.take().context("the watch's stderr")?);
        let mut said = String::new();
        stderr.read_line(&mut said)?;
        ensure!(
            said.contains(&format!("http://127.0.0.1:{port}")),
            "the watch said `{}`",
            said.trim()
        );
        Ok(Self {
            workload,
            watch,
            stderr,
            port,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// Where a file's first lock allocates its `struct file_lock_context`, and that cache's name:
/// SLUB merges it with caches of its size on most kernels (on 6.18 here: with
/// ftrace_event_field, damon_region and others).
pub const LOCK_CONTEXT_SITE: &str = "locks_get_lock_context";
pub const LOCK_CONTEXT_CACHE: &str = "file_lock_ctx";

/// That `shared`, the name the events gave the cache, and `others`, the names memleak listed
/// beside it, are every name /sys/kernel/slab gives `cache`'s cache.
pub fn ensure_every_name_of(cache: &str, shared: &str, others: &[String]) -> Result<()> {
    let mut names = others.to_vec();
    names.push(shared.to_owned());
    names.sort();
    let mut expected = merged_names(cache);
    expected.push(cache.to_owned());
    expected.sort();
    ensure!(
        names == expected,
        "memleak names every name of {cache}'s cache: {names:?}, sysfs {expected:?}"
    );
    Ok(())
}

/// The other names /sys/kernel/slab links to the directory of `cache`, read apart from memleak.
pub fn merged_names(cache: &str) -> Vec<String> {
    let root = Path::new("/sys/kernel/slab");
    let Ok(directory) = std::fs::read_link(root.join(cache)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            (name != cache && std::fs::read_link(entry.path()).ok()? == directory).then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// A directory named `name` and this process's id, for files whose inodes must stay: on tmpfs
/// when there is one (/dev/shm), where inodes are not reclaimed under memory pressure, else in
/// the temporary directory. Not created.
pub fn tmpfs_directory(name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    parent.join(format!("{name}-{}", std::process::id()))
}
