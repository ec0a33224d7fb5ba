//! End-to-end: what memleak promises when things go wrong. `kill -9` of a trace or a run leaves
//! no program in the kernel (the watch's is in watch.rs); a command killed by a signal gives the
//! status a shell reports, with the report still written; three traces at once each count the
//! same held objects exactly; a full disk is a one-line error and leaves no partial report; the
//! report file holds the whole report or the previous one whenever memleak is stopped.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, ensure};
use memleak::trace::report::Report;
use memleak_tests::{
    end_to_end, entries_at, finish_tracer, memleak_binary, memleak_program_count,
    settled_program_count, share_of, start_attached, start_fixture, start_tracer,
    wait_for_programs_gone,
};

/// Eventfds the fixture holds.
const HELD: u64 = 300;

#[test]
fn kill_9_of_a_trace_or_a_run_leaves_no_program_behind() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    for command in [&["trace"][..], &["run", "--", "sleep", "30"]] {
        let before = settled_program_count()?;
        let (mut tracer, _stderr) = if command[0] == "trace" {
            start_tracer(&["--duration", "60s"])?
        } else {
            start_attached("run", &command[1..])?
        };
        let during = memleak_program_count()?;
        ensure!(
            during >= before + 4,
            "{command:?}: programs not visible while tracing: {before} -> {during}"
        );
        tracer.child().kill().context("kill -9")?;
        tracer.child().wait().context("reaping memleak")?;
        wait_for_programs_gone(before).with_context(|| format!("after kill -9 of {command:?}"))?;
    }
    Ok(())
}

#[test]
fn a_command_killed_by_a_signal_gives_the_shells_status_and_a_report() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let output = Command::new(memleak_binary()?)
        .args(["run", "--grace", "0s", "--format", "json", "--"])
        .args(["sh", "-c", "kill -9 $$"])
        .stdin(Stdio::null())
        .output()
        .context("running memleak run")?;
    // A shell reports a command killed by signal N as 128 + N.
    ensure!(
        output.status.code() == Some(128 + libc::SIGKILL),
        "memleak run exited {} for a command killed by SIGKILL, expected {}; stderr: {}",
        output.status,
        128 + libc::SIGKILL,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Report =
        serde_json::from_slice(&output.stdout).context("reading the run's JSON report")?;
    ensure!(
        report.stats.counters.allocs > 0,
        "the report of the killed command's run saw no allocation: {:?}",
        report.stats.counters
    );
    Ok(())
}

#[test]
fn three_traces_at_once_each_count_the_held_objects_exactly() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let before = settled_program_count()?;
    let mut tracers = Vec::new();
    for _ in 0..3 {
        let (tracer, _stderr) =
            start_tracer(&["--duration", "6s", "--format", "json", "--top", "100000"])?;
        tracers.push(tracer);
    }
    let (fixture, line) = start_fixture("hold-eventfds", HELD)?;
    ensure!(line == "ready", "fixture said {line:?}");
    let mut fixture = fixture;
    let pid = u64::from(fixture.child().id());
    let reports: Vec<Report> = tracers
        .into_iter()
        .map(finish_tracer)
        .collect::<Result<_>>()?;
    for (index, report) in reports.iter().enumerate() {
        // Each tracer has its own table: each sees every eventfd the fixture holds, once.
        let (count, _) = share_of(entries_at(report, "kmalloc", "do_eventfd"), pid);
        ensure!(
            count == HELD,
            "trace {} of 3 counted {count} eventfd contexts held by the fixture, expected {HELD}",
            index + 1
        );
    }
    drop(fixture.child().stdin.take());
    fixture.child().wait()?;
    wait_for_programs_gone(before)
}

/// A tmpfs of `bytes` mounted on a fresh directory, unmounted when dropped.
struct TinyDisk(std::path::PathBuf);

