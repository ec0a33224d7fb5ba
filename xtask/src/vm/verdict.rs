//! Judges what the guest sent: the statuses and reports of the two `memleak run` checks
//! around one load of the leaky module (tests/vm/init.sh).
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, ensure};
use memleak::{
    classify::analysis::Report as ClassifyReport, kinds::Callers,
    kmemleak::report::Report as KmemleakReport, scan::ScanReport,
    trace::report::Report as TraceReport,
};
use serde::de::DeserializeOwned;

use memleak::vm::guest::GuestResults;

/// One leaking function of tests/kmod/leaky and what memleak must report for it.
struct ExpectedLeak {
    function: &'static str,
    kind: &'static str,
    /// `None`: the slab cache named in the kernel's own event (see `cache_names_known`).
    cache: Option<&'static str>,
}

const LEAKS: [ExpectedLeak; 2] = [
    ExpectedLeak {
        function: "leaky_kmalloc",
        kind: "kmalloc",
        cache: Some("kmalloc-64"),
    },
    ExpectedLeak {
        function: "leaky_cache_alloc",
        kind: "kmem_cache",
        cache: None,
    },
];
/// The module's leaks of the other kinds: (function, kind), `n` each, checked exactly where
/// memleak follows the kind on the guest's kernel, and otherwise required to be noted.
const OTHER_LEAKS: [(&str, &str); 3] = [
    ("leaky_vmalloc", "vmalloc"),
    ("leaky_percpu", "percpu"),
    ("leaky_pages", "page"),
];
/// The kinds kmemleak tracks besides slab objects (not pages).
const KMEMLEAK_KINDS: [&str; 2] = ["vmalloc", "percpu"];
const MODULE: &str = "leaky";
const OWN_CACHE: &str = "leaky_cache";
const CLEAN_FUNCTION: &str = "clean_alloc";

/// The content scan of `leaky_cache` and a short classify, run while the module's objects are
/// still allocated (tests/vm/init.sh). With kernel BTF the scan must read the cache: at least
/// the module's `objects` in use, at least that many holding no informative byte (the module's
/// objects are zeroed by the cache's constructor and never written); without BTF it must refuse
/// in one line with status 2. Where the guest booted with KASLR, the direct map and vmemmap
/// bases the scan found must be other than the fixed ones. classify must finish and sample the
/// guest's counters.
pub fn judge_scan_and_classify(
    results: &GuestResults,
    objects: u64,
    kaslr: bool,
) -> Result<String> {
    let leaky: TraceReport = report(results, "leaky.json")?;
    let scan = if slab_layout_readable(results, &leaky.kernel)? {
        require_status(
            results,
            "scan",
            "0",
            &format!("memleak scan --cache {OWN_CACHE}"),
        )?;
        let scan: ScanReport = report(results, "scan.json")?;
        ensure!(
            scan.scanned_cache == OWN_CACHE
                && scan.objects >= objects
                && scan.empty_objects >= objects,
            "the scan of {OWN_CACHE} must read at least {objects} objects in use, as many of \
             them empty (zeroed), in {OWN_CACHE} itself: it read {} in use, {} empty, in {}",
            scan.objects,
            scan.empty_objects,
            scan.scanned_cache
        );
        ensure!(
            !kaslr
                || (!FIXED_PAGE_OFFSET_BASES.contains(&scan.page_offset_base)
                    && !FIXED_VMEMMAP_BASES.contains(&scan.vmemmap_base)),
            "the guest booted with KASLR, yet the scan used the fixed bases (page_offset_base \
             {:#x}, vmemmap_base {:#x})",
            scan.page_offset_base,
            scan.vmemmap_base
        );
        format!(
            "scan of {OWN_CACHE}: {} objects in use, {} empty, page_offset_base {:#x}{}",
            scan.objects,
            scan.empty_objects,
            scan.page_offset_base,
            if kaslr { " (KASLR)" } else { "" }
        )
    } else {
        one_line_error(results, "scan")
            .context("without kernel BTF, or before Linux 5.17, `memleak scan` must refuse")?;
        "scan refused (no BTF, or no struct slab before 5.17), in one line".to_owned()
    };
    require_status(results, "classify", "0", "memleak classify")?;
    let classify: ClassifyReport = report(results, "classify.json")?;
    ensure!(
        classify.samples >= 2 && !classify.kinds.is_empty(),
        "`memleak classify` took {} samples and found {} kinds",
        classify.samples,
        classify.kinds.len()
    );
    Ok(format!(
        "{scan}; classify: {} samples, {} kinds",
        classify.samples,
        classify.kinds.len()
    ))
}

/// The direct map's and vmemmap's bases without KASLR (x86-64, 4- and 5-level paging).
const FIXED_PAGE_OFFSET_BASES: [u64; 2] = [0xffff_8880_0000_0000, 0xff11_0000_0000_0000];
const FIXED_VMEMMAP_BASES: [u64; 2] = [0xffff_ea00_0000_0000, 0xffd4_0000_0000_0000];

/// Whether memleak followed `kind` on the guest, by the report's attach methods.
fn follows(report: &TraceReport, kind: &str) -> bool {
    report
        .methods
        .iter()
        .any(|method| method.kind == kind && method.method != "none")
}

/// The error line of the memleak command whose status and standard error the guest sent as
/// `NAME.status` and `NAME.stderr`: status 2, and one `memleak: error: ` line, nothing else.
fn one_line_error<'a>(results: &'a GuestResults, name: &str) -> Result<&'a str> {
    let status = results.file(&format!("{name}.status"))?;
    let stderr = results.file(&format!("{name}.stderr")).unwrap_or_default();
    let mut lines = stderr.lines();
    match (lines.next(), lines.next()) {
        (Some(line), None) if status == "2" && line.starts_with("memleak: error: ") => Ok(line),
        _ => anyhow::bail!("it exited {status} and printed:\n{stderr}"),
    }
}

/// Requires the memleak command the guest ran as `NAME` (`NAME.status`, `NAME.stderr`) to have
/// exited `expected`; `command` names it in the error, with its standard error.
fn require_status(results: &GuestResults, name: &str, expected: &str, command: &str) -> Result<()> {
    let status = results.file(&format!("{name}.status"))?;
    ensure!(
        status == expected,
        "`{command}` exited {status}, expected {expected}; its stderr:\n{}",
        results.file(&format!("{name}.stderr")).unwrap_or_default()
    );
    Ok(())
}

