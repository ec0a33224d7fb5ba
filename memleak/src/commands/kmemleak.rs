//! `memleak kmemleak`: read kmemleak's report (from the running kernel or a saved file) and
//! group its objects by backtrace.
use std::process::ExitCode;

use anyhow::Result;
use memleak::{
    kmemleak,
    output::{self, ReportOptions, ReportSink},
};

use crate::cli::KmemleakArgs;

pub fn run(args: &KmemleakArgs) -> Result<ExitCode> {
    let report_options = ReportOptions::from(&args.report);
    let format = report_options.format.plain("kmemleak")?;
    let mut sink = ReportSink::open(report_options.output.as_deref())?;
    let report = kmemleak::read(&kmemleak::Options::from(args), report_options.top)?;
    sink.write(&output::render(
        &report,
        format,
        output::text::kmemleak::render_text,
    ))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use std::{fs, path::Path};

    use memleak::{output::Format, util::scratch::ScratchDir};

    use super::*;
    use crate::cli::KmemleakArgs;

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
