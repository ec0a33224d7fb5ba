//! End-to-end: the claims of docs/cli.md about options and signals that no other test checks. Each
//! trace is short (2-3 s) and attributes what it finds to the fixture's pid, so that other
//! processes' allocations (a build beside the tests) change nothing.
use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use memleak::{
    classify::analysis::Report as ClassifyReport,
    scan::report::ScanReport,
    trace::report::{Entry, Report},
};
use memleak_tests::{
    Guard, entries_at, finish_tracer, fixture_binary, memleak_binary, share_of, start_tracer,
    trace_around,
};

const HELD: u64 = 2_000;

/// Traces `hold-eventfds HELD` with `args`; the report and the fixture's pid.
fn trace_held(args: &[&str]) -> Result<(Report, u64)> {
    let (report, mut fixture) = trace_around(args, "hold-eventfds", HELD)?;
    let pid = u64::from(fixture.child().id());
    drop(fixture.child().stdin.take());
    fixture.child().wait()?;
    Ok((report, pid))
}

/// The fixture's eventfd contexts in the report.
fn held_contexts(report: &Report, pid: u64) -> u64 {
    share_of(entries_at(report, "kmalloc", "do_eventfd"), pid).0
}

/// Sends `signal` to the tracer after `after`; the report must come out, soon.
fn signal_ends_window(args: &[&str], signal: libc::c_int, after: Duration) -> Result<Report> {
    let (mut tracer, _stderr) = start_tracer(args)?;
    std::thread::sleep(after);
    let pid = tracer.child().id() as libc::pid_t;
    let sent = Instant::now();
    ensure!(
        unsafe { libc::kill(pid, signal) } == 0,
        "kill {signal} failed"
    );
    let report: Report = finish_tracer(tracer)?;
    ensure!(
        sent.elapsed() < Duration::from_secs(10),
        "{args:?}: the report took {:?} after signal {signal}",
        sent.elapsed()
    );
    ensure!(
        report.stats.counters.allocs > 0,
        "{args:?}: empty report after signal {signal}: {:#?}",
        report.stats
    );
    Ok(report)
}

#[test]
fn sigterm_ends_an_open_window_and_a_timed_one_with_a_report() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    signal_ends_window(
        &["--format", "json"],
        libc::SIGTERM,
        Duration::from_millis(500),
    )?;
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let report = signal_ends_window(
            &["--duration", "60s", "--format", "json"],
            signal,
            Duration::from_secs(1),
        )?;
        let duration = report.duration_ms;
        ensure!(
            duration < 10_000,
            "signal {signal} ended a 60 s window, but the report covers {duration} ms"
        );
    }
    Ok(())
}

#[test]
fn a_full_table_drops_and_counts_and_the_report_stays_within_it() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    // The smallest table: 1,024 objects, for the 2,000 eventfd contexts alone (and their
    // files and dentries, and the rest of the machine).
    const CAPACITY: u64 = 1024;
    let (report, pid) = trace_held(&[
        "--duration",
        "3s",
        "--format",
        "json",
        "--capacity",
        &CAPACITY.to_string(),
    ])?;
    let dropped = report.stats.counters.dropped_table_full;
    ensure!(
        dropped > 0,
        "{HELD} eventfds (three objects each) in a table of {CAPACITY}, yet nothing dropped: {:#?}",
        report.stats
    );
    // What was kept is reported as it is, no more: at most the table, and the fixture's
    // contexts are among the entries but fewer than it holds.
    let outstanding = report.stats.outstanding;
    let listed: u64 = report.stacks.iter().map(|entry| entry.count).sum();
    ensure!(
        outstanding <= CAPACITY && listed <= CAPACITY,
        "{outstanding} outstanding ({listed} in the entries) in a table of {CAPACITY}"
    );
    let kept = held_contexts(&report, pid);
    ensure!(
        kept < HELD,
        "{kept} of {HELD} contexts reported from a table of {CAPACITY}"
    );
    Ok(())
}

#[test]
fn comm_keeps_only_tasks_of_that_name() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, pid) = trace_held(&[
        "--duration",
        "3s",
        "--format",
        "json",
        "--comm",
        "memleak-fixture",
    ])?;
    let others: Vec<_> = report
        .stacks
        .iter()
        .flat_map(|entry| &entry.processes)
        .filter(|process| process.comm.as_deref() != Some("memleak-fixture"))
        .collect();
    ensure!(
        others.is_empty(),
        "--comm memleak-fixture let others in: {others:#?}"
    );
    let held = held_contexts(&report, pid);
    ensure!(
        held == HELD,
        "the fixture holds {HELD} contexts, reported {held}"
    );
    ensure!(
        report.stats.counters.filtered > 0,
        "nothing filtered: {:#?}",
        report.stats
    );
    Ok(())
}