/// Whether the guest's /proc/timer_list prints the jiffies count, as its `timer_list_jiffies`
/// file says.
fn guest_prints_jiffies(results: &GuestResults) -> Result<bool> {
    match results.file("timer_list_jiffies")? {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => {
            anyhow::bail!("the guest's timer_list_jiffies file says {other:?}, expected yes or no")
        }
    }
}

/// Whether the guest has kernel BTF, as it says in its `btf` file.
fn guest_has_btf(results: &GuestResults) -> Result<bool> {
    match results.file("btf")? {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => anyhow::bail!("the guest's btf file says {other:?}, expected yes or no"),
    }
}

/// Whether memleak can read the guest's slab pages: with kernel BTF, from Linux 5.17, where the
/// slab fields moved from `struct page` to `struct slab` (the layout memleak reads; see
/// `memleak::kernel::btf`). `kernel` is the release the guest's trace report names.
fn slab_layout_readable(results: &GuestResults, kernel: &str) -> Result<bool> {
    Ok(guest_has_btf(results)? && !memleak::kernel::release_predates(kernel, 5, 17))
}

/// What the checks found, for the summary line.
pub struct Findings {
    pub kernel: String,
    pub attach: String,
    pub notes: Vec<String>,
    /// `leaky_kmalloc+0x2b/0x42 [leaky]: 100 kmalloc objects in kmalloc-64`, one per leak.
    pub leaks: Vec<String>,
    /// How exact the report's ages are (`age_resolution_ms`).
    pub age_resolution_ms: u64,
}

/// `objects`: how many objects each leaking function allocated (the module's `n`).
/// The guest ran the binary `cargo xtask dist` built from this source: its report records this
/// version and commit (xtask is built from the same tree).
pub fn judge_producer(results: &GuestResults) -> Result<()> {
    let leaky: TraceReport = report(results, "leaky.json")?;
    let this = memleak::util::build::Producer::this();
    ensure!(
        leaky.memleak == this,
        "the guest's report was written by memleak {:?}, not by this source's dist binary {this:?}",
        leaky.memleak
    );
    Ok(())
}

pub fn judge(results: &GuestResults, objects: u64) -> Result<Findings> {
    require_status(
        results,
        "leaky",
        "1",
        "memleak run --fail-on-leak --module leaky -- insmod leaky.ko (1: leak found)",
    )?;
    let leaky: TraceReport = report(results, "leaky.json")?;
    let check = leaky
        .check
        .as_ref()
        .context("the report has no module-scoped check")?;
    ensure!(
        check.failed,
        "the module-scoped check did not fail: {check:#?}"
    );
    // `sites` is there: a required field of the typed report, whose parse fails without it.
    let sites = &check.sites;
    // Older kernels' classic kmem_cache_alloc event (Linux 6.1's among them) does not name the
    // cache; memleak then reads it from kernel memory at report time, which needs kernel BTF.
    // The guest says whether it has BTF (Debian's kernel does; the kmemleak kernel, built from
    // tinyconfig, does not): with BTF from Linux 5.17 (`struct slab`), or where the event names
    // the cache, the cache must be the module's own. memleak's own note that it could not read the cache is no excuse (a
    // kernel memory reader that always failed would pass); it is required, though, where the
    // cache stays unnamed. (`kmalloc-64` proves no read: it is the size class anyway.)
    let event_names_caches = results
        .file("kmem_cache_alloc.format")?
        .lines()
        .any(|line| line.contains(" name;"));
    let guest_has_btf = guest_has_btf(results)?;
    let has_note = |text: &str| leaky.notes.iter().any(|note| note.contains(text));
    let caches_not_read = has_note("not read from the kernel");
    let cache_names_known = event_names_caches || slab_layout_readable(results, &leaky.kernel)?;
    ensure!(
        cache_names_known || caches_not_read,
        "memleak cannot read this guest's slab pages (no kernel BTF, or before Linux 5.17) and \
         its kmem_cache_alloc event names no cache, yet memleak does not note that it could not \
         read cache names: {:#?}",
        leaky.notes
    );
    // How memleak attached, and why: tests/vm/init.sh leaves --attach at auto. With kernel
    // BTF the slab events are tp_btf or, where the verifier refuses those, raw tracepoints
    // (which need BTF only for their argument list), with the reason; without BTF, classic
    // tracepoints, with a note saying so.
    let attach = leaky.attach.as_str();
    let slab_why = leaky
        .methods
        .iter()
        .find(|method| method.kind == "slab" && method.method == attach)
        .map(|method| method.why.as_deref());
    ensure!(
        match (attach, slab_why) {
            ("tp_btf", Some(None)) => guest_has_btf,
            ("raw_tp", Some(Some(why))) => guest_has_btf && why.contains("tp_btf"),
            ("tracepoint", Some(_)) => !guest_has_btf && has_note("kernel has no BTF"),
            _ => false,
        },
        "memleak attached with {attach:?} on a guest {} kernel BTF; its methods: {:#?}; its \
         notes: {:#?}",
        if guest_has_btf { "with" } else { "without" },
        leaky.methods,
        leaky.notes
    );
    let mut leaks = Vec::new();
    for leak in &LEAKS {
        let site = sites
            .iter()
            .find(|site| is_in(Some(&site.call_site), leak.function))
            .with_context(|| {
                format!(
                    "no {} site in the module-scoped check: {check:#?}",
                    leak.function
                )
            })?;
        let expected_cache = leak.cache.or(cache_names_known.then_some(OWN_CACHE));
        let expected_cache_name = expected_cache.unwrap_or("an unnamed cache");
        ensure!(
            site.kind == leak.kind
                && site.cache.as_deref() == expected_cache
                && site.count == objects,
            "{}: expected {objects} {} objects in {expected_cache_name}, memleak reported \
             {site:#?}",
            leak.function,
            leak.kind
        );
        leaks.push(format!(
            "{}: {objects} {} objects in {expected_cache_name}",
            site.call_site, leak.kind
        ));
    }
    for (function, kind) in OTHER_LEAKS {
        let at_function: Vec<_> = sites
            .iter()
            .filter(|site| is_in(Some(&site.call_site), function))
            .collect();
        if !follows(&leaky, kind) {
            ensure!(
                at_function.is_empty() && has_note(&format!("{kind} allocations not followed")),
                "memleak does not follow {kind} allocations on this kernel, yet it lists \
                 {at_function:?} or does not say why not: {:#?}",
                leaky.notes
            );
            leaks.push(format!("{function}: {kind} not followed (noted)"));
            continue;
        }
        let count: u64 = at_function.iter().map(|site| site.count).sum();
        ensure!(
            count == objects && at_function.iter().all(|site| site.kind == kind),
            "{function}: expected {objects} {kind} allocations, memleak reported \
             {at_function:#?}"
        );
        leaks.push(format!("{function}: {objects} {kind} allocations"));
    }
    if follows(&leaky, "page") {
        leaks.push(judge_page_callers(&leaky, objects)?);
    }
    ensure!(
        !sites
            .iter()
            .any(|site| is_in(Some(&site.call_site), CLEAN_FUNCTION)),
        "{CLEAN_FUNCTION} frees what it allocates, yet the check lists it: {check:#?}"
    );
    // The JUnit file: one failure, whose text lists each leaking function with its count (the
    // test case's name holds the scope, `--module leaky`, which proves nothing).
    let junit = results.file("leaky.xml")?;
    let failure = junit_failure_text(junit);
    ensure!(
        junit.matches("<failure").count() == 1
            && LEAKS.iter().all(|leak| {
                failure.is_some_and(|text| {
                    text.lines().any(|line| {
                        line.contains(&format!(" in {} objects", thousands(objects)))
                            && line.split_once(" at ").is_some_and(|(_, frame)| {
                                is_in(Some(frame), leak.function)
                                    || frame.starts_with(&format!("{} ", leak.function))
                            })
                    })
                })
            }),
        "the JUnit report does not list both leaks, {objects} objects each, in one failure:\n\
         {junit}"
    );

    require_status(
        results,
        "clean",
        "0",
        &format!("memleak run --fail-on-leak --function {CLEAN_FUNCTION}"),
    )?;
    let clean: TraceReport = report(results, "clean.json")?;
    ensure!(
        clean
            .check
            .as_ref()
            .is_some_and(|check| !check.failed && check.count == 0),
        "the {CLEAN_FUNCTION} check: {:#?}",
        clean.check
    );
    // The passing check means something only if that tracer saw the module's allocations.
    let seen = clean
        .stacks
        .iter()
        .find(|entry| is_in(entry.call_site.symbol.as_deref(), LEAKS[0].function))
        .map(|entry| entry.count);
    ensure!(
        seen == Some(objects),
        "the tracer scoped to {CLEAN_FUNCTION} did not see the module's {objects} {} objects \
         (saw {seen:?})",
        LEAKS[0].function
    );

    // Every guest kernel has bpf_jiffies64 (Linux 5.5+) and runs its checks a minute or two
    // after boot, far from the 300 s uptime at which two tick rates explain one jiffies count:
    // where its /proc/timer_list prints that count, allocations must be timed in jiffies, whose
    // two ticks are 2-20 ms (0 says the programs read the nanosecond clock); where it does not,
    // in nanoseconds.
    let timed_in_jiffies = (1..=20).contains(&leaky.age_resolution_ms);
    if guest_prints_jiffies(results)? {
        ensure!(
            timed_in_jiffies,
            "the guest's ages are exact to {} ms: allocations were not timed in jiffies",
            leaky.age_resolution_ms
        );
    } else {
        ensure!(
            leaky.age_resolution_ms == 0,
            "the guest's /proc/timer_list prints no jiffies count, yet its ages are exact to {} \
             ms, not 0",
            leaky.age_resolution_ms
        );
    }

    Ok(Findings {
        kernel: leaky.kernel,
        attach: leaky.attach,
        notes: leaky.notes,
        leaks,
        age_resolution_ms: leaky.age_resolution_ms,
    })
}

