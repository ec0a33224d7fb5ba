//! The fuzz target's corpus as a plain test: every file of fuzz/corpus/kmemleak_parse (the
//! seeds from memleak/testdata/kmemleak, and whatever `./x fuzz` found and kept locally) and
//! every kmemleak sample goes through the kmemleak report parser and the clustering, with the
//! fuzz target's checks (memleak::kmemleak::invariants). This runs
//! on stable Rust, without cargo-fuzz, in every `./x test`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};

use memleak::kmemleak::{invariants::check, parse::parse};

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

/// Feeds `file` to the checks; a panic is reported with the file that caused it.
fn replay(file: &Path) -> Result<()> {
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    std::panic::catch_unwind(|| check(&data)).map_err(|panic| {
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
