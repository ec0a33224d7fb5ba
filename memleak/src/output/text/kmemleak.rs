//! The kmemleak report as text, laid out like `memleak trace`'s.
use std::{fmt::Write as _, time::Duration};

use crate::{
    kmemleak::report::{PROCESSES_SHOWN, Report, SIZES_LISTED, Sizes},
    util::{
        duration,
        units::{human_bytes, thousands},
    },
};

pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let stats = &report.stats;
    let origin = match &report.kernel {
        Some(kernel) => format!("kernel {kernel}"),
        None => "saved report".to_owned(),
    };
    let _ = writeln!(
        out,
        "memleak: {} in {} unreferenced objects reported by kmemleak, from {} backtraces ({origin})",
        human_bytes(stats.bytes),
        thousands(stats.objects),
        thousands(stats.clusters),
    );
    let _ = writeln!(
        out,
        "records: {} truncated (kept with what they hold), {} unparsed (skipped)",
        thousands(stats.truncated_records),
        thousands(stats.unparsed_records),
    );
    if (report.stacks.len() as u64) < stats.clusters {
        let _ = writeln!(
            out,
            "showing: the top {} of {} backtraces, by count times bytes",
            report.stacks.len(),
            thousands(stats.clusters),
        );
    }
    if report.stacks.is_empty() {
        let _ = writeln!(out, "\nno unreferenced objects to report");
    }
    for (rank, stack) in report.stacks.iter().enumerate() {
        let noun = if stack.count == 1 {
            "object"
        } else {
            "objects"
        };
        let objects = match &stack.object_type {
            Some(object_type) => format!("{object_type} {noun}"),
            None => noun.to_owned(),
        };
        let oldest = stack
            .oldest_age_ms
            .map(|age| format!(", oldest {}", duration::display(Duration::from_millis(age))))
            .unwrap_or_default();
        let suspect = match &stack.suspect {
            Some(frame) => frame.to_string(),
            None => "unknown".to_owned(),
        };
        let _ = writeln!(
            out,
            "\n#{:<3} {} {objects}, {} ({}){oldest}, suspect {suspect}",
            rank + 1,
            thousands(stack.count),
            human_bytes(stack.bytes),
            describe_sizes(&stack.sizes),
        );
        if stack.frames.is_empty() {
            let _ = writeln!(out, "     no backtrace");
        } else {
            let _ = writeln!(out, "     backtrace:");
        }
        for frame in &stack.frames {
            let _ = writeln!(out, "         {frame}");
        }
        if !stack.processes.is_empty() {
            let mut processes: Vec<String> = stack
                .processes
                .iter()
                .take(PROCESSES_SHOWN)
                .map(|process| {
                    format!(
                        "{} ({}) {}",
                        process.pid,
                        process.comm,
                        thousands(process.count)
                    )
                })
                .collect();
            if stack.processes.len() > PROCESSES_SHOWN {
                processes.push(format!("{} more", stack.processes.len() - PROCESSES_SHOWN));
            }
            let _ = writeln!(out, "     allocated by: {}", processes.join(", "));
        }
        if let Some(prefix) = &stack.hex_prefix {
            let _ = writeln!(out, "     hex prefix: {prefix}");
        }
    }
    out
}

