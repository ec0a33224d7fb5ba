//! End-to-end: vmalloc and percpu allocations, from a fixture that holds BPF maps: a 1 MiB
//! array map vmallocs its storage, and a percpu array map makes one percpu allocation per
//! element.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use memleak_tests::{Guard, count_of, entries_through, finish_tracer, is_root, start_tracer};

const MAPS: u64 = 20;
const PERCPU_ENTRIES: u64 = 16;

fn trace_held_maps(tracer_args: &[&str]) -> Result<serde_json::Value> {
    let (tracer, _stderr) = start_tracer(tracer_args)?;
    let mut fixture = Guard::new(
        Command::new(env!("CARGO_BIN_EXE_memleak-fixture"))
            .args(["hold-bpf-maps", &MAPS.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?,
    );
    let stdout = fixture.child().stdout.take().context("fixture stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(line.trim() == "ready", "fixture said {line:?}");
    let report = finish_tracer(tracer)?;
    drop(fixture.child().stdin.take());
    fixture.child().wait()?;
    Ok(report)
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
    let _exclusive = memleak_tests::exclusive();
    if !is_root() {
        eprintln!("skipped: end-to-end tests need root (they load eBPF programs)");
        return Ok(());
    }
    let report = trace_held_maps(&["--duration", "4s", "--format", "json", "--top", "50"])?;
    ensure!(
        report["notes"].as_array().is_some_and(Vec::is_empty),
        "notes: {:#}",
        report["notes"]
    );

    let vmalloc = of_kind(&report, "vmalloc", "array_map_alloc");
    let areas: u64 = vmalloc.iter().map(|entry| count_of(entry)).sum();
    ensure!(
        areas >= MAPS,
        "expected {MAPS} vmalloc areas through array_map_alloc: {vmalloc:#?}"
    );
    ensure!(
        vmalloc
            .iter()
            .all(|entry| entry["bytes"].as_u64().unwrap_or(0) >= count_of(entry) << 20),
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
    let elements: u64 = percpu.iter().map(|entry| count_of(entry)).sum();
    ensure!(
        elements >= MAPS * PERCPU_ENTRIES,
        "expected {} percpu allocations through array_map_alloc: {percpu:#?}",
        MAPS * PERCPU_ENTRIES
    );
    Ok(())
}

#[test]
fn kinds_selects_what_is_traced() -> Result<()> {
    let _exclusive = memleak_tests::exclusive();
    if !is_root() {
        eprintln!("skipped: end-to-end tests need root (they load eBPF programs)");
        return Ok(());
    }
    let report = trace_held_maps(&[
        "--duration",
        "3s",
        "--format",
        "json",
        "--kinds",
        "slab",
        "--top",
        "1000",
    ])?;
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
