//! Classify's analysis on series recorded on the development machine (see
//! testdata/classify/record.sh), and its file-system readers on fake sysfs trees.
use std::fs;

use super::{
    analysis::{self, CacheFacts, Thresholds, fit},
    fixtures::*,
    read_cache_facts, read_sys_slab,
};
use crate::util::scratch::ScratchDir;

/// The trend of the cache `name` among the report's unreclaimable caches.
fn unreclaimable_cache<'a>(report: &'a analysis::Report, name: &str) -> &'a analysis::CacheTrend {
    report
        .unreclaimable_caches
        .iter()
        .find(|cache| cache.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {:#?}", report.unreclaimable_caches))
}

#[test]
fn fit_finds_the_slope_of_a_line_and_the_scatter_around_it() {
    let line: Vec<(f64, f64)> = (0..5).map(|x| (x as f64, 100.0 + 8.0 * x as f64)).collect();
    let trend = fit(&line).unwrap();
    assert!((trend.slope - 8.0).abs() < 1e-9 && trend.scatter < 1e-9);

    // A step in the middle: the slope is the least-squares one, not last minus first.
    let step = [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 90.0), (4.0, 90.0)];
    let trend = fit(&step).unwrap();
    assert!((trend.slope - 27.0).abs() < 1e-9, "{trend:?}");
    assert!(trend.scatter > 10.0);

    let flat = [(0.0, 7.0), (1.0, 7.0), (2.0, 7.0)];
    assert_eq!(fit(&flat).unwrap().slope, 0.0);
    assert_eq!(fit(&[(1.0, 5.0)]), None);
    assert_eq!(fit(&[]), None);
    assert_eq!(fit(&[(1.0, 5.0), (1.0, 9.0)]), None, "no spread in time");
}

#[test]
fn an_idle_machine_has_no_growth() {
    // Idle as far as memleak's fixtures go: the others working on the machine ran compilers
    // meanwhile, which grew the inode cache.
    let report = classify_recorded("idle");
    assert!(!report.verdict.growing, "{:#?}", report.verdict);
    assert!(report.verdict.kinds.is_empty() && report.verdict.caches.is_empty());
    assert!(
        report
            .kinds
            .iter()
            .all(|kind| !kind.growing || kind.name == "slab_reclaimable"),
        "{:#?}",
        report.kinds
    );
    assert!(
        report
            .growing_caches
            .iter()
            .all(|cache| cache.reclaimable == Some(true)),
        "{:#?}",
        report.growing_caches
    );
    assert!(report.verdict.summary.starts_with("no growth"));
    assert_eq!(
        report.verdict.next_command.as_deref(),
        Some("memleak classify --duration 60s")
    );
}

#[test]
fn growing_eventfds_are_unreclaimable_slab_in_filp_and_kmalloc_64() {
    let report = classify_recorded("grow-eventfds");
    let verdict = &report.verdict;
    assert!(verdict.growing);
    assert_eq!(verdict.kinds, ["slab_unreclaimable"], "{verdict:#?}");
    // Each eventfd is a struct file (filp) and a struct eventfd_ctx (kmalloc-64).
    for cache in ["filp", "kmalloc-64"] {
        assert!(
            verdict.caches.iter().any(|name| name == cache),
            "{cache} not named: {verdict:#?}"
        );
    }
    assert_eq!(verdict.caches.first().map(String::as_str), Some("filp"));
    let filp = report
        .growing_caches
        .iter()
        .find(|cache| cache.name == "filp")
        .unwrap();
    assert_eq!(filp.reclaimable, Some(false));
    // The fixture made 2500 eventfds a second for most of the window.
    assert!(
        (1500.0..3000.0).contains(&filp.growth_objects_per_second),
        "{filp:#?}"
    );
    let unreclaimable = report
        .kinds
        .iter()
        .find(|kind| kind.name == "slab_unreclaimable")
        .unwrap();
    assert!(unreclaimable.growth_bytes_per_second > 500 * 1024);
    assert_eq!(
        verdict.next_command.as_deref(),
        Some("memleak trace --kinds slab --duration 30s --cache filp")
    );
    // Each eventfd also pins a dentry, which is in a reclaimable cache: mentioned, not
    // blamed.
    assert!(
        verdict
            .reclaimable_caches
            .iter()
            .any(|name| name == "dentry"),
        "{verdict:#?}"
    );
    assert!(!verdict.caches.iter().any(|name| name == "dentry"));
    assert!(verdict.summary.contains("usually cache"));

    let (samples, facts) = recorded("grow-eventfds");
    let mut blaming = context(facts, DEFAULT_THRESHOLDS);
    blaming.blame_reclaimable = true;
    let verdict = analysis::analyze(&samples, &blaming).verdict;
    assert!(
        verdict.kinds.iter().any(|kind| kind == "slab_reclaimable"),
        "{verdict:#?}"
    );
    assert!(verdict.caches.iter().any(|name| name == "dentry"));
    assert!(verdict.reclaimable_caches.is_empty());
}

