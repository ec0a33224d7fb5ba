//! End-to-end: the stack formats of a trace (`--format folded`, `svg`, `pprof`) name the
//! function that holds a known workload's memory, and the pprof profile opens in Go's own
//! `go tool pprof` (Debian's golang-go, installed by `./x test`).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use memleak_tests::{Guard, end_to_end, start_tracer};

const HELD: u64 = 2_000;
/// Where the fixture's eventfds are allocated: the leaf of their stacks.
const HOLDER: &str = "do_eventfd";

/// Traces 3 s with `--format FORMAT --output FILE` while the fixture holds HELD eventfds;
/// returns the file.
fn trace_held_as(format: &str, directory: &Path) -> Result<PathBuf> {
    let file = directory.join(format!("report.{format}"));
    let file_arg = file.display().to_string();
    let (tracer, _stderr) = start_tracer(&[
        "--duration",
        "3s",
        "--format",
        format,
        "--output",
        &file_arg,
    ])?;
    let _fixture = hold_eventfds()?;
    let output = tracer
        .into_child()
        .wait_with_output()
        .context("waiting for memleak")?;
    ensure!(
        output.status.success(),
        "memleak --format {format} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(file)
}

/// Starts the fixture holding HELD eventfds (until its stdin closes) and waits until it holds
/// them.
fn hold_eventfds() -> Result<Guard> {
    let (fixture, line) = memleak_tests::start_fixture("hold-eventfds", HELD)?;
    ensure!(line == "ready", "fixture said {line:?}");
    Ok(fixture)
}

/// The bytes of the folded stacks whose innermost frame is HOLDER.
fn bytes_ending_at_holder(folded: &str) -> u64 {
    folded
        .lines()
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(stack, _)| stack.ends_with(&format!(";{HOLDER}")))
        .map(|(_, bytes)| bytes.parse::<u64>().unwrap_or(0))
        .sum()
}

fn scratch(name: &str) -> Result<PathBuf> {
    let directory =
        std::env::temp_dir().join(format!("memleak-formats-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).context("creating a scratch directory")?;
    Ok(directory)
}

#[test]
fn folded_stacks_and_the_flame_graph_name_the_holder() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory = scratch("folded")?;
    let folded = std::fs::read_to_string(trace_held_as("folded", &directory)?)?;
    // `root;...;do_eventfd BYTES`: the held contexts (64-byte kmallocs) end at do_eventfd.
    let held_bytes = bytes_ending_at_holder(&folded);
    ensure!(
        held_bytes >= HELD * 64,
        "{held_bytes} bytes end at {HOLDER}, for {HELD} held eventfds:\n{folded}"
    );
    ensure!(
        folded.lines().all(|line| line
            .rsplit_once(' ')
            .is_some_and(|(stack, bytes)| !stack.is_empty() && bytes.parse::<u64>().is_ok())),
        "a line is not `stack bytes`:\n{folded}"
    );

    let svg = std::fs::read_to_string(trace_held_as("svg", &directory)?)?;
    ensure!(
        svg.starts_with("<?xml") && svg.contains("<svg") && svg.contains(HOLDER),
        "the flame graph does not show {HOLDER}: {}",
        &svg[..svg.len().min(300)]
    );
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}

#[test]
fn go_tool_pprof_reads_the_profile_and_names_the_holder() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory = scratch("pprof")?;
    let profile = trace_held_as("pprof", &directory)?;
    let output = Command::new("go")
        .args(["tool", "pprof", "-top", "-sample_index=inuse_space"])
        .arg(&profile)
        // go wants a cache directory; the test's own keeps it off the machine's.
        .env("GOCACHE", directory.join("gocache"))
        .env("HOME", &directory)
        .output()
        .context("running go tool pprof (golang-go; `cargo xtask test-deps` installs it)")?;
    let top = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "go tool pprof failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // `flat flat% sum% cum cum%  name`: the holder's own (flat) bytes are the held contexts.
    let holder = top
        .lines()
        .find(|line| line.split_whitespace().last() == Some(HOLDER))
        .with_context(|| format!("{HOLDER} is not in go tool pprof -top:\n{top}"))?;
    let flat = holder.split_whitespace().next().unwrap_or_default();
    let flat_bytes =
        parse_pprof_bytes(flat).with_context(|| format!("reading `{flat}` in `{holder}`"))?;
    ensure!(
        flat_bytes >= (HELD * 64) as f64,
        "{HOLDER} holds {flat} in the profile, for {HELD} held 64-byte contexts:\n{top}"
    );
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}

/// pprof's byte figures: `125kB`, `1.50MB`, `64B`.
fn parse_pprof_bytes(text: &str) -> Option<f64> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let scale = match &text[digits.len()..] {
        "B" | "" => 1.0,
        "kB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(digits.parse::<f64>().ok()? * scale)
}

#[test]
fn watch_writes_its_last_snapshot_as_folded_stacks_when_it_ends() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory = scratch("watch")?;
    let file = directory.join("watch.folded");
    let mut watch = Guard::new(
        Command::new(memleak_tests::memleak_binary()?)
            .args([
                "watch",
                "--interval",
                "1s",
                "--duration",
                "4s",
                "--no-history",
            ])
            .args(["--sample-rate", "1", "--duty", "100", "--format", "folded"])
            .arg("--output")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting memleak watch")?,
    );
    let mut stderr = BufReader::new(watch.child().stderr.take().context("watch stderr")?);
    let mut said = String::new();
    stderr.read_line(&mut said)?;
    ensure!(said.contains("watching"), "the watch said {said:?}");
    let _fixture = hold_eventfds()?;
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest)?;
    let status = watch.child().wait()?;
    ensure!(status.success(), "memleak watch: {status}: {rest}");
    // The intervals went to standard error as text lines, the profile to the file.
    ensure!(
        rest.lines()
            .filter(|line| line.contains(" objects at "))
            .count()
            >= 2,
        "no interval lines on standard error: {rest}"
    );
    let folded = std::fs::read_to_string(&file)?;
    let held_bytes = bytes_ending_at_holder(&folded);
    ensure!(
        held_bytes >= HELD * 64,
        "{held_bytes} bytes end at {HOLDER} in the watch's last snapshot:\n{folded}"
    );
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}