/// Every guest kernel is built with the ORC unwinder (x86-64's default since Linux 4.14): the
/// module's pages must be named by the walk through the page allocator's frames, with stacks
/// for at most half of them (the first from the site and a sample), no walk failing, and no
/// caller the stacks captured with it contradict.
fn judge_page_callers(leaky: &TraceReport, objects: u64) -> Result<String> {
    let callers = leaky
        .methods
        .iter()
        .find(|method| method.kind == "page")
        .and_then(|method| method.callers);
    ensure!(
        callers == Some(Callers::FrameWalk),
        "the guest's page callers were not found by the frame walk ({callers:?}); notes: {:#?}",
        leaky.notes
    );
    let with_stacks: u64 = leaky
        .stacks
        .iter()
        .filter(|entry| {
            entry.kind == "page" && is_in(entry.call_site.symbol.as_deref(), "leaky_pages")
        })
        .map(|entry| entry.stack_samples)
        .sum();
    let stats = &leaky.stats;
    ensure!(
        with_stacks * 2 <= objects
            && stats.counters.page_callers_unknown == 0
            && stats.page_sites_contradicted == 0,
        "leaky_pages: {with_stacks} of {objects} pages had their stacks captured, the walk \
         failed for {} pages, and {} page sites are contradicted by their stacks",
        stats.counters.page_callers_unknown,
        stats.page_sites_contradicted
    );
    Ok(format!(
        "leaky_pages: callers by frame walk, {with_stacks} of {objects} with stacks"
    ))
}

impl Findings {
    pub fn summary(&self) -> String {
        let clock = match self.age_resolution_ms {
            0 => "allocations timed in nanoseconds".to_owned(),
            ms => format!("allocations timed in jiffies, ages exact to {ms} ms"),
        };
        format!(
            "on Linux {} ({}) the module check failed with {}, and the {CLEAN_FUNCTION} check \
             passed; {clock}",
            self.kernel,
            self.attach,
            self.leaks.join(", "),
        )
    }
}

