//! End-to-end: `memleak run` around commands whose kernel allocations outlive them (System V
//! messages left in a queue, lock contexts left on files) or do not (the queue removed, half
//! the files removed, before exit). Lock contexts live in a cache SLUB merges with others: a
//! check scoped to it must count them under the shared cache's name, and say so.
use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, ensure};
use memleak::trace::report::{Entry, Report, Verdict};
use memleak_tests::{
    LOCK_CONTEXT_CACHE, LOCK_CONTEXT_SITE, ensure_every_name_of, entries_through, memleak_binary,
    merged_names, message_cache, tmpfs_directory,
};

const MESSAGES: u64 = 200;
/// The fixture's task name: `memleak-fixture`, which fits the kernel's 15 characters.
const FIXTURE_COMM: &str = "memleak-fixture";

/// The `<failure>` element of a JUnit file: its `message` attribute and its text, unescaped.
/// A hand parse of the one shape memleak writes; anything else is an error.
fn junit_failure(xml: &str) -> Result<Option<(String, String)>> {
    let unescape = |text: &str| {
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&")
    };
    let Some(start) = xml.find("<failure") else {
        return Ok(None);
    };
    let rest = &xml[start..];
    let tag_end = rest.find('>').context("an unterminated <failure> tag")?;
    let tag = &rest[..tag_end];
    ensure!(!tag.ends_with('/'), "an empty <failure/>: {xml}");
    let message = tag
        .split_once("message=\"")
        .and_then(|(_, value)| value.split_once('"'))
        .map(|(value, _)| unescape(value))
        .context("a <failure> without a message")?;
    let body = &rest[tag_end + 1..];
    let body = &body[..body.find("</failure>").context("no </failure>")?];
    ensure!(
        rest[tag_end..].matches("<failure").count() == 0,
        "more than one <failure>: {xml}"
    );
    Ok(Some((message, unescape(body))))
}

/// The value of `attribute` in the first `<element ...>` tag of `xml`.
fn xml_attribute<'a>(xml: &'a str, element: &str, attribute: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{element} "))?;
    let tag = &xml[start..start + xml[start..].find('>')?];
    let (_, value) = tag.split_once(&format!(" {attribute}=\""))?;
    value.split_once('"').map(|(value, _)| value)
}

fn fixture() -> &'static str {
    env!("CARGO_BIN_EXE_memleak-fixture")
}

/// Runs `memleak run --fail-on-leak --function load_msg --cache CACHE ... -- fixture
/// WORKLOAD`: alloc_msg, which kmallocs each message with its header, is inlined into
/// load_msg. The cache keeps out what a new slab for those messages allocates through the
/// same path (its obj_exts vector, kmalloc-256), which legitimately outlives the queue.
fn run_checked(workload: &str, junit: &Path) -> Result<(i32, Report, String)> {
    let junit = junit.to_str().context("a JUnit path that is not UTF-8")?;
    run_scoped(
        workload,
        MESSAGES,
        &[],
        &[
            "--function",
            "load_msg",
            "--cache",
            message_cache(),
            "--junit",
            junit,
        ],
    )
}

/// Runs `memleak run --fail-on-leak SCOPE... -- fixture WORKLOAD COUNT` with `environment`,
/// counting only the fixture's allocations; its status, its report and what the fixture
/// printed.
fn run_scoped(
    workload: &str,
    count: u64,
    environment: &[(&str, &Path)],
    scope: &[&str],
) -> Result<(i32, Report, String)> {
    let output = Command::new(memleak_binary()?)
        .envs(environment.iter().copied())
        // A wide --top: on a busy machine (a build running beside the tests) other sites can
        // outgrow the fixture's within the window.
        .args(["run", "--grace", "1s", "--format", "json", "--top", "1000"])
        // Only the fixture's allocations: its counts are then exact, and the counters prove
        // that its objects were seen even when none is left.
        .args(["--comm", FIXTURE_COMM])
        .arg("--fail-on-leak")
        .args(scope)
        .args(["--", fixture(), workload, &count.to_string()])
        .output()
        .context("running memleak run")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The fixture's own output (the queue id) comes first, the JSON report after it.
    let (fixture_output, json) = stdout
        .split_once('{')
        .map(|(before, after)| (before.to_owned(), format!("{{{after}")))
        .context("no JSON report on stdout")?;
    let report: Report =
        serde_json::from_str(&json).with_context(|| format!("parsing the report: {stdout}"))?;
    let status = output.status.code().context("memleak killed by a signal")?;
    ensure!(
        status != 2,
        "memleak failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((status, report, fixture_output))
}

/// A leak check that failed (status 1) on exactly the fixture's `count` objects, and the
/// report's entry through `function` that holds them all.
fn failed_check<'a>(
    status: i32,
    report: &'a Report,
    function: &str,
    count: u64,
) -> Result<(&'a Verdict, &'a Entry)> {
    ensure!(status == 1, "a leak must exit 1, got {status}: {report:#?}");
    let check = report.check.as_ref().context("the report has no check")?;
    ensure!(
        check.failed && check.count == count,
        "the check fails on exactly the fixture's {count} objects: {check:#?}"
    );
    let entry = entries_through(report, function)
        .into_iter()
        .max_by_key(|entry| entry.count)
        .filter(|entry| entry.count == count)
        .with_context(|| {
            format!("no {function} stack with exactly {count} objects: {report:#?}")
        })?;
    Ok((check, entry))
}

