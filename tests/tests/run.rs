//! End-to-end: `memleak run` around commands whose kernel allocations outlive them (System V
//! messages left in a queue) or do not (the queue removed before exit).
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use memleak::trace::report::Report;
use memleak_tests::{entries_through, memleak_binary, message_cache};

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
fn run_checked(workload: &str, junit: &std::path::Path) -> Result<(i32, Report, String)> {
    let output = Command::new(memleak_binary()?)
        // A wide --top: on a busy machine (a build running beside the tests) other sites can
        // outgrow the 200 messages within the window.
        .args(["run", "--grace", "1s", "--format", "json", "--top", "1000"])
        // Only the fixture's allocations: its counts are then exact, and the counters prove
        // that its messages were seen even when none is left.
        .args(["--comm", FIXTURE_COMM])
        .arg("--fail-on-leak")
        .args([
            "--function",
            "load_msg",
            "--cache",
            message_cache(),
            "--junit",
        ])
        .arg(junit)
        .args(["--", fixture(), workload, &MESSAGES.to_string()])
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
    ensure!(status == 1, "a leak must exit 1, got {status}: {report:#?}");
    let check = report.check.as_ref().context("the report has no check")?;
    ensure!(check.failed, "check: {check:#?}");
    ensure!(
        check.count == MESSAGES,
        "check counts exactly the fixture's {MESSAGES} messages: {check:#?}"
    );
    let messages = entries_through(&report, "load_msg")
        .into_iter()
        .max_by_key(|entry| entry.count)
        .filter(|entry| entry.count == MESSAGES)
        .with_context(|| {
            format!("no load_msg stack with exactly {MESSAGES} objects: {report:#?}")
        })?;
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
