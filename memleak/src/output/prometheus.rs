//! `memleak watch --listen`'s /metrics: the last interval in the Prometheus text exposition
//! format (version 0.0.4). Sites are labelled by kind, cache and call site, the `--top` largest
//! of them, and everything else is one `site="other"` series, so that the number of series is
//! bounded; stacks never become labels.
use std::fmt::Write as _;

use crate::watch::{Interval, SiteName, verdict::Severity};

/// Counters summed over every interval of the watch (Prometheus counters only go up).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub intervals: u64,
    pub allocs: u64,
    pub frees: u64,
    pub dropped_table_full: u64,
    pub missed_frees: u64,
    pub stack_failures: u64,
    pub found_free: u64,
}

impl Totals {
    pub fn add(&mut self, interval: &Interval) {
        let stats = &interval.stats;
        self.intervals += 1;
        self.allocs += stats.allocs;
        self.frees += stats.frees;
        self.dropped_table_full += stats.dropped_table_full;
        self.missed_frees += stats.missed_frees;
        self.stack_failures += stats.stack_failures;
        self.found_free += stats.found_free;
    }
}

/// What the watch process itself uses.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessUsage {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

/// The metrics page; `interval` is `None` before the first snapshot.
pub fn render(interval: Option<&Interval>, totals: &Totals, usage: &ProcessUsage) -> String {
    let mut out = String::new();
    if let Some(interval) = interval {
        sites(&mut out, interval);
        leaks(&mut out, interval);
        family(
            &mut out,
            "memleak_sample_rate",
            "gauge",
            "One tracked object stands for this many (--sample-rate).",
        );
        let _ = writeln!(out, "memleak_sample_rate {}", interval.sample_rate);
        family(
            &mut out,
            "memleak_duty_ratio",
            "gauge",
            "Share of each interval the slab allocation hooks are attached (--duty).",
        );
        let _ = writeln!(
            out,
            "memleak_duty_ratio {}",
            f64::from(interval.duty_percent) / 100.0
        );
        family(
            &mut out,
            "memleak_last_interval_timestamp_seconds",
            "gauge",
            "When the last snapshot was taken, in Unix seconds.",
        );
        let _ = writeln!(
            out,
            "memleak_last_interval_timestamp_seconds {}",
            interval.at_ms as f64 / 1000.0
        );
    }
    counter(
        &mut out,
        "memleak_intervals_total",
        "Snapshots taken.",
        totals.intervals,
    );
    counter(
        &mut out,
        "memleak_allocations_total",
        "Allocation events of sampled addresses.",
        totals.allocs,
    );
    counter(
        &mut out,
        "memleak_frees_total",
        "Free events of sampled addresses.",
        totals.frees,
    );
    family(
        &mut out,
        "memleak_lost_events_total",
        "counter",
        "Events memleak could not follow, by reason.",
    );
    for (reason, value) in [
        ("table_full", totals.dropped_table_full),
        ("missed_free", totals.missed_frees),
        ("stack_failure", totals.stack_failures),
    ] {
        let _ = writeln!(
            out,
            "memleak_lost_events_total{{reason=\"{reason}\"}} {value}"
        );
    }
    counter(
        &mut out,
        "memleak_found_free_objects_total",
        "Tracked objects found free in kernel memory (freed without an event) and forgotten.",
        totals.found_free,
    );
    family(
        &mut out,
        "memleak_process_cpu_seconds_total",
        "counter",
        "CPU time of the memleak process (user and system).",
    );
    let _ = writeln!(
        out,
        "memleak_process_cpu_seconds_total {}",
        usage.cpu_seconds
    );
    family(
        &mut out,
        "memleak_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the memleak process.",
    );
    let _ = writeln!(
        out,
        "memleak_process_resident_memory_bytes {}",
        usage.resident_bytes
    );
    out
}

fn sites(out: &mut String, interval: &Interval) {
    let shown_bytes: u64 = interval.sites.iter().map(|site| site.bytes).sum();
    let shown_count: u64 = interval.sites.iter().map(|site| site.count).sum();
    let other = (
        interval.stats.outstanding_bytes.saturating_sub(shown_bytes),
        interval.stats.outstanding.saturating_sub(shown_count),
    );
    for (name, help, value, other_value) in [
        (
            "memleak_outstanding_bytes",
            "Outstanding bytes per allocation site (estimated when sampled or duty-cycled).",
            (|site: &crate::watch::SiteFigures| site.bytes) as fn(&_) -> u64,
            other.0,
        ),
        (
            "memleak_outstanding_objects",
            "Outstanding objects per allocation site (estimated when sampled or duty-cycled).",
            |site| site.count,
            other.1,
        ),
    ] {
        family(out, name, "gauge", help);
        for site in &interval.sites {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(&site.site), value(site));
        }
        let _ = writeln!(
            out,
            "{name}{{kind=\"other\",cache=\"\",site=\"other\"}} {other_value}"
        );
    }
}

