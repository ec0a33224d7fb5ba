//! Debian packages through apt: installing host tools and downloading packages without
//! installing them. The package lists are refreshed at most once per run, and only when
//! something is missing or could not be fetched.
use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, ensure};

#[derive(Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    /// Runs `apt-get update` unless this run already did.
    pub fn update_once(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        eprintln!("apt: refreshing the package lists");
        run_apt_get(&["update", "-qq"], None)?;
        self.updated = true;
        Ok(())
    }

    pub fn updated(&self) -> bool {
        self.updated
    }

    /// Installs the packages that are not installed yet, refreshing the lists first.
    pub fn install_missing(&mut self, packages: &[&str]) -> Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|package| !is_installed(package))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.update_once()?;
        eprintln!("apt: installing {}", missing.join(" "));
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        run_apt_get(&args, None)
    }

    /// Downloads the packages' .deb files into `directory` without installing them.
    pub fn download(&self, packages: &[String], directory: &Path) -> Result<()> {
        let mut args = vec!["download", "-qq"];
        args.extend(packages.iter().map(String::as_str));
        run_apt_get(&args, Some(directory))
    }
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${Status}", package])
        .output()
        .is_ok_and(|output| output.stdout == b"install ok installed")
}

/// `apt-cache ARGS`, its standard output on success.
pub fn cache(args: &[&str]) -> Result<String> {
    let output = Command::new("apt-cache")
        .args(args)
        .output()
        .context("running apt-cache (is this a Debian-based system?)")?;
    check(&output, &format!("apt-cache {}", args.join(" ")))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run_apt_get(args: &[&str], directory: Option<&Path>) -> Result<()> {
    let mut command = Command::new("apt-get");
    // Downloads into a directory the unprivileged _apt user cannot write would only warn.
    command
        .args(["-o", "APT::Sandbox::User=root"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    if let Some(directory) = directory {
        command.current_dir(directory);
    }
    let output = command.output().context("running apt-get")?;
    check(&output, &format!("apt-get {}", args.join(" ")))
}

fn check(output: &Output, what: &str) -> Result<()> {
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}
