//! `memleak watch` on a workload whose leak is known by construction (`memleak-fixture
//! watch-mix`): 20 eventfds a second never closed (`struct eventfd_ctx`, kmalloc in
//! do_eventfd), among a pool of 300 pipes that fills over 3 s and then replaces its oldest
//! member every 10 ms (alloc_pipe_info: warm-up that levels off, members that never age), and
//! epoll instances created and closed all the time (churn, freed through RCU).
//!
//! The leak must be judged a leak (warning or worse) within a few 1-second intervals, with its
//! stack and a rate near 20/s; the pool and the churn never at warning or above. A second
//! watch on the same history store continues the series: it judges the leak before it could
//! have from its own intervals. A leak of file lock contexts (`memleak-fixture
//! grow-file-locks`), in a cache SLUB merges with others, is judged with the other caches'
//! names.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use memleak::watch::{Interval, Leak, verdict::Severity};
use memleak_tests::{
    Guard, LOCK_CONTEXT_CACHE, LOCK_CONTEXT_SITE, end_to_end, ensure_every_name_of, fixture_binary,
    memleak_binary, memleak_program_count, merged_names, settled_program_count, start_program,
    tmpfs_directory, wait_for_programs_gone,
};

const LEAK_SITE: &str = "do_eventfd";
const POOL_SITE: &str = "alloc_pipe_info";
/// Sites only the pool's pipes allocate at (an eventfd's file shares its sites with a pipe's:
/// alloc_empty_file, __d_alloc, security_file_alloc; its inode is the one anonymous inode).
const POOL_ONLY_SITES: &[&str] = &[POOL_SITE, "alloc_inode", "security_inode_alloc"];
const CHURN_SITES: &[&str] = &["ep_alloc", "do_epoll_create"];

/// Starts the fixture for `seconds` and waits until it says `ready`.
fn start_workload(seconds: u32) -> Result<Guard> {
    // memleak is built first: a build while the fixture runs would eat into its seconds.
    memleak_binary()?;
    let mut child = Command::new(fixture_binary()?)
        .args(["watch-mix", "20", &seconds.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting memleak-fixture watch-mix")?;
    let stdout = child.stdout.take().context("the fixture's stdout")?;
    let guard = Guard::new(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the fixture's first line")?;
    ensure!(line.trim() == "ready", "the fixture said `{}`", line.trim());
    Ok(guard)
}

/// Runs `memleak watch --format json --pid PID --settle SETTLE EXTRA` with 1-second intervals
/// and reads its lines. (The pid keeps other tests' eventfds, and the machine's, out of the
/// sites judged.)
fn watch(
    seconds: u32,
    pid: u32,
    settle: &str,
    extra: &[&str],
    history: Option<&Path>,
) -> Result<Vec<Interval>> {
    let duration = format!("{seconds}s");
    let pid = pid.to_string();
    let mut args = vec![
        "watch",
        "--pid",
        &pid,
        "--interval",
        "1s",
        "--duration",
        &duration,
        "--sample-rate",
        "1",
        "--format",
        "json",
        "--top",
        "1000",
        "--settle",
        settle,
    ];
    args.extend(extra);
    let history_arg;
    match history {
        Some(path) => {
            history_arg = path.display().to_string();
            args.extend(["--history", &history_arg]);
        }
        None => args.push("--no-history"),
    }
    let output = Command::new(memleak_binary()?)
        .args(&args)
        .output()
        .context("running memleak watch")?;
    ensure!(
        output.status.success(),
        "memleak watch exited {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)?
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("parsing `{line}`")))
        .collect()
}

fn leak_at<'a>(interval: &'a Interval, function: &str) -> Option<&'a Leak> {
    interval
        .leaks
        .iter()
        .find(|leak| leak.site.call_site.starts_with(function))
}