#[test]
fn growing_bpf_arrays_are_vmalloc_from_array_map_alloc() {
    let report = classify_recorded("grow-bpf-maps");
    let verdict = &report.verdict;
    assert_eq!(verdict.kinds, ["vmalloc"], "{verdict:#?}");
    assert_eq!(verdict.vmalloc_callers, ["array_map_alloc"]);
    assert!(verdict.caches.is_empty());
    let vmalloc = report
        .kinds
        .iter()
        .find(|kind| kind.name == "vmalloc")
        .unwrap();
    // 16 maps of 1 MiB (257 pages with the guard) a second.
    assert!(
        (8 << 20..20 << 20).contains(&vmalloc.growth_bytes_per_second),
        "{vmalloc:#?}"
    );
    assert_eq!(
        report.vmalloc_callers[0].caller, "array_map_alloc",
        "largest caller first"
    );
    for caller in &report.vmalloc_callers {
        let per_hour = caller.growth_bytes_per_second as f64 * 3600.0;
        assert!(
            (caller.growth_bytes_per_hour as f64 - per_hour).abs() <= 3600.0,
            "{caller:?}"
        );
    }
    assert_eq!(
        verdict.next_command.as_deref(),
        Some("memleak trace --kinds vmalloc --duration 30s")
    );
}

#[test]
fn thresholds_are_overridable() {
    let (samples, facts) = recorded("grow-eventfds");
    let strict = Thresholds {
        min_rate_bytes_per_second: 64 << 20,
        ..DEFAULT_THRESHOLDS
    };
    let report = analysis::analyze(&samples, &context(facts.clone(), strict));
    assert!(!report.verdict.growing, "{:#?}", report.verdict);

    let high_floor = Thresholds {
        noise_floor_bytes: 1 << 30,
        ..DEFAULT_THRESHOLDS
    };
    let report = analysis::analyze(&samples, &context(facts.clone(), high_floor));
    assert!(!report.verdict.growing);

    // With no floor at all, the idle machine's small wobbles count.
    let (idle, idle_facts) = recorded("idle");
    let lax = Thresholds {
        min_rate_bytes_per_second: 0,
        noise_floor_bytes: 0,
        scatter_factor: 0.0,
    };
    let report = analysis::analyze(&idle, &context(idle_facts, lax));
    assert!(report.verdict.growing);
}

#[test]
fn large_kmallocs_are_what_the_caches_do_not_hold() {
    // SUnreclaim grows 400 KiB/s while the one unreclaimable cache stays put.
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000 + 400 * second)],
            vec![cache("kmalloc-128", 100)],
        )
    });
    let report = analysis::analyze(
        &samples,
        &context(facts(&[("kmalloc-128", false)]), DEFAULT_THRESHOLDS),
    );
    assert_eq!(report.verdict.kinds, ["slab_unreclaimable"]);
    assert_eq!(report.verdict.caches, ["large kmalloc"]);
    assert_eq!(
        report.verdict.next_command.as_deref(),
        Some("memleak trace --kinds slab --duration 30s --min-size 8193")
    );
    let large = &report.growing_caches[0];
    assert_eq!(large.growth_bytes_per_second, 400 * 1024);
    assert_eq!(large.growth_bytes_per_hour, 400 * 1024 * 3600);
    assert_eq!(large.bytes, (1000 + 400 * 9 - 400) * 1024);
}