fn leaks(out: &mut String, interval: &Interval) {
    family(
        out,
        "memleak_leak_severity",
        "gauge",
        "Verdict per growing site: 0 info, 1 warning (a leak), 2 critical.",
    );
    for leak in &interval.leaks {
        let level = match leak.judgement.severity {
            Severity::Info => 0,
            Severity::Warning => 1,
            Severity::Critical => 2,
        };
        let _ = writeln!(
            out,
            "memleak_leak_severity{{{}}} {level}",
            labels(&leak.site)
        );
    }
    family(
        out,
        "memleak_leak_growth_bytes_per_second",
        "gauge",
        "Growth of each growing site (Theil-Sen slope over the window).",
    );
    for leak in &interval.leaks {
        let _ = writeln!(
            out,
            "memleak_leak_growth_bytes_per_second{{{}}} {}",
            labels(&leak.site),
            leak.judgement.bytes_per_second
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn labels(site: &SiteName) -> String {
    format!(
        "kind=\"{}\",cache=\"{}\",site=\"{}\"",
        escape(&site.kind),
        escape(site.cache.as_deref().unwrap_or("")),
        escape(&site.call_site)
    )
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{IntervalStats, SiteFigures};

    fn site(call_site: &str, count: u64) -> SiteFigures {
        let name = SiteName {
            kind: "kmalloc".into(),
            cache: Some("kmalloc-64".into()),
            call_site: call_site.into(),
        };
        SiteFigures::of(name, count, count * 64)
    }

    fn interval() -> Interval {
        Interval {
            memleak: crate::util::build::Producer::default(),
            schema: 1,
            at_ms: 1_796_000_000_000,
            elapsed_ms: 60_000,
            interval_ms: 60_000,
            sample_rate: 64,
            duty_percent: 10,
            estimated: true,
            stats: IntervalStats {
                allocs: 1000,
                frees: 900,
                missed_frees: 3,
                outstanding: 500,
                outstanding_bytes: 500 * 64,
                ..IntervalStats::default()
            },
            sites: vec![site("do_eventfd+0x34/0x140", 300), site("odd\"name\\", 100)],
            leaks: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn sites_are_labelled_the_rest_is_other_and_counters_add_up() {
        let interval = interval();
        let mut totals = Totals::default();
        totals.add(&interval);
        totals.add(&interval);
        let usage = ProcessUsage {
            cpu_seconds: 1.5,
            resident_bytes: 30 << 20,
        };
        let page = render(Some(&interval), &totals, &usage);
        for line in [
            "memleak_outstanding_bytes{kind=\"kmalloc\",cache=\"kmalloc-64\",site=\"do_eventfd+0x34/0x140\"} 19200",
            "memleak_outstanding_objects{kind=\"other\",cache=\"\",site=\"other\"} 100",
            "memleak_outstanding_bytes{kind=\"kmalloc\",cache=\"kmalloc-64\",site=\"odd\\\"name\\\\\"} 6400",
            "memleak_allocations_total 2000",
            "memleak_lost_events_total{reason=\"missed_free\"} 6",
            "memleak_duty_ratio 0.1",
            "memleak_process_resident_memory_bytes 31457280",
            "# TYPE memleak_frees_total counter",
        ] {
            assert!(
                page.lines().any(|got| got == line),
                "no `{line}` in\n{page}"
            );
        }
        // Every family is declared once, before its samples.
        let types = page
            .lines()
            .filter(|line| line.starts_with("# TYPE"))
            .count();
        let helps = page
            .lines()
            .filter(|line| line.starts_with("# HELP"))
            .count();
        assert_eq!(types, helps);
        let names: Vec<&str> = page
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .map(|rest| rest.split(' ').next().unwrap_or_default())
            .collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        // Before the first snapshot: the counters only.
        let empty = render(None, &Totals::default(), &usage);
        assert!(!empty.contains("memleak_outstanding_bytes"));
        assert!(empty.contains("memleak_intervals_total 0"));
    }
}