/// Checks that kmemleak, asked after the checks, names the same leaking functions of the
/// module as memleak did (`judge` has established memleak's) with the same counts, less at most
/// a few: a stale copy of a pointer to a leaked object (on a stack, in a register) hides that
/// object from kmemleak, but the module zeroes its objects, so that no chain of them hides.
/// More objects than memleak's, or many fewer, is a disagreement (one of the two parsers or
/// counters is wrong).
pub fn compare_with_kmemleak(results: &GuestResults) -> Result<String> {
    require_status(results, "kmemleak", "0", "memleak kmemleak")?;
    let leaky: TraceReport = report(results, "leaky.json")?;
    let report: KmemleakReport = report(results, "kmemleak.json")?;
    let mut named: BTreeMap<&str, u64> = BTreeMap::new();
    for stack in &report.stacks {
        // The innermost frame in the module is the function that called the allocator.
        let function = stack
            .frames
            .iter()
            .find(|frame| frame.module.as_deref() == Some(MODULE))
            .and_then(|frame| frame.symbol.as_deref());
        if let Some(function) = function {
            *named.entry(function).or_default() += stack.count;
        }
    }
    // kmemleak also sees the module's vmalloc and percpu leaks; they are compared where memleak
    // follows those kinds on this kernel, and left out of the comparison where it does not
    // (its own check requires the note saying so).
    let not_compared: Vec<&str> = OTHER_LEAKS
        .iter()
        .filter(|(_, kind)| KMEMLEAK_KINDS.contains(kind) && !follows(&leaky, kind))
        .map(|(function, _)| *function)
        .collect();
    named.retain(|function, _| !not_compared.contains(function));
    let mut expected: Vec<&str> = LEAKS
        .iter()
        .map(|leak| leak.function)
        .chain(
            OTHER_LEAKS
                .iter()
                .filter(|(function, kind)| {
                    KMEMLEAK_KINDS.contains(kind) && !not_compared.contains(function)
                })
                .map(|(function, _)| *function),
        )
        .collect();
    expected.sort_unstable();
    ensure!(
        named.keys().copied().eq(expected.iter().copied()),
        "kmemleak names {named:?} in the module, memleak names {expected:?}; kmemleak's report: \
         {report:#?}"
    );
    let memleak = memleak_counts(&leaky)?;
    for (function, &count) in &named {
        let theirs = memleak.get(function).copied().unwrap_or(0);
        ensure!(
            count <= theirs && count + kmemleak_slack(theirs) >= theirs,
            "kmemleak counts {count} objects from {function}, memleak {theirs} (kmemleak may \
             miss at most {}); kmemleak's report: {report:#?}",
            kmemleak_slack(theirs)
        );
    }
    Ok(format!(
        "kmemleak named the same functions ({}){}",
        named
            .iter()
            .map(|(function, count)| format!("{function}: {count} objects"))
            .collect::<Vec<_>>()
            .join(", "),
        if not_compared.is_empty() {
            String::new()
        } else {
            format!(
                "; not compared, their kinds not followed on this kernel: {}",
                not_compared.join(", ")
            )
        }
    ))
}

/// Objects kmemleak may miss out of `count` (stale pointers to them): 2, or 5% of many.
fn kmemleak_slack(count: u64) -> u64 {
    (count / 20).max(2)
}

/// The objects memleak's module-scoped check counted per leaking function.
fn memleak_counts(leaky: &TraceReport) -> Result<BTreeMap<&'static str, u64>> {
    let check = leaky
        .check
        .as_ref()
        .context("the report has no module-scoped check")?;
    Ok(LEAKS
        .iter()
        .map(|leak| leak.function)
        .chain(OTHER_LEAKS.iter().map(|(function, _)| *function))
        .map(|function| {
            let count = check
                .sites
                .iter()
                .filter(|site| is_in(Some(&site.call_site), function))
                .map(|site| site.count)
                .sum();
            (function, count)
        })
        .collect())
}

/// The text of the `<failure>` element of a JUnit file (memleak escapes no character that a
/// function name or a count holds).
fn junit_failure_text(junit: &str) -> Option<&str> {
    let element = &junit[junit.find("<failure")?..];
    let text = &element[element.find('>')? + 1..];
    Some(&text[..text.find("</failure>")?])
}

/// `1234567` as memleak prints counts: `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// The guest's report `name`, read into memleak's type for it: a field missing or of another
/// type fails the verdict.
fn report<R: DeserializeOwned>(results: &GuestResults, name: &str) -> Result<R> {
    serde_json::from_str(results.file(name)?).with_context(|| format!("parsing the guest's {name}"))
}

/// Whether a symbol (`leaky_kmalloc`) or a `%pS`-style frame (`leaky_kmalloc+0x2b/0x42 [leaky]`)
/// is in `function`.
fn is_in(frame: Option<&str>, function: &str) -> bool {
    frame.is_some_and(|frame| {
        frame == function
            || frame
                .strip_prefix(function)
                .is_some_and(|rest| rest.starts_with('+'))
    })
}

#[cfg(test)]
pub(super) mod tests {
    use memleak::{
        bpf::maps::Counters,
        kinds::KindAttach,
        kmemleak::report::{Sizes, Stack, Stats as KmemleakStats},
        symbols::Frame,
        trace::report::{Entry, LeakingSite, LivenessStats, SCHEMA_VERSION, Stats, Verdict},
    };

    use super::*;

    const N: u64 = 100;

    fn site(function: &str, kind: &str, cache: Option<&str>, count: u64) -> LeakingSite {
        LeakingSite {
            call_site: format!("{function}+0x2b/0x42 [leaky]"),
            kind: kind.to_owned(),
            cache: cache.map(str::to_owned),
            bytes: count * 64,
            count,
        }
    }

    /// A frame without an address, as kmemleak writes them; `module` `None` for the core kernel.
    fn frame(symbol: Option<&str>, module: Option<&str>) -> Frame {
        Frame {
            addr: None,
            symbol: symbol.map(str::to_owned),
            offset: None,
            size: None,
            module: module.map(str::to_owned),
            source: None,
        }
    }

