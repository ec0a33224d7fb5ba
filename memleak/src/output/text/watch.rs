//! The watch as text: a line per interval, a block when a site first becomes a leak, a verdict
//! table at the end; and `memleak history`.
use std::{fmt::Write as _, time::Duration};

use super::merged_with;
use crate::{
    util::{
        duration,
        units::{human_bytes, thousands},
    },
    watch::{
        Interval, Leak, SiteName,
        history::{HistoryReport, StoredSeries},
        verdict::Severity,
    },
};

/// `kmalloc in kmalloc-64 at leaky_alloc+0x1c/0x80 [leaky]`; a cache SLUB merged with others
/// is followed by their names.
fn describe_site(site: &SiteName, cache_merged_with: &[String]) -> String {
    let cache = site
        .cache
        .as_deref()
        .map(|cache| format!(" in {cache}{}", merged_with(cache_merged_with)))
        .unwrap_or_default();
    format!("{}{cache} at {}", site.kind, site.call_site)
}

fn signed_rate(per_second: f64) -> String {
    if per_second >= 0.0 {
        format!("+{per_second:.2}")
    } else {
        format!("{per_second:.2}")
    }
}

/// The leak's one-line summary: severity, site, rate, total, how sure.
fn describe_leak(leak: &Leak, approx: &str) -> String {
    let judgement = &leak.judgement;
    format!(
        "{} {}: {}/s objects ({} B/s), {approx}{} objects ({approx}{}) outstanding, grew {} over {}, confidence {:.1}%{}",
        judgement.severity.name().to_uppercase(),
        describe_site(&leak.site, &leak.cache_merged_with),
        signed_rate(judgement.objects_per_second),
        signed_rate(judgement.bytes_per_second),
        thousands(leak.count),
        human_bytes(leak.bytes),
        judgement.grown_objects,
        duration::display(Duration::from_secs_f64(judgement.seconds.max(0.0))),
        judgement.confidence * 100.0,
        if judgement.levelled_off {
            " (levelled off)"
        } else if !judgement.aging {
            " (objects replaced: not aging)"
        } else if !judgement.settled {
            " (objects too young: may be waiting for an RCU free)"
        } else if judgement.frees_unseen {
            " (some objects freed without an event: judge with --duty 100)"
        } else {
            ""
        }
    )
}

/// One interval: a summary line, then a block for each site that reached warning or
/// critical in this interval.
pub fn render_interval(interval: &Interval) -> String {
    let mut out = String::new();
    let stats = &interval.stats;
    let approx = if interval.estimated { "~" } else { "" };
    let warnings = interval
        .leaks
        .iter()
        .filter(|leak| leak.judgement.severity >= Severity::Warning)
        .count();
    let _ = writeln!(
        out,
        "+{:<8} {approx}{} in {approx}{} objects at {} sites; {} growing, {} leaking; \
         {} allocs, {} frees; lost: {} dropped, {} missed frees, {} stack failures; {} found free",
        duration::display(Duration::from_millis(interval.elapsed_ms)),
        human_bytes(stats.outstanding_bytes),
        thousands(stats.outstanding),
        thousands(stats.sites),
        interval.leaks.len(),
        warnings,
        thousands(stats.allocs),
        thousands(stats.frees),
        thousands(stats.dropped_table_full),
        thousands(stats.missed_frees),
        thousands(stats.stack_failures),
        thousands(stats.found_free),
    );
    for note in &interval.notes {
        let _ = writeln!(out, "          note: {note}");
    }
    for leak in interval.leaks.iter().filter(|leak| {
        leak.judgement.severity >= Severity::Warning && leak.since_ms == interval.at_ms
    }) {
        let _ = writeln!(out, "          {}", describe_leak(leak, approx));
        for frame in &leak.frames {
            let _ = writeln!(out, "              {frame}");
        }
    }
    out
}

/// The verdicts at the end of a watch, most severe first.
pub fn render_final(last: Option<&Interval>) -> String {
    let mut out = String::new();
    let Some(interval) = last else {
        let _ = writeln!(out, "\nmemleak watch: stopped before the first interval");
        return out;
    };
    let approx = if interval.estimated { "~" } else { "" };
    let leaking: Vec<&Leak> = interval
        .leaks
        .iter()
        .filter(|leak| leak.judgement.severity >= Severity::Warning)
        .collect();
    let _ = writeln!(
        out,
        "\nmemleak watch: {} after {}: {} sites growing, {} leaking",
        if leaking.is_empty() {
            "no leak"
        } else {
            "LEAKS"
        },
        duration::display(Duration::from_millis(interval.elapsed_ms)),
        interval.leaks.len(),
        leaking.len()
    );
    for leak in &interval.leaks {
        let _ = writeln!(out, "  {}", describe_leak(leak, approx));
        if leak.judgement.severity >= Severity::Warning {
            for frame in leak.frames.iter().take(8) {
                let _ = writeln!(out, "      {frame}");
            }
        }
    }
    out
}