#[test]
fn min_and_max_size_keep_only_allocations_within_them() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    // eventfd contexts are 64-byte kmallocs (kmalloc-64), as allocated.
    let (report, pid) = trace_held(&[
        "--duration",
        "3s",
        "--format",
        "json",
        "--min-size",
        "64",
        "--max-size",
        "64",
    ])?;
    let outside: Vec<String> = report
        .stacks
        .iter()
        .filter(|entry| entry.bytes != 64 * entry.count)
        .map(|entry| {
            format!(
                "{} in {} objects ({})",
                entry.bytes, entry.count, entry.kind
            )
        })
        .collect();
    ensure!(
        outside.is_empty(),
        "--min-size 64 --max-size 64 kept other sizes: {outside:?}"
    );
    let held = held_contexts(&report, pid);
    ensure!(
        held == HELD,
        "the fixture's {HELD} 64-byte contexts, reported {held}"
    );

    // Above them: the contexts go, the fixture's larger objects (its struct files) stay.
    let (report, pid) = trace_held(&["--duration", "3s", "--format", "json", "--min-size", "65"])?;
    let held = held_contexts(&report, pid);
    ensure!(held == 0, "--min-size 65 kept {held} 64-byte contexts");
    let small: Vec<&Entry> = report
        .stacks
        .iter()
        .filter(|entry| entry.kind != "page" && entry.bytes < 65 * entry.count)
        .collect();
    ensure!(
        small.is_empty(),
        "--min-size 65 kept smaller objects: {small:#?}"
    );
    let (files, _) = share_of(entries_at(&report, "kmem_cache", "alloc_empty_file"), pid);
    ensure!(
        files >= HELD,
        "the fixture's {HELD} struct files (larger than 64 bytes) were not seen: {files}"
    );
    Ok(())
}

/// The field of an entry that a `--sort` orders by.
type SortedBy = fn(&Entry) -> u64;

