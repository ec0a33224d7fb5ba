//! `cargo xtask bench-user`: a malloc-heavy C loop (tests/user/malloc_bench.c) alone, under
//! `memleak run --user`, under the same with programs that return at once (the floor: what
//! the kernel's uprobes cost by themselves), and under valgrind's memcheck. Each run prints
//! its loop's own rate, so start-up, symbolization and reports stay out of the ratios.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::{bench_stats::median, workspace};

#[derive(clap::Args)]
pub struct BenchUserArgs {
    /// Rounds; each round runs every variant once
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Allocator calls per run (a free comes with each but the first few thousand)
    #[arg(long, default_value_t = 500_000)]
    operations: u64,
}

#[derive(Clone, Copy)]
enum Variant {
    Alone,
    Memleak,
    Floor,
    Valgrind,
}

impl Variant {
    const ALL: [Self; 4] = [Self::Alone, Self::Floor, Self::Memleak, Self::Valgrind];

    fn label(self) -> &'static str {
        match self {
            Self::Alone => "no tool",
            Self::Floor => "memleak --user, empty programs (floor)",
            Self::Memleak => "memleak run --user",
            Self::Valgrind => "valgrind (memcheck)",
        }
    }

    fn command(self, memleak: &Path, program: &Path, operations: u64) -> Command {
        let operations = operations.to_string();
        let mut command = match self {
            Self::Alone => {
                let mut command = Command::new(program);
                command.arg(operations);
                return command;
            }
            Self::Memleak | Self::Floor => {
                let mut command = Command::new(memleak);
                command.args(["run", "--user"]);
                if matches!(self, Self::Floor) {
                    command.arg("--empty-programs");
                }
                command.arg("--");
                command
            }
            Self::Valgrind => {
                let mut command = Command::new("valgrind");
                command.arg("-q");
                command
            }
        };
        command.arg(program).arg(operations);
        command
    }
}

pub fn run(args: &BenchUserArgs) -> Result<()> {
    let root = workspace::root()?;
    let status = workspace::cargo(root)?
        .args(["build", "--release", "-p", "memleak"])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build failed ({status})");
    memleak::vm::apt::Apt::default().install_missing(&["gcc", "valgrind"])?;
    let memleak = workspace::target_dir(root).join("release/memleak");
    let program = build_program(root)?;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    for round in 1..=args.rounds {
        for (index, variant) in Variant::ALL.iter().enumerate() {
            let output = variant
                .command(&memleak, &program, args.operations)
                .output()
                .with_context(|| format!("running {}", variant.label()))?;
            ensure!(
                output.status.success(),
                "{} failed ({}): {}",
                variant.label(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            let rate: f64 = stdout
                .lines()
                .find_map(|line| line.strip_prefix("ops/s: "))
                .and_then(|rate| rate.trim().parse().ok())
                .with_context(|| format!("{}: no ops/s line in {stdout:?}", variant.label()))?;
            eprintln!("round {round}: {}: {rate:.0} ops/s", variant.label());
            rates[index].push(rate);
        }
    }
    let medians: Vec<f64> = rates
        .iter()
        .map(|rates| median(rates.iter().copied()))
        .collect();
    let (alone, floor) = (medians[0], medians[1]);
    println!(
        "malloc_bench, {} allocator calls per run, median of {} rounds:",
        args.operations, args.rounds
    );
    println!("| variant | ops/s | slowdown vs no tool | vs floor |");
    println!("|---|---:|---:|---:|");
    for (variant, rate) in Variant::ALL.iter().zip(&medians) {
        println!(
            "| {} | {:.0} | {:.2}x | {:.2}x |",
            variant.label(),
            rate,
            alone / rate,
            floor / rate
        );
    }
    Ok(())
}

fn build_program(root: &Path) -> Result<PathBuf> {
    let output_dir = workspace::target_dir(root).join("bench-user");
    std::fs::create_dir_all(&output_dir)?;
    let program = output_dir.join("malloc_bench");
    let status = Command::new("gcc")
        .args(["-O2", "-fno-omit-frame-pointer", "-o"])
        .arg(&program)
        .arg(root.join("tests/user/malloc_bench.c"))
        .status()
        .context("running gcc")?;
    ensure!(status.success(), "gcc failed ({status})");
    Ok(program)
}
