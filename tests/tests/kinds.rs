//! End-to-end: the kinds of memory beyond slab. vmalloc and percpu allocations come from a
//! fixture that holds BPF maps: a 1 MiB array map vmallocs its storage, and a percpu array map
//! makes one percpu allocation per element. Pages come from a fixture that fills pipes.
use anyhow::{Result, ensure};
use memleak::trace::report::{Entry, Report};
use memleak_tests::{Guard, entries_through, share_of, trace_around, trace_churning_fixture};

const MAPS: u64 = 20;
const PERCPU_ENTRIES: u64 = 16;

/// The report of a trace around `hold-bpf-maps`, and the fixture's pid.
fn trace_held_maps(tracer_args: &[&str]) -> Result<(Report, u64)> {
    let (report, mut fixture) = trace_around(tracer_args, "hold-bpf-maps", MAPS)?;
    let pid = u64::from(fixture.child().id());
    release(fixture)?;
    Ok((report, pid))
}

/// Closes the fixture's standard input, which makes it free what it holds and exit.
fn release(mut fixture: Guard) -> Result<()> {
    drop(fixture.child().stdin.take());
    fixture.child().wait()?;
    Ok(())
}

fn of_kind<'a>(report: &'a Report, kind: &str, through: &str) -> Vec<&'a Entry> {
    entries_through(report, through)
        .into_iter()
        .filter(|entry| entry.kind == kind)
        .collect()
}

#[test]
fn vmalloc_and_percpu_allocations_are_attributed_by_kind() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    // vmalloc and percpu events are BTF tracepoints whatever --attach says (--attach chooses
    // for the slab events); both ways must count each area and element exactly once.
    for (args, attach) in memleak_tests::ATTACH_MODES {
        let (report, fixture) = trace_held_maps(args)?;
        ensure!(
            report.attach == attach,
            "with {args:?}: attach {}",
            report.attach
        );
        // Each kind names its method; on this kernel (6.18, BTF) vmalloc and percpu have their
        // tracepoints whatever --attach asks of the slab events.
        let methods: Vec<(&str, &str)> = report
            .methods
            .iter()
            .map(|method| (method.kind.as_str(), method.method.as_str()))
            .collect();
        for (kind, method) in [
            ("slab", attach),
            ("vmalloc", "tp_btf"),
            ("percpu", "tp_btf"),
        ] {
            ensure!(
                methods.contains(&(kind, method)),
                "with {args:?}: expected {kind} followed by {method}: {methods:?}"
            );
        }
        let left_out: Vec<&String> = report
            .notes
            .iter()
            .filter(|note| {
                note.contains("vmalloc")
                    || note.contains("percpu")
                    || note.contains("not followed more cheaply")
            })
            .collect();
        ensure!(
            left_out.is_empty(),
            "with {args:?}: nothing is left out on this kernel: {left_out:?}"
        );

        let vmalloc = of_kind(&report, "vmalloc", "array_map_alloc");
        let (areas, bytes) = share_of(vmalloc.iter().copied(), fixture);
        ensure!(
            areas == MAPS,
            "with {args:?}: pid {fixture} holds exactly {MAPS} vmalloc areas through \
             array_map_alloc, the report says {areas}: {vmalloc:#?}"
        );
        ensure!(
            bytes >= areas << 20,
            "each area holds at least 1 MiB: {vmalloc:#?}"
        );
        ensure!(
            vmalloc.iter().all(|entry| entry
                .call_site
                .symbol
                .as_deref()
                .is_some_and(|symbol| !symbol.contains("vmap"))),
            "the call site is past the vmalloc internals: {vmalloc:#?}"
        );
        // The pages of those areas are vmalloc memory: counted as pages too, the areas would
        // count twice (docs/design.md: pages backing a vmalloc area are only `backing_pages`).
        let pages = of_kind(&report, "page", "array_map_alloc");
        let (backing, _) = share_of(pages.iter().copied(), fixture);
        ensure!(
            backing == 0,
            "with {args:?}: the {MAPS} vmalloc areas' pages are counted again as {backing} \
             page allocations: {}",
            pages
                .iter()
                .map(|entry| format!("{} pages at {}", entry.count, entry.call_site))
                .collect::<Vec<_>>()
                .join(", ")
        );

        let percpu = of_kind(&report, "percpu", "array_map_alloc");
        let (elements, _) = share_of(percpu.iter().copied(), fixture);
        ensure!(
            elements == MAPS * PERCPU_ENTRIES,
            "with {args:?}: expected exactly {} percpu allocations through array_map_alloc by \
             pid {fixture}, the report says {elements}: {percpu:#?}",
            MAPS * PERCPU_ENTRIES
        );
    }
    Ok(())
}