#[test]
fn reclaimable_growth_is_reported_and_blamed_only_when_asked() {
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("SReclaimable", 4000 + 400 * second)],
            vec![cache("dentry", 1000 + 100 * second)],
        )
    });
    let mut context = context(facts(&[("dentry", true)]), DEFAULT_THRESHOLDS);
    let report = analysis::analyze(&samples, &context);
    assert!(!report.verdict.growing);
    assert!(report.verdict.kinds.is_empty());
    assert_eq!(report.verdict.reclaimable_caches, ["dentry"]);
    assert!(report.verdict.summary.starts_with("no growth"));
    assert!(report.verdict.summary.contains("usually cache, not a leak"));
    assert!(
        report
            .unreclaimable_caches
            .iter()
            .all(|c| c.name != "dentry")
    );

    context.blame_reclaimable = true;
    let report = analysis::analyze(&samples, &context);
    assert_eq!(report.verdict.kinds, ["slab_reclaimable"]);
    assert_eq!(report.verdict.caches, ["dentry"]);
    assert_eq!(
        report.verdict.next_command.as_deref(),
        Some("memleak trace --kinds slab --duration 30s --cache dentry")
    );
}

#[test]
fn caches_created_during_the_window_were_empty_before() {
    let samples = synthetic(|second| {
        let mut caches = vec![cache("old", 10)];
        if second >= 5 {
            caches.push(cache("new", 100 * (second - 4)));
        }
        (vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000)], caches)
    });
    let report = analysis::analyze(
        &samples,
        &context(CacheFacts::default(), DEFAULT_THRESHOLDS),
    );
    let new = report
        .growing_caches
        .iter()
        .find(|cache| cache.name == "new")
        .expect("new grows");
    assert_eq!(new.reclaimable, None);
    assert_eq!(new.bytes, 500 * PAGE);
    assert!(new.growth_bytes_per_second > 0);
    // Without /sys/kernel/slab there is no large-kmalloc estimate.
    assert!(
        report
            .unreclaimable_caches
            .iter()
            .all(|c| c.name != "large kmalloc")
    );
}

#[test]
fn other_pages_is_what_no_counter_explains() {
    let fields = [
        ("MemTotal", 10_000),
        ("MemFree", 4_000),
        ("Active", 1_000),
        ("Inactive", 1_000),
        ("Unevictable", 100),
        ("KReclaimable", 600),
        ("SReclaimable", 500),
        ("SUnreclaim", 300),
        ("PageTables", 50),
        ("VmallocUsed", 200),
        ("Percpu", 20),
        ("KernelStack", 16),
    ];
    // 6000 in use - 3270 explained (KReclaimable covers SReclaimable; kernel stacks are in
    // VmallocUsed).
    assert_eq!(analysis::other_pages(&meminfo(&fields), 0), 2_730 * 1024);
    assert_eq!(
        analysis::other_pages(&meminfo(&fields), 730 * 1024),
        2_000 * 1024,
        "free pages on per-CPU lists are not in use"
    );
    assert_eq!(
        analysis::other_pages(&meminfo(&[("MemTotal", 5)]), 0),
        5 * 1024
    );
    assert_eq!(
        analysis::other_pages(&meminfo(&[("MemTotal", 5), ("Active", 9)]), 0),
        0,
        "never negative"
    );
}

#[test]
fn page_growth_points_to_page_tracing_only_where_trace_has_it() {
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("MemFree", 900_000 - 1000 * second)],
            Vec::new(),
        )
    });
    let mut without_pages = context(CacheFacts::default(), DEFAULT_THRESHOLDS);
    let report = analysis::analyze(&samples, &without_pages);
    assert_eq!(report.verdict.kinds, ["other_pages"]);
    assert_eq!(report.verdict.next_command, None);
    assert!(report.verdict.summary.contains("cannot follow"));

    without_pages.traceable.push("page".into());
    let report = analysis::analyze(&samples, &without_pages);
    assert_eq!(
        report.verdict.next_command.as_deref(),
        Some("memleak trace --kinds page --duration 30s")
    );
}

fn fake_cache(root: &std::path::Path, directory: &str, reclaimable: bool, slabs: u64) {
    let dir = root.join(directory);
    fs::create_dir_all(&dir).unwrap();
    for (file, text) in [
        ("objects", format!("{} N0={}\n", slabs * 30, slabs * 30)),
        (
            "total_objects",
            format!("{} N0={}\n", slabs * 32, slabs * 32),
        ),
        ("object_size", "64\n".into()),
        ("order", "0\n".into()),
        ("slabs", format!("{slabs} N0={slabs}\n")),
        ("reclaim_account", format!("{}\n", u8::from(reclaimable))),
    ] {
        fs::write(dir.join(file), text).unwrap();
    }
}

