//! memleak: finds kernel memory leaks with eBPF on kernels that have no kmemleak.
use std::process::ExitCode;

use clap::Parser as _;

mod cli;
mod commands;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logger(cli.verbose);
    let result = match cli.command {
        cli::Command::Trace(args) => commands::trace::trace(&args),
        cli::Command::Run(args) => commands::trace::run(&args),
        cli::Command::Kmemleak(args) => commands::kmemleak::run(&args),
        cli::Command::Classify(args) => commands::classify::run(&args),
        cli::Command::Scan(args) => commands::scan::run(&args),
        cli::Command::Watch(args) => commands::watch::run(&args),
        cli::Command::History(args) => commands::watch::history(&args),
        cli::Command::Vm(args) => commands::vm::run(&args),
        cli::Command::Completions(args) => commands::documentation::completions(&args),
        cli::Command::Manpages(args) => commands::documentation::manpages(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // One line: the chain of contexts, outermost first.
            eprintln!("memleak: error: {error:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}

/// Warnings always reach standard error; `-v` adds what memleak decides, `-vv` debugging.
/// RUST_LOG, where set, wins.
fn init_logger(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_module("memleak", level)
        .parse_env("RUST_LOG")
        .format_timestamp(None)
        .format_target(false)
        .init();
}
