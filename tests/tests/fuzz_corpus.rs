//! The fuzz targets' corpora as plain tests: every file of fuzz/corpus/TARGET (the seeds, and
//! whatever `./x fuzz TARGET` found and was kept) and every recorded sample of the same input
//! goes through the target's checks (memleak::kmemleak::invariants for the kmemleak report
//! parser and the clustering, memleak::kernel::invariants for the tracefs, /proc, process-maps
//! and duration parsers). This runs on stable Rust, without cargo-fuzz, in every `./x test`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};

use memleak::{
    kernel::invariants,
    kmemleak::{invariants::check, parse::parse},
};

fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn files_in(directory: &Path) -> Result<Vec<PathBuf>> {
    let mut files = std::fs::read_dir(directory)
        .with_context(|| format!("listing {}", directory.display()))?
        .map(|entry| Ok(entry?.path()))
        .collect::<Result<Vec<_>>>()?;
    files.retain(|path| path.is_file());
    files.sort();
    Ok(files)
}

/// Feeds `file` to the kmemleak checks; a panic is reported with the file that caused it.
fn replay(file: &Path) -> Result<()> {
    replay_with(file, check)
}

/// Feeds `file` to `checks`; a panic is reported with the file that caused it.
fn replay_with(file: &Path, checks: fn(&[u8])) -> Result<()> {
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    std::panic::catch_unwind(|| checks(&data)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        anyhow::anyhow!("{}: {message}", file.display())
    })
}

#[test]
fn the_fuzz_corpus_replays_without_a_failure() -> Result<()> {
    let corpus = workspace().join("fuzz/corpus/kmemleak_parse");
    let files = files_in(&corpus)?;
    let seeds = files
        .iter()
        .filter(|file| {
            file.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("seed-"))
        })
        .count();
    ensure!(
        seeds >= 5,
        "{} holds {seeds} seeds (seed-*), expected the 5 kmemleak samples at least",
        corpus.display()
    );
    for file in &files {
        replay(file)?;
    }
    Ok(())
}

#[test]
fn the_kmemleak_samples_replay_and_parse_to_objects() -> Result<()> {
    let samples = files_in(&workspace().join("memleak/testdata/kmemleak"))?;
    ensure!(!samples.is_empty(), "no kmemleak samples");
    for sample in &samples {
        replay(sample)?;
        let text = std::fs::read_to_string(sample)?;
        ensure!(
            !parse(&text).objects.is_empty(),
            "{}: no objects parsed",
            sample.display()
        );
    }
    Ok(())
}

/// A fuzz target: its name (and corpus directory), the directories of recorded samples of
/// the same input, and its checks.
type Target = (&'static str, &'static [&'static str], fn(&[u8]));

/// The other fuzz targets (at least one seed each).
const PARSER_TARGETS: [Target; 4] = [
    (
        "tracefs_format",
        &[
            "memleak/testdata/tracefs/5.15",
            "memleak/testdata/tracefs/6.1",
            "memleak/testdata/tracefs/6.18",
        ],
        invariants::tracefs_format,
    ),
    (
        "procfs",
        &[
            "memleak/testdata/accounting",
            "memleak/testdata/classify/idle",
            "memleak/testdata/classify/grow-eventfds",
        ],
        invariants::procfs,
    ),
    ("process_maps", &[], invariants::process_maps),
    ("duration", &[], invariants::duration),
];

#[test]
fn the_parser_corpora_and_samples_replay_without_a_failure() -> Result<()> {
    for (target, samples, checks) in PARSER_TARGETS {
        let corpus = files_in(&workspace().join("fuzz/corpus").join(target))?;
        ensure!(!corpus.is_empty(), "fuzz/corpus/{target} holds no seed");
        let mut replayed = corpus.len();
        for file in &corpus {
            replay_with(file, checks)?;
        }
        for directory in samples {
            for file in files_in(&workspace().join(directory))? {
                replay_with(&file, checks)?;
                replayed += 1;
            }
        }
        ensure!(replayed >= 3, "{target}: only {replayed} inputs replayed");
    }
    Ok(())
}
