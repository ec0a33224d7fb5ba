//! The classify report as text and JSON.
use std::fmt::Write as _;

use super::merged_with;
use crate::{
    classify::analysis::Report,
    util::{duration, units::human_bytes},
};

/// `+1.5 MiB`, `-12.0 KiB`, `0 B`.
fn signed_bytes(bytes: i64) -> String {
    let sign = match bytes.signum() {
        1 => "+",
        -1 => "-",
        _ => "",
    };
    format!("{sign}{}", human_bytes(bytes.unsigned_abs()))
}

fn growing_mark(growing: bool) -> &'static str {
    if growing { "  growing" } else { "" }
}

pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let window = duration::display(std::time::Duration::from_millis(report.duration_ms));
    let _ = writeln!(
        out,
        "memleak classify: {} samples over {window} (kernel {})",
        report.samples, report.kernel
    );
    let thresholds = &report.thresholds;
    let _ = writeln!(
        out,
        "growing means a fitted trend of at least {}/s (--min-rate), {} over the window \
         (--noise-floor) and {}x the samples' scatter",
        human_bytes(thresholds.min_rate_bytes_per_second),
        human_bytes(thresholds.noise_floor_bytes),
        thresholds.scatter_factor,
    );
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }

    let _ = writeln!(
        out,
        "\n{:<24} {:>11} {:>14} {:>13}",
        "kind", "size", "growth/s", "growth/h"
    );
    for kind in &report.kinds {
        let name = if kind.estimate {
            format!("{} (estimate)", kind.name)
        } else {
            kind.name.to_owned()
        };
        let _ = writeln!(
            out,
            "{name:<24} {:>11} {:>14} {:>13}{}",
            human_bytes(kind.bytes),
            signed_bytes(kind.growth_bytes_per_second),
            signed_bytes(kind.growth_bytes_per_hour),
            growing_mark(kind.growing),
        );
    }

    let cache_name = |name: &str, aliases: &[String]| format!("{name}{}", merged_with(aliases));
    if !report.unreclaimable_caches.is_empty() {
        let _ = writeln!(
            out,
            "\nunreclaimable slab caches, largest first:\n{:>11} {:>12} {:>14}  cache",
            "size", "objects", "growth/s"
        );
        for cache in &report.unreclaimable_caches {
            let _ = writeln!(
                out,
                "{:>11} {:>12} {:>14}  {}{}",
                human_bytes(cache.bytes),
                // Large kmallocs are pages, not objects of a cache.
                if cache.object_size == 0 {
                    "-".to_owned()
                } else {
                    crate::util::units::thousands(cache.active_objects)
                },
                signed_bytes(cache.growth_bytes_per_second),
                cache_name(&cache.name, &cache.aliases),
                growing_mark(cache.growing),
            );
        }
    }
    if !report.growing_caches.is_empty() {
        let _ = writeln!(
            out,
            "\ngrowing slab caches, fastest first:\n{:>14} {:>12} {:>11}  cache",
            "growth/s", "objects/s", "size"
        );
        for cache in &report.growing_caches {
            let reclaimable = match cache.reclaimable {
                Some(true) => " [reclaimable]",
                Some(false) => "",
                None => " [reclaimable?]",
            };
            let objects_per_second = if cache.object_size == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", cache.growth_objects_per_second)
            };
            let _ = writeln!(
                out,
                "{:>14} {objects_per_second:>12} {:>11}  {}{reclaimable}",
                signed_bytes(cache.growth_bytes_per_second),
                human_bytes(cache.bytes),
                cache_name(&cache.name, &cache.aliases),
            );
        }
    }
    if !report.vmalloc_callers.is_empty() {
        let _ = writeln!(
            out,
            "\nvmalloc by caller, largest first:\n{:>11} {:>14}  caller",
            "size", "growth/s"
        );
        for caller in &report.vmalloc_callers {
            let _ = writeln!(
                out,
                "{:>11} {:>14}  {}{}",
                human_bytes(caller.bytes),
                signed_bytes(caller.growth_bytes_per_second),
                caller.caller,
                growing_mark(caller.growing),
            );
        }
    }

    let verdict = &report.verdict;
    let _ = writeln!(out, "\nverdict: {}", verdict.summary);
    if let Some(command) = &verdict.next_command {
        let _ = writeln!(out, "next:    {command}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::fixtures::classify_recorded;

    #[test]
    fn json_follows_the_conventions_of_the_other_reports() {
        let report = classify_recorded("grow-eventfds");
        let json: serde_json::Value =
            serde_json::from_str(&crate::output::json::render_json(&report)).expect("valid JSON");
        assert_eq!(json["schema"], 1);
        assert_eq!(json["kernel"], "6.18.0-test");
        assert!(
            json["duration_ms"]
                .as_u64()
                .is_some_and(|ms| (5_000..8_000).contains(&ms))
        );
        assert_eq!(json["samples"], 7);
        assert_eq!(json["thresholds"]["noise_floor_bytes"], 256 * 1024);
        assert_eq!(json["verdict"]["growing"], true);
        assert_eq!(json["verdict"]["kinds"][0], "slab_unreclaimable");
        let sorted = |array: &str, key: &str| {
            let values: Vec<i64> = json[array]
                .as_array()
                .unwrap()
                .iter()
                .map(|entry| entry[key].as_i64().unwrap())
                .collect();
            assert!(!values.is_empty(), "{array} is empty");
            assert!(values.is_sorted_by(|a, b| a >= b), "{array}: {values:?}");
        };
        sorted("kinds", "bytes");
        sorted("unreclaimable_caches", "bytes");
        sorted("growing_caches", "growth_bytes_per_second");
        sorted("vmalloc_callers", "bytes");
        assert!(
            json["unreclaimable_caches"].as_array().unwrap().len() <= 10,
            "--top"
        );
    }

    #[test]
    fn text_ends_with_the_verdict_and_the_next_command() {
        let text = render_text(&classify_recorded("grow-eventfds"));
        assert!(
            text.starts_with("memleak classify: 7 samples over "),
            "{text}"
        );
        assert!(text.contains("slab_unreclaimable"));
        assert!(text.contains("other_pages (estimate)"));
        let mut last_lines = text.lines().rev();
        assert!(
            last_lines
                .next()
                .unwrap()
                .starts_with("next:    memleak trace --kinds slab")
        );
        assert!(
            last_lines
                .next()
                .unwrap()
                .starts_with("verdict: growing in ")
        );
    }

    #[test]
    fn json_reads_back_into_the_report_it_came_from() {
        let json = crate::output::json::render_json(&classify_recorded("grow-eventfds"));
        let read: Report = serde_json::from_str(&json).expect("a report reads back");
        assert_eq!(crate::output::json::render_json(&read), json);
    }
}
