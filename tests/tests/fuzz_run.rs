//! A short run of every fuzz target under libFuzzer (`./x fuzz TARGET SECONDS`, the pinned
//! nightly and cargo-fuzz), from its committed corpus: the replay in fuzz_corpus.rs checks
//! what was found before, this looks for what was not. A crash fails the suite with
//! libFuzzer's report, whose input libFuzzer leaves under fuzz/artifacts/TARGET. What a run
//! finds lands in fuzz/found/TARGET and stays local until merged into fuzz/corpus.
use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, ensure};
use memleak_tests::{skip, skip_requested};

/// Seconds each target is fuzzed for. The first target's build compiles memleak's library with
/// the sanitizers (about 2 minutes on 2 cores once the dependencies are in memleak's cache, 9
/// the first time on a machine); the others reuse it and only link.
const SECONDS: u32 = 15;

#[test]
fn every_fuzz_target_runs_a_while_without_a_crash() -> Result<()> {
    if skip_requested() {
        skip("MEMLEAK_SKIP_E2E=1 (the fuzz run uses ./x, which runs as root)");
        return Ok(());
    }
    let workspace = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut targets: Vec<String> = std::fs::read_dir(workspace.join("fuzz/fuzz_targets"))
        .context("listing fuzz/fuzz_targets")?
        .map(|entry| {
            let name = entry?.file_name().to_string_lossy().into_owned();
            Ok(name.trim_end_matches(".rs").to_owned())
        })
        .collect::<Result<_>>()?;
    targets.sort();
    ensure!(targets.len() >= 5, "fuzz targets: {targets:?}");
    for target in &targets {
        let started = Instant::now();
        let output = Command::new(workspace.join("x"))
            .args(["fuzz", target, &SECONDS.to_string()])
            .current_dir(workspace)
            // The outer cargo's settings are not the nightly build's.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .output()
            .with_context(|| format!("running ./x fuzz {target}"))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        // libFuzzer's crash report and the input it saved are in its last lines.
        ensure!(
            output.status.success(),
            "./x fuzz {target} {SECONDS} failed ({}): {}",
            output.status,
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
        // libFuzzer's last line: `Done N runs in S second(s)`.
        let done = lines
            .iter()
            .rfind(|line| line.starts_with("Done "))
            .copied()
            .unwrap_or("no `Done` line");
        eprintln!(
            "fuzz {target}: {done} ({:.0} s with its build)",
            started.elapsed().as_secs_f64()
        );
        ensure!(done.starts_with("Done "), "./x fuzz {target}: {done}");
    }
    Ok(())
}
