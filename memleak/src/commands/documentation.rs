//! `memleak completions` and `memleak manpages`: what the command line defines, as shell
//! completion scripts and man pages (the Debian package built by `cargo xtask dist` ships
//! both, made by the binary it packages).
use std::{fs, io, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;

use crate::cli::{Cli, CompletionsArgs, ManpagesArgs};

pub fn completions(args: &CompletionsArgs) -> Result<ExitCode> {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "memleak", &mut io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn manpages(args: &ManpagesArgs) -> Result<ExitCode> {
    fs::create_dir_all(&args.directory)
        .with_context(|| format!("creating {}", args.directory.display()))?;
    // One page for memleak and one per subcommand, named memleak-SUBCOMMAND.1.
    clap_mangen::generate_to(Cli::command(), &args.directory)
        .with_context(|| format!("writing man pages into {}", args.directory.display()))?;
    Ok(ExitCode::SUCCESS)
}
