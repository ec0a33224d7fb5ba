//! End-to-end: `memleak run` around commands whose kernel allocations outlive them (System V
//! messages left in a queue) or do not (the queue removed before exit).
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use memleak_tests::{count_of, entries_through, memleak_binary};

const MESSAGES: u64 = 200;

fn fixture() -> &'static str {
    env!("CARGO_BIN_EXE_memleak-fixture")
}

/// The cache of a 64-byte System V message with its 48-byte header (112 bytes, the 128-byte
/// size class): load_msg allocates with GFP_KERNEL_ACCOUNT, from its own bucket set since Linux
/// 6.11, else from the accounted kmalloc caches (the plain ones when the kernel has no memcg
/// accounting, and so no such caches).
fn message_cache() -> &'static str {
    ["msg_msg-128", "kmalloc-cg-128"]
        .into_iter()
        .find(|cache| {
            std::path::Path::new("/sys/kernel/slab")
                .join(cache)
                .exists()
        })
        .unwrap_or("kmalloc-128")
}

/// Runs `memleak run --fail-on-leak --function load_msg --cache CACHE ... -- fixture
/// WORKLOAD`: alloc_msg, which kmallocs each message with its header, is inlined into
/// load_msg. The cache keeps out what a new slab for those messages allocates through the
/// same path (its obj_exts vector, kmalloc-256), which legitimately outlives the queue.
fn run_checked(
    workload: &str,
    junit: &std::path::Path,
) -> Result<(i32, serde_json::Value, String)> {
    let output = Command::new(memleak_binary()?)
        // A wide --top: on a busy machine (a build running beside the tests) other sites can
        // outgrow the 200 messages within the window.
        .args(["run", "--grace", "1s", "--format", "json", "--top", "1000"])
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
    let report: serde_json::Value =
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
    ensure!(status == 1, "a leak must exit 1, got {status}: {report:#}");
    let check = &report["check"];
    ensure!(check["failed"] == true, "check: {check:#}");
    ensure!(
        check["count"].as_u64().unwrap_or(0) >= MESSAGES,
        "check counts {MESSAGES} messages: {check:#}"
    );
    let messages = entries_through(&report, "load_msg")
        .into_iter()
        .max_by_key(|entry| count_of(entry))
        .filter(|entry| count_of(entry) >= MESSAGES)
        .with_context(|| format!("no load_msg stack with {MESSAGES} objects: {report:#}"))?;
    ensure!(
        messages["cache"] == message_cache(),
        "the messages are named in their real cache {}: {messages:#}",
        message_cache()
    );
    ensure!(
        xml.contains("failures=\"1\"") && xml.contains("load_msg"),
        "JUnit: {xml}"
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
        "a clean run exits with the command's status 0, got {status}: {:#} {:#}",
        report["check"],
        report["stats"]
    );
    ensure!(
        report["check"]["failed"] == false,
        "check: {:#}",
        report["check"]
    );
    ensure!(xml.contains("failures=\"0\""), "JUnit: {xml}");

    // And the command's own failure comes through.
    let output = Command::new(memleak_binary()?)
        .args([
            "run", "--grace", "0s", "--format", "json", "--", "sh", "-c", "exit 7",
        ])
        .output()?;
    ensure!(output.status.code() == Some(7), "status {}", output.status);
    Ok(())
}
