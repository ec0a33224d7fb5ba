//! End-to-end: the kinds of memory beyond slab. vmalloc and percpu allocations come from a
//! fixture that holds BPF maps: a 1 MiB array map vmallocs its storage, and a percpu array map
//! makes one percpu allocation per element. Pages come from a fixture that fills pipes.
use anyhow::{Context as _, Result, ensure};
use memleak_tests::{Guard, count_of, entries_through, trace_around};

const MAPS: u64 = 20;
const PERCPU_ENTRIES: u64 = 16;

/// The report of a trace around `hold-bpf-maps`, and the fixture's pid.
fn trace_held_maps(tracer_args: &[&str]) -> Result<(serde_json::Value, u64)> {
    let (report, mut fixture) = trace_around(tracer_args, "hold-bpf-maps", MAPS)?;
    let pid = u64::from(fixture.child().id());
    release(fixture)?;
    Ok((report, pid))
}

/// The objects and bytes that process `pid` holds in `entries` (other processes may allocate
/// through the same stacks while the test runs).
fn share_of(entries: &[&serde_json::Value], pid: u64) -> (u64, u64) {
    entries
        .iter()
        .filter_map(|entry| entry["processes"].as_array())
        .flatten()
        .filter(|process| process["pid"].as_u64() == Some(pid))
        .fold((0, 0), |(count, bytes), process| {
            (
                count + process["count"].as_u64().unwrap_or(0),
                bytes + process["bytes"].as_u64().unwrap_or(0),
            )
        })
}

/// Closes the fixture's standard input, which makes it free what it holds and exit.
fn release(mut fixture: Guard) -> Result<()> {
    drop(fixture.child().stdin.take());
    fixture.child().wait()?;
    Ok(())
}

fn of_kind<'a>(
    report: &'a serde_json::Value,
    kind: &str,
    through: &str,
) -> Vec<&'a serde_json::Value> {
    entries_through(report, through)
        .into_iter()
        .filter(|entry| entry["kind"] == kind)
        .collect()
}

#[test]
fn vmalloc_and_percpu_allocations_are_attributed_by_kind() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, fixture) = trace_held_maps(&["--duration", "4s", "--format", "json"])?;
    ensure!(
        report["notes"].as_array().is_some_and(Vec::is_empty),
        "notes: {:#}",
        report["notes"]
    );

    let vmalloc = of_kind(&report, "vmalloc", "array_map_alloc");
    let (areas, bytes) = share_of(&vmalloc, fixture);
    ensure!(
        areas >= MAPS,
        "expected {MAPS} vmalloc areas through array_map_alloc by pid {fixture}: {vmalloc:#?}"
    );
    ensure!(
        bytes >= areas << 20,
        "each area holds at least 1 MiB: {vmalloc:#?}"
    );
    ensure!(
        vmalloc.iter().all(
            |entry| entry["call_site"]["symbol"] != serde_json::Value::Null
                && !entry["call_site"]["symbol"]
                    .as_str()
                    .unwrap_or("")
                    .contains("vmap")
        ),
        "the call site is past the vmalloc internals: {vmalloc:#?}"
    );

    let percpu = of_kind(&report, "percpu", "array_map_alloc");
    let (elements, _) = share_of(&percpu, fixture);
    ensure!(
        elements >= MAPS * PERCPU_ENTRIES,
        "expected {} percpu allocations through array_map_alloc: {percpu:#?}",
        MAPS * PERCPU_ENTRIES
    );
    Ok(())
}

#[test]
fn kinds_selects_what_is_traced() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, _) =
        trace_held_maps(&["--duration", "3s", "--format", "json", "--kinds", "slab"])?;
    let stacks = report["stacks"].as_array().context("no stacks")?;
    ensure!(
        stacks
            .iter()
            .all(|entry| entry["kind"] == "kmalloc" || entry["kind"] == "kmem_cache"),
        "--kinds slab reported other kinds: {:#?}",
        stacks
            .iter()
            .map(|entry| &entry["kind"])
            .collect::<Vec<_>>()
    );
    Ok(())
}

const PIPE_PAGES: u64 = 2_000;

fn pages_through_pipe_writes(report: &serde_json::Value) -> u64 {
    of_kind(report, "page", "pipe_write")
        .iter()
        .map(|entry| count_of(entry))
        .sum()
}

#[test]
fn held_pipe_pages_show_as_page_allocations() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, fixture) = trace_around(
        &["--duration", "4s", "--format", "json"],
        "hold-pipe-pages",
        PIPE_PAGES,
    )?;
    release(fixture)?;
    let pages = of_kind(&report, "page", "pipe_write");
    let held = pages_through_pipe_writes(&report);
    ensure!(
        held >= PIPE_PAGES,
        "expected {PIPE_PAGES} pages through the pipe write path: {pages:#?}"
    );
    ensure!(
        pages.iter().all(
            |entry| entry["bytes"].as_u64() == Some(count_of(entry) * 4096)
                && entry["cache"].is_null()
        ),
        "pipe buffers are single pages, in no cache: {pages:#?}"
    );
    let slab_pages: Vec<_> = entries_through(&report, "allocate_slab")
        .into_iter()
        .filter(|entry| entry["kind"] == "page")
        .collect();
    ensure!(
        slab_pages.is_empty(),
        "pages backing slabs are counted as slab only: {slab_pages:#?}"
    );
    ensure!(
        report["stats"]["movable_pages"].is_u64() && report["stats"]["backing_pages"].is_u64(),
        "stats: {:#}",
        report["stats"]
    );
    Ok(())
}

#[test]
fn freed_pipe_pages_do_not_show() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, _fixture) = trace_around(
        &["--duration", "3s", "--format", "json"],
        "churn-pipe-pages",
        PIPE_PAGES,
    )?;
    let held = pages_through_pipe_writes(&report);
    ensure!(
        held < PIPE_PAGES / 10,
        "{held} pipe pages reported after the pipes were closed: {:#?}",
        of_kind(&report, "page", "pipe_write")
    );
    Ok(())
}
