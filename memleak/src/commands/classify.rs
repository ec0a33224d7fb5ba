//! `memleak classify`: sample the kernel's memory counters for a window and say which kind of
//! memory grows.
use std::{process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum as _;
use memleak::{
    classify::{self, Options, Sampler, analysis::Sample},
    kernel,
    kinds::Kind,
    output::{self, ReportOptions, ReportSink},
    util::duration,
};

use super::signals::StopSignals;
use crate::cli::ClassifyArgs;

pub fn run(args: &ClassifyArgs) -> Result<ExitCode> {
    let options = Options::from(args);
    let report_options = ReportOptions::from(&args.report);
    let format = report_options.format.plain("classify")?;
    if options.interval * 2 > options.window {
        bail!(
            "--duration {} is shorter than two --interval {}: a trend needs at least three samples",
            duration::display(options.window),
            duration::display(options.interval)
        );
    }
    let mut sink = ReportSink::open(report_options.output.as_deref())?;
    let kernel = kernel::release()?;
    let page_size = classify::page_size()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut sampler = Sampler::new(page_size);
    let samples = runtime.block_on(sample_window(&mut sampler, &options))?;
    if samples.len() < 2 {
        bail!("interrupted before a second sample: no trend to report");
    }
    // The kinds `memleak trace --kinds` takes, for the suggested next command.
    let traceable = Kind::value_variants()
        .iter()
        .filter_map(|kind| kind.to_possible_value())
        .map(|value| value.get_name().to_owned())
        .collect();
    let report = classify::classify(
        &samples,
        &sampler,
        &options,
        kernel,
        report_options.top,
        traceable,
    );
    sink.write(&output::render(
        &report,
        format,
        output::text::classify::render_text,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Samples every interval until the window ends or a signal arrives.
async fn sample_window(sampler: &mut Sampler, options: &Options) -> Result<Vec<Sample>> {
    let mut signals = StopSignals::install()?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + options.window;
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            _ = signals.next() => break,
            _ = ticker.tick() => {
                samples.push(sampler.sample(started.elapsed())?);
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                samples.push(sampler.sample(started.elapsed())?);
                break;
            }
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser as _;
    use memleak::classify::{analysis, fixtures::*};

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn cli_parses_classify_and_rejects_absurd_values() {
        let cli = Cli::try_parse_from([
            "memleak",
            "classify",
            "--duration",
            "6s",
            "--format",
            "json",
            "--min-rate",
            "4096",
        ])
        .unwrap();
        let Command::Classify(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.duration, Duration::from_secs(6));
        assert_eq!(args.interval, Duration::from_secs(1));
        assert_eq!((args.min_rate, args.noise_floor), (4096, 256 * 1024));
        for bad in [
            &["memleak", "classify", "--duration", "0s"][..],
            &["memleak", "classify", "--duration", "2d"],
            &["memleak", "classify", "--duration", "10"],
            &["memleak", "classify", "--interval", "1ms"],
            &["memleak", "classify", "--min-rate", "-1"],
            &["memleak", "classify", "--noise-floor", "lots"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn too_short_a_window_for_three_samples_is_refused() {
        let cli = Cli::try_parse_from([
            "memleak",
            "classify",
            "--duration",
            "1s",
            "--interval",
            "1s",
        ])
        .unwrap();
        let Command::Classify(args) = cli.command else {
            panic!("parsed as another command");
        };
        let error = run(&args).expect_err("one interval is not a trend");
        assert!(format!("{error:#}").contains("at least three samples"));
    }

    #[test]
    fn suggested_commands_are_valid_memleak_commands() {
        let mut suggestions: Vec<String> = ["idle", "grow-eventfds", "grow-bpf-maps"]
            .into_iter()
            .filter_map(|name| classify_recorded(name).verdict.next_command)
            .collect();
        let large = synthetic(|second| {
            (
                vec![("MemTotal", 1 << 20), ("SUnreclaim", 1000 + 400 * second)],
                vec![cache("kmalloc-128", 100)],
            )
        });
        let context = context(facts(&[("kmalloc-128", false)]), DEFAULT_THRESHOLDS);
        suggestions.extend(analysis::analyze(&large, &context).verdict.next_command);
        assert_eq!(suggestions.len(), 4);
        for suggestion in suggestions {
            let words: Vec<&str> = suggestion.split_whitespace().collect();
            assert!(
                Cli::try_parse_from(&words).is_ok(),
                "`{suggestion}` does not parse"
            );
        }
    }
}
