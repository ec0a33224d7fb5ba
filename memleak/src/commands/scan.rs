//! `memleak scan`: read every object of a slab cache and report its largest groups of
//! similar objects.
use std::process::ExitCode;

use anyhow::Result;
use memleak::{
    kernel::{self, privileges},
    output::{self, ReportOptions, ReportSink},
    scan::{self, Similarity},
};

use crate::cli::ScanArgs;

pub fn run(args: &ScanArgs) -> Result<ExitCode> {
    let report_options = ReportOptions::from(&args.report);
    let format = report_options.format.plain("scan")?;
    privileges::require_root()?;
    privileges::lift_memlock_limit();
    let mut sink = ReportSink::open(report_options.output.as_deref())?;
    let layout = scan::slab_layout(kernel::parse_btf()?.as_ref())?;
    let groups = report_options.top.min(scan::MAX_GROUPS);
    let similarity = Similarity::from(&args.similarity);
    let scan = scan::scan_cache(&args.cache, layout, similarity, groups)?;
    let mut report = scan.report(&kernel::release()?, None);
    if args.similarity.no_contents {
        report.withhold_contents();
    }
    sink.write(&output::render(
        &report,
        format,
        output::text::scan::render_text,
    ))?;
    Ok(ExitCode::SUCCESS)
}
