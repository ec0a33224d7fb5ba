//! Debian packages through apt: installing host tools and downloading packages without
//! installing them. The package lists are refreshed at most once per run, and only when
//! something is missing or could not be fetched.
use std::{
    fs,
    path::Path,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, ensure};

/// The archive the host's apt uses; other suites of it are read through private
/// configurations ([`Apt::private`]).
const DEBIAN_ARCHIVE: &str = "http://deb.debian.org/debian";

/// The host's apt configuration, or a private one that reads one suite of Debian's archive
/// without touching the host's sources, lists or installed packages.
#[derive(Default)]
pub struct Apt {
    updated: bool,
    /// `-o` options of a private configuration; empty for the host's.
    options: Vec<String>,
}

impl Apt {
    /// A configuration that sees only `suite` (`bullseye`, `bookworm-backports`) of Debian's
    /// archive, with its package lists kept under `directory`. Only for downloading and
    /// `apt-cache`; the archive is unsigned here (`trusted=yes`): the packages are booted in
    /// a throw-away guest, never installed.
    pub fn private(directory: &Path, suite: &str) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            let path = directory.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let sources = directory.join("sources.list");
        let line = format!("deb [trusted=yes] {DEBIAN_ARCHIVE} {suite} main\n");
        if fs::read_to_string(&sources).ok().as_deref() != Some(line.as_str()) {
            fs::write(&sources, line).with_context(|| format!("writing {}", sources.display()))?;
        }
        let option = |name: &str, value: &Path| format!("{name}={}", value.display());
        let options = vec![
            option("Dir::Etc::sourcelist", &sources),
            "Dir::Etc::sourceparts=/nonexistent".to_owned(),
            option("Dir::State::Lists", &directory.join("lists")),
            option("Dir::Cache", &directory.join("cache")),
        ];
        // Lists already there (a cached run) are used as they are; a download that fails
        // because they are stale refreshes them (see `updated`).
        let has_lists = fs::read_dir(directory.join("lists"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .any(|entry| entry.path().is_file())
            })
            .unwrap_or(false);
        let mut apt = Self {
            updated: false,
            options,
        };
        if !has_lists {
            apt.update_once()?;
        }
        Ok(apt)
    }

    /// Runs `apt-get update` unless this run already did.
    pub fn update_once(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        log::info!("apt: refreshing the package lists");
        self.apt_get(&["update", "-qq"], None)?;
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
        log::info!("apt: installing {}", missing.join(" "));
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        self.apt_get(&args, None)
    }

    /// Downloads the packages' .deb files into `directory` without installing them.
    pub fn download(&self, packages: &[String], directory: &Path) -> Result<()> {
        let mut args = vec!["download", "-qq"];
        args.extend(packages.iter().map(String::as_str));
        self.apt_get(&args, Some(directory))
    }

    /// `apt-cache ARGS`, its standard output on success.
    pub fn cache(&self, args: &[&str]) -> Result<String> {
        let output = Command::new("apt-cache")
            .args(self.options.iter().flat_map(|option| ["-o", option]))
            .args(args)
            .output()
            .context("running apt-cache (is this a Debian-based system?)")?;
        check(&output, &format!("apt-cache {}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn apt_get(&self, args: &[&str], directory: Option<&Path>) -> Result<()> {
        let mut command = Command::new("apt-get");
        // Downloads into a directory the unprivileged _apt user cannot write would only warn.
        command
            .args(["-o", "APT::Sandbox::User=root"])
            .args(self.options.iter().flat_map(|option| ["-o", option]))
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        if let Some(directory) = directory {
            command.current_dir(directory);
        }
        let output = command.output().context("running apt-get")?;
        check(&output, &format!("apt-get {}", args.join(" ")))
    }
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${Status}", package])
        .output()
        .is_ok_and(|output| output.stdout == b"install ok installed")
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
