//! End-to-end: slab content similarity. A fixture fills a cache with identical System V
//! messages long before memleak looks; `memleak scan` must find them as one group, and
//! `memleak trace --cache` must attribute the group to the function that allocates them, from
//! the few more the fixture sends during the window, while another fixture's dissimilar
//! messages, allocated in the same cache by the same function, stay unmarked.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use memleak::{
    scan::report::ScanReport,
    trace::report::{Entry, Report},
};
use memleak_tests::{Guard, finish_tracer, fixture_binary, memleak_binary, start_tracer};

const HELD: u64 = 20_000;
const MORE: u64 = 300;
const DISSIMILAR: u64 = 200;
/// `BPF_PROG_TYPE_RAW_TRACEPOINT`: the kernel memory reader is memleak's only program of
/// this type.
const RAW_TRACEPOINT: &str = "17";

/// Where 64-byte System V messages live: their own bucket caches since Linux 6.11, the
/// accounted kmalloc caches before.
fn message_cache() -> &'static str {
    if Path::new("/sys/kernel/slab/msg_msg-64").exists() {
        "msg_msg-64"
    } else {
        "kmalloc-cg-64"
    }
}

/// A message fixture. System V queues outlive their process, so the fixture is never killed:
/// closing its standard input makes it remove its queues and exit, pass or fail.
struct Fixture {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Fixture {
    /// Starts a fixture and waits for its first line, which must be `expected`.
    fn start(args: &[&str], expected: &str) -> Result<Self> {
        let mut child = Command::new(fixture_binary()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?;
        let stdout = BufReader::new(child.stdout.take().context("fixture stdout")?);
        let mut fixture = Self { child, stdout };
        fixture.expect_line(expected)?;
        Ok(fixture)
    }

    fn expect_line(&mut self, expected: &str) -> Result<()> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("reading the fixture")?;
        ensure!(
            line.trim() == expected,
            "fixture said {line:?}, expected {expected}"
        );
        Ok(())
    }

    fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("fixture stdin")?;
        writeln!(stdin, "{line}").context("writing to the fixture")
    }

