//! memleak's project tasks, run as `cargo xtask TASK`.
mod bench;
mod bench_stats;
mod bench_user;
mod dist;
mod soak;
mod tracer;
mod vm;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// memleak's project tasks.
#[derive(Parser)]
#[command(bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Measure how much tracing slows down allocation-heavy workloads, against no tracer
    /// (and optionally bpftrace), and print a table for the README.
    Bench(bench::BenchArgs),
    /// Measure how much `memleak run --user` slows down a malloc-heavy program, against no
    /// tool, the uprobes alone (empty programs) and valgrind.
    BenchUser(bench_user::BenchUserArgs),
    /// Boot Debian's kernel under qemu and check that memleak, inside it, fails the leak check
    /// of a module that leaks and passes that of its clean function.
    VmTest(vm::VmTestArgs),
    /// Run `memleak watch` under churn for a long time and print its RSS, table occupancy,
    /// removed objects, drops and stack failures over time (not part of the test suite).
    Soak(soak::SoakArgs),
    /// Build what users install, into target/dist/: the static binary, the Debian package
    /// and a tarball, with SHA-256 checksums.
    Dist(dist::DistArgs),
    /// Install the Debian packages the end-to-end tests run (`./x test` does it first).
    TestDeps,
}

/// What the end-to-end tests run besides memleak: `go tool pprof` reads the pprof profiles,
/// Prometheus scrapes `watch --listen` (and promtool checks its page and the alert rules),
/// headless Chromium renders its dashboard; gcc builds the user-space fixture, which valgrind
/// checks as the oracle of `run --user`, and which runs with jemalloc, tcmalloc and mimalloc;
/// g++ builds the C++ fixture, whose operators those allocators define.
/// (The VM test installs its own: qemu, and what building a kernel needs.)
const TEST_PACKAGES: [&str; 9] = [
    "chromium",
    "gcc",
    "g++",
    "golang-go",
    "libjemalloc2",
    "libmimalloc2.0",
    "libtcmalloc-minimal4",
    "prometheus",
    "valgrind",
];

fn main() -> ExitCode {
    let Cli { task } = Cli::parse();
    env_logger::Builder::new()
        .filter_module("memleak", log::LevelFilter::Info)
        .format_timestamp(None)
        .init();
    let result = match task {
        Task::Bench(args) => bench::run(&args),
        Task::BenchUser(args) => bench_user::run(&args),
        Task::VmTest(args) => vm::run(&args),
        Task::Soak(args) => soak::run(&args),
        Task::Dist(args) => dist::run(&args),
        Task::TestDeps => memleak::vm::apt::Apt::default().install_missing(&TEST_PACKAGES),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