    /// The JSON of a `memleak run --fail-on-leak` report on the guest: its check (failed or
    /// not, over `sites`) and `stacks`, with nothing else traced.
    pub(in crate::vm) fn run_report(
        attach: &str,
        notes: &[&str],
        failed: bool,
        sites: Vec<LeakingSite>,
        stacks: Vec<Entry>,
    ) -> String {
        let check = Verdict {
            scope: "module leaky".to_owned(),
            cache_merged_with: Vec::new(),
            bytes: sites.iter().map(|site| site.bytes).sum(),
            count: sites.iter().map(|site| site.count).sum(),
            max_bytes: 0,
            max_count: 0,
            failed,
            sites,
        };
        let report = TraceReport {
            memleak: memleak::util::build::Producer::default(),
            schema: SCHEMA_VERSION,
            kernel: "6.1.0-56-amd64".to_owned(),
            duration_ms: 1_000,
            age_resolution_ms: 8,
            attach: attach.to_owned(),
            // The other kinds are not followed (as on a guest without BTF), and noted so; a
            // test that wants them followed says so with `follow_other_kinds`.
            methods: std::iter::once(KindAttach {
                kind: "slab".to_owned(),
                method: attach.to_owned(),
                why: (attach == "raw_tp").then(|| RAW_WHY.to_owned()),
                callers: None,
            })
            .chain(OTHER_LEAKS.iter().map(|(_, kind)| KindAttach {
                kind: (*kind).to_owned(),
                method: "none".to_owned(),
                why: Some("not on this kernel".to_owned()),
                callers: None,
            }))
            .collect(),
            free_paths: Vec::new(),
            sample_rate: 1,
            stack_sample_rate: 1,
            stack_sample_limit: None,
            stats: Stats {
                counters: Counters::default(),
                outstanding: 0,
                outstanding_bytes: 0,
                hidden_younger: 0,
                skipped_runs: 0,
                sites: 0,
                backing_pages: 0,
                backing_pages_bytes: 0,
                bookkeeping_objects: 0,
                bookkeeping_bytes: 0,
                page_sites_contradicted: 0,
                liveness: LivenessStats::default(),
            },
            notes: notes
                .iter()
                .map(|note| (*note).to_owned())
                .chain(
                    OTHER_LEAKS
                        .iter()
                        .map(|(_, kind)| format!("{kind} allocations not followed: not here")),
                )
                .collect(),
            kinds: Vec::new(),
            caches: Vec::new(),
            processes: None,
            check: Some(check),
            scan: None,
            missed_free_sites: Vec::new(),
            accounting: Vec::new(),
            stacks,
        };
        serde_json::to_string(&report).expect("a report serializes")
    }

    /// A kmalloc-64 entry of `count` objects whose call site is `symbol`.
    fn entry_at(symbol: &str, count: u64) -> Entry {
        let call_site = frame(Some(symbol), None);
        Entry {
            bytes: count * 64,
            count,
            bytes_requested: count * 64,
            estimated: false,
            kind: "kmalloc".to_owned(),
            cache: Some("kmalloc-64".to_owned()),
            cache_merged_with: Vec::new(),
            oldest_age_ms: 0,
            frames: vec![call_site.clone()],
            call_site,
            stack_samples: 0,
            frames_samples: 0,
            stack_failures: 0,
            other_stacks: Vec::new(),
            processes: Vec::new(),
            unverified: 0,
            unreliable: false,
            marks: None,
            user_stacks: None,
        }
    }

    const NOT_READ: &str = "slab caches are not read from the kernel: no BTF";
    const NO_BTF: &str =
        "/sys/kernel/btf/vmlinux not found: kernel has no BTF, using classic tracepoints";
    const RAW_WHY: &str = "tp_btf: the kernel's verifier rejected kmalloc_btf";

    /// What a correct run on Linux 6.1 (no cache names in classic kmem_cache_alloc) without
    /// kernel BTF (so no cache read from kernel memory either) sends.
    fn guest(leaky_sites: Vec<LeakingSite>, clean_seen: u64) -> GuestResults {
        let leaky = run_report(
            "tracepoint",
            &[NOT_READ, NO_BTF],
            true,
            leaky_sites,
            Vec::new(),
        );
        let clean = run_report(
            "tracepoint",
            &[],
            false,
            Vec::new(),
            vec![entry_at("leaky_kmalloc", clean_seen)],
        );
        let files = [
            ("leaky.status", "1".to_owned()),
            ("leaky.json", leaky),
            ("leaky.xml", junit(N)),
            ("clean.status", "0".to_owned()),
            ("clean.json", clean),
            (
                "kmem_cache_alloc.format",
                "\tfield:const void * ptr;\toffset:16;".to_owned(),
            ),
            ("btf", "no".to_owned()),
            ("timer_list_jiffies", "yes".to_owned()),
        ];
        GuestResults::from_files(files)
    }

    /// What memleak writes for the module check with `count` objects per leak.
    fn junit(count: u64) -> String {
        format!(
            "<testsuites failures=\"1\">\n  <testsuite failures=\"1\">\n    <testcase \
             name=\"no kernel memory leaks (module leaky)\">\n      <failure type=\"leak\" \
             message=\"leak check failed\">6.2 KiB in {count} objects, kmalloc (kmalloc-64) at \
             leaky_kmalloc+0x2b/0x42 [leaky]\n6.2 KiB in {count} objects, kmem_cache at \
             leaky_cache_alloc+0x2b/0x42 [leaky]\n</failure>\n    </testcase>\n  \
             </testsuite>\n</testsuites>\n"
        )
    }