impl TinyDisk {
    fn mount(name: &str, bytes: u64) -> Result<Self> {
        let directory = std::env::temp_dir().join(format!("memleak-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&directory)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&directory)
            .status()
            .context("running mount")?;
        ensure!(status.success(), "mounting a tmpfs failed ({status})");
        Ok(Self(directory))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs memleak with ARGS and returns its status and standard error.
fn memleak_fails(args: &[&str], output: &std::path::Path) -> Result<(Option<i32>, String)> {
    let result = Command::new(memleak_binary()?)
        .args(args)
        .arg("--output")
        .arg(output)
        .stdin(Stdio::null())
        .output()
        .context("running memleak")?;
    Ok((
        result.status.code(),
        String::from_utf8_lossy(&result.stderr).into_owned(),
    ))
}

#[test]
fn a_full_disk_is_a_one_line_error_and_leaves_no_partial_report() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    // A trace's JSON report of every site is larger than 4 KiB: no whole report fits, and none
    // may stay behind.
    let disk = TinyDisk::mount("full-trace", 4096)?;
    let report = disk.0.join("report.json");
    let (status, stderr) = memleak_fails(
        &[
            "trace",
            "--duration",
            "2s",
            "--format",
            "json",
            "--top",
            "100000",
        ],
        &report,
    )?;
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error"))
        .collect();
    ensure!(
        status == Some(2)
            && errors.len() == 1
            && errors[0].contains("No space left on device")
            && !report.exists(),
        "trace onto a full disk: status {status:?}, stderr {stderr}, report left: {}",
        report.exists()
    );
    drop(disk);

    // The watch appends one JSON line per interval: the lines that fit stay, whole, and the
    // one that did not is cut away.
    let disk = TinyDisk::mount("full-watch", 4096)?;
    let lines = disk.0.join("watch.json");
    let (status, stderr) = memleak_fails(
        &[
            "watch",
            "--interval",
            "1s",
            "--duration",
            "30s",
            "--no-history",
            "--format",
            "json",
        ],
        &lines,
    )?;
    ensure!(
        status == Some(2) && stderr.contains("No space left on device"),
        "watch onto a full disk: status {status:?}, stderr {stderr}"
    );
    let text = std::fs::read_to_string(&lines).context("reading the watch's lines")?;
    ensure!(
        !text.is_empty() && text.ends_with('\n'),
        "the watch's file must hold whole lines only: {} bytes ending {:?}",
        text.len(),
        text.chars().rev().take(20).collect::<String>()
    );
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .with_context(|| format!("a line the watch left: {line}"))?;
    }
    Ok(())
}

/// The names in `directory`, sorted.
fn names_in(directory: &std::path::Path) -> Result<Vec<String>> {
    let mut names = std::fs::read_dir(directory)
        .with_context(|| format!("listing {}", directory.display()))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

fn signal(tracer: &mut memleak_tests::Guard, signal: libc::c_int) {
    unsafe { libc::kill(tracer.child().id() as libc::pid_t, signal) };
}

/// A trace's report file holds the whole report or what it held before, whenever memleak is
/// stopped: more SIGTERMs while the report is being made do not cut it short, and SIGKILL at
/// any point of it leaves the previous content, with nothing beside it.
#[test]
fn signals_while_the_report_is_made_leave_the_whole_report_or_the_one_before() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory = std::env::temp_dir().join(format!("memleak-signals-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory)?;
    let path = directory.join("report.json");
    let path_text = path.to_string_lossy().into_owned();
    let args = [
        "--format", "json", "--top", "100000", "--output", &path_text,
    ];
    const PREVIOUS: &str = "the previous report\n";
    let before = settled_program_count()?;

    // SIGTERM ends the window; the ones that follow, every 10 ms until memleak exits, land
    // while the report is made.
    std::fs::write(&path, PREVIOUS)?;
    let (mut tracer, _stderr) = start_tracer(&args)?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    signal(&mut tracer, libc::SIGTERM);
    let mut later = 0;
    let status = loop {
        if let Some(status) = tracer.child().try_wait()? {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        signal(&mut tracer, libc::SIGTERM);
        later += 1;
    };
    ensure!(
        status.success() && later >= 3,
        "memleak trace ended with {status} after a SIGTERM and {later} more while it reported"
    );
    let text = std::fs::read_to_string(&path)?;
    serde_json::from_str::<Report>(&text).with_context(|| {
        format!("the report after {later} SIGTERMs while it was made is not whole")
    })?;
    ensure!(
        names_in(&directory)? == ["report.json"],
        "left: {:?}",
        names_in(&directory)?
    );

    // SIGKILL at points from the end of the window to after the report is written.
    let mut killed_while_reporting = 0;
    for delay_ms in [0, 50, 150, 300, 600, 1200, 2400] {
        std::fs::write(&path, PREVIOUS)?;
        let (mut tracer, _stderr) = start_tracer(&args)?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        signal(&mut tracer, libc::SIGTERM);
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if tracer.child().try_wait()?.is_none() {
            killed_while_reporting += 1;
        }
        signal(&mut tracer, libc::SIGKILL);
        tracer.child().wait()?;
        let text = std::fs::read_to_string(&path)?;
        ensure!(
            text == PREVIOUS || serde_json::from_str::<Report>(&text).is_ok(),
            "SIGKILL {delay_ms} ms after the window ended left a report that is neither the \
             previous one nor whole: {} bytes",
            text.len()
        );
        let names = names_in(&directory)?;
        ensure!(
            names == ["report.json"],
            "SIGKILL {delay_ms} ms after the window ended left {names:?}"
        );
    }
    ensure!(
        killed_while_reporting >= 2,
        "only {killed_while_reporting} of the SIGKILLs landed before memleak had finished: \
         the test proved nothing"
    );
    std::fs::remove_dir_all(&directory)?;
    wait_for_programs_gone(before)
}
