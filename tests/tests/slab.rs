//! End-to-end: memleak traces this machine's kernel while a fixture holds (or churns) eventfds,
//! whose creation kmallocs one `struct eventfd_ctx` per fd in do_eventfd.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use memleak_tests::{
    Guard, count_of, entries_through, finish_tracer, fixture_binary, loaded_program_names,
    start_tracer, trace_around,
};

const HELD: u64 = 2_000;

/// Active objects per cache, from /proc/slabinfo.
fn slab_objects() -> Result<std::collections::HashMap<String, u64>> {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
    Ok(slabinfo
        .lines()
        .skip(2)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.parse().ok()?))
        })
        .collect())
}

#[test]
fn held_eventfds_show_as_outstanding_through_eventfd_creation() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    for args in [
        &["--duration", "4s", "--format", "json"][..],
        &[
            "--duration",
            "4s",
            "--format",
            "json",
            "--attach",
            "classic",
        ],
    ] {
        let before = slab_objects()?;
        let (report, mut fixture) = trace_around(args, "hold-eventfds", HELD)?;
        let holding = slab_objects()?;
        // do_eventfd kmallocs the eventfd_ctx; the struct file from alloc_empty_file (filp
        // cache) is reached through eventfd creation too, but is not what this test is about.
        let leaks = entries_through(&report, "eventfd");
        let summary: Vec<String> = leaks.iter().map(|entry| summarize(entry)).collect();
        let Some(ctx) = leaks
            .iter()
            .find(|entry| entry["kind"] == "kmalloc" && count_of(entry) >= HELD)
        else {
            anyhow::bail!(
                "with {args:?}: expected a kmalloc stack through eventfd creation holding \
                 >= {HELD} objects; entries through eventfd: {summary:#?}"
            );
        };
        ensure!(
            ctx["bytes"].as_u64().unwrap_or(0) >= HELD * 32,
            "bytes too small: {ctx:#}"
        );
        // The cache named is the one the held eventfd_ctx objects really fill. Objects kept
        // free per CPU count as active in /proc/slabinfo, so a cache can grow by fewer than
        // HELD; a cache that merely shares the size class grows by none of them.
        let cache = ctx["cache"].as_str().unwrap_or_default();
        let grown = holding
            .get(cache)
            .zip(before.get(cache))
            .map_or(0, |(holding, before)| holding.saturating_sub(*before));
        ensure!(
            grown >= HELD / 2,
            "the eventfd_ctx site is named {cache:?}, which grew by {grown} active objects \
             while {HELD} were held: {ctx:#}"
        );
        for name in [
            "allocs",
            "frees",
            "outstanding",
            "dropped_table_full",
            "stack_failures",
        ] {
            ensure!(
                report["stats"][name].is_u64(),
                "stats.{name} missing: {:#}",
                report["stats"]
            );
        }
        // Releases the fds.
        drop(fixture.child().stdin.take());
        fixture.child().wait()?;
    }
    Ok(())
}

#[test]
fn sampling_estimates_held_objects_within_20_percent() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    const MANY: u64 = 10_000;
    let (report, mut fixture) = trace_around(
        &[
            "--duration",
            "4s",
            "--format",
            "json",
            "--sample-rate",
            "64",
        ],
        "hold-eventfds",
        MANY,
    )?;
    let leaks = entries_through(&report, "eventfd");
    let summary: Vec<String> = leaks.iter().map(|entry| summarize(entry)).collect();
    let Some(ctx) = leaks.iter().find(|entry| {
        entry["kind"] == "kmalloc"
            && entry["call_site"]["symbol"]
                .as_str()
                .is_some_and(|s| s.contains("eventfd"))
    }) else {
        anyhow::bail!("no sampled kmalloc entry at the eventfd call site: {summary:#?}");
    };
    ensure!(
        ctx["estimated"] == true,
        "sampled counts must be marked: {ctx:#}"
    );
    let estimate = count_of(ctx) as f64;
    let error = (estimate - MANY as f64).abs() / MANY as f64;
    ensure!(
        error <= 0.2,
        "estimate {estimate} is {:.0}% off {MANY}: {summary:#?}",
        error * 100.0
    );
    drop(fixture.child().stdin.take());
    fixture.child().wait()?;
    Ok(())
}