#[test]
fn reads_a_sysfs_slab_tree_with_merged_caches() {
    let scratch = ScratchDir::new("sysfs");
    let root = scratch.path();
    fake_cache(root, "filp", false, 5);
    fake_cache(root, "dentry", true, 7);
    fake_cache(root, ":0000064", false, 3);
    for alias in ["kmalloc-64", "Acpi-Namespace"] {
        std::os::unix::fs::symlink(":0000064", root.join(alias)).unwrap();
    }
    // A directory missing its counters is skipped, not fatal.
    fs::create_dir_all(root.join("broken")).unwrap();

    let (facts, problem) = read_cache_facts(root);
    assert_eq!(
        problem.as_deref().map(|text| text.contains("broken")),
        Some(true)
    );
    assert_eq!(facts.reclaimable.get("dentry"), Some(&true));
    assert_eq!(facts.reclaimable.get("kmalloc-64"), Some(&false));
    assert!(!facts.reclaimable.contains_key(":0000064"));
    assert_eq!(facts.merges.others("kmalloc-64"), ["Acpi-Namespace"]);
    assert!(facts.merges.others("filp").is_empty());

    let mut caches = read_sys_slab(root, &facts).unwrap();
    caches.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = caches.iter().map(|cache| cache.name.as_str()).collect();
    // The merged cache is named after its first alias, and counted once.
    assert_eq!(names, ["Acpi-Namespace", "dentry", "filp"]);
    assert_eq!(caches[2].bytes(PAGE), 5 * PAGE);
    assert_eq!(caches[2].active_objects, 150);

    let empty = ScratchDir::new("sysfs-empty");
    assert!(read_sys_slab(empty.path(), &facts).is_err());
    let missing = empty.path().join("no-such-dir");
    assert!(read_sys_slab(&missing, &facts).is_err());
    let (facts, problem) = read_cache_facts(&missing);
    assert!(facts.reclaimable.is_empty() && problem.is_some());
}

#[test]
fn cache_names_are_quoted_for_the_shell_when_needed() {
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000 + 400 * second)],
            vec![cache("my cache's", 10 + 100 * second)],
        )
    });
    let report = analysis::analyze(
        &samples,
        &context(CacheFacts::default(), DEFAULT_THRESHOLDS),
    );
    assert_eq!(
        report.verdict.next_command.as_deref(),
        Some(r"memleak trace --kinds slab --duration 30s --cache 'my cache'\''s'")
    );
}

#[test]
fn fit_refuses_too_few_points_and_measures_the_scatter_exactly() {
    assert_eq!(fit(&[]), None);
    assert_eq!(fit(&[(1.0, 5.0)]), None);
    let two = fit(&[(0.0, 0.0), (1.0, 2.0)]).expect("two points make a line");
    assert!((two.slope - 2.0).abs() < 1e-12 && two.scatter < 1e-12);
    // The step of fit_finds_the_slope...: around the line 36 + 27 (x - 2) the residuals are
    // 18, -9, -36, 27 and 0, root mean square sqrt(2430 / 5).
    let step = [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 90.0), (4.0, 90.0)];
    let trend = fit(&step).unwrap();
    assert!(
        (trend.scatter - (2430.0f64 / 5.0).sqrt()).abs() < 1e-9,
        "{trend:?}"
    );
}

#[test]
fn growth_is_judged_on_the_growth_over_the_window() {
    let thresholds = DEFAULT_THRESHOLDS;
    // 30 kB/s for 10 s is 300 kB, past the 256 KiB noise floor; 30 kB/s plus 10 s is not.
    let fast = analysis::Trend {
        slope: 30_000.0,
        scatter: 0.0,
    };
    assert!(thresholds.is_growing(&fast, 10.0));
    assert!(!thresholds.is_growing(&fast, 8.0));
    // The same rise inside a scatter of 200 kB: 300 kB is not three times the scatter.
    let noisy = analysis::Trend {
        scatter: 200_000.0,
        ..fast
    };
    assert!(!thresholds.is_growing(&noisy, 10.0));
}