    #[test]
    fn the_junit_failure_must_list_each_leak_with_its_count() {
        let mut results = guest(correct_sites(), N);
        // The names in the test case's name (the scope) or only in the message prove nothing.
        for xml in [
            "<testsuite failures=\"1\"><testcase name=\"leaky_kmalloc leaky_cache_alloc\">\
             <failure message=\"leak\"></failure></testcase></testsuite>"
                .to_owned(),
            junit(N - 1),
            junit(N).replace("leaky_cache_alloc+", "other+"),
            format!("{}{}", junit(N), junit(N)),
        ] {
            results.files.insert("leaky.xml".into(), xml.clone());
            assert!(judge(&results, N).is_err(), "{xml}");
        }
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(100), "100");
    }

    fn correct_sites() -> Vec<LeakingSite> {
        vec![
            site("leaky_cache_alloc", "kmem_cache", None, N),
            site("leaky_kmalloc", "kmalloc", Some("kmalloc-64"), N),
        ]
    }

    #[test]
    fn accepts_both_leaks_with_exact_counts() {
        let findings = judge(&guest(correct_sites(), N), N).unwrap();
        // Two slab leaks, and the three kinds this guest does not follow, noted.
        assert_eq!(findings.leaks.len(), 5);
        assert!(findings.leaks[2].ends_with("not followed (noted)"));
        assert_eq!(findings.attach, "tracepoint");
    }

    #[test]
    fn the_guest_report_must_come_from_this_sources_binary() {
        let mut results = guest(correct_sites(), N);
        // guest() records a report of an unknown memleak, as an older binary would write.
        assert!(judge_producer(&results).is_err());
        let mut report: TraceReport = serde_json::from_str(&results.files["leaky.json"]).unwrap();
        report.memleak = memleak::util::build::Producer::this();
        results
            .files
            .insert("leaky.json".into(), serde_json::to_string(&report).unwrap());
        judge_producer(&results).unwrap();
    }

    #[test]
    fn the_guest_must_time_allocations_in_jiffies() {
        let mut results = guest(correct_sites(), N);
        let mut report: TraceReport = serde_json::from_str(&results.files["leaky.json"]).unwrap();
        report.age_resolution_ms = 0;
        results
            .files
            .insert("leaky.json".into(), serde_json::to_string(&report).unwrap());
        let Err(error) = judge(&results, N) else {
            panic!("a guest report without jiffies passed");
        };
        assert!(
            error.to_string().contains("not timed in jiffies"),
            "{error}"
        );
        // A kernel whose /proc/timer_list prints no jiffies count gets the nanosecond clock.
        results
            .files
            .insert("timer_list_jiffies".into(), "no".into());
        judge(&results, N).unwrap();
        report.age_resolution_ms = 8;
        results
            .files
            .insert("leaky.json".into(), serde_json::to_string(&report).unwrap());
        assert!(judge(&results, N).is_err());
    }

    #[test]
    fn rejects_missing_or_miscounted_leaks() {
        let mut one_missing = correct_sites();
        one_missing.pop();
        assert!(judge(&guest(one_missing, N), N).is_err());
        let mut miscounted = correct_sites();
        miscounted[0].count = N - 1;
        assert!(judge(&guest(miscounted, N), N).is_err());
        let mut wrong_cache = correct_sites();
        wrong_cache[1].cache = Some("kmalloc-128".to_owned());
        assert!(judge(&guest(wrong_cache, N), N).is_err());
    }

    #[test]
    fn the_cache_must_be_named_where_the_kernel_names_it() {
        let mut results = guest(correct_sites(), N);
        results.files.insert(
            "kmem_cache_alloc.format".into(),
            "\tfield:__data_loc char[] name;\toffset:56;".into(),
        );
        assert!(judge(&results, N).is_err());
        let mut named = correct_sites();
        named[0].cache = Some(OWN_CACHE.to_owned());
        results.files.insert(
            "leaky.json".into(),
            run_report("tracepoint", &[NO_BTF], true, named, Vec::new()),
        );
        assert!(judge(&results, N).is_ok());
    }

    #[test]
    fn the_cache_must_be_named_where_the_guest_has_btf() {
        // A kernel memory reader that always fails notes that it could not read the cache; on
        // a guest with BTF that is a failure, not an excuse.
        let mut results = guest(correct_sites(), N);
        results.files.insert("btf".into(), "yes".into());
        assert!(judge(&results, N).is_err());
        let mut named = correct_sites();
        named[0].cache = Some(OWN_CACHE.to_owned());
        results.files.insert(
            "leaky.json".into(),
            run_report("raw_tp", &[], true, named, Vec::new()),
        );
        assert!(judge(&results, N).is_ok());
        // The guest must say.
        results.files.remove("btf");
        assert!(judge(&results, N).is_err());
        results.files.insert("btf".into(), "maybe".into());
        assert!(judge(&results, N).is_err());
    }

    #[test]
    fn before_5_17_the_cache_may_stay_unnamed_where_memleak_says_so() {
        // Linux 5.10 has BTF but no `struct slab`: memleak cannot read the cache, and must say so.
        let on_5_10 = |notes: &[&str]| {
            run_report("raw_tp", notes, true, correct_sites(), Vec::new())
                .replace("6.1.0-56-amd64", "5.10.0-32-amd64")
        };
        let mut results = guest(correct_sites(), N);
        results.files.insert("btf".into(), "yes".into());
        results.files.insert("leaky.json".into(), on_5_10(&[]));
        assert!(judge(&results, N).is_err());
        results
            .files
            .insert("leaky.json".into(), on_5_10(&[NOT_READ]));
        assert!(judge(&results, N).is_ok());
    }

    /// `json` (a report of `run_report`) with the other kinds followed by `method`, their
    /// notes gone, and `sites` added to its check.
    fn follow_other_kinds(json: &str, sites: Vec<LeakingSite>) -> String {
        let mut report: TraceReport = serde_json::from_str(json).unwrap();
        for method in &mut report.methods {
            if method.kind != "slab" {
                method.method = "tp_btf".to_owned();
                method.why = None;
            }
            if method.kind == "page" {
                method.callers = Some(Callers::FrameWalk);
            }
        }
        report
            .notes
            .retain(|note| !note.contains("allocations not followed"));
        report.check.as_mut().unwrap().sites.extend(sites);
        serde_json::to_string(&report).unwrap()
    }

    #[test]
    fn followed_pages_are_named_by_the_frame_walk() {
        let mut results = guest(correct_sites(), N);
        let leaky = results.file("leaky.json").unwrap().to_owned();
        let others: Vec<LeakingSite> = OTHER_LEAKS
            .iter()
            .map(|(function, kind)| site(function, kind, None, N))
            .collect();
        let followed: TraceReport =
            serde_json::from_str(&follow_other_kinds(&leaky, others)).unwrap();
        let mut judged = |change: &dyn Fn(&mut TraceReport)| {
            let mut report: TraceReport =
                serde_json::from_str(&serde_json::to_string(&followed).unwrap()).unwrap();
            change(&mut report);
            results
                .files
                .insert("leaky.json".into(), serde_json::to_string(&report).unwrap());
            judge(&results, N)
        };
        let pages_with_stacks = |stack_samples: u64| {
            move |report: &mut TraceReport| {
                let mut pages = entry_at("leaky_pages+0x1c/0x40 [leaky]", N);
                pages.kind = "page".to_owned();
                pages.stack_samples = stack_samples;
                report.stacks.push(pages);
            }
        };
        assert!(judged(&|_| {}).is_ok());
        assert!(judged(&pages_with_stacks(2)).is_ok());
        // Each page's stack taken: the walk did not name them.
        assert!(judged(&pages_with_stacks(N)).is_err());
        assert!(
            judged(&|report| {
                let page = report.methods.iter_mut().find(|m| m.kind == "page");
                page.unwrap().callers = Some(Callers::Stacks);
            })
            .is_err()
        );
        assert!(judged(&|report| report.stats.counters.page_callers_unknown = 1).is_err());
        assert!(judged(&|report| report.stats.page_sites_contradicted = 1).is_err());
    }

    #[test]
    fn other_kinds_are_checked_exactly_where_followed() {
        let mut results = guest(correct_sites(), N);
        // Not followed and noted: passes without their sites.
        assert!(judge(&results, N).is_ok());
        let leaky = results.file("leaky.json").unwrap().to_owned();
        let others = |count: u64| -> Vec<LeakingSite> {
            OTHER_LEAKS
                .iter()
                .map(|(function, kind)| site(function, kind, None, count))
                .collect()
        };
        // Not followed, yet listed: a contradiction.
        let mut listed: TraceReport = serde_json::from_str(&leaky).unwrap();
        listed.check.as_mut().unwrap().sites.extend(others(N));
        results
            .files
            .insert("leaky.json".into(), serde_json::to_string(&listed).unwrap());
        assert!(judge(&results, N).is_err());
        // Followed: each with exactly N.
        results
            .files
            .insert("leaky.json".into(), follow_other_kinds(&leaky, others(N)));
        assert!(judge(&results, N).is_ok());
        results.files.insert(
            "leaky.json".into(),
            follow_other_kinds(&leaky, others(N - 1)),
        );
        assert!(judge(&results, N).is_err());
        results
            .files
            .insert("leaky.json".into(), follow_other_kinds(&leaky, Vec::new()));
        assert!(judge(&results, N).is_err());
        // Followed but not noted as missing is fine; missing the note while not followed is not.
        let mut silent: TraceReport = serde_json::from_str(&leaky).unwrap();
        silent
            .notes
            .retain(|note| !note.contains("allocations not followed"));
        results
            .files
            .insert("leaky.json".into(), serde_json::to_string(&silent).unwrap());
        assert!(judge(&results, N).is_err());
    }

    /// What a guest sent of its scan and classify: the recorded files of a 6.1 guest (fixed
    /// bases) or of a 6.12 guest booted with KASLR, both with kernel BTF.
    fn scanned(kaslr: bool) -> GuestResults {
        let scan = if kaslr {
            include_str!("../../testdata/vm/scan-6.12-kaslr.json")
        } else {
            include_str!("../../testdata/vm/scan-6.1.json")
        };
        let leaky = run_report("raw_tp", &[], true, correct_sites(), Vec::new());
        let files = [
            ("btf", "yes"),
            ("leaky.json", &leaky),
            ("scan.status", "0"),
            ("scan.json", scan),
            ("classify.status", "0"),
            (
                "classify.json",
                include_str!("../../testdata/vm/classify-6.12.json"),
            ),
        ];
        GuestResults::from_files(files)
    }

    #[test]
    fn the_scan_must_read_the_modules_objects_and_find_kaslrs_bases() {
        // Both recorded scans read 112 objects in use in leaky_cache, all empty (100 leaked,
        // 12 free on a CPU's slab).
        assert!(judge_scan_and_classify(&scanned(false), 100, false).is_ok());
        assert!(judge_scan_and_classify(&scanned(true), 100, true).is_ok());
        assert!(judge_scan_and_classify(&scanned(false), 113, false).is_err());
        // A guest booted with KASLR whose scan used the fixed bases: the discovery failed.
        assert!(judge_scan_and_classify(&scanned(false), 100, true).is_err());
        // Another cache scanned, fewer empty objects, a failed scan or classify.
        for (file, from, to) in [
            (
                "scan.json",
                "\"scanned_cache\": \"leaky_cache\"",
                "\"scanned_cache\": \"kmalloc-64\"",
            ),
            (
                "scan.json",
                "\"empty_objects\": 112",
                "\"empty_objects\": 99",
            ),
            ("scan.status", "0", "1"),
            ("classify.status", "0", "2"),
        ] {
            let mut results = scanned(true);
            let text = results.file(file).unwrap().replace(from, to);
            assert_ne!(text, results.file(file).unwrap(), "{file}: {from}");
            results.files.insert(file.to_owned(), text);
            assert!(
                judge_scan_and_classify(&results, 100, true).is_err(),
                "{file}: {to}"
            );
        }
        // Without BTF, or before Linux 5.17 (no struct slab), the scan must be refused, in one
        // line: a guest that scanned fails, one whose scan exited 2 with one line passes.
        let must_refuse = |mut results: GuestResults, error: &str| {
            assert!(judge_scan_and_classify(&results, 100, false).is_err());
            results.files.insert("scan.status".into(), "2".into());
            results.files.insert("scan.stderr".into(), error.into());
            assert!(judge_scan_and_classify(&results, 100, false).is_ok());
        };
        let mut on_5_10 = scanned(false);
        let report = on_5_10
            .file("leaky.json")
            .unwrap()
            .replace("6.1.0-56-amd64", "5.10.0-32-amd64");
        on_5_10.files.insert("leaky.json".into(), report);
        must_refuse(
            on_5_10,
            "memleak: error: kernel BTF has no definition of struct slab",
        );
        let mut without_btf = scanned(false);
        without_btf.files.insert("btf".into(), "no".into());
        must_refuse(
            without_btf,
            "memleak: error: reading slab caches needs kernel BTF",
        );
    }

    #[test]
    fn the_attach_method_must_fit_the_guest_and_be_explained() {
        let leaky = |attach: &str, notes: &[&str], btf: &str| {
            let mut results = guest(correct_sites(), N);
            // Without BTF the cache stays unnamed, and memleak says so.
            let mut named = correct_sites();
            let mut notes = notes.to_vec();
            if btf == "yes" {
                named[0].cache = Some(OWN_CACHE.to_owned());
            } else {
                notes.push(NOT_READ);
            }
            results.files.insert(
                "leaky.json".into(),
                run_report(attach, &notes, true, named, Vec::new()),
            );
            results.files.insert("btf".into(), btf.into());
            judge(&results, N)
        };
        assert!(leaky("tp_btf", &[], "yes").is_ok());
        assert!(leaky("raw_tp", &[], "yes").is_ok());
        assert!(leaky("tracepoint", &[NO_BTF], "no").is_ok());
        // Classic tracepoints where BTF makes raw ones possible, or without a word why; BTF or
        // raw tracepoints without BTF; nonsense.
        assert!(leaky("tracepoint", &[NO_BTF], "yes").is_err());
        assert!(leaky("tracepoint", &[], "no").is_err());
        assert!(leaky("raw_tp", &[], "no").is_err());
        assert!(leaky("tp_btf", &[], "no").is_err());
        assert!(leaky("kprobe", &[], "yes").is_err());
        // Raw tracepoints without the reason tp_btf was passed over.
        let mut results = guest(correct_sites(), N);
        let mut named = correct_sites();
        named[0].cache = Some(OWN_CACHE.to_owned());
        let silent = run_report("raw_tp", &[], true, named, Vec::new())
            .replace(&format!(r#","why":"{RAW_WHY}""#), "");
        assert!(!silent.contains(RAW_WHY));
        results.files.insert("leaky.json".into(), silent);
        results.files.insert("btf".into(), "yes".into());
        assert!(judge(&results, N).is_err());
    }

    #[test]
    fn an_unnamed_cache_needs_memleak_to_say_why() {
        let mut results = guest(correct_sites(), N);
        results.files.insert(
            "leaky.json".into(),
            run_report("tracepoint", &[NO_BTF], true, correct_sites(), Vec::new()),
        );
        assert!(judge(&results, N).is_err());
    }

    #[test]
    fn rejects_a_listed_clean_function_and_wrong_statuses() {
        let mut with_clean = correct_sites();
        with_clean.push(site(CLEAN_FUNCTION, "kmalloc", Some("kmalloc-64"), 1));
        assert!(judge(&guest(with_clean, N), N).is_err());

        for (file, status) in [
            ("leaky.status", "0"),
            ("leaky.status", "2"),
            ("clean.status", "1"),
        ] {
            let mut results = guest(correct_sites(), N);
            results.files.insert(file.into(), status.into());
            assert!(judge(&results, N).is_err(), "{file} {status}");
        }
    }

    #[test]
    fn a_clean_pass_counts_only_if_that_tracer_saw_the_leaks() {
        assert!(judge(&guest(correct_sites(), 0), N).is_err());
    }

    fn kmemleak_results(stacks: Vec<Stack>) -> GuestResults {
        let mut results = guest(correct_sites(), N);
        results.files.insert("kmemleak.status".into(), "0".into());
        let report = KmemleakReport {
            memleak: memleak::util::build::Producer::default(),
            source: "kmemleak".to_owned(),
            kernel: None,
            stats: KmemleakStats {
                objects: stacks.iter().map(|stack| stack.count).sum(),
                clusters: stacks.len() as u64,
                unparsed_records: 0,
                truncated_records: 0,
                bytes: stacks.iter().map(|stack| stack.bytes).sum(),
            },
            stacks,
        };
        results.files.insert(
            "kmemleak.json".into(),
            serde_json::to_string(&report).expect("a report serializes"),
        );
        results
    }

    /// `count` 64-byte objects allocated by `function` of the module, from its init.
    fn kmemleak_stack(function: &str, count: u64) -> Stack {
        Stack {
            bytes: count * 64,
            count,
            kind: "kmemleak".to_owned(),
            cache: None,
            object_type: None,
            suspect: Some(frame(Some(function), Some(MODULE))),
            sizes: Sizes {
                min: 64,
                max: 64,
                distinct: Vec::new(),
            },
            processes: Vec::new(),
            oldest_age_ms: None,
            hex_prefix: None,
            frames: vec![
                frame(Some(function), Some(MODULE)),
                frame(None, None),
                frame(Some("do_one_initcall"), None),
            ],
        }
    }

    #[test]
    fn kmemleak_must_name_the_same_functions_with_the_same_counts() {
        let both = vec![
            kmemleak_stack("leaky_cache_alloc", 99),
            kmemleak_stack("leaky_kmalloc", 100),
        ];
        let agreement = compare_with_kmemleak(&kmemleak_results(both)).unwrap();
        assert!(
            agreement.contains("leaky_cache_alloc: 99 objects"),
            "{agreement}"
        );

        // Counts: more than memleak's, or many fewer, is a disagreement.
        for (cache, kmalloc) in [(100, 50), (100, 101), (0, 100)] {
            let stacks = vec![
                kmemleak_stack("leaky_cache_alloc", cache),
                kmemleak_stack("leaky_kmalloc", kmalloc),
            ];
            assert!(
                compare_with_kmemleak(&kmemleak_results(stacks)).is_err(),
                "{cache} and {kmalloc} objects"
            );
        }
        // Split over several stacks, the counts add up.
        let split = vec![
            kmemleak_stack("leaky_cache_alloc", 60),
            kmemleak_stack("leaky_cache_alloc", 40),
            kmemleak_stack("leaky_kmalloc", 98),
        ];
        assert!(compare_with_kmemleak(&kmemleak_results(split)).is_ok());

        let one = vec![kmemleak_stack("leaky_cache_alloc", 100)];
        assert!(compare_with_kmemleak(&kmemleak_results(one)).is_err());
        let extra = vec![
            kmemleak_stack("leaky_cache_alloc", 100),
            kmemleak_stack("leaky_kmalloc", 100),
            kmemleak_stack(CLEAN_FUNCTION, 1),
        ];
        assert!(compare_with_kmemleak(&kmemleak_results(extra)).is_err());
        let mut failed = kmemleak_results(Vec::new());
        failed.files.insert("kmemleak.status".into(), "2".into());
        assert!(compare_with_kmemleak(&failed).is_err());
    }

    #[test]
    fn matches_functions_not_prefixes() {
        assert!(is_in(
            Some("leaky_kmalloc+0x2b/0x42 [leaky]"),
            "leaky_kmalloc"
        ));
        assert!(is_in(Some("leaky_kmalloc"), "leaky_kmalloc"));
        assert!(!is_in(Some("leaky_kmalloc_more+0x1/0x2"), "leaky_kmalloc"));
        assert!(!is_in(None, "leaky_kmalloc"));
    }
}