#[test]
fn kinds_selects_what_is_traced() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, fixture) =
        trace_held_maps(&["--duration", "3s", "--format", "json", "--kinds", "slab"])?;
    // `stacks` is there: a required field of the typed report, whose parse fails without it.
    let is_slab = |kind: &str| kind == "kmalloc" || kind == "kmem_cache";
    ensure!(
        report.stacks.iter().all(|entry| is_slab(&entry.kind)),
        "--kinds slab reported other kinds: {:#?}",
        report
            .stacks
            .iter()
            .map(|entry| &entry.kind)
            .collect::<Vec<_>>()
    );
    let kinds: Vec<&str> = report
        .kinds
        .iter()
        .map(|total| total.name.as_str())
        .collect();
    ensure!(
        kinds.iter().all(|kind| is_slab(kind)),
        "--kinds slab totals other kinds: {kinds:?}"
    );
    // The same fixture was seen: each map's struct is a slab object allocated through
    // array_map_alloc (an empty report would pass the checks above).
    let slab = entries_through(&report, "array_map_alloc");
    let (structs, _) = share_of(slab.iter().copied(), fixture);
    ensure!(
        structs >= MAPS,
        "the fixture's {MAPS} maps were not seen in slab: {structs} objects through \
         array_map_alloc: {slab:#?}"
    );
    // Each map's vmalloc area has its `struct vmap_area`, a slab object too, but vmalloc's
    // bookkeeping: counted apart, not as an entry (docs/json.md, bookkeeping_objects).
    ensure!(
        !slab
            .iter()
            .any(|entry| entry.cache.as_deref() == Some("vmap_area")),
        "vmalloc's bookkeeping listed as an entry: {slab:#?}"
    );
    ensure!(
        report.stats.bookkeeping_objects >= MAPS,
        "the {MAPS} maps' vmap_area structs are not counted as bookkeeping: {:?}",
        report.stats
    );
    Ok(())
}

const PIPE_PAGES: u64 = 2_000;

fn pages_through_pipe_writes(report: &Report) -> u64 {
    of_kind(report, "page", "pipe_write")
        .iter()
        .map(|entry| entry.count)
        .sum()
}

#[test]
fn held_pipe_pages_show_as_page_allocations() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, mut fixture) = trace_around(
        &["--duration", "4s", "--format", "json"],
        "hold-pipe-pages",
        PIPE_PAGES,
    )?;
    let pid = u64::from(fixture.child().id());
    release(fixture)?;
    let pages = of_kind(&report, "page", "pipe_write");
    let (held, _) = share_of(pages.iter().copied(), pid);
    // Its `ready` line, written to the pipe of its standard output, may hold one more page
    // (the pipe keeps a page it has read for reuse).
    ensure!(
        (PIPE_PAGES..=PIPE_PAGES + 1).contains(&held),
        "pid {pid} holds {PIPE_PAGES} pages through the pipe write path (one more for its \
         standard output), the report says {held}: {pages:#?}"
    );
    ensure!(
        pages
            .iter()
            .all(|entry| entry.bytes == entry.count * 4096 && entry.cache.is_none()),
        "pipe buffers are single pages, in no cache: {pages:#?}"
    );
    // This kernel's ORC unwind tables are readable: each page's caller comes from a walk of
    // the page allocator's frames, and stacks only for the first page from each caller and a
    // sample (at most one every 16 ms per CPU), not for each of the pipe's pages. Each caller
    // the walk found is in the stacks captured with it.
    let with_stacks: u64 = pages.iter().map(|entry| entry.stack_samples).sum();
    ensure!(
        with_stacks <= held / 2,
        "{with_stacks} of the {held} pipe pages had their stacks captured: their callers were \
         not found by the frame walk ({:?})",
        report.methods
    );
    let counters = &report.stats.counters;
    ensure!(
        report.stats.page_sites_contradicted == 0
            && counters.page_callers_unknown * 100 <= counters.tracked_allocs,
        "the frame walk found callers its stacks contradict, or found too few: {:?}, notes \
         {:#?}",
        report.stats,
        report.notes
    );
    let slab_pages: Vec<_> = entries_through(&report, "allocate_slab")
        .into_iter()
        .filter(|entry| entry.kind == "page")
        .collect();
    ensure!(
        slab_pages.is_empty(),
        "pages backing slabs are counted as slab only: {slab_pages:#?}"
    );
    // stats.movable_pages and stats.backing_pages are numbers: required u64 fields of the typed
    // report, whose parse in trace_around fails without them.
    Ok(())
}

#[test]
fn freed_pipe_pages_do_not_show() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (report, _) = trace_churning_fixture("churn-pipe-pages", PIPE_PAGES, "3s")?;
    let held = pages_through_pipe_writes(&report);
    ensure!(
        held < PIPE_PAGES / 10,
        "{held} pipe pages reported after the pipes were closed: {:#?}",
        of_kind(&report, "page", "pipe_write")
    );
    let (tracked, freed) = (
        report.stats.counters.tracked_allocs,
        report.stats.counters.tracked_frees,
    );
    ensure!(
        tracked >= PIPE_PAGES && freed >= PIPE_PAGES,
        "the fixture's {PIPE_PAGES} pipe pages were not seen allocated ({tracked} tracked) and \
         freed ({freed}): {:#?}",
        report.stats
    );
    Ok(())
}