#[test]
fn messages_left_behind_fail_the_check() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let junit = std::env::temp_dir().join(format!("memleak-run-leak-{}.xml", std::process::id()));
    let (status, report, fixture_output) = run_checked("leave-messages", &junit)?;
    // Remove the queue the fixture left, whatever the assertions say.
    if let Ok(queue) = fixture_output.trim().parse::<libc::c_int>() {
        unsafe { libc::msgctl(queue, libc::IPC_RMID, std::ptr::null_mut()) };
    }
    let xml = std::fs::read_to_string(&junit).context("reading the JUnit file")?;
    let _ = std::fs::remove_file(&junit);
    let (_, messages) = failed_check(status, &report, "load_msg", MESSAGES)?;
    ensure!(
        messages
            .processes
            .iter()
            .all(|process| process.comm.as_deref() == Some(FIXTURE_COMM)),
        "--comm {FIXTURE_COMM} let other processes in: {messages:#?}"
    );
    ensure!(
        messages.cache.as_deref() == Some(message_cache()),
        "the messages are named in their real cache {}: {messages:#?}",
        message_cache()
    );
    // The JUnit file: one failing test case, whose failure names the leaking function and
    // its count (the test case's name, the scope, names load_msg too: that is not enough).
    ensure!(
        xml_attribute(&xml, "testsuite", "failures") == Some("1")
            && xml_attribute(&xml, "testsuite", "tests") == Some("1"),
        "JUnit: one failing test case expected: {xml}"
    );
    let (message, details) = junit_failure(&xml)?.with_context(|| format!("no failure: {xml}"))?;
    ensure!(
        message.contains(&format!("in {MESSAGES} objects")),
        "the failure message gives the count {MESSAGES}: {message:?}"
    );
    ensure!(
        details
            .lines()
            .any(|line| line.contains(&format!("in {MESSAGES} objects"))
                && line.contains(" at load_msg+")),
        "the failure lists load_msg with its {MESSAGES} objects: {details:?}"
    );
    Ok(())
}

#[test]
fn messages_cleaned_up_pass_the_check_with_the_commands_status() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let junit = std::env::temp_dir().join(format!("memleak-run-clean-{}.xml", std::process::id()));
    let (status, report, _) = run_checked("clean-messages", &junit)?;
    let xml = std::fs::read_to_string(&junit).context("reading the JUnit file")?;
    let _ = std::fs::remove_file(&junit);
    ensure!(
        status == 0,
        "a clean run exits with the command's status 0, got {status}: {:#?} {:#?}",
        report.check,
        report.stats
    );
    ensure!(
        report.check.as_ref().is_some_and(|check| !check.failed),
        "check: {:#?}",
        report.check
    );
    ensure!(
        xml_attribute(&xml, "testsuite", "failures") == Some("0") && junit_failure(&xml)?.is_none(),
        "JUnit: {xml}"
    );
    // The pass means something only if the fixture's messages were seen, allocated and freed.
    let (tracked, freed) = (
        report.stats.counters.tracked_allocs,
        report.stats.counters.tracked_frees,
    );
    ensure!(
        tracked >= MESSAGES && freed >= MESSAGES,
        "the fixture's {MESSAGES} messages were not seen allocated ({tracked}) and freed \
         ({freed}): {:#?}",
        report.stats
    );

    // And the command's own failure comes through.
    let output = Command::new(memleak_binary()?)
        .args([
            "run", "--grace", "0s", "--format", "json", "--", "sh", "-c", "exit 7",
        ])
        .output()?;
    ensure!(output.status.code() == Some(7), "status {}", output.status);
    Ok(())
}