#[test]
fn churned_eventfds_do_not_show_as_outstanding() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, _fixture) = trace_around(
        &["--duration", "3s", "--format", "json"],
        "churn-eventfds",
        HELD,
    )?;
    for entry in entries_through(&report, "eventfd") {
        ensure!(
            count_of(entry) < HELD / 10,
            "closed eventfds reported as outstanding: {entry:#}"
        );
    }
    ensure!(
        report["stats"]["allocs"].as_u64().unwrap_or(0) >= HELD,
        "the churn's allocations were not seen: {:#}",
        report["stats"]
    );
    Ok(())
}

#[test]
fn pid_filter_keeps_only_that_process() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let mut fixture = Guard::new(
        Command::new(fixture_binary()?)
            .args(["wait-then-hold-eventfds", &HELD.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?,
    );
    let pid = fixture.child().id();
    let (tracer, _stderr) = start_tracer(&[
        "--duration",
        "3s",
        "--format",
        "json",
        "--pid",
        &pid.to_string(),
        "--by-process",
        "--top",
        "1000",
    ])?;
    let mut stdin = fixture.child().stdin.take().context("fixture stdin")?;
    writeln!(stdin, "go")?;
    let stdout = fixture.child().stdout.take().context("fixture stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(line.trim() == "ready", "fixture said {line:?}");
    let report = finish_tracer(tracer)?;
    drop(stdin);
    fixture.child().wait()?;

    let processes = report["processes"]
        .as_array()
        .context("no --by-process table")?;
    ensure!(
        processes.iter().all(|process| process["pid"] == pid),
        "other processes reported: {processes:#?}"
    );
    ensure!(
        processes
            .first()
            .and_then(|p| p["count"].as_u64())
            .unwrap_or(0)
            >= HELD,
        "the fixture holds {HELD} eventfd contexts at least: {processes:#?}"
    );
    let best = entries_through(&report, "eventfd")
        .iter()
        .map(|e| count_of(e))
        .max();
    ensure!(
        best.unwrap_or(0) >= HELD,
        "eventfd stack missing: {report:#}"
    );
    ensure!(
        report["stats"]["filtered"].as_u64().unwrap_or(0) > 0,
        "nothing was filtered out"
    );
    Ok(())
}

fn memleak_programs() -> Result<usize> {
    Ok(loaded_program_names()?
        .iter()
        .filter(|name| {
            name.ends_with("_btf") || name.contains("_classic") || name.starts_with("kmem_cache_")
        })
        .count())
}

#[test]
fn ctrl_c_prints_the_report_and_detaches() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let before = memleak_programs()?;
    let (mut tracer, _stderr) = start_tracer(&["--format", "json"])?;
    let during = memleak_programs()?;
    ensure!(
        during >= before + 4,
        "programs not visible while tracing: {before} -> {during}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid = tracer.child().id() as libc::pid_t;
    ensure!(
        unsafe { libc::kill(pid, libc::SIGINT) } == 0,
        "kill -INT failed"
    );
    let report = finish_tracer(tracer)?;
    ensure!(
        report["stats"]["allocs"].as_u64().unwrap_or(0) > 0,
        "empty report: {report:#}"
    );
    // Program teardown is asynchronous in the kernel (RCU); give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = memleak_programs()?;
        if after <= before {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "programs still loaded after exit: {before} -> {after}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn bad_input_gets_one_line_errors() -> Result<()> {
    let _exclusive = memleak_tests::exclusive();
    let memleak = memleak_tests::memleak_binary()?;
    for (args, expected) in [
        (&["trace", "--duration", "0s"][..], "out of range"),
        (&["trace", "--duration", "10"], "missing unit"),
        (&["trace", "--bogus"], "unexpected argument"),
        (
            &["trace", "--pid", "999999999", "--duration", "1s"],
            "no such process",
        ),
    ] {
        let output = Command::new(&memleak).args(args).output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(2),
            "{args:?}: status {}",
            output.status
        );
        ensure!(stderr.contains(expected), "{args:?}: stderr {stderr:?}");
        ensure!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    let _ = std::io::stderr().flush();
    Ok(())
}

fn summarize(entry: &serde_json::Value) -> String {
    format!(
        "{} x {} ({}) at {}",
        entry["count"], entry["kind"], entry["cache"], entry["call_site"]["symbol"]
    )
}