#[test]
fn a_leak_among_a_pool_and_churn_is_judged_and_they_are_not() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    // Closed epolls wait about ten seconds for their kfree_rcu batch: a settle time of 15 s
    // keeps them from being judged, as the default 30 s does at the default intervals.
    let mut workload = start_workload(40)?;
    // The default duty cycle (allocations followed 10% of the time) here; the restart test
    // below follows them all the time. --on-leak appends each new leak to a file.
    let directory = std::env::temp_dir().join(format!("memleak-on-leak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory)?;
    let hooked = directory.join("leaks.jsonl");
    let on_leak = format!("cat >> {}", hooked.display());
    let intervals = watch(
        24,
        workload.child().id(),
        "15s",
        &["--on-leak", &on_leak],
        None,
    )?;
    drop(workload);
    ensure!(
        intervals.len() >= 22,
        "{} intervals in 24 s",
        intervals.len()
    );

    // The workload was seen: the pool's 300 pipes and the leaked eventfds are in the figures.
    let last = intervals.last().expect("checked above");
    let figures = |function: &str| {
        last.sites
            .iter()
            .filter(|site| site.site.call_site.starts_with(function))
            .map(|site| site.count)
            .sum::<u64>()
    };
    ensure!(
        figures(POOL_SITE) >= 250,
        "pool: {} pipes seen; totals by interval: {:?}",
        figures(POOL_SITE),
        intervals
            .iter()
            .map(|interval| (interval.elapsed_ms, interval.stats.outstanding))
            .collect::<Vec<_>>()
    );
    ensure!(
        figures(LEAK_SITE) >= 150,
        "leak: {} eventfds seen",
        figures(LEAK_SITE)
    );
    // The ages tell them apart too: the pool's pipes live about 3 s, the leak's eventfds
    // accumulate from the start (a median of about 12 s at the end).
    let site_at = |function: &str| {
        last.sites
            .iter()
            .find(|site| site.site.call_site.starts_with(function))
            .with_context(|| format!("no {function} site in the last interval"))
    };
    let (pool, leak) = (site_at(POOL_SITE)?, site_at(LEAK_SITE)?);
    ensure!(
        pool.median_age_ms <= 3_500 && pool.p90_age_ms <= 4_000,
        "pool ages: {pool:?}"
    );
    ensure!(
        leak.median_age_ms >= 8_000 && leak.p90_age_ms > leak.median_age_ms,
        "leak ages: {leak:?}"
    );

    // Frees per site: the leak's eventfds are never closed, so none of the objects one
    // interval saw are gone at the next; the pool replaces its members all the time.
    let site_in = |interval: &Interval, function: &str| {
        interval
            .sites
            .iter()
            .find(|site| site.site.call_site.starts_with(function))
            .cloned()
    };
    let leak_freed: Vec<u64> = intervals
        .iter()
        .filter_map(|interval| site_in(interval, LEAK_SITE))
        .map(|site| site.freed)
        .collect();
    ensure!(
        leak_freed.iter().all(|&freed| freed == 0),
        "the leak's objects were freed: {leak_freed:?}"
    );
    let pool_freeing = intervals[5..]
        .iter()
        .filter(|interval| site_in(interval, POOL_SITE).is_some_and(|site| site.freed > 0))
        .count();
    ensure!(
        pool_freeing * 2 >= intervals.len() - 5,
        "the pool freed members in only {pool_freeing} of {} intervals",
        intervals.len() - 5
    );

    let first_warning = intervals.iter().position(|interval| {
        leak_at(interval, LEAK_SITE)
            .is_some_and(|leak| leak.judgement.severity >= Severity::Warning)
    });
    let first = first_warning.context("the eventfd leak was never judged leaking")?;
    // The leak's first objects reach the settle time at about the 15th interval.
    ensure!(
        (13..=19).contains(&first),
        "judged leaking at interval {} (settled at about 15)",
        first + 1
    );
    let leak = leak_at(last, LEAK_SITE).context("the leak is gone from the last interval")?;
    ensure!(leak.judgement.severity >= Severity::Warning, "{leak:?}");
    ensure!(
        (15.0..=25.0).contains(&leak.judgement.objects_per_second),
        "rate {} objects/s for a leak of 20/s",
        leak.judgement.objects_per_second
    );
    ensure!(
        leak.judgement.aging && leak.judgement.settled && !leak.judgement.levelled_off,
        "{leak:?}"
    );
    ensure!(
        leak.frames.iter().any(|frame| frame
            .symbol
            .as_deref()
            .is_some_and(|symbol| symbol.contains("eventfd"))),
        "no eventfd frame in {:?}",
        leak.frames
    );

    // --on-leak ran once per site that reached warning, with that leak on its input, the
    // eventfd leak among them; never for the pool or the churn.
    let hooked: Vec<Leak> = std::fs::read_to_string(&hooked)
        .context("--on-leak never ran")?
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("parsing `{line}`")))
        .collect::<Result<_>>()?;
    let _ = std::fs::remove_dir_all(&directory);
    ensure!(
        hooked
            .iter()
            .any(|leak| leak.site.call_site.starts_with(LEAK_SITE)
                && leak.judgement.severity >= Severity::Warning),
        "--on-leak was not given the eventfd leak: {hooked:?}"
    );
    let mut sites: Vec<&str> = hooked
        .iter()
        .map(|leak| leak.site.call_site.as_str())
        .collect();
    sites.sort_unstable();
    let before = sites.len();
    sites.dedup();
    ensure!(
        sites.len() == before,
        "--on-leak ran twice for a site: {sites:?}"
    );
    ensure!(
        !sites.iter().any(|site| POOL_ONLY_SITES
            .iter()
            .chain(CHURN_SITES)
            .any(|other| site.starts_with(other))),
        "--on-leak ran for the pool or the churn: {sites:?}"
    );

    ensure_merged_caches_named(&intervals)?;
    for interval in &intervals {
        // New slabs' object extension vectors, allocated for the fixture's caches as they
        // grow, are the allocator's bookkeeping, counted apart.
        for site in &interval.sites {
            ensure!(
                !site.site.call_site.starts_with("alloc_slab_obj_exts"),
                "allocator bookkeeping listed as a site: {site:?}"
            );
        }
        for site in POOL_ONLY_SITES.iter().chain(CHURN_SITES) {
            if let Some(judged) = leak_at(interval, site) {
                ensure!(
                    judged.judgement.severity < Severity::Warning,
                    "{site} judged {:?} at +{} ms: {judged:?}",
                    judged.judgement.severity,
                    interval.elapsed_ms
                );
            }
        }
    }
    Ok(())
}

