//! `memleak kmemleak`: runs a kmemleak scan on a debug kernel, or reads a saved report, and
//! groups the unreferenced objects by allocation backtrace.
mod cluster;
mod live;
mod parse;
mod render;

use std::{
    fs,
    io::{self, Read as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cli::{Format, ReportOptions},
    duration, kernel,
    output::ReportSink,
};

#[derive(Debug, clap::Args)]
pub struct KmemleakArgs {
    /// Read a saved report from FILE (`-` for standard input) instead of scanning the running
    /// kernel. Reports copied from dmesg or the journal, with text around them, are fine.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,

    #[command(flatten)]
    pub report: ReportOptions,

    /// After reading the report, tell kmemleak to stop reporting these objects, so that the
    /// next run shows only new suspects.
    #[arg(long, conflicts_with = "from")]
    pub clear: bool,

    /// Set the period of kmemleak's background scans, in whole seconds like 600s or 10m
    /// (0s stops them).
    #[arg(long = "scan-interval", value_name = "DUR", value_parser = parse_scan_interval,
          conflicts_with = "from")]
    pub scan_interval_secs: Option<u32>,

    /// Where debugfs is mounted. By default /sys/kernel/debug, mounted there if needed.
    #[arg(long, value_name = "DIR", conflicts_with = "from")]
    pub debugfs: Option<PathBuf>,
}

/// kmemleak takes its scan period in whole seconds, as an unsigned int.
fn parse_scan_interval(text: &str) -> Result<u32, String> {
    let interval = duration::parse(text).map_err(|error| error.to_string())?;
    if interval.subsec_nanos() != 0 {
        return Err(format!("`{text}` is not a whole number of seconds"));
    }
    u32::try_from(interval.as_secs()).map_err(|_| format!("`{text}` is too long"))
}

pub fn run(args: &KmemleakArgs) -> Result<ExitCode> {
    let sink = ReportSink::open(args.report.output.as_deref())?;
    let (text, kernel) = match &args.from {
        Some(path) => (read_saved_report(path)?, None),
        None => {
            let debugfs = match &args.debugfs {
                Some(dir) => dir.clone(),
                None => {
                    live::mount_default_debugfs()?;
                    PathBuf::from(live::DEFAULT_DEBUGFS)
                }
            };
            let options = live::Options {
                clear: args.clear,
                scan_interval_secs: args.scan_interval_secs,
            };
            let text = live::collect(&debugfs, options)?;
            let kernel = kernel::release()
                .inspect_err(|error| log::debug!("kernel release unknown: {error:#}"))
                .ok();
            (text, kernel)
        }
    };
    let parsed = parse::parse(&text);
    if let Some(path) = &args.from
        && parsed.objects.is_empty()
        && parsed.unparsed_records == 0
        && !text.trim().is_empty()
    {
        // An empty report means no leak; text without a single record is another file.
        bail!(
            "{}: not a kmemleak report (no `unreferenced object 0x...` record in it)",
            path.display()
        );
    }
    let report = render::build(kernel, &parsed, args.report.top as usize);
    let rendered = match args.report.format {
        Format::Text => render::render_text(&report),
        Format::Json => render::render_json(&report),
    };
    sink.write(&rendered)?;
    Ok(ExitCode::SUCCESS)
}