const LOCKED_FILES: u64 = 200;

/// `memleak run --fail-on-leak --function locks_get_lock_context --cache file_lock_ctx
/// THRESHOLDS...` around `fixture WORKLOAD 200`, whose files are removed afterwards whatever
/// happened. They are on tmpfs when there is one, where their inodes, and so their lock
/// contexts, are not reclaimed under memory pressure.
fn run_lock_check(workload: &str, thresholds: &[&str]) -> Result<(i32, Report)> {
    let directory = tmpfs_directory("memleak-locks-test");
    let mut scope = vec![
        "--function",
        LOCK_CONTEXT_SITE,
        "--cache",
        LOCK_CONTEXT_CACHE,
    ];
    scope.extend_from_slice(thresholds);
    let result = run_scoped(
        workload,
        LOCKED_FILES,
        &[("MEMLEAK_LOCKS_DIR", &directory)],
        &scope,
    );
    let _ = std::fs::remove_dir_all(&directory);
    result.map(|(status, report, _)| (status, report))
}

/// The merged names the entry, the report's cache totals and the check give for
/// `file_lock_ctx`, against sysfs.
fn ensure_merged_names_are_named(report: &Report, contexts: &Entry, check: &Verdict) -> Result<()> {
    // The totals keep the ten largest caches; the shared one is among them unless ten others
    // hold more of the fixture's bytes.
    match report
        .caches
        .iter()
        .find(|total| total.name.as_str() == contexts.cache.as_deref().unwrap_or_default())
    {
        Some(total) => ensure!(
            total.merged_with == contexts.cache_merged_with,
            "the cache's total names what its entry names: {total:#?} {contexts:#?}"
        ),
        None => ensure!(
            report.caches.len() == 10,
            "the entry's cache has a total among fewer than ten: {:#?}",
            report.caches
        ),
    }
    let merged = merged_names(LOCK_CONTEXT_CACHE);
    if merged.is_empty() {
        // A cache of its own (slab_nomerge, or no partner of its size): named as it is.
        ensure!(
            contexts.cache.as_deref() == Some(LOCK_CONTEXT_CACHE)
                && contexts.cache_merged_with.is_empty()
                && check.cache_merged_with.is_empty(),
            "an unmerged cache is named alone: {contexts:#?} {check:#?}"
        );
        return Ok(());
    }
    // Merged: the event names the shared cache by one of its names (file_lock_ctx's own when
    // it was created first).
    let shared = contexts.cache.clone().context("no cache named")?;
    ensure!(
        shared == LOCK_CONTEXT_CACHE || merged.contains(&shared),
        "the entry's cache {shared} is one of {LOCK_CONTEXT_CACHE}'s merged names {merged:?}"
    );
    ensure_every_name_of(LOCK_CONTEXT_CACHE, &shared, &contexts.cache_merged_with)?;
    ensure!(
        check.cache_merged_with == merged,
        "the check names {LOCK_CONTEXT_CACHE}'s other names {merged:?}: {check:#?}"
    );
    Ok(())
}

#[test]
fn a_check_on_a_merged_cache_counts_its_objects_and_says_it_is_merged() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    let (status, report) = run_lock_check("leave-file-locks", &[])?;
    let (check, contexts) = failed_check(status, &report, LOCK_CONTEXT_SITE, LOCKED_FILES)?;
    ensure_merged_names_are_named(&report, contexts, check)
}

#[test]
fn a_check_on_a_merged_cache_leaves_out_its_freed_objects() -> Result<()> {
    let Some(_exclusive) = memleak_tests::end_to_end() else {
        return Ok(());
    };
    // Half the contexts are freed before the fixture exits; the other half are allowed (by
    // count: the bytes' allowance is wide).
    let left = LOCKED_FILES / 2;
    let (status, report) = run_lock_check(
        "halve-file-locks",
        &["--max-count", &left.to_string(), "--max-bytes", "1048576"],
    )?;
    let check = report.check.as_ref().context("the report has no check")?;
    ensure!(
        status == 0 && !check.failed && check.count == left,
        "exactly the {left} contexts left count, and are allowed (status {status}): {check:#?}"
    );
    let contexts = entries_through(&report, LOCK_CONTEXT_SITE)
        .into_iter()
        .find(|entry| entry.count == left)
        .with_context(|| format!("no site with {left} lock contexts: {report:#?}"))?;
    ensure_merged_names_are_named(&report, contexts, check)
}
