//! `memleak trace`: attach, wait out the window with a progress line, detach, report.
use std::{
    io::IsTerminal as _,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    aggregate,
    cli::{Format, TraceArgs},
    kernel,
    output::ReportSink,
    privileges,
    probes::{self, Tracer, TracerSettings},
    report::{self, Report, Stats},
    symbolize::KernelSymbolizer,
    table::{self, TracerMaps},
};

pub fn run(args: &TraceArgs) -> Result<ExitCode> {
    privileges::require_root()?;
    if let Some(pid) = args.pid
        && !Path::new(&format!("/proc/{pid}")).exists()
    {
        bail!("--pid {pid}: no such process");
    }
    privileges::lift_memlock_limit();
    let kernel_release = kernel::release()?;
    let sink = ReportSink::open(args.report.output.as_deref())?;

    let tracer = probes::attach(&TracerSettings {
        capacity: args.capacity,
        sample_rate: args.sample_rate,
        stack_sample_rate: args.stack_sample_rate,
        filter_tgid: args.pid,
        method: args.attach,
    })?;
    eprintln!(
        "memleak: attached to the kernel's slab events ({}); tracing {}",
        tracer.attached,
        match args.duration {
            Some(window) => format!(
                "for {}, Ctrl-C ends early",
                crate::duration::display(window)
            ),
            None => "until Ctrl-C".to_owned(),
        }
    );
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let wait_result = runtime.block_on(wait_for_end(&tracer.maps, args.duration));

    let Tracer {
        programs,
        maps,
        attached,
        notes,
    } = tracer;
    // Detach before reading, so the table is a consistent snapshot.
    drop(programs);
    let elapsed = started.elapsed();
    let now_ns = monotonic_now_ns();
    wait_result?;

    let report = build_report(
        args,
        &maps,
        now_ns,
        ReportHeader {
            kernel: kernel_release,
            elapsed,
            attach: attached.to_string(),
            notes,
        },
    )?;
    let text = match args.report.format {
        Format::Text => report::render_text(&report),
        Format::Json => report::render_json(&report),
    };
    sink.write(&text)?;
    Ok(ExitCode::SUCCESS)
}

struct ReportHeader {
    kernel: String,
    elapsed: Duration,
    attach: String,
    notes: Vec<String>,
}

fn build_report(
    args: &TraceArgs,
    maps: &TracerMaps,
    now_ns: u64,
    header: ReportHeader,
) -> Result<Report> {
    let counters = table::read_counters(maps)?;
    let mut aggregator = aggregate::Aggregator::new(now_ns, args.min_age.unwrap_or(Duration::ZERO));
    let (mut outstanding, mut outstanding_bytes) = (0u64, 0u64);
    table::for_each_outstanding(maps, |record| {
        outstanding += 1;
        outstanding_bytes += u64::from(record.bytes_allocated);
        aggregator.add(record);
    })?;
    let aggregate = aggregator.finish();
    let mut sites = aggregate.sites;
    let site_count = sites.len() as u64;
    aggregate::rank(&mut sites, args.sort);
    sites.truncate(args.report.top as usize);

    let stack_ids = sites.iter().flat_map(|site| site.stacks.keys().copied());
    let stacks = table::read_stacks(maps, stack_ids)?;
    let mut symbolizer = KernelSymbolizer::new();
    symbolizer.resolve(report::addresses_to_symbolize(&sites, &stacks))?;
    let cache_names = table::read_cache_names(maps)?;
    let comms = table::read_comms(maps)?;
    let frame = |addr| symbolizer.frame(addr);
    let context = report::Context {
        stacks: &stacks,
        cache_names: &cache_names,
        comms: &comms,
        now_ns,
        sample_rate: args.sample_rate,
        frame: &frame,
    };
    Ok(Report {
        schema: report::SCHEMA_VERSION,
        kernel: header.kernel,
        duration_ms: header.elapsed.as_millis() as u64,
        attach: header.attach,
        sample_rate: args.sample_rate,
        stack_sample_rate: args.stack_sample_rate,
        stats: Stats {
            counters,
            outstanding,
            outstanding_bytes,
            hidden_younger: aggregate.hidden_younger,
            sites: site_count,
        },
        notes: header.notes,
        stacks: sites
            .iter()
            .map(|site| report::entry(site, &context))
            .collect(),
    })
}

/// Waits for the window to pass or for SIGINT / SIGTERM, showing progress on a terminal.
async fn wait_for_end(maps: &TracerMaps, window: Option<Duration>) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let started = tokio::time::Instant::now();
    let deadline = window.map(|window| started + window);
    let show_progress = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last_events = 0;
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            () = sleep_until(deadline) => break,
            _ = ticker.tick() => {
                if show_progress {
                    let counters = table::read_counters(maps)?;
                    let events = counters.allocs + counters.frees;
                    eprint!(
                        "\r\x1b[Ktracing {}: {}/s events, {} outstanding, {} dropped, {} stack failures",
                        crate::duration::display(started.elapsed()),
                        report::thousands(events - last_events),
                        report::thousands(counters.outstanding()),
                        report::thousands(counters.dropped_table_full),
                        report::thousands(counters.stack_failures),
                    );
                    last_events = events;
                }
            }
        }
    }
    if show_progress {
        eprint!("\r\x1b[K");
    }
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
