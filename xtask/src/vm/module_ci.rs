//! `memleak vm` as a module author runs it: the static dist binary, Debian's kernel, the test
//! module (tests/kmod/leaky, built against that kernel) and a test command. Each scenario's
//! leaks are known by construction (leaky.c); its exit status and both checks (during the
//! tests, after the unload) must say exactly that.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use memleak::trace::report::{Report, Verdict};

/// What one check must find.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Nothing in scope.
    Pass,
    /// Exactly `count` objects from one call site in `function` of the module.
    Leak { function: &'static str, count: u64 },
}

struct Scenario {
    name: &'static str,
    /// insmod's parameters for leaky.
    params: &'static str,
    command: &'static [&'static str],
    /// `memleak vm`'s exit status.
    status: i32,
    tests: Expect,
    unload: Expect,
    /// A line the guest's dmesg must show: the command did reach the module.
    dmesg: Option<&'static str>,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "leak-during-tests",
        params: "n=0",
        command: &["sh", "-c", "echo 7 > /sys/module/leaky/parameters/leak"],
        status: 1,
        tests: Expect::Leak {
            function: "leaky_kmalloc",
            count: 7,
        },
        // What the tests leaked is still there once the module is gone.
        unload: Expect::Leak {
            function: "leaky_kmalloc",
            count: 7,
        },
        dmesg: Some("leaky: leaked 7 kmalloc objects on request"),
    },
    Scenario {
        // Objects held for the module's life and freed by its exit, and objects allocated and
        // freed during the tests: a clean module.
        name: "clean",
        params: "n=0 hold=5",
        command: &["sh", "-c", "echo 50 > /sys/module/leaky/parameters/churn"],
        status: 0,
        tests: Expect::Pass,
        unload: Expect::Pass,
        dmesg: Some("leaky: allocated and freed 50 objects on request"),
    },
    Scenario {
        // The same held objects, which the exit forgets: only the unload check sees them.
        name: "leak-on-unload",
        params: "n=0 hold=5 forget_on_exit=1",
        command: &["true"],
        status: 1,
        tests: Expect::Pass,
        unload: Expect::Leak {
            function: "leaky_hold",
            count: 5,
        },
        dmesg: None,
    },
    Scenario {
        // A failing test is the command's status, not a leak.
        name: "failing-command",
        params: "n=0",
        command: &["sh", "-c", "echo the test failed; exit 3"],
        status: 3,
        tests: Expect::Pass,
        unload: Expect::Pass,
        dmesg: None,
    },
];

/// Runs every scenario with `memleak vm --kernel SERIES`; their summaries, or what went wrong.
pub fn run_all(
    memleak: &Path,
    series: &str,
    module: &Path,
    work: &Path,
    timeout: Duration,
    step: &dyn Fn(&str),
) -> Result<Vec<String>> {
    let mut summaries = Vec::new();
    for scenario in &SCENARIOS {
        let out = work.join(scenario.name);
        let started = Instant::now();
        let status = Command::new(memleak)
            .args(["vm", "--kernel", series, "--module"])
            .arg(module)
            .args(["--module-params", &format!("leaky:{}", scenario.params)])
            .args([
                "--grace",
                "1s",
                "--timeout",
                &format!("{}s", timeout.as_secs()),
            ])
            .arg("--output-dir")
            .arg(&out)
            .arg("--")
            .args(scenario.command)
            .status()
            .context("running memleak vm")?;
        let seconds = started.elapsed().as_secs_f64();
        judge(scenario, status.code(), &out).with_context(|| {
            format!(
                "memleak vm, scenario {} (its output is in {})",
                scenario.name,
                out.display()
            )
        })?;
        let summary = format!("{} passed in {seconds:.0} s", scenario.name);
        step(&format!("memleak vm on {series}: {summary}"));
        summaries.push(summary);
    }
    Ok(summaries)
}

