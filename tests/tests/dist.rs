//! End-to-end: what users install. `cargo xtask dist` builds the static binary, the Debian
//! package and the tarball into target/dist/; the package installs with `dpkg -i` into an
//! empty root, where its binary is static, says which commit and libraries built it, finds a
//! known leak on this kernel and records its version in the report; its man pages render with
//! `man -l`, its bash completion loads, its unit runs the installed binary; and `dpkg -r`
//! leaves nothing behind. (`cargo xtask vm-test` boots the same binary in Debian's 6.1 and
//! other guests, where no build tool exists, and checks its traces there.)
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};
use memleak::trace::report::Report;
use memleak_tests::{end_to_end, message_cache};

const MESSAGES: u64 = 50;

fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// `cargo xtask dist`, and where it put its outputs.
fn build_dist() -> Result<PathBuf> {
    memleak_tests::xtask("dist")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    Ok(target.join("dist"))
}

fn head_commit() -> Result<String> {
    let output = run(Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(workspace()))?;
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// An empty root that dpkg can install into: only its database.
fn empty_root() -> Result<PathBuf> {
    let root = std::env::temp_dir().join(format!("memleak-dist-root-{}", std::process::id()));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for directory in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        fs::create_dir_all(root.join(directory))?;
    }
    fs::write(root.join("var/lib/dpkg/status"), "")?;
    Ok(root)
}

/// Regular files and links under `directory`, relative to it, without dpkg's own database.
fn installed_files(directory: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            let relative = entry.path().strip_prefix(directory)?.display().to_string();
            if relative.starts_with("var/lib/dpkg") {
                continue;
            }
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            } else {
                files.push(relative);
            }
        }
    }
    files.sort();
    Ok(files)
}

#[test]
fn the_debian_package_installs_a_static_memleak_that_finds_leaks_and_removes_cleanly() -> Result<()>
{
    let Some(_exclusive) = end_to_end() else {
        return Ok(());
    };
    let dist = build_dist()?;
    let deb = dist.join(format!("memleak_{}_amd64.deb", env!("CARGO_PKG_VERSION")));
    let tarball = dist.join(format!(
        "memleak-{}-x86_64-linux-musl.tar.gz",
        env!("CARGO_PKG_VERSION")
    ));
    // Every output is listed in the checksums, and matches them.
    let sums = fs::read_to_string(dist.join("SHA256SUMS")).context("reading SHA256SUMS")?;
    for output in [&dist.join("memleak"), &deb, &tarball] {
        let name = output
            .file_name()
            .context("no file name")?
            .to_string_lossy();
        ensure!(
            sums.lines()
                .any(|line| line.ends_with(&format!("  {name}"))),
            "SHA256SUMS does not list {name}: {sums}"
        );
    }
    run(Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dist))?;
    let listing = run(Command::new("tar").arg("-tzf").arg(&tarball))?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    for member in [
        "/memleak",
        "/man/man1/memleak-trace.1",
        "/completions/memleak.bash",
    ] {
        ensure!(
            listing.lines().any(|line| line.ends_with(member)),
            "the tarball has no {member}: {listing}"
        );
    }

    let root = empty_root()?;
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .arg("-i")
        .arg(&deb))?;
    let memleak = root.join("usr/bin/memleak");
    let binary = fs::read(&memleak).context("the package installed no /usr/bin/memleak")?;
    ensure!(
        !memleak::vm::needs_interpreter(&binary)?,
        "the packaged memleak is dynamically linked"
    );

    let version = run(Command::new(&memleak).arg("--version"))?;
    let version = String::from_utf8_lossy(&version.stdout);
    let commit = head_commit()?;
    for expected in [
        format!("memleak {} (commit {commit})", env!("CARGO_PKG_VERSION")),
        "aya ".to_owned(),
        "blazesym ".to_owned(),
        "target x86_64-unknown-linux-musl".to_owned(),
    ] {
        ensure!(
            version.contains(&expected),
            "--version lacks {expected:?}: {version}"
        );
    }

    // The installed binary finds a known leak on this kernel: MESSAGES System V messages left
    // in a queue, each kmalloc'ed in load_msg (as in run.rs).
    let output = Command::new(&memleak)
        .args(["run", "--grace", "1s", "--format", "json", "--top", "1000"])
        .args(["--comm", "memleak-fixture", "--fail-on-leak"])
        .args(["--function", "load_msg", "--cache", message_cache()])
        .args([
            "--",
            env!("CARGO_BIN_EXE_memleak-fixture"),
            "leave-messages",
            &MESSAGES.to_string(),
        ])
        .output()
        .context("running the installed memleak")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (queue, json) = stdout
        .split_once('{')
        .map(|(before, after)| (before.trim().to_owned(), format!("{{{after}")))
        .with_context(|| {
            format!(
                "no JSON report: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    if let Ok(queue) = queue.parse::<libc::c_int>() {
        unsafe { libc::msgctl(queue, libc::IPC_RMID, std::ptr::null_mut()) };
    }
    let report: Report = serde_json::from_str(&json).context("parsing the report")?;
    ensure!(
        output.status.code() == Some(1),
        "a leak exits 1, got {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let check = report.check.as_ref().context("the report has no check")?;
    ensure!(
        check.count == MESSAGES,
        "the check counts the {MESSAGES} messages: {check:#?}"
    );
    ensure!(
        report.memleak.version == env!("CARGO_PKG_VERSION") && report.memleak.commit == commit,
        "the report records the memleak that wrote it: {:?}",
        report.memleak
    );

    let page = root.join("usr/share/man/man1/memleak-trace.1.gz");
    let rendered = run(Command::new("man")
        .arg("-l")
        .arg(&page)
        // Wide and ASCII: no hyphenated options, no Unicode hyphens.
        .env("MANWIDTH", "200")
        .env("LC_ALL", "C"))?;
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    ensure!(
        rendered.contains("memleak-trace") && rendered.contains("--duration"),
        "man -l memleak-trace.1.gz: {rendered}"
    );
    let completion = root.join("usr/share/bash-completion/completions/memleak");
    let loaded = run(Command::new("bash").arg("-c").arg(format!(
        "source '{}' && complete -p memleak",
        completion.display()
    )))?;
    ensure!(
        String::from_utf8_lossy(&loaded.stdout).contains("memleak"),
        "the bash completion registers no completion for memleak"
    );
    let unit = fs::read_to_string(root.join("lib/systemd/system/memleak-watch.service"))
        .context("the package installed no memleak-watch.service")?;
    ensure!(
        unit.contains("ExecStart=/usr/bin/memleak watch"),
        "the unit runs the installed binary: {unit}"
    );

    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--purge", "memleak"]))?;
    let left = installed_files(&root)?;
    fs::remove_dir_all(&root)?;
    if !left.is_empty() {
        bail!("dpkg --purge memleak left files behind: {left:?}");
    }
    Ok(())
}