#[test]
fn top_cuts_the_entries_in_the_order_asked() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let orders: [(&str, &str, SortedBy); 2] = [
        ("size", "bytes", |entry| entry.bytes),
        ("count", "count", |entry| entry.count),
    ];
    for (sort, key, value_of) in orders {
        let (tracer, _stderr) = start_tracer(&[
            "--duration",
            "2s",
            "--format",
            "json",
            "--top",
            "3",
            "--sort",
            sort,
        ])?;
        // More than three sites hold memory through the window whatever else the machine does:
        // leaked eventfds and a pool of pipes (each a file, an inode, a dentry, a pipe_inode_info
        // and its buffers), alive until the fixture is killed after the report.
        let _fixture = Guard::new(
            Command::new(fixture_binary()?)
                .args(["watch-mix", "50", "30"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting the fixture")?,
        );
        let report: Report = finish_tracer(tracer)?;
        let shown = &report.stacks;
        let sites = report.stats.sites;
        ensure!(
            sites > 3 && shown.len() == 3,
            "--top 3 of {sites} sites showed {}",
            shown.len()
        );
        let values: Vec<u64> = shown.iter().map(value_of).collect();
        ensure!(
            values.windows(2).all(|pair| pair[0] >= pair[1]),
            "--sort {sort}: {key} not descending: {values:?}"
        );
    }
    Ok(())
}

#[test]
fn grace_keeps_tracing_after_the_command() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    for (grace, at_least) in [("0s", 0), ("2s", 2_000)] {
        let started = Instant::now();
        let output = Command::new(memleak_binary()?)
            .args(["run", "--grace", grace, "--format", "json", "--", "true"])
            .output()?;
        let took = started.elapsed();
        ensure!(
            output.status.success(),
            "run --grace {grace} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Report =
            serde_json::from_slice(&output.stdout).context("parsing run's report")?;
        let duration = report.duration_ms;
        ensure!(
            duration >= at_least
                && duration < at_least + 3_000
                && took.as_millis() >= u128::from(at_least),
            "--grace {grace}: a window of {duration} ms, {took:?} in all"
        );
    }
    Ok(())
}

#[test]
fn classify_works_without_root_from_meminfo() -> Result<()> {
    let _exclusive = memleak_tests::exclusive();
    if !memleak_tests::is_root() {
        // Already the case this test sets up.
        let output = Command::new(memleak_binary()?)
            .args([
                "classify",
                "--duration",
                "2s",
                "--interval",
                "500ms",
                "--format",
                "json",
            ])
            .output()?;
        ensure!(output.status.success(), "classify failed: {output:?}");
        return Ok(());
    }
    // The binary where nobody may run it.
    let directory = std::env::temp_dir().join(format!("memleak-classify-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let binary = directory.join("memleak");
    std::fs::copy(memleak_binary()?, &binary)?;
    use std::os::unix::fs::PermissionsExt as _;
    for path in [&directory, &binary] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    let as_nobody = |args: &[&str]| {
        Command::new(&binary)
            .args(args)
            .uid(65534)
            .gid(65534)
            .current_dir(&directory)
            .output()
            .with_context(|| format!("running memleak {args:?} as nobody"))
    };
    let output = as_nobody(&[
        "classify",
        "--duration",
        "2s",
        "--interval",
        "500ms",
        "--format",
        "json",
    ]);
    // Tracing, by contrast, is refused with status 2 and one line.
    let refused = as_nobody(&["trace", "--duration", "1s"]);
    let _ = std::fs::remove_dir_all(&directory);
    let (output, refused) = (output?, refused?);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        refused.status.code() == Some(2) && stderr.trim().lines().count() == 1,
        "trace as nobody: status {}, stderr {stderr:?}",
        refused.status
    );
    ensure!(
        output.status.success(),
        "classify as nobody exited {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: ClassifyReport =
        serde_json::from_slice(&output.stdout).context("parsing classify's report")?;
    ensure!(
        !report.notes.is_empty(),
        "without root, the notes say what could not be read: {report:#?}"
    );
    Ok(())
}

/// The sizes of the groups `memleak scan --cache CACHE --similarity PERCENT` finds.
fn scan_groups(cache: &str, similarity: &str) -> Result<(u64, Vec<u64>)> {
    let output = Command::new(memleak_binary()?)
        .args(["scan", "--cache", cache, "--format", "json"])
        .args(["--similarity", similarity])
        .output()?;
    ensure!(
        output.status.success(),
        "scan --similarity {similarity} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // `groups` is there: a required field of the typed report, whose parse fails without it.
    let report: ScanReport =
        serde_json::from_slice(&output.stdout).context("parsing scan's report")?;
    let groups = report.groups.iter().map(|group| group.objects).collect();
    Ok((report.objects, groups))
}

#[test]
fn similarity_sets_how_alike_grouped_objects_are() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    const DISSIMILAR: u64 = 3_000;
    let cache = if std::path::Path::new("/sys/kernel/slab/msg_msg-64").exists() {
        "msg_msg-64"
    } else {
        "kmalloc-cg-64"
    };
    // Random 16-byte messages: unlike each other at the default 65%, all alike at 1%. (System
    // V queues outlive their process: the fixture removes them when its input closes.)
    let mut fixture = Command::new(memleak_tests::fixture_binary()?)
        .args(["dissimilar-messages", &DISSIMILAR.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let sent = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(fixture.stdout.take().context("fixture stdout")?),
        &mut line,
    );
    let scans = sent.map_err(anyhow::Error::from).and_then(|_| {
        ensure!(line.trim() == "sent", "fixture said {line:?}");
        Ok((scan_groups(cache, "65")?, scan_groups(cache, "1")?))
    });
    drop(fixture.stdin.take());
    fixture.wait()?;
    let ((objects, strict), (_, loose)) = scans?;
    ensure!(objects >= DISSIMILAR, "{objects} objects in {cache}");
    let largest = |groups: &[u64]| groups.first().copied().unwrap_or(0);
    ensure!(
        largest(&strict) < DISSIMILAR / 4,
        "at 65%, {DISSIMILAR} random messages were grouped: {strict:?}"
    );
    ensure!(
        largest(&loose) >= DISSIMILAR * 9 / 10,
        "at 1%, the {DISSIMILAR} random messages are alike, yet the groups are {loose:?}"
    );
    Ok(())
}

#[test]
fn a_missing_kernel_feature_is_a_one_line_error_with_status_2() -> Result<()> {
    let _exclusive = memleak_tests::exclusive();
    if std::path::Path::new("/sys/kernel/debug/kmemleak").exists() {
        memleak_tests::skip("this kernel has kmemleak");
        return Ok(());
    }
    // The report file is created before kmemleak is looked for; a failure must not leave it.
    let report =
        std::env::temp_dir().join(format!("memleak-no-kmemleak-{}.json", std::process::id()));
    let output = Command::new(memleak_binary()?)
        .arg("kmemleak")
        .arg("--output")
        .arg(&report)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(2)
            && stderr.trim().lines().count() == 1
            && stderr.contains("kmemleak is not available"),
        "memleak kmemleak without kmemleak: status {}, stderr {stderr:?}",
        output.status
    );
    ensure!(
        !report.exists(),
        "the failed kmemleak left an empty report file at {}",
        report.display()
    );
    Ok(())
}