/// Reads the whole report; invalid UTF-8 (a task name is arbitrary bytes) is replaced rather
/// than refused.
fn read_saved_report(path: &Path) -> Result<String> {
    let bytes = if path == Path::new("-") {
        let mut bytes = Vec::new();
        io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .context("reading the report from standard input")?;
        bytes
    } else {
        fs::read(path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod scratch {
    use std::{
        fs,
        path::{Path, PathBuf},
    };

    /// A fresh directory under the system temp dir, removed when dropped.
    pub struct ScratchDir(PathBuf);

    impl ScratchDir {
        pub fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("memleak-kmemleak-{}-{name}", std::process::id()));
            // Left over from an earlier run with the same pid that was killed mid-test.
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("creating a scratch directory");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{scratch::ScratchDir, *};

    const MODERN: &str = include_str!("../../testdata/kmemleak/modern.txt");

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: KmemleakArgs,
    }

    fn args(words: &[&str]) -> Result<KmemleakArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("kmemleak").chain(words.iter().copied()))
            .map(|cli| cli.args)
    }

    fn path_str(path: &Path) -> &str {
        path.to_str().expect("UTF-8 temp path")
    }

    #[test]
    fn scans_a_fake_debugfs_and_writes_json() {
        let scratch = ScratchDir::new("run-live");
        let kmemleak = scratch.path().join("kmemleak");
        fs::write(&kmemleak, MODERN).expect("writing the fake report");
        let output = scratch.path().join("report.json");
        let args = args(&[
            "--debugfs",
            path_str(scratch.path()),
            "--format",
            "json",
            "--output",
            path_str(&output),
            "--clear",
            "--scan-interval",
            "10m",
        ])
        .expect("valid arguments");

        assert_eq!(run(&args).expect("live run"), ExitCode::SUCCESS);

        let written = fs::read_to_string(&kmemleak).expect("reading the fake file");
        assert_eq!(written, format!("{MODERN}scan=600\nscan\nclear\n"));
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&output).expect("report written"))
                .expect("valid JSON");
        assert_eq!(json["source"], "kmemleak");
        assert!(json["kernel"].is_string(), "live reports name the kernel");
        assert_eq!(json["stats"]["objects"], 5);
        assert_eq!(json["stats"]["truncated_records"], 0);
        assert_eq!(json["stacks"][2]["suspect"]["symbol"], "leaky_alloc");
    }

    #[test]
    fn reports_a_missing_kmemleak_in_one_line() {
        let scratch = ScratchDir::new("run-missing");
        let args = args(&["--debugfs", path_str(scratch.path())]).expect("valid arguments");
        let error = run(&args).expect_err("no kmemleak file");
        let message = format!("{error:#}");
        assert!(message.contains("kmemleak is not available"), "{message}");
        assert!(message.contains("memleak trace"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn reads_a_saved_report_as_text() {
        let scratch = ScratchDir::new("run-saved");
        let saved = scratch.path().join("saved.txt");
        fs::write(&saved, MODERN.replace('\n', "\r\n")).expect("writing the saved report");
        let output = scratch.path().join("report.txt");
        let args = args(&[
            "--from",
            path_str(&saved),
            "--top",
            "1",
            "-o",
            path_str(&output),
        ])
        .expect("valid arguments");

        assert_eq!(run(&args).expect("offline run"), ExitCode::SUCCESS);

        let text = fs::read_to_string(&output).expect("report written");
        assert!(
            text.starts_with("memleak: 5.1 KiB in 5 unreferenced objects"),
            "{text}"
        );
        assert!(text.contains("(saved report)"), "{text}");
        assert!(
            text.contains("suspect reserve_crashkernel_generic"),
            "{text}"
        );
        assert!(!text.contains("#2"), "{text}");
    }

    #[test]
    fn a_missing_saved_report_is_an_error_naming_it() {
        let args = args(&["--from", "/nonexistent/kmemleak.txt"]).expect("valid arguments");
        let message = format!("{:#}", run(&args).expect_err("no such file"));
        assert!(
            message.starts_with("reading /nonexistent/kmemleak.txt: "),
            "{message}"
        );
    }

    #[test]
    fn takes_the_scan_interval_in_whole_seconds() {
        assert_eq!(parse_scan_interval("10m"), Ok(600));
        assert_eq!(parse_scan_interval("0s"), Ok(0));
        assert!(parse_scan_interval("1500ms").is_err());
        assert!(parse_scan_interval("200").is_err());
        assert!(parse_scan_interval("50000d").is_err());
    }

    #[test]
    fn live_only_options_conflict_with_from() {
        for live_only in [
            &["--clear"][..],
            &["--scan-interval", "60s"],
            &["--debugfs", "/tmp"],
        ] {
            let mut words = vec!["--from", "report.txt"];
            words.extend_from_slice(live_only);
            assert!(args(&words).is_err(), "{live_only:?} accepted with --from");
        }
        assert!(args(&["--top", "0"]).is_err());
        let defaults = args(&[]).expect("no arguments needed");
        assert_eq!(defaults.report.top, 10);
        assert_eq!(defaults.report.format, Format::Text);
        assert!(defaults.from.is_none() && defaults.debugfs.is_none() && !defaults.clear);
    }
}
