//! End-to-end: the page `memleak watch --listen` serves at `/`, as a person sees it. Headless
//! Chromium (Debian's `chromium`, installed by `./x test`) loads it while the watch follows a
//! leaking workload; the test reads the page Chromium rendered (its DOM after the scripts ran)
//! and keeps a screenshot in target/test-artifacts/dashboard.png.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use memleak_tests::{ListeningWatch, end_to_end, http_get};

const LEAK_SITE: &str = "do_eventfd";

/// Chromium with a profile of its own in `directory`, run as root (hence no sandbox), given
/// ten seconds of page time for the scripts to fetch and draw. At most two minutes.
fn chromium(directory: &Path, args: &[&str], url: &str) -> Result<std::process::Output> {
    let output = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            directory.join("profile").display()
        ))
        .arg("--virtual-time-budget=10000")
        .args(args)
        .arg(url)
        .env("HOME", directory)
        .output()
        .context("running chromium (Debian's package; `cargo xtask test-deps` installs it)")?;
    ensure!(
        output.status.success(),
        "chromium {args:?} {url}: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// The value of `attribute` on the element whose id is `id` in `dom`.
fn attribute<'a>(dom: &'a str, id: &str, attribute: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let value_at = tag.find(&format!(" {attribute}=\""))? + attribute.len() + 3;
    let value_end = value_at + tag[value_at..].find('"')?;
    Some(&tag[value_at..value_end])
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts")
}

#[test]
fn chromium_shows_the_leak_its_stack_and_charts_with_data() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory = std::env::temp_dir().join(format!("memleak-dashboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory)?;
    let served = ListeningWatch::start(20, 90, "80s")?;

    // The page is one self-contained file: nothing fetched from elsewhere.
    let page = http_get(&served.url("/"))?;
    ensure!(page.contains("<title>memleak watch</title>"), "{page}");
    let external: Vec<&str> = page
        .match_indices("http")
        .map(|(at, _)| &page[at..(at + 40).min(page.len())])
        .filter(|link| !link.starts_with("http://www.w3.org/2000/svg"))
        .collect();
    ensure!(external.is_empty(), "the page links out: {external:?}");

    // Wait for the verdict the page must show.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let interval: serde_json::Value =
            serde_json::from_str(&http_get(&served.url("/api/interval"))?)?;
        let leaking = interval["leaks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|leak| {
                leak["call_site"]
                    .as_str()
                    .is_some_and(|site| site.starts_with(LEAK_SITE))
                    && ["warning", "critical"].contains(&leak["severity"].as_str().unwrap_or(""))
            });
        if leaking {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the watch judged no {LEAK_SITE} leak in 45 s: {interval}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    let dump = chromium(&directory, &["--dump-dom"], &served.url("/"))?;
    let dom = String::from_utf8(dump.stdout)?;
    let keep = artifacts();
    std::fs::create_dir_all(&keep)?;
    std::fs::write(keep.join("dashboard.html"), &dom)?;

    // The banner says a leak is there.
    let level = attribute(&dom, "status", "data-level").context("no status banner")?;
    ensure!(
        level == "warning" || level == "critical",
        "the banner's level is {level}"
    );
    ensure!(dom.contains("LEAKING: "), "the banner does not say LEAKING");
    // The verdict row names the leaking call site, at warning or above, with its stack open.
    let row_at = dom
        .find(&format!("data-call-site=\"{LEAK_SITE}"))
        .with_context(|| format!("no verdict row for {LEAK_SITE}"))?;
    let row = &dom[dom[..row_at].rfind("<tr").context("a row")?..];
    let row = &row[..row.find("</tr>").context("the row's end")?];
    ensure!(
        row.contains("data-severity=\"warning\"") || row.contains("data-severity=\"critical\""),
        "{row}"
    );
    ensure!(
        row.contains("<details open"),
        "the stack is not shown: {row}"
    );
    let frames = row.matches("<li>").count();
    ensure!(frames >= 3, "{frames} frames in the verdict's stack: {row}");
    // Both charts have data: several points per kind, and the leaking site among the lines.
    for chart in ["kinds-chart", "sites-chart"] {
        let series: usize = attribute(&dom, chart, "data-series")
            .with_context(|| format!("{chart} was not drawn"))?
            .parse()?;
        let points: usize = attribute(&dom, chart, "data-points")
            .context("no points")?
            .parse()?;
        ensure!(
            series >= 1 && points >= 3 * series,
            "{chart}: {series} series, {points} points"
        );
    }
    let legend = &dom[dom.find("id=\"sites-legend\"").context("no legend")?..];
    ensure!(
        legend[..legend.find("</div>").unwrap_or(legend.len())].contains(LEAK_SITE),
        "the chart of the largest sites has no {LEAK_SITE} line"
    );
    // The flame graph the page embeds names the leaking function.
    ensure!(dom.contains("id=\"flame\""), "no flame graph on the page");
    let flame = http_get(&served.url("/flamegraph.svg"))?;
    ensure!(
        flame.contains("<svg") && flame.contains(LEAK_SITE),
        "the flame graph does not show {LEAK_SITE}"
    );

    // What a person sees, kept for the record.
    let screenshot = keep.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(
        &directory,
        &[
            &format!("--screenshot={}", screenshot.display()),
            "--window-size=1400,1700",
        ],
        &served.url("/"),
    )?;
    let png = std::fs::read(&screenshot).context("no screenshot")?;
    ensure!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "the screenshot is {} bytes",
        png.len()
    );
    println!("dashboard screenshot: {}", screenshot.display());

    drop(served);
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}
