//! End-to-end: `memleak watch --listen` serves metrics that Prometheus itself scrapes. The test
//! starts Debian's `prometheus` (installed by `./x test`) on loopback, pointed at the watch of a
//! leaking workload, and asks Prometheus's HTTP API for the leak's series; `promtool check
//! metrics` must find nothing to say about the page.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use memleak_tests::{Guard, end_to_end, fixture_binary, memleak_binary};

const LEAK_SITE: &str = "do_eventfd";

/// A port nobody listens on now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// GET `url` with curl; the body.
fn get(url: &str) -> Result<String> {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "5", url])
        .output()
        .context("running curl")?;
    ensure!(
        output.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn prometheus_scrapes_the_leak_from_watch_listen() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let memleak = memleak_binary()?;
    let directory = std::env::temp_dir().join(format!("memleak-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory)?;

    let mut workload = Guard::new(
        Command::new(fixture_binary()?)
            .args(["watch-mix", "20", "60"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting memleak-fixture watch-mix")?,
    );
    let stdout = workload
        .child()
        .stdout
        .take()
        .context("the fixture's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(line.trim() == "ready", "the fixture said `{}`", line.trim());

    let metrics_port = free_port()?;
    let mut watch = Guard::new(
        Command::new(&memleak)
            .args(["watch", "--pid", &workload.child().id().to_string()])
            .args(["--interval", "1s", "--sample-rate", "1", "--settle", "5s"])
            .args(["--duration", "50s", "--no-history", "--format", "json"])
            .args(["--listen", &metrics_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting memleak watch --listen")?,
    );
    // Kept open to the end: a watch whose stderr is closed dies at its next line.
    let mut stderr = BufReader::new(watch.child().stderr.take().context("the watch's stderr")?);
    let mut said = String::new();
    stderr.read_line(&mut said)?;
    ensure!(
        said.contains(&format!("http://127.0.0.1:{metrics_port}")),
        "the watch said `{}`",
        said.trim()
    );

    let prometheus_port = free_port()?;
    let config = directory.join("prometheus.yml");
    std::fs::File::create(&config)?.write_all(
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: memleak\n    \
             static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        .as_bytes(),
    )?;
    let _prometheus = Guard::new(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting prometheus (Debian's package; `cargo xtask test-deps` installs it)",
            )?,
    );

    // The page as served, checked by Prometheus's own linter once the first interval is in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        if let Ok(page) = get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
            && page.contains("memleak_outstanding_bytes")
        {
            break page;
        }
        ensure!(
            Instant::now() < deadline,
            "no interval on /metrics within 30 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool")?;
    promtool
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(page.as_bytes())?;
    let linted = promtool.wait_with_output()?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
    ensure!(
        linted.status.success() && complaints.trim().is_empty(),
        "promtool check metrics: {complaints}\n{page}"
    );

    // Prometheus has the leak's series, and then its verdict.
    let query = |expression: &str| -> Result<Vec<serde_json::Value>> {
        let url = format!(
            "http://127.0.0.1:{prometheus_port}/api/v1/query?query={}",
            expression
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('~', "%7E")
                .replace('>', "%3E")
                .replace(' ', "%20")
        );
        let answer: serde_json::Value = serde_json::from_str(&get(&url)?)?;
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut seen = false;
    loop {
        let objects = query(&format!(
            "memleak_outstanding_objects{{site=~\"{LEAK_SITE}.*\"}} > 0"
        ))
        .unwrap_or_default();
        seen |= !objects.is_empty();
        let leaking = query(&format!(
            "memleak_leak_severity{{site=~\"{LEAK_SITE}.*\"}} >= 1"
        ))
        .unwrap_or_default();
        if seen && !leaking.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "Prometheus {} the leak's objects and has no warning for it after 45 s",
                if seen { "has" } else { "never got" }
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    // /profile is what is outstanding now, as a pprof profile that Go's pprof reads.
    let profile = directory.join("profile.pb.gz");
    let fetched = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "5",
            "--output",
        ])
        .arg(&profile)
        .arg(format!("http://127.0.0.1:{metrics_port}/profile"))
        .status()?;
    ensure!(fetched.success(), "GET /profile: {fetched}");
    let top = Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&profile)
        .env("GOCACHE", directory.join("gocache"))
        .env("HOME", &directory)
        .output()
        .context("running go tool pprof")?;
    let top_text = String::from_utf8_lossy(&top.stdout);
    ensure!(
        top.status.success() && top_text.contains(LEAK_SITE),
        "go tool pprof -top of /profile ({}): {top_text}{}",
        top.status,
        String::from_utf8_lossy(&top.stderr)
    );

    // Read-only: another method or path is refused, and the watch goes on.
    for (method, path, refused) in [("POST", "/metrics", "405"), ("GET", "/etc/passwd", "404")] {
        let answer = Command::new("curl")
            .args([
                "--silent",
                "--output",
                "/dev/null",
                "--write-out",
                "%{http_code}",
            ])
            .args(["--max-time", "5", "--request", method])
            .arg(format!("http://127.0.0.1:{metrics_port}{path}"))
            .output()?;
        let code = String::from_utf8_lossy(&answer.stdout);
        ensure!(code == refused, "{method} {path}: {code}, not {refused}");
    }
    get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .context("the watch stopped serving after the refused requests")?;

    drop(watch);
    drop(stderr);
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}