/// Every judged site names the caches SLUB merged with its cache, as /sys/kernel/slab gives
/// them, when it is a kmem_cache site; no other site names any.
fn ensure_merged_caches_named(intervals: &[Interval]) -> Result<()> {
    for judged in intervals.iter().flat_map(|interval| &interval.leaks) {
        let expected = match &judged.site.cache {
            Some(cache) if judged.site.kind == "kmem_cache" => merged_names(cache),
            _ => Vec::new(),
        };
        ensure!(
            judged.cache_merged_with == expected,
            "the merged names of {judged:?}: /sys/kernel/slab gives {expected:?}"
        );
    }
    Ok(())
}

#[test]
fn a_leak_in_a_merged_cache_is_judged_with_the_caches_names() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    // 20 file lock contexts a second (file_lock_ctx, which SLUB merges with caches of its
    // size on most kernels: on 6.18 here the events name it ftrace_event_field), on tmpfs
    // where their inodes are not reclaimed.
    let directory = tmpfs_directory("memleak-watch-locks");
    let _ = std::fs::remove_dir_all(&directory);
    memleak_binary()?;
    let mut fixture = Command::new(fixture_binary()?);
    fixture
        .args(["grow-file-locks", "20", "14"])
        .env("MEMLEAK_LOCKS_DIR", &directory);
    let (mut workload, first) = start_program(fixture)?;
    let result = (|| {
        ensure!(first == "started", "the fixture said `{first}`");
        let intervals = watch(12, workload.child().id(), "2s", &["--duty", "100"], None)?;
        ensure_merged_caches_named(&intervals)?;
        let last = intervals.last().context("no interval")?;
        let leak = leak_at(last, LOCK_CONTEXT_SITE).with_context(|| {
            format!(
                "no {LOCK_CONTEXT_SITE} site judged in the last interval: {:?}",
                last.leaks
            )
        })?;
        ensure!(leak.judgement.severity >= Severity::Warning, "{leak:?}");
        let cache = leak
            .site
            .cache
            .as_deref()
            .context("the site names no cache")?;
        ensure_every_name_of(LOCK_CONTEXT_CACHE, cache, &leak.cache_merged_with)
    })();
    drop(workload);
    let _ = std::fs::remove_dir_all(&directory);
    result
}