/// `64 B each`, `sizes 32 B x3, 64 B x9`, or `32 B to 4.0 KiB, 7 sizes`.
fn describe_sizes(sizes: &Sizes) -> String {
    match sizes.distinct.as_slice() {
        [only] => format!("{} each", human_bytes(only.size)),
        distinct if distinct.len() <= SIZES_LISTED => {
            let listed: Vec<String> = distinct
                .iter()
                .map(|size| format!("{} x{}", human_bytes(size.size), thousands(size.count)))
                .collect();
            format!("sizes {}", listed.join(", "))
        }
        distinct => format!(
            "{} to {}, {} sizes",
            human_bytes(sizes.min),
            human_bytes(sizes.max),
            distinct.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::kmemleak::{
        parse::parse,
        report::{SizeCount, build},
    };

    const MODERN: &str = include_str!("../../../testdata/kmemleak/modern.txt");
    const LEGACY: &str = include_str!("../../../testdata/kmemleak/legacy.txt");

    #[test]
    fn json_has_the_documented_layout() {
        let report = build(None, &parse(MODERN), 10);
        let json: serde_json::Value =
            serde_json::from_str(&crate::output::json::render_json(&report)).expect("valid JSON");
        // Sorted: serde_json's map does not keep the order of the text.
        let keys = |value: &serde_json::Value| -> Vec<String> {
            let mut keys: Vec<String> = value
                .as_object()
                .map(|object| object.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            keys
        };
        assert_eq!(
            keys(&json),
            ["kernel", "memleak", "source", "stacks", "stats"]
        );
        assert_eq!(json["source"], "kmemleak");
        assert_eq!(json["memleak"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(json["kernel"].is_null());
        assert_eq!(
            json["stats"],
            json!({
                "objects": 5,
                "clusters": 4,
                "unparsed_records": 0,
                "truncated_records": 0,
                "bytes": 5256,
            })
        );
        let leaky = &json["stacks"][2];
        assert_eq!(
            keys(leaky),
            [
                "bytes",
                "cache",
                "count",
                "frames",
                "hex_prefix",
                "kind",
                "object_type",
                "oldest_age_ms",
                "processes",
                "sizes",
                "suspect",
            ]
        );
        assert_eq!(leaky["bytes"], 128);
        assert_eq!(leaky["count"], 2);
        assert_eq!(leaky["kind"], "kmemleak");
        assert!(leaky["cache"].is_null());
        assert!(leaky["object_type"].is_null());
        let suspect = json!({
            "addr": null,
            "symbol": "leaky_alloc",
            "offset": 0x1c,
            "size": 0x40,
            "module": "leaky",
        });
        assert_eq!(leaky["suspect"], suspect);
        assert_eq!(leaky["frames"][0], suspect);
        assert_eq!(leaky["frames"].as_array().map(Vec::len), Some(7));
        assert_eq!(
            leaky["sizes"],
            json!({"min": 64, "max": 64, "distinct": [{"size": 64, "count": 2}]})
        );
        assert_eq!(
            leaky["processes"],
            json!([{"pid": 4242, "comm": "insmod", "count": 2, "bytes": 128}])
        );
        assert!(leaky["oldest_age_ms"].is_null());
        assert_eq!(leaky["hex_prefix"], "4c 45 41 4b 59 21 00 00");
        assert_eq!(json["stacks"][0]["object_type"], "phys");
        assert!(json["stacks"][0]["hex_prefix"].is_null());
    }

    #[test]
    fn text_has_a_header_stats_and_a_block_per_cluster() {
        let report = build(Some("5.4.0-debug".to_owned()), &parse(LEGACY), 10);
        let expected = "\
memleak: 512 B in 3 unreferenced objects reported by kmemleak, from 2 backtraces (kernel 5.4.0-debug)
records: 0 truncated (kept with what they hold), 0 unparsed (skipped)

#1   2 objects, 256 B (128 B each), oldest 5m02s, suspect mydrv_probe+0x3a/0x1f0 [mydrv]
     backtrace:
         mydrv_probe+0x3a/0x1f0 [mydrv]
         pci_device_probe+0xd3/0x170
         really_probe+0xe0/0x3b0
         driver_probe_device+0x5a/0xf0
     allocated by: 1234 (modprobe) 2
     hex prefix: 00 00 00 00 ad 4e ad de ff ff ff ff 00 00 00 00 ff ff ff ff ff ff ff ff

#2   1 object, 256 B (256 B each), oldest 12.3s, suspect mydrv_work+0x56/0x120 [mydrv]
     backtrace:
         mydrv_work+0x56/0x120 [mydrv]
         process_one_work+0x151/0x400
         worker_thread+0x11b/0x460
         0xffffffffa0124000
         kthread+0xd8/0xf0
         ret_from_fork+0x3f/0x70
     allocated by: 57 (kworker/u8:1) 1
     hex prefix: 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b 6b
";
        assert_eq!(render_text(&report), expected);
    }

    #[test]
    fn text_says_when_top_leaves_clusters_out() {
        let text = render_text(&build(None, &parse(MODERN), 1));
        assert!(text.contains("(saved report)"), "{text}");
        assert!(
            text.contains("\nshowing: the top 1 of 4 backtraces, by count times bytes\n"),
            "{text}"
        );
        assert!(text.contains("#1 "), "{text}");
        assert!(!text.contains("#2 "), "{text}");
        assert!(text.contains("1 phys object, 4.0 KiB"), "{text}");
    }

    #[test]
    fn text_of_an_empty_report() {
        let text = render_text(&build(None, &parse(""), 10));
        assert_eq!(
            text,
            "memleak: 0 B in 0 unreferenced objects reported by kmemleak, from 0 backtraces (saved report)\n\
             records: 0 truncated (kept with what they hold), 0 unparsed (skipped)\n\
             \n\
             no unreferenced objects to report\n"
        );
    }

    #[test]
    fn describes_size_distributions() {
        let sizes = |pairs: &[(u64, u64)]| Sizes {
            min: pairs.first().map_or(0, |pair| pair.0),
            max: pairs.last().map_or(0, |pair| pair.0),
            distinct: pairs
                .iter()
                .map(|&(size, count)| SizeCount { size, count })
                .collect(),
        };
        assert_eq!(describe_sizes(&sizes(&[(64, 12)])), "64 B each");
        assert_eq!(
            describe_sizes(&sizes(&[(32, 3), (64, 9)])),
            "sizes 32 B x3, 64 B x9"
        );
        assert_eq!(
            describe_sizes(&sizes(&[(8, 1), (16, 1), (32, 1), (64, 1), (4096, 1)])),
            "8 B to 4.0 KiB, 5 sizes"
        );
    }

    #[test]
    fn json_reads_back_into_the_report_it_came_from() {
        let json = crate::output::json::render_json(&build(None, &parse(MODERN), 10));
        let read: Report = serde_json::from_str(&json).expect("a report reads back");
        assert_eq!(crate::output::json::render_json(&read), json);
    }
}
