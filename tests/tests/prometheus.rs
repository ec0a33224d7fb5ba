//! End-to-end: `memleak watch --listen` serves metrics that Prometheus itself scrapes. The test
//! starts Debian's `prometheus` (installed by `./x test`) on loopback, pointed at the watch of a
//! leaking workload and loaded with packaging/memleak-alerts.yml, and asks Prometheus's HTTP API
//! for the leak's series, its alert, and every query of packaging/grafana-memleak.json;
//! `promtool check metrics` must find nothing to say about the page. Then the endpoint's
//! limits: a huge request, idle clients beyond the connection bound.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use memleak_tests::{Guard, ListeningWatch, end_to_end, free_port, http_get as get};

const LEAK_SITE: &str = "do_eventfd";

/// The repository's packaging folder: the alert rules and the Grafana dashboard.
fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// `promtool ARGS` must succeed; what it said.
fn promtool(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(packaging())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian's prometheus; `cargo xtask test-deps` installs it)")?;
    let mut stdin = child.stdin.take().context("promtool's stdin")?;
    if let Some(input) = input {
        stdin.write_all(input.as_bytes())?;
    }
    drop(stdin);
    let output = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "promtool {args:?}: {said}");
    Ok(said)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() -> Result<()> {
    let checked = promtool(&["check", "rules", "memleak-alerts.yml"], None)?;
    ensure!(checked.contains("SUCCESS: 4 rules found"), "{checked}");
    promtool(&["test", "rules", "memleak-alerts.test.yml"], None)?;
    Ok(())
}

/// Every PromQL expression of the Grafana dashboard, by panel title, with the dashboard's
/// variables replaced as Grafana would for "all machines".
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = packaging().join("grafana-memleak.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        let title = panel["title"].as_str().context("a panel without a title")?;
        for target in panel["targets"]
            .as_array()
            .context("a panel without targets")?
        {
            let expression = target["expr"].as_str().context("a target without expr")?;
            queries.push((
                title.to_owned(),
                expression
                    .replace("$instance", ".+")
                    .replace("$__rate_interval", "30s"),
            ));
        }
    }
    Ok(queries)
}

