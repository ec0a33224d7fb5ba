//! End-to-end: `memleak classify` against fixtures that grow one kind of kernel memory
//! quickly: eventfds (a struct file from the filp cache and a struct eventfd_ctx from kmalloc
//! each, unreclaimable slab), 1 MiB BPF array maps (vmalloc'd by array_map_alloc) and full
//! pipes (pages from the page allocator that no meminfo counter shows).
//!
//! Only positive assertions: other tests' fixtures may hold thousands of eventfds or BPF maps
//! while this one runs, so "this cache did not grow" cannot be checked here; the unit tests
//! check it on a recorded idle series.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use memleak::classify::analysis::{KindTrend, Report};
use memleak_tests::{Guard, finish_tracer, memleak_binary};

/// Far above the default thresholds (256 KiB over the window): 3000 eventfds a second are
/// about 560 KiB/s of filp alone, and take 12,000 descriptors in all, within the 20,000 a
/// process may open here.
const EVENTFDS_PER_SECOND: u64 = 3_000;
const MAPS_PER_SECOND: u64 = 8;
/// 64 KiB each: 6.25 MiB/s.
const PIPES_PER_SECOND: u64 = 100;
const GROWTH_SECONDS: u64 = 4;

/// Runs `memleak classify --duration 6s --format json` while the fixture grows WORKLOAD for
/// GROWTH_SECONDS, and returns the report (finish_tracer waits for any memleak subcommand).
fn classify_while(workload: &str, rate: u64) -> Result<Report> {
    let classify = Guard::new(
        Command::new(memleak_binary()?)
            .args([
                "classify",
                "--duration",
                "6s",
                "--format",
                "json",
                "--top",
                "50",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting memleak classify")?,
    );
    let mut fixture = Guard::new(
        Command::new(env!("CARGO_BIN_EXE_memleak-fixture"))
            .args([workload, &rate.to_string(), &GROWTH_SECONDS.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?,
    );
    let stdout = fixture.child().stdout.take().context("fixture stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for expected in ["started", "done"] {
        let line = lines.next().context("fixture ended early")??;
        ensure!(
            line == expected,
            "fixture said {line:?}, expected {expected:?}"
        );
    }
    let report = finish_tracer(classify)?;
    // Closing standard input lets the fixture free everything and exit.
    drop(fixture.child().stdin.take());
    fixture.child().wait()?;
    Ok(report)
}

/// Whether `names` holds `name`.
fn lists(names: &[String], name: &str) -> bool {
    names.iter().any(|listed| listed == name)
}

/// Checks that the verdict blames `kind` and that its next command traces `trace_kind`;
/// returns the kind's entry in `kinds`.
fn blamed_kind<'a>(report: &'a Report, kind: &str, trace_kind: &str) -> Result<&'a KindTrend> {
    let verdict = &report.verdict;
    // The whole series' figures, to tell a masked growth from a missed one.
    let figures = || {
        format!(
            "{verdict:#?}\n{:#?}\n{:#?}",
            report.kinds, report.growing_caches
        )
    };
    ensure!(verdict.growing, "{}", figures());
    ensure!(lists(&verdict.kinds, kind), "{}", figures());
    let next = verdict.next_command.as_deref().context("no next command")?;
    ensure!(
        next.starts_with("memleak trace --kinds ") && next.contains(trace_kind),
        "{next}"
    );
    report
        .kinds
        .iter()
        .find(|entry| entry.name == kind)
        .with_context(|| format!("no {kind} in kinds: {report:#?}"))
}

#[test]
fn growing_eventfds_are_blamed_on_unreclaimable_slab_and_filp() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let report = classify_while("grow-eventfds", EVENTFDS_PER_SECOND)?;
    let verdict = &report.verdict;
    // `kernel` is a string, and `growing_caches` is there: required fields of the typed
    // report, whose parse in classify_while fails without them.
    ensure!(report.schema == 1, "{report:#?}");
    ensure!(report.notes.is_empty(), "notes: {:#?}", report.notes);
    blamed_kind(&report, "slab_unreclaimable", "slab")?;
    ensure!(lists(&verdict.caches, "filp"), "{verdict:#?}");
    let growing = &report.growing_caches;
    let objects_per_second = |name: &str| {
        growing
            .iter()
            .find(|cache| cache.name == name)
            .map_or(0.0, |cache| cache.growth_objects_per_second)
    };
    // Growth for 4 s of the 6 s window: the fitted rate is a little under the fixture's.
    let expected = EVENTFDS_PER_SECOND as f64 / 2.0;
    ensure!(
        objects_per_second("filp") >= expected,
        "filp grew {} objects/s: {growing:#?}",
        objects_per_second("filp")
    );
    // struct eventfd_ctx comes from the kmalloc cache of its size class.
    ensure!(
        growing.iter().any(|cache| {
            cache.name.starts_with("kmalloc-")
                && cache.reclaimable == Some(false)
                && cache.growth_objects_per_second >= expected
        }),
        "no kmalloc cache grew by {expected} objects/s: {growing:#?}"
    );
    Ok(())
}

#[test]
fn growing_bpf_arrays_are_blamed_on_vmalloc_and_array_map_alloc() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let report = classify_while("grow-bpf-maps", MAPS_PER_SECOND)?;
    let verdict = &report.verdict;
    let vmalloc = blamed_kind(&report, "vmalloc", "vmalloc")?;
    ensure!(
        lists(&verdict.vmalloc_callers, "array_map_alloc"),
        "{verdict:#?}"
    );
    // 8 MiB a second for 4 s of the 6 s window.
    let rate = vmalloc.growth_bytes_per_second;
    ensure!(rate >= 4 << 20, "vmalloc grew {rate} B/s: {vmalloc:#?}");
    Ok(())
}

#[test]
fn growing_pipe_buffers_are_blamed_on_other_pages() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let report = classify_while("grow-pipe-pages", PIPES_PER_SECOND)?;
    let other_pages = blamed_kind(&report, "other_pages", "page")?;
    ensure!(other_pages.estimate, "{other_pages:#?}");
    // 6.25 MiB a second for 4 s of the 6 s window.
    let rate = other_pages.growth_bytes_per_second;
    ensure!(
        rate >= 3 << 20,
        "other pages grew {rate} B/s: {other_pages:#?}"
    );
    Ok(())
}