    fn pid(&self) -> u64 {
        u64::from(self.child.id())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `memleak scan --cache CACHE --format json`.
fn memleak_scan(cache: &str) -> Result<Output> {
    Command::new(memleak_binary()?)
        .args(["scan", "--cache", cache, "--format", "json"])
        .output()
        .context("running memleak scan")
}

/// The report of `memleak scan --cache CACHE`, or why there is none.
fn scan_report(cache: &str) -> Result<Result<ScanReport, String>> {
    let output = memleak_scan(cache)?;
    if !output.status.success() {
        return Ok(Err(format!(
            "memleak scan --cache {cache} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(Ok(
        serde_json::from_slice(&output.stdout).context("parsing the report")?
    ))
}

#[test]
fn scan_finds_identical_messages_as_one_group() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let cache = message_cache();
    let _fixture = Fixture::start(&["similar-messages", &HELD.to_string(), "0"], "ready")?;
    let report = scan_report(cache)?.map_err(anyhow::Error::msg)?;
    ensure!(report.cache == cache, "{report:#?}");
    ensure!(report.objects >= HELD, "{report:#?}");
    ensure!(report.unreadable_pages == 0, "{report:#?}");
    let Some(top) = report.groups.first() else {
        bail!("the largest group should hold the {HELD} messages: {report:#?}");
    };
    ensure!(
        top.objects >= HELD,
        "the largest group should hold the {HELD} messages: {report:#?}"
    );
    ensure!(
        top.strings
            .iter()
            .any(|string| string.text == "memleak-scan-fix"),
        "the representative should hold the messages' text: {top:#?}"
    );
    // The typed parse has read the bases from 0x-prefixed hex strings (it fails on anything
    // else); memleak writes them as `{:#x}` does.
    for (base, value) in [
        ("page_offset_base", report.page_offset_base),
        ("vmemmap_base", report.vmemmap_base),
    ] {
        let value = format!("{value:#x}");
        ensure!(value.starts_with("0xff"), "{base} = {value:?}");
    }

    // --no-contents: the same group, with neither the text nor its bytes anywhere.
    let output = Command::new(memleak_binary()?)
        .args([
            "scan",
            "--cache",
            cache,
            "--format",
            "json",
            "--no-contents",
        ])
        .output()
        .context("running memleak scan --no-contents")?;
    ensure!(
        output.status.success(),
        "memleak scan --no-contents: {}",
        output.status
    );
    let text = String::from_utf8_lossy(&output.stdout);
    // "memleak" in hex, as the contents would spell it.
    for secret in ["memleak-scan-fix", "6d656d6c65616b"] {
        ensure!(
            !text.contains(secret),
            "--no-contents printed {secret}: {text}"
        );
    }
    let withheld: ScanReport = serde_json::from_str(&text).context("parsing the report")?;
    ensure!(
        withheld.contents_withheld
            && withheld
                .groups
                .first()
                .is_some_and(|top| top.objects >= HELD)
            && withheld
                .groups
                .iter()
                .all(|group| group.contents.is_empty() && group.strings.is_empty()),
        "{withheld:#?}"
    );
    Ok(())
}

#[test]
fn scan_of_an_unknown_cache_is_a_one_line_error() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let output = memleak_scan("no-such-cache")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(2),
        "status {}: {stderr}",
        output.status
    );
    ensure!(
        stderr.lines().count() == 1 && stderr.contains("no-such-cache"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn a_merged_cache_is_scanned_as_the_cache_it_was_merged_into() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    // SLUB names each cache's slabs with a link in /sys/kernel/slab; merged caches' links lead
    // to the same directory.
    let sysfs = Path::new("/sys/kernel/slab");
    let mut by_slabs: std::collections::BTreeMap<std::path::PathBuf, Vec<String>> =
        Default::default();
    for entry in std::fs::read_dir(sysfs).context("listing /sys/kernel/slab")? {
        let entry = entry?;
        if entry.file_type()?.is_symlink()
            && let (Ok(name), Ok(target)) = (
                entry.file_name().into_string(),
                std::fs::canonicalize(entry.path()),
            )
        {
            by_slabs.entry(target).or_default().push(name);
        }
    }
    let merged: Vec<Vec<String>> = by_slabs
        .into_values()
        .filter(|names| names.len() > 1)
        .map(|mut names| {
            names.sort();
            names
        })
        .collect();
    // Merged caches can be empty; the first group whose slabs hold objects will do. One name in
    // each group owns the slabs; the others are scanned as that one.
    for names in merged.iter().take(20) {
        let mut saw_merged = false;
        for alias in names {
            let Ok(report) = scan_report(alias)? else {
                continue;
            };
            let scanned = report.scanned_cache.as_str();
            ensure!(
                names.iter().any(|name| name == scanned),
                "{alias} was scanned as {scanned}, not one of {names:?}: {report:#?}"
            );
            ensure!(
                report.merged == (scanned != alias.as_str()),
                "{alias}: merged says {}, scanned as {scanned}",
                report.merged
            );
            let others: Vec<String> = names
                .iter()
                .filter(|name| *name != alias)
                .cloned()
                .collect();
            ensure!(
                report.shares_slabs_with == others,
                "{alias}: expected {others:?} to share its slabs: {report:#?}"
            );
            saw_merged |= report.merged;
        }
        if saw_merged {
            return Ok(());
        }
    }
    bail!("none of these groups of merged caches could be scanned: {merged:?}")
}

/// How many raw tracepoint programs `tracer` holds open, from its fdinfo: whether it loaded
/// the kernel memory reader. Other processes' programs do not count.
fn readers_held(tracer: &mut Guard) -> Result<usize> {
    let fdinfo = format!("/proc/{}/fdinfo", tracer.child().id());
    let mut readers = 0;
    for entry in std::fs::read_dir(&fdinfo).with_context(|| format!("listing {fdinfo}"))? {
        // Descriptors may close while they are listed.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        readers += info
            .lines()
            .filter(|line| {
                line.strip_prefix("prog_type:")
                    .is_some_and(|kind| kind.trim() == RAW_TRACEPOINT)
            })
            .count();
    }
    Ok(readers)
}

#[test]
fn only_trace_with_cache_holds_the_kernel_memory_reader_while_tracing() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (mut plain, _stderr) = start_tracer(&["--duration", "1s", "--format", "json"])?;
    ensure!(
        readers_held(&mut plain)? == 0,
        "memleak trace loaded the reader before detaching"
    );
    finish_tracer::<Report>(plain)?;
    let (mut scanning, _stderr) = start_tracer(&[
        "--duration",
        "1s",
        "--format",
        "json",
        "--cache",
        "kmalloc-64",
    ])?;
    ensure!(
        readers_held(&mut scanning)? == 1,
        "memleak trace --cache holds one reader"
    );
    let report: Report = finish_tracer(scanning)?;
    ensure!(
        report
            .scan
            .as_ref()
            .is_some_and(|scan| scan.cache == "kmalloc-64"),
        "{:#?}",
        report.scan
    );
    Ok(())
}

/// The trace report's entry for the allocation site through which `pid` allocated objects
/// found in the scanned cache.
fn entry_of(report: &Report, pid: u64) -> Option<&Entry> {
    report.stacks.iter().find(|entry| {
        entry.marks.is_some_and(|marks| marks.in_scanned_cache > 0)
            && entry
                .processes
                .iter()
                .any(|process| u64::from(process.pid) == pid)
    })
}

#[test]
fn trace_with_cache_attributes_the_old_objects_to_their_allocating_function() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let cache = message_cache();
    // Long before the tracer: the objects a trace window cannot see being allocated.
    let mut similar = Fixture::start(
        &["similar-messages", &HELD.to_string(), &MORE.to_string()],
        "ready",
    )?;
    let (tracer, _stderr) = start_tracer(&[
        "--duration",
        "5s",
        "--format",
        "json",
        "--top",
        "100000",
        "--cache",
        cache,
    ])?;
    // During the window: a few more of the same, and as many unlike them from another process
    // through the same function.
    similar.say("go")?;
    similar.expect_line("sent")?;
    let dissimilar = Fixture::start(&["dissimilar-messages", &DISSIMILAR.to_string()], "sent")?;
    let report: Report = finish_tracer(tracer)?;

    let scan = report.scan.as_ref().context("the report has no scan")?;
    ensure!(scan.cache == cache, "{scan:#?}");
    let group = scan.groups.first().map_or(0, |group| group.objects);
    ensure!(
        group >= HELD,
        "the largest group holds {group} objects, expected >= {HELD}: {scan:#?}"
    );

    let Some(leaker) = entry_of(&report, similar.pid()) else {
        bail!("no entry for the similar messages' allocation site: {scan:#?}");
    };
    let marks = leaker.marks.unwrap_or_default();
    let (marked, traced) = (marks.marked, marks.in_scanned_cache);
    ensure!(
        marked >= MORE,
        "the {MORE} messages sent during the window should be marked: {leaker:#?}"
    );
    let suspect = scan
        .marking
        .as_ref()
        .and_then(|marking| marking.suspected.as_ref());
    ensure!(
        suspect.is_some_and(|suspect| suspect.call_site == leaker.call_site),
        "the suspect should be the messages' allocation site: {suspect:#?} vs {leaker:#?}"
    );
    ensure!(
        leaker
            .call_site
            .symbol
            .as_deref()
            .is_some_and(|symbol| symbol.contains("msg")),
        "messages are allocated in the System V message code: {leaker:#?}"
    );
    // The dissimilar messages share the site, and are counted there but not marked.
    ensure!(
        entry_of(&report, dissimilar.pid())
            .is_some_and(|entry| entry.call_site == leaker.call_site),
        "the dissimilar messages should come through the same site: {report:#?}"
    );
    ensure!(
        traced >= MORE + DISSIMILAR && marked <= traced - DISSIMILAR,
        "the {DISSIMILAR} dissimilar messages must not be marked: {leaker:#?}"
    );
    Ok(())
}