#[test]
fn hourly_growth_is_sixty_times_sixty_the_growth_per_second() {
    let report = classify_recorded("grow-eventfds");
    for kind in &report.kinds {
        let per_hour = kind.growth_bytes_per_second as f64 * 3600.0;
        assert!(
            (kind.growth_bytes_per_hour as f64 - per_hour).abs() <= 3600.0,
            "{}: {} per second, {} per hour",
            kind.name,
            kind.growth_bytes_per_second,
            kind.growth_bytes_per_hour
        );
    }
    assert!(
        report
            .kinds
            .iter()
            .any(|kind| kind.growth_bytes_per_hour > 3600)
    );
}

#[test]
fn the_suggested_trace_lasts_until_the_fastest_growth_reaches_a_mebibyte() {
    // SUnreclaim grows 4 KiB/s in kmalloc-128: 1 MiB takes 256 s.
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000 + 4 * second)],
            vec![cache("kmalloc-128", 100 + second)],
        )
    });
    let lax = Thresholds {
        min_rate_bytes_per_second: 1,
        noise_floor_bytes: 1,
        ..DEFAULT_THRESHOLDS
    };
    let context = context(facts(&[("kmalloc-128", false)]), lax);
    let command = analysis::analyze(&samples, &context).verdict.next_command;
    assert_eq!(
        command.as_deref(),
        Some("memleak trace --kinds slab --duration 256s --cache kmalloc-128")
    );
}

#[test]
fn caches_destroyed_during_the_window_are_empty_from_then_on() {
    let samples = synthetic(|second| {
        let mut caches = vec![cache("stays", 10)];
        if second < 5 {
            caches.push(cache("gone", 100));
        }
        (vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000)], caches)
    });
    let report = analysis::analyze(
        &samples,
        &context(CacheFacts::default(), DEFAULT_THRESHOLDS),
    );
    let gone = unreclaimable_cache(&report, "gone");
    assert!(gone.growth_bytes_per_second < 0, "{gone:?}");
    // Exactly the line through 100 slabs for five seconds, then zero for five: one missing
    // zero would give another slope.
    let expected: Vec<(f64, f64)> = (0..10)
        .map(|second| {
            (
                second as f64,
                if second < 5 { (100 * PAGE) as f64 } else { 0.0 },
            )
        })
        .collect();
    let slope = fit(&expected).unwrap().slope;
    assert!(
        (gone.growth_bytes_per_second as f64 - slope).abs() <= 1.0,
        "{gone:?}, {slope}"
    );
}

#[test]
fn a_growing_cache_is_blamed_when_other_caches_hide_it_in_the_total() {
    // filp grows by 100 slabs a second while task_struct shrinks as fast (processes
    // exiting): SUnreclaim stays flat, and the cache's own series shows the growth.
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("SUnreclaim", 16_000)],
            vec![
                cache("filp", 1000 + 100 * second),
                cache("task_struct", 3000 - 100 * second),
            ],
        )
    });
    let context = context(
        facts(&[("filp", false), ("task_struct", false)]),
        DEFAULT_THRESHOLDS,
    );
    let report = analysis::analyze(&samples, &context);
    let verdict = &report.verdict;
    assert!(verdict.growing, "{verdict:#?}");
    assert_eq!(verdict.kinds, ["slab_unreclaimable"]);
    assert_eq!(verdict.caches, ["filp"]);
    let unreclaimable = report
        .kinds
        .iter()
        .find(|kind| kind.name == "slab_unreclaimable")
        .unwrap();
    assert!(!unreclaimable.growing, "the total itself is flat");
    assert!(
        verdict
            .summary
            .contains("slab_unreclaimable (filp +400.0 KiB/s), while its total moved +0 B/s"),
        "{}",
        verdict.summary
    );
    let next = verdict.next_command.as_deref().unwrap();
    assert!(
        next.starts_with("memleak trace --kinds slab --duration ")
            && next.ends_with(" --cache filp"),
        "{next}"
    );

    // A shrinking cache alone blames nothing (the total shrinks with it: 4 KiB slabs).
    let shrinking = synthetic(|second| {
        (
            vec![
                ("MemTotal", 1 << 20),
                ("SUnreclaim", 4_000 + 4 * (3000 - 100 * second)),
            ],
            vec![cache("task_struct", 3000 - 100 * second)],
        )
    });
    let verdict = analysis::analyze(&shrinking, &context).verdict;
    assert!(
        !verdict.kinds.iter().any(|kind| kind.starts_with("slab")) && verdict.caches.is_empty(),
        "{verdict:#?}"
    );
}

