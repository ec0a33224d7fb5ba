//! The trace report as text, with the leak check's one-line verdict.
use std::fmt::Write as _;

use super::{
    merged_with,
    scan::{describe_marks, render_details, summary},
};
use crate::{
    trace::report::{Report, StackSampleLimit, Total, UserStacks, Verdict},
    util::{
        duration,
        units::{human_bytes, thousands},
    },
};

pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let stats = &report.stats;
    let counters = &stats.counters;
    let window = duration::display(std::time::Duration::from_millis(report.duration_ms));
    let approx = if report.sample_rate > 1 { "~" } else { "" };
    let _ = writeln!(
        out,
        "memleak: {approx}{} in {approx}{} objects still allocated after {window}, from {} allocation sites (kernel {}, {})",
        human_bytes(stats.outstanding_bytes * u64::from(report.sample_rate)),
        thousands(stats.outstanding * u64::from(report.sample_rate)),
        thousands(stats.sites),
        report.kernel,
        report.attach,
    );
    if !report.methods.is_empty() {
        let methods: Vec<String> = report
            .methods
            .iter()
            .map(|method| format!("{} {}", method.kind, method.method))
            .collect();
        let _ = writeln!(out, "attach:  {}", methods.join(", "));
    }
    let per_second = |events: u64| {
        let seconds = (report.duration_ms as f64 / 1000.0).max(0.001);
        thousands((events as f64 / seconds) as u64)
    };
    // With sampling, events at addresses the sample leaves out return before counting.
    let which = if report.sample_rate > 1 {
        " at sampled addresses"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "events:  {} allocs, {} frees{which} ({}/s); {} frees of objects not held (allocated \
         before tracing, or not followed: movable pages, filtered, dropped)",
        thousands(counters.allocs),
        thousands(counters.frees),
        per_second(counters.allocs + counters.frees),
        thousands(counters.untracked_frees),
    );
    let _ = writeln!(
        out,
        "dropped: {} (table full), {} events skipped by the kernel (nested), {} of {} stack \
         captures failed, {} missed frees (address reallocated)",
        thousands(counters.dropped_table_full),
        thousands(stats.skipped_runs),
        thousands(counters.stack_failures),
        thousands(counters.stack_captures),
        thousands(counters.missed_frees),
    );
    if counters.claim_races > 0 {
        let _ = writeln!(
            out,
            "dropped: {} claim races (two CPUs recording into one table slot at once; plain \
             claims before Linux 5.12)",
            thousands(counters.claim_races),
        );
    }
    if counters.stack_samples_over_limit > 0 {
        let _ = writeln!(
            out,
            "stacks:  {} objects of the stack sample left without a stack ({}; the first from \
             each call site is always taken)",
            thousands(counters.stack_samples_over_limit),
            stack_sample_limit(report.stack_sample_limit),
        );
    }
    if counters.page_callers_unknown > 0 {
        let _ = writeln!(
            out,
            "pages:   {} page allocations whose caller the walk through the page allocator's \
             frames did not find, named by their stacks instead",
            thousands(counters.page_callers_unknown),
        );
    }
    if counters.user_stack_captures > 0 {
        let _ = writeln!(
            out,
            "user stacks: {} of {} captures found none (kernel threads) or failed",
            thousands(counters.user_stack_misses),
            thousands(counters.user_stack_captures),
        );
    }
    let liveness = &stats.liveness;
    if liveness.verified_free + liveness.verified_allocated + liveness.unverified > 0 {
        let found = &liveness.verified_free_where;
        let _ = writeln!(
            out,
            "checked: {} slab objects found free in kernel memory and left out (slab gone {}, \
             slab freelists {}, CPU freelists {}, sheaves {}); {} verified allocated, {} unverified",
            thousands(liveness.verified_free),
            thousands(found.slab_gone),
            thousands(found.slab_freelist),
            thousands(found.cpu_freelist),
            thousands(found.sheaf),
            thousands(liveness.verified_allocated),
            thousands(liveness.unverified),
        );
    }
    if !report.missed_free_sites.is_empty() {
        let sites: Vec<String> = report
            .missed_free_sites
            .iter()
            .take(3)
            .map(|site| format!("{} ({})", site.call_site, thousands(site.count)))
            .collect();
        let _ = writeln!(out, "missed:  most missed frees at {}", sites.join(", "));
    }
    for line in report
        .accounting
        .iter()
        .filter(|line| line.unreliable || line.explained_by_turnover)
        .take(5)
    {
        let _ = writeln!(
            out,
            "kernel:  {} traced {approx}{} {}, the kernel counted {:+}{}",
            line.cache.as_deref().unwrap_or(&line.kind),
            thousands(line.traced),
            line.unit,
            line.kernel,
            if line.unreliable {
                " (entries unreliable)"
            } else {
                " (all verified allocated: older objects were freed meanwhile)"
            }
        );
    }
    if counters.movable_pages > 0 || stats.backing_pages > 0 {
        let _ = writeln!(
            out,
            "pages:   {} movable page allocations (user, page cache) not followed; {} pages \
             ({}) backing slabs, large kmallocs, vmalloc and percpu counted under those kinds",
            thousands(counters.movable_pages),
            thousands(stats.backing_pages),
            human_bytes(stats.backing_pages_bytes),
        );
    }
    if stats.bookkeeping_objects > 0 {
        let _ = writeln!(
            out,
            "bookkeeping: {} objects ({}) the allocators keep for their own slabs and vmalloc \
             areas (slab object extensions, vmap_area), left out: they go with their slab or \
             area, freed lazily without an event",
            thousands(stats.bookkeeping_objects),
            human_bytes(stats.bookkeeping_bytes),
        );
    }
    if report.sample_rate > 1 {
        let _ = writeln!(
            out,
            "sampling: 1 object in {} tracked by address hash; counts marked ~ are estimates",
            report.sample_rate
        );
    }
    if stats.hidden_younger > 0 {
        let _ = writeln!(
            out,
            "hidden:  {} objects younger than --min-age",
            thousands(stats.hidden_younger)
        );
    }
    for note in &report.notes {
        let _ = writeln!(out, "note:    {note}");
    }
    if let Some(check) = &report.check {
        let _ = writeln!(out, "check:   {}", verdict_summary(check));
    }
    let describe = |totals: &[Total]| {
        totals
            .iter()
            .map(|total| {
                format!(
                    "{}{} {approx}{} ({approx}{})",
                    total.name,
                    merged_with(&total.merged_with),
                    human_bytes(total.bytes),
                    thousands(total.count)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !report.kinds.is_empty() {
        let _ = writeln!(out, "kinds:   {}", describe(&report.kinds));
    }
    if !report.caches.is_empty() {
        let _ = writeln!(out, "caches:  {}", describe(&report.caches));
    }
    if let Some(scan) = &report.scan {
        let _ = writeln!(out, "similar: {}", summary(scan));
    }
    if let Some(processes) = &report.processes {
        let _ = writeln!(
            out,
            "\n{:>8}  {:<16} {:>12} {:>10}",
            "PID", "COMMAND", "BYTES", "OBJECTS"
        );
        for process in processes {
            let _ = writeln!(
                out,
                "{:>8}  {:<16} {:>12} {:>10}",
                process.pid,
                process.comm.as_deref().unwrap_or("?"),
                format!("{approx}{}", human_bytes(process.bytes)),
                format!("{approx}{}", thousands(process.count)),
            );
        }
    }
    if report.stacks.is_empty() {
        let _ = writeln!(out, "\nno outstanding allocations to report");
    }
    for (rank, entry) in report.stacks.iter().enumerate() {
        let approx = if entry.estimated { "~" } else { "" };
        let cache = entry
            .cache
            .as_deref()
            .map(|cache| format!(" in {cache}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "\n#{:<3} {approx}{} in {approx}{} objects, {}{cache}, oldest {}",
            rank + 1,
            human_bytes(entry.bytes),
            thousands(entry.count),
            entry.kind,
            duration::display(std::time::Duration::from_millis(entry.oldest_age_ms)),
        );
        let _ = writeln!(out, "     call site: {}", entry.call_site);
        if let Some(cache) = &entry.cache
            && !entry.cache_merged_with.is_empty()
        {
            let _ = writeln!(
                out,
                "     merged cache: {} are aliases of {cache} (SLUB merging); these objects may \
                 have been allocated under any of these names, the call site tells which",
                entry.cache_merged_with.join(", ")
            );
        }
        if entry.unreliable {
            let _ = writeln!(
                out,
                "     UNRELIABLE: the kernel's counters for this {} grew by less than traced; \
                 these objects may have been freed by a path memleak does not follow",
                if entry.cache.is_some() {
                    "cache"
                } else {
                    "kind"
                }
            );
        }
        if entry.unverified > 0 {
            let _ = writeln!(
                out,
                "     unverified: {approx}{} of these objects could not be checked in kernel memory",
                thousands(entry.unverified)
            );
        }
        let stack_note = if entry.stack_samples == 0 {
            "no stack captured".to_owned()
        } else {
            format!(
                "stack of {} of {} sampled objects",
                thousands(entry.frames_samples),
                thousands(entry.stack_samples)
            )
        };
        let _ = writeln!(out, "     {stack_note}:");
        for frame in &entry.frames {
            let _ = writeln!(out, "         {frame}");
        }
        for other in &entry.other_stacks {
            let _ = writeln!(
                out,
                "     also via ({} sampled objects):",
                thousands(other.samples)
            );
            for frame in other.frames.iter().take(6) {
                let _ = writeln!(out, "         {frame}");
            }
        }
        if !entry.processes.is_empty() {
            let processes: Vec<String> = entry
                .processes
                .iter()
                .map(|process| {
                    format!(
                        "{} ({}) {approx}{}",
                        process.pid,
                        process.comm.as_deref().unwrap_or("?"),
                        thousands(process.count)
                    )
                })
                .collect();
            let _ = writeln!(out, "     allocated by: {}", processes.join(", "));
        }
        if let Some(user) = &entry.user_stacks {
            render_user_stacks(&mut out, user);
        }
        if let (Some(marks), Some(scan)) = (&entry.marks, &report.scan) {
            let _ = writeln!(out, "     {}", describe_marks(marks, scan));
        }
    }
    if let Some(scan) = &report.scan {
        let _ = writeln!(out, "\ncontent scan of {}:", scan.cache);
        render_details(&mut out, scan);
    }
    out
}

/// The stack sample's limit in words. Reports before the limit was recorded lack it.
fn stack_sample_limit(limit: Option<StackSampleLimit>) -> String {
    match limit {
        Some(StackSampleLimit {
            interval_us: Some(us),
            ..
        }) => {
            // Whole milliseconds at HZ 100, 250 and 1000; 16.7 ms at HZ=300.
            let ms = format!("{:.1}", us as f64 / 1000.0);
            let ms = ms.strip_suffix(".0").unwrap_or(&ms);
            format!("at most one sampled stack every {ms} ms per CPU")
        }
        Some(StackSampleLimit { ticks, .. }) => {
            format!("at most one sampled stack every {ticks} clock ticks per CPU")
        }
        None => "a limit on sampled stacks per CPU".to_string(),
    }
}

/// The user-space stacks of `--user-stacks` under an entry.
fn render_user_stacks(out: &mut String, user: &UserStacks) {
    let withheld = if user.withheld > 0 {
        format!(
            "; {} more withheld: allocated in an interrupt or an exec, where the user stack is \
             not the allocating code's",
            thousands(user.withheld)
        )
    } else {
        String::new()
    };
    if user.stacks.is_empty() {
        let _ = writeln!(out, "     no user stack{withheld}");
        return;
    }
    let _ = writeln!(
        out,
        "     user stacks of {} sampled objects{withheld}:",
        thousands(user.samples)
    );
    for stack in &user.stacks {
        let _ = writeln!(
            out,
            "       {} ({}), {} sampled objects:",
            stack.pid,
            stack.comm.as_deref().unwrap_or("?"),
            thousands(stack.samples)
        );
        for frame in stack.frames.iter().take(USER_FRAMES_SHOWN) {
            let _ = writeln!(out, "         {frame}");
        }
    }
}

/// User frames shown per stack: past them, the C library's start-up.
const USER_FRAMES_SHOWN: usize = 8;

pub fn verdict_summary(verdict: &Verdict) -> String {
    let scope = if verdict.cache_merged_with.is_empty() {
        verdict.scope.clone()
    } else {
        format!(
            "{}; SLUB merged the cache with {}: kmem_cache allocations under any of these names \
             count",
            verdict.scope,
            verdict.cache_merged_with.join(", ")
        )
    };
    if verdict.failed {
        format!(
            "leak check failed ({scope}): {} in {} objects from {} allocation sites outstanding \
             (allowed: {} bytes, {} objects)",
            human_bytes(verdict.bytes),
            thousands(verdict.count),
            verdict.sites.len(),
            verdict.max_bytes,
            verdict.max_count
        )
    } else {
        format!(
            "leak check passed ({scope}): {} in {} objects outstanding",
            human_bytes(verdict.bytes),
            thousands(verdict.count)
        )
    }
}

/// One line per site in scope, for the JUnit failure's body.
pub fn verdict_details(verdict: &Verdict) -> String {
    let mut text = String::new();
    for site in &verdict.sites {
        let _ = writeln!(
            text,
            "{} in {} objects, {}{} at {}",
            human_bytes(site.bytes),
            thousands(site.count),
            site.kind,
            site.cache
                .as_deref()
                .map(|cache| format!(" ({cache})"))
                .unwrap_or_default(),
            site.call_site
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::report::fixtures::sample_report;

    #[test]
    fn sampled_reports_scale_and_mark_estimates() {
        let report = sample_report(64);
        let top = &report.stacks[0];
        assert_eq!((top.count, top.bytes), (4 * 64, 256 * 64));
        assert!(top.estimated);
        assert!(render_text(&report).contains("~16.0 KiB in ~256 objects"));
    }

    /// Sampled-out events are not counted: a sampled report says whose events it counts.
    #[test]
    fn sampled_reports_say_their_event_counts_are_of_sampled_addresses() {
        assert!(render_text(&sample_report(64)).contains(" frees at sampled addresses ("));
        assert!(!render_text(&sample_report(1)).contains("at sampled addresses"));
    }

    #[test]
    fn json_follows_the_documented_schema() {
        let json: serde_json::Value =
            serde_json::from_str(&crate::output::json::render_json(&sample_report(1))).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["kernel"], "6.18.0-test");
        assert_eq!(json["duration_ms"], 2_000);
        for counter in [
            "allocs",
            "frees",
            "outstanding",
            "dropped_table_full",
            "stack_failures",
        ] {
            assert!(json["stats"][counter].is_u64(), "stats.{counter}");
        }
        let top = &json["stacks"][0];
        assert_eq!(top["bytes"], 256);
        assert_eq!(top["count"], 4);
        assert_eq!(top["kind"], "kmalloc");
        assert_eq!(top["cache"], "kmalloc-64");
        assert_eq!(top["frames"][0]["addr"], "0x10");
        assert_eq!(top["frames"][0]["symbol"], "alloc_site");
        assert_eq!(top["frames"][0]["offset"], 4);
        assert!(top["frames"][0]["module"].is_null());
        assert!(json["stacks"][1]["frames"][0]["symbol"].is_null());
    }

    #[test]
    fn text_report_shows_counters_notes_and_stacks() {
        let text = render_text(&sample_report(1));
        assert!(text.starts_with("memleak: 320 B in 5 objects still allocated after 2.0s"));
        assert!(text.contains(
            "dropped: 0 (table full), 0 events skipped by the kernel (nested), 0 of 0 stack \
             captures failed"
        ));
        assert!(text.contains("note:    kmem:kmem_cache_free missing"));
        assert!(text.contains("#1   256 B in 4 objects, kmalloc in kmalloc-64, oldest 2.0s"));
        assert!(text.contains("stack of 2 of 3 sampled objects:\n         alloc_site+0x4/0x40\n"));
        assert!(text.contains("allocated by: 7 (leaker) 2, 8 (?) 2"));
        assert!(!text.contains("claim races"));
    }

    #[test]
    fn merged_caches_are_named_with_the_entry_and_the_check() {
        let mut report = sample_report(1);
        let text = render_text(&report);
        assert!(!text.contains("merged"), "{text}");
        report.stacks[0].kind = "kmem_cache".into();
        report.stacks[0].cache = Some("ftrace_event_field".into());
        report.stacks[0].cache_merged_with = vec!["damon_region".into(), "file_lock_ctx".into()];
        (report.kinds, report.caches) = crate::trace::report::totals(&report.stacks);
        let text = render_text(&report);
        assert!(
            text.contains(
                "caches:  ftrace_event_field (merged with damon_region, file_lock_ctx) 256 B (4), \
                 filp 64 B (1)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "     call site: alloc_site+0x4/0x40\n     merged cache: damon_region, \
                 file_lock_ctx are aliases of ftrace_event_field (SLUB merging); these objects \
                 may have been allocated under any of these names, the call site tells which\n"
            ),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&crate::output::json::render_json(&report)).unwrap();
        assert_eq!(
            json["stacks"][0]["cache_merged_with"],
            serde_json::json!(["damon_region", "file_lock_ctx"])
        );
        assert!(json["stacks"][1].get("cache_merged_with").is_none());
        assert_eq!(
            json["caches"][0]["merged_with"],
            serde_json::json!(["damon_region", "file_lock_ctx"])
        );
        assert!(json["caches"][1].get("merged_with").is_none());
        assert!(json["kinds"][0].get("merged_with").is_none());

        let verdict = Verdict {
            scope: "module=* function=* cache=file_lock_ctx".into(),
            cache_merged_with: vec!["damon_region".into(), "ftrace_event_field".into()],
            bytes: 64,
            count: 1,
            max_bytes: 0,
            max_count: 0,
            failed: true,
            sites: Vec::new(),
        };
        assert!(verdict_summary(&verdict).starts_with(
            "leak check failed (module=* function=* cache=file_lock_ctx; SLUB merged the cache \
             with damon_region, ftrace_event_field: kmem_cache allocations under any of these \
             names count): 64 B in 1 objects"
        ));
    }

    #[test]
    fn claim_races_are_shown_where_there_were_any() {
        let mut report = sample_report(1);
        report.stats.counters.claim_races = 3;
        assert!(render_text(&report).contains("dropped: 3 claim races (two CPUs"));
    }

    #[test]
    fn stack_samples_over_the_limit_are_shown_where_there_were_any() {
        let mut report = sample_report(1);
        assert!(!render_text(&report).contains("left without a stack"));
        report.stats.counters.stack_samples_over_limit = 1_234;
        assert!(render_text(&report).contains(
            "stacks:  1,234 objects of the stack sample left without a stack (a limit on"
        ));
        // A report from before the limit was recorded.
        assert!(render_text(&report).contains("(a limit on sampled stacks per CPU; the first"));
        let with_limit = |ticks, interval_us| {
            let mut report = sample_report(1);
            report.stats.counters.stack_samples_over_limit = 1;
            report.stack_sample_limit = Some(StackSampleLimit { ticks, interval_us });
            render_text(&report)
        };
        assert!(with_limit(4, Some(16_000)).contains("at most one sampled stack every 16 ms per"));
        assert!(with_limit(5, Some(16_666)).contains("stack every 16.7 ms per CPU"));
        assert!(with_limit(2, Some(20_000)).contains("stack every 20 ms per CPU"));
        // The tick rate not measured: the ticks, not a time they may not last.
        assert!(with_limit(4, None).contains("stack every 4 clock ticks per CPU"));
    }

    /// Tests and scripts read the JSON back into the same types: nothing is lost on the way.
    #[test]
    fn json_reads_back_into_the_report_it_came_from() {
        for sample_rate in [1, 64] {
            let json = crate::output::json::render_json(&sample_report(sample_rate));
            let read: Report = serde_json::from_str(&json).expect("a report reads back");
            assert_eq!(crate::output::json::render_json(&read), json);
        }
        for interval_us in [Some(16_000), None] {
            let mut report = sample_report(1);
            let limit = StackSampleLimit {
                ticks: 4,
                interval_us,
            };
            report.stack_sample_limit = Some(limit);
            let json = crate::output::json::render_json(&report);
            let read: Report = serde_json::from_str(&json).expect("a report reads back");
            assert_eq!(read.stack_sample_limit, Some(limit));
        }
    }
}