#[test]
fn prometheus_scrapes_the_leak_from_watch_listen_and_its_rules_and_dashboard_read_it() -> Result<()>
{
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let directory = std::env::temp_dir().join(format!("memleak-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory)?;

    let served = ListeningWatch::start(20, 90, "80s")?;
    let metrics_port = served.port;

    let prometheus_port = free_port()?;
    let config = directory.join("prometheus.yml");
    std::fs::File::create(&config)?.write_all(
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - \
             {}\nscrape_configs:\n  - job_name: memleak\n    static_configs:\n      - \
             targets: ['127.0.0.1:{metrics_port}']\n",
            packaging().join("memleak-alerts.yml").display()
        )
        .as_bytes(),
    )?;
    let prometheus = Guard::new(
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
    let linted = promtool(&["check", "metrics"], Some(&page))?;
    ensure!(
        linted.trim().is_empty(),
        "promtool check metrics: {linted}\n{page}"
    );

    // Prometheus has the leak's series, and then its verdict.
    let query = |expression: &str| -> Result<Vec<serde_json::Value>> {
        let url = format!(
            "http://127.0.0.1:{prometheus_port}/api/v1/query?query={}",
            url_encoded(expression)
        );
        let answer: serde_json::Value = serde_json::from_str(&get(&url)?)?;
        ensure!(
            answer["status"] == "success",
            "Prometheus refused `{expression}`: {answer}"
        );
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

    // The alert rules, loaded by this Prometheus, hold the leak: pending for their `for`.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let alerts: serde_json::Value = serde_json::from_str(&get(&format!(
            "http://127.0.0.1:{prometheus_port}/api/v1/alerts"
        ))?)?;
        let leak_alert = alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|alert| {
                alert["labels"]["alertname"]
                    .as_str()
                    .is_some_and(|name| name.starts_with("KernelMemoryLeak"))
                    && alert["labels"]["site"]
                        .as_str()
                        .is_some_and(|site| site.starts_with(LEAK_SITE))
                    && ["pending", "firing"].contains(&alert["state"].as_str().unwrap_or(""))
            });
        if leak_alert {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no KernelMemoryLeak alert for {LEAK_SITE}: {alerts}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Each query of the Grafana dashboard is valid PromQL over the metrics served, and the
    // panels an on-call engineer reads first show the leak.
    let queries = dashboard_queries()?;
    ensure!(queries.len() >= 10, "{queries:?}");
    for (title, expression) in &queries {
        let result = query(expression).with_context(|| format!("panel `{title}`"))?;
        let must_show = [
            "Sites leaking (warning or critical)",
            "Leaking sites",
            "Outstanding kernel memory by kind",
            "Largest allocation sites",
            "Growth of growing sites",
        ];
        if must_show.contains(&title.as_str()) {
            ensure!(
                !result.is_empty(),
                "panel `{title}`: `{expression}` is empty"
            );
        }
        if title == "Sites leaking (warning or critical)" {
            let count = result[0]["value"][1].as_str().unwrap_or("0");
            ensure!(count != "0", "panel `{title}` counts {count} leaking sites");
        }
        if title == "Leaking sites" && expression.starts_with("memleak_leak_severity") {
            ensure!(
                result.iter().any(|series| series["metric"]["site"]
                    .as_str()
                    .is_some_and(|site| site.starts_with(LEAK_SITE))),
                "panel `{title}` does not list {LEAK_SITE}: {result:?}"
            );
        }
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
    // A request with a megabyte of headers is refused with 431, a malformed one with 400, and
    // the watch goes on.
    let header = format!("X-Padding: {}\r\n", "a".repeat(1 << 20));
    for (request, refused) in [
        (
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{header}\r\n"),
            "HTTP/1.1 431",
        ),
        ("GARBAGE\r\n\r\n".to_owned(), "HTTP/1.1 400"),
    ] {
        let mut raw = TcpStream::connect(("127.0.0.1", metrics_port))?;
        raw.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The server may close before it has read all of a huge request: the answer counts.
        let _ = raw.write_all(request.as_bytes());
        let mut answer = Vec::new();
        let _ = raw.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        ensure!(
            answer.starts_with(refused),
            "{} bytes of request were answered `{}`, not {refused}",
            request.len(),
            answer.lines().next().unwrap_or("")
        );
    }
    get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .context("the watch stopped serving after the refused requests")?;

    // Clients that connect and say nothing take at most MAX_CONNECTIONS slots, each for at
    // most the idle timeout (10 s): a request behind them waits, then is served. (Prometheus
    // is stopped first: its scrapes keep a connection of their own.)
    drop(prometheus);
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", metrics_port)))
        .collect::<std::io::Result<_>>()?;
    let started = Instant::now();
    let waited = Command::new("curl")
        .args([
            "--silent",
            "--fail",
            "--output",
            "/dev/null",
            "--max-time",
            "30",
        ])
        .arg(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .status()?;
    let waited_for = started.elapsed();
    ensure!(
        waited.success(),
        "/metrics behind 20 idle clients: {waited}"
    );
    ensure!(
        waited_for >= Duration::from_secs(5),
        "/metrics was served in {waited_for:?} beside 20 idle clients: connections are not bounded"
    );
    // The server closed the idle connections it took (a read sees the end, not a timeout).
    let mut closed = 0;
    for mut connection in idle {
        connection.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut byte = [0_u8; 1];
        if matches!(connection.read(&mut byte), Ok(0)) {
            closed += 1;
        }
    }
    ensure!(
        closed >= 16,
        "only {closed} of 20 idle connections were closed"
    );

    drop(served);
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}

/// A PromQL expression as a query-string value.
fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