fn judge(scenario: &Scenario, status: Option<i32>, out: &Path) -> Result<()> {
    ensure!(
        status == Some(scenario.status),
        "memleak vm exited {status:?}, not {}",
        scenario.status
    );
    let read = |name: &str| -> Result<Report> {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    };
    check("the tests' check", &read("tests.json")?, scenario.tests)?;
    check("the unload check", &read("unload.json")?, scenario.unload)?;
    let command_status =
        std::fs::read_to_string(out.join("command.status")).context("reading command.status")?;
    let expected_command_status = if scenario.status == 1 {
        0
    } else {
        scenario.status
    };
    ensure!(
        command_status.trim() == expected_command_status.to_string(),
        "the command's own status was {}, not {expected_command_status}",
        command_status.trim()
    );
    if let Some(line) = scenario.dmesg {
        let dmesg = std::fs::read_to_string(out.join("dmesg")).context("reading dmesg")?;
        ensure!(
            dmesg.contains(line),
            "the guest's dmesg lacks {line:?}: the command did not reach the module"
        );
    }
    for artifact in [
        "tests.xml",
        "unload.xml",
        "tests.txt",
        "unload.txt",
        "console.log",
    ] {
        ensure!(
            out.join(artifact).is_file(),
            "memleak vm brought back no {artifact}"
        );
    }
    Ok(())
}

fn check(what: &str, report: &Report, expect: Expect) -> Result<()> {
    let verdict: &Verdict = report
        .check
        .as_ref()
        .with_context(|| format!("{what}: the report has no check"))?;
    match expect {
        Expect::Pass => ensure!(
            !verdict.failed && verdict.count == 0,
            "{what} must pass with nothing in scope: {verdict:#?}"
        ),
        Expect::Leak { function, count } => {
            ensure!(verdict.failed, "{what} must fail: {verdict:#?}");
            ensure!(
                verdict.count == count
                    && verdict.sites.len() == 1
                    && verdict.sites[0]
                        .call_site
                        .starts_with(&format!("{function}+"))
                    && verdict.sites[0].call_site.ends_with(" [leaky]"),
                "{what} must find exactly {count} objects at {function} [leaky]: {verdict:#?}"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use memleak::trace::report::LeakingSite;

    use super::*;

    fn report(failed: bool, sites: Vec<(&str, u64)>) -> Report {
        let mut report: Report =
            serde_json::from_str(include_str!("../../testdata/vm/module-ci-unload.json")).unwrap();
        report.check = Some(Verdict {
            scope: "module=leaky function=* cache=*".into(),
            cache_merged_with: Vec::new(),
            bytes: 0,
            count: sites.iter().map(|(_, count)| count).sum(),
            max_bytes: 0,
            max_count: 0,
            failed,
            sites: sites
                .into_iter()
                .map(|(call_site, count)| LeakingSite {
                    call_site: call_site.into(),
                    kind: "kmalloc".into(),
                    cache: Some("kmalloc-64".into()),
                    bytes: count * 64,
                    count,
                })
                .collect(),
        });
        report
    }

    const HOLD: Expect = Expect::Leak {
        function: "leaky_hold",
        count: 5,
    };

    #[test]
    fn the_recorded_unload_report_passes_its_check() {
        let recorded: Report =
            serde_json::from_str(include_str!("../../testdata/vm/module-ci-unload.json")).unwrap();
        check("unload", &recorded, HOLD).unwrap();
        assert!(check("unload", &recorded, Expect::Pass).is_err());
    }

    #[test]
    fn a_leak_must_be_exact_and_in_the_module() {
        check(
            "x",
            &report(true, vec![("leaky_hold+0x49/0x7a [leaky]", 5)]),
            HOLD,
        )
        .unwrap();
        for wrong in [
            report(true, vec![("leaky_hold+0x49/0x7a [leaky]", 4)]),
            report(true, vec![("leaky_hold+0x49/0x7a", 5)]),
            report(true, vec![("0xffffffffc0a00049", 5)]),
            report(
                true,
                vec![
                    ("leaky_hold+0x49/0x7a [leaky]", 5),
                    ("other+0x1/0x2 [leaky]", 1),
                ],
            ),
            report(false, vec![("leaky_hold+0x49/0x7a [leaky]", 5)]),
        ] {
            assert!(check("x", &wrong, HOLD).is_err(), "{:?}", wrong.check);
        }
        check("x", &report(false, vec![]), Expect::Pass).unwrap();
        assert!(
            check(
                "x",
                &report(false, vec![("a+0x1/0x2 [leaky]", 1)]),
                Expect::Pass
            )
            .is_err()
        );
    }
}