/// `memleak history`: the verdicts stored, and the series of the sites asked for.
pub fn render_history(report: &HistoryReport) -> String {
    let mut out = String::new();
    let verdicts = &report.verdicts;
    if verdicts.is_empty() {
        let _ = writeln!(out, "no verdicts stored in this window");
    }
    for verdict in verdicts {
        let _ = writeln!(
            out,
            "{} {:<8} {}: {}/s objects, {} objects ({}), confidence {:.1}%",
            verdict.at_ms,
            verdict.severity,
            describe_site(&verdict.site, &[]),
            signed_rate(verdict.objects_per_second),
            thousands(verdict.count),
            human_bytes(verdict.bytes),
            verdict.confidence * 100.0
        );
    }
    for StoredSeries { site, points } in &report.series {
        let _ = writeln!(out, "\n{}:", describe_site(site, &[]));
        let _ = writeln!(
            out,
            "{:>15} {:>12} {:>12} {:>12}",
            "AT_MS", "OBJECTS", "BYTES", "OLDEST"
        );
        for point in points {
            let _ = writeln!(
                out,
                "{:>15} {:>12} {:>12} {:>12}",
                point.at_ms,
                thousands(point.count),
                human_bytes(point.bytes),
                duration::display(Duration::from_millis(point.oldest_age_ms))
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{IntervalStats, SiteFigures, verdict::Judgement};

    fn interval(severity: Severity, since_ms: u64) -> Interval {
        let site = SiteName {
            kind: "kmalloc".into(),
            cache: Some("kmalloc-64".into()),
            call_site: "leaky_alloc+0x1c/0x80 [leaky]".into(),
        };
        Interval {
            memleak: crate::util::build::Producer::default(),
            schema: 1,
            at_ms: 10_000,
            elapsed_ms: 9_000,
            interval_ms: 1_000,
            sample_rate: 1,
            duty_percent: 100,
            estimated: false,
            stats: IntervalStats {
                outstanding: 600,
                outstanding_bytes: 600 * 64,
                sites: 3,
                ..IntervalStats::default()
            },
            sites: vec![SiteFigures {
                new: 50,
                oldest_age_ms: 9_000,
                ..SiteFigures::of(site.clone(), 500, 500 * 64)
            }],
            leaks: vec![Leak {
                site,
                cache_merged_with: Vec::new(),
                count: 500,
                bytes: 500 * 64,
                judgement: Judgement {
                    severity,
                    confidence: 0.999,
                    objects_per_second: 50.0,
                    bytes_per_second: 3200.0,
                    grown_objects: 450,
                    grown_bytes: 450 * 64,
                    seconds: 9.0,
                    points: 10,
                    aging: true,
                    settled: true,
                    frees_unseen: false,
                    levelled_off: false,
                },
                since_ms,
                frames: vec![crate::symbols::Frame::unknown(0xffff_ffff_c000_0000)],
            }],
            notes: vec![],
        }
    }

    #[test]
    fn a_new_leak_gets_a_block_once_and_the_end_a_table() {
        let first = render_interval(&interval(Severity::Warning, 10_000));
        assert!(first.starts_with("+9.0s"), "{first}");
        assert!(first.contains("1 growing, 1 leaking"), "{first}");
        assert!(
            first.contains(
                "WARNING kmalloc in kmalloc-64 at leaky_alloc+0x1c/0x80 [leaky]: +50.00/s objects"
            ),
            "{first}"
        );
        assert!(first.contains("0xffffffffc0000000"), "{first}");
        let later = render_interval(&interval(Severity::Warning, 5_000));
        assert!(!later.contains("WARNING"), "{later}");
        let info = render_interval(&interval(Severity::Info, 10_000));
        assert!(
            info.contains("1 growing, 0 leaking") && !info.contains("INFO"),
            "{info}"
        );
        let last = interval(Severity::Critical, 5_000);
        let end = render_final(Some(&last));
        assert!(
            end.contains("LEAKS after 9.0s: 1 sites growing, 1 leaking"),
            "{end}"
        );
        assert!(end.contains("CRITICAL kmalloc"), "{end}");
        assert!(render_final(None).contains("before the first interval"));
    }

    #[test]
    fn a_leak_in_a_merged_cache_names_the_other_caches() {
        let mut merged = interval(Severity::Warning, 10_000);
        let leak = &mut merged.leaks[0];
        leak.site.kind = "kmem_cache".into();
        leak.site.cache = Some("ftrace_event_field".into());
        leak.cache_merged_with = vec!["damon_region".into(), "file_lock_ctx".into()];
        let site = "WARNING kmem_cache in ftrace_event_field (merged with damon_region, \
                    file_lock_ctx) at leaky_alloc+0x1c/0x80 [leaky]: +50.00/s objects";
        let text = render_interval(&merged);
        assert!(text.contains(site), "{text}");
        let end = render_final(Some(&merged));
        assert!(end.contains(site), "{end}");
        let line = crate::output::json::render_json_line(&merged);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            value["leaks"][0]["cache_merged_with"],
            serde_json::json!(["damon_region", "file_lock_ctx"])
        );
        assert_eq!(serde_json::from_str::<Interval>(&line).unwrap(), merged);
    }

    #[test]
    fn interval_json_reads_back() {
        let line = crate::output::json::render_json_line(&interval(Severity::Warning, 10_000));
        assert_eq!(line.matches('\n').count(), 1);
        let read: Interval = serde_json::from_str(&line).unwrap();
        assert_eq!(read, interval(Severity::Warning, 10_000));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let leak = &value["leaks"][0];
        for field in [
            "call_site",
            "kind",
            "cache",
            "count",
            "bytes",
            "objects_per_second",
            "severity",
            "confidence",
            "frames",
        ] {
            assert!(!leak[field].is_null(), "leaks[0].{field}");
        }
        assert!(leak.get("cache_merged_with").is_none());
        assert_eq!(leak["severity"], "warning");
    }
}