#[test]
fn a_restarted_watch_continues_its_series_from_the_store() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory = std::env::temp_dir().join(format!("memleak-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    let store = directory.join("history.sqlite");
    let mut workload = start_workload(30)?;
    let pid = workload.child().id();
    // The leak's objects outlive a settle time of 5 s in the second watch's first interval.
    let before = watch(5, pid, "5s", &["--duty", "100"], Some(&store))?;
    ensure!(
        before.iter().all(|interval| leak_at(interval, LEAK_SITE)
            .is_none_or(|leak| leak.judgement.severity < Severity::Warning)),
        "five intervals are too few for a warning (6 by default): the check below proves nothing"
    );
    let after = watch(5, pid, "5s", &["--duty", "100"], Some(&store))?;
    drop(workload);
    // Six points are needed for a warning; the second watch has them only with the first's.
    let judged = after
        .iter()
        .take(3)
        .find_map(|interval| leak_at(interval, LEAK_SITE))
        .context("the restarted watch did not judge the leak in its first 3 intervals")?;
    ensure!(judged.judgement.severity >= Severity::Warning, "{judged:?}");
    ensure!(judged.judgement.points >= 6, "{judged:?}");
    // The re-seeded objects keep the count growing across the restart, not back from zero.
    let count_before = leak_at(before.last().expect("intervals"), LEAK_SITE)
        .map(|leak| leak.count)
        .or_else(|| {
            before.last().and_then(|interval| {
                interval
                    .sites
                    .iter()
                    .find(|site| site.site.call_site.starts_with(LEAK_SITE))
                    .map(|site| site.count)
            })
        })
        .context("the leak's site is not in the first watch's last interval")?;
    ensure!(
        judged.count > count_before,
        "after the restart {} objects, before it {count_before}",
        judged.count
    );

    let history = Command::new(memleak_binary()?)
        .args(["history", "--history"])
        .arg(&store)
        .args(["--site", LEAK_SITE, "--format", "json"])
        .output()
        .context("running memleak history")?;
    ensure!(
        history.status.success(),
        "memleak history exited {}",
        history.status
    );
    let report: memleak::watch::history::HistoryReport = serde_json::from_slice(&history.stdout)?;
    let points: usize = report.series.iter().map(|series| series.points.len()).sum();
    ensure!(
        points >= 8,
        "{points} points stored for the leak over two watches"
    );
    ensure!(
        report
            .verdicts
            .iter()
            .any(|verdict| verdict.site.call_site.starts_with(LEAK_SITE)
                && verdict.severity != "info"),
        "no stored warning for the leak"
    );
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}

#[test]
fn kill_9_of_a_watch_leaves_no_program_behind() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let before = settled_program_count()?;
    let mut child = Command::new(memleak_binary()?)
        .args(["watch", "--interval", "1s", "--no-history"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting memleak watch")?;
    let stderr = child.stderr.take().context("the watch's stderr")?;
    let mut watch = Guard::new(child);
    let mut line = String::new();
    BufReader::new(stderr)
        .read_line(&mut line)
        .context("reading the watch's first line")?;
    ensure!(
        line.starts_with("memleak: watching"),
        "the watch said `{}`",
        line.trim()
    );
    // Two intervals: the kill lands after the table and the kernel reader were used.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let during = memleak_program_count()?;
    ensure!(
        during >= before + 4,
        "programs not visible while watching: {before} -> {during}"
    );
    watch.child().kill().context("kill -9")?;
    watch.child().wait().context("reaping the watch")?;
    wait_for_programs_gone(before)
}

/// Runs `chattr FLAG` on those of `paths` that exist.
fn chattr(flag: &str, paths: &[&Path]) -> Result<()> {
    let existing: Vec<&&Path> = paths.iter().filter(|path| path.exists()).collect();
    let status = Command::new("chattr")
        .arg(flag)
        .args(&existing)
        .status()
        .context("running chattr")?;
    ensure!(status.success(), "chattr {flag} {existing:?}: {status}");
    Ok(())
}

/// The store of a running watch deleted, then made immutable (root's only read-only: the
/// kernel refuses its writes with EPERM), then overwritten in place with something else: each
/// interval says what became of the store, the watch goes on to its end with every line, a
/// deleted store is started again, an immutable one is written again once it is not, and an
/// overwritten one is left as it was found.
#[test]
fn a_store_deleted_made_read_only_or_overwritten_while_watching_is_said_and_left() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory =
        std::env::temp_dir().join(format!("memleak-watch-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory)?;
    let store = directory.join("history.sqlite");
    let log = directory.join("history.sqlite-wal");
    const INTERVALS: usize = 16;
    let mut child = Command::new(memleak_binary()?)
        .args([
            "watch",
            "--interval",
            "1s",
            "--duration",
            &format!("{INTERVALS}s"),
        ])
        .args(["--format", "json", "--top", "5", "--history"])
        .arg(&store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting memleak watch")?;
    let stdout = child.stdout.take().context("the watch's stdout")?;
    let watch = Guard::new(child);
    let garbage = "not a history store\n".repeat(300);
    let mut intervals: Vec<Interval> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the watch")?;
        intervals.push(serde_json::from_str(&line).with_context(|| format!("parsing `{line}`"))?);
        match intervals.len() {
            2 => std::fs::remove_file(&store).context("deleting the store")?,
            5 => chattr("+i", &[&store, &log])?,
            8 => chattr("-i", &[&store, &log])?,
            11 => std::fs::write(&store, &garbage).context("overwriting the store")?,
            _ => {}
        }
    }
    let output = watch.into_child().wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && intervals.len() >= INTERVALS - 1,
        "the watch exited {} after {} intervals: {stderr}",
        output.status,
        intervals.len()
    );
    let said = |from: usize, to: usize, needle: &str| {
        intervals[from..to.min(intervals.len())]
            .iter()
            .any(|interval| interval.notes.iter().any(|note| note.contains(needle)))
    };
    let notes = |from: usize, to: usize| {
        intervals[from..to.min(intervals.len())]
            .iter()
            .map(|interval| &interval.notes)
            .collect::<Vec<_>>()
    };
    let not_written = "history not written";
    ensure!(
        said(2, 4, "was deleted while the watch ran") && !said(0, 5, not_written),
        "the deleted store: notes {:?}",
        notes(0, intervals.len())
    );
    ensure!(
        said(5, 8, not_written),
        "the immutable store: notes {:?}",
        notes(5, 8)
    );
    ensure!(
        !said(9, 11, not_written),
        "writing did not resume once the store was writable: notes {:?}",
        notes(9, 11)
    );
    ensure!(
        said(
            11,
            13,
            "overwritten with something that is not an SQLite database"
        ) && intervals[12..]
            .iter()
            .all(|interval| interval.notes.iter().any(|note| note.contains(not_written))),
        "the overwritten store: notes {:?}",
        notes(11, intervals.len())
    );
    ensure!(
        std::fs::read_to_string(&store)? == garbage,
        "the watch wrote into the file that had replaced its store"
    );
    ensure!(
        stderr.matches("keeping no history meanwhile").count() == 1,
        "the warning is said once on standard error: {stderr}"
    );
    let history = Command::new(memleak_binary()?)
        .args(["history", "--history"])
        .arg(&store)
        .output()
        .context("running memleak history")?;
    let error = String::from_utf8_lossy(&history.stderr);
    ensure!(
        history.status.code() == Some(2) && error.trim().lines().count() == 1,
        "memleak history on the overwritten store: {} {error}",
        history.status
    );
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}