#[test]
fn object_growth_is_rounded_to_a_tenth_and_hourly_growth_is_exact() {
    // 0, 3, 6, 10, 13, ...: the least-squares slope is 3.327... objects a second.
    let samples = synthetic(|second| {
        let mut growing = cache("growing", 10);
        growing.active_objects = 10 * second / 3;
        (
            vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000)],
            vec![growing, cache("filp", 1000 + 100 * second)],
        )
    });
    let report = analysis::analyze(
        &samples,
        &context(CacheFacts::default(), DEFAULT_THRESHOLDS),
    );
    let growing = unreclaimable_cache(&report, "growing");
    assert_eq!(growing.growth_objects_per_second, 3.3, "{growing:?}");
    // A cache's hourly growth: 100 slabs of a page a second.
    let filp = unreclaimable_cache(&report, "filp");
    assert_eq!(filp.growth_bytes_per_second, 100 * PAGE as i64, "{filp:?}");
    assert_eq!(filp.growth_bytes_per_hour, 3600 * 100 * PAGE as i64);
}

#[test]
fn a_growing_reclaimable_cache_is_blamed_when_other_caches_hide_it_in_the_total() {
    // dentry grows by 100 slabs a second while inode_cache shrinks as fast: SReclaimable stays
    // flat, and with --blame-reclaimable the cache's own series shows the growth.
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("SReclaimable", 16_000)],
            vec![
                cache("dentry", 1000 + 100 * second),
                cache("inode_cache", 3000 - 100 * second),
            ],
        )
    });
    let mut context = context(
        facts(&[("dentry", true), ("inode_cache", true)]),
        DEFAULT_THRESHOLDS,
    );
    context.blame_reclaimable = true;
    let verdict = analysis::analyze(&samples, &context).verdict;
    assert_eq!(verdict.kinds, ["slab_reclaimable"], "{verdict:#?}");
    assert_eq!(verdict.caches, ["dentry"]);
    assert!(
        verdict
            .summary
            .contains("slab_reclaimable (dentry +400.0 KiB/s), while its total moved"),
        "{}",
        verdict.summary
    );
}

#[test]
fn the_summary_names_what_grew_in_each_kind() {
    // The reclaimable caches, when blamed.
    let samples = synthetic(|second| {
        (
            vec![("MemTotal", 1 << 20), ("SReclaimable", 4000 + 400 * second)],
            vec![cache("dentry", 1000 + 100 * second)],
        )
    });
    let mut blaming = context(facts(&[("dentry", true)]), DEFAULT_THRESHOLDS);
    blaming.blame_reclaimable = true;
    let summary = analysis::analyze(&samples, &blaming).verdict.summary;
    assert!(
        summary.contains("slab_reclaimable +400.0 KiB/s (dentry +400.0 KiB/s)"),
        "{summary}"
    );
    // The vmalloc callers.
    let summary = classify_recorded("grow-bpf-maps").verdict.summary;
    assert!(summary.contains(" (array_map_alloc +"), "{summary}");
}

#[test]
fn nothing_grown_suggests_a_classify_six_times_as_long() {
    let samples = synthetic(|_| {
        (
            vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000)],
            vec![cache("filp", 1000)],
        )
    });
    let mut context = context(facts(&[("filp", false)]), DEFAULT_THRESHOLDS);
    context.requested = std::time::Duration::from_secs(20);
    let verdict = analysis::analyze(&samples, &context).verdict;
    assert!(!verdict.growing);
    assert_eq!(
        verdict.next_command.as_deref(),
        Some("memleak classify --duration 120s")
    );
}

#[test]
fn a_trace_of_several_kinds_is_not_scoped_to_a_cache() {
    // Slab (filp) and percpu memory both grow: `--cache` would leave the percpu leak out of
    // the trace's leak check.
    let samples = synthetic(|second| {
        (
            vec![
                ("MemTotal", 1 << 20),
                ("SUnreclaim", 4000 + 400 * second),
                ("Percpu", 4000 + 400 * second),
            ],
            vec![cache("filp", 1000 + 100 * second)],
        )
    });
    let context = context(facts(&[("filp", false)]), DEFAULT_THRESHOLDS);
    let verdict = analysis::analyze(&samples, &context).verdict;
    let command = verdict.next_command.as_deref().unwrap_or_default();
    assert!(
        command.starts_with("memleak trace --kinds ")
            && command.contains("slab")
            && command.contains("percpu")
            && !command.contains("--cache"),
        "{verdict:#?}"
    );
}
