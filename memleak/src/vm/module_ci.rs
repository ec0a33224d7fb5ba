//! `memleak vm`'s guest: what runs inside it and what its results mean. Two leak checks,
//! each a `memleak run` in the guest:
//!
//! - **tests**: scoped to the modules, around COMMAND only, with the modules loaded. Objects
//!   the modules' code allocated while the tests ran and did not free by their end (plus
//!   `--grace`) are leaks of the tests; what the modules allocated on load and hold while
//!   loaded is outside this window, so module state is not blamed.
//! - **unload**: scoped to the modules, from before `insmod` to after `rmmod` (plus `--grace`).
//!   Whatever the modules' code allocated and is still allocated once they are gone has no
//!   owner left: the classic leak on unload (it also counts what the tests leaked). The
//!   tracer records the modules' symbols while they are loaded, so their call sites are named
//!   after the unload.
//!
//! The guest writes each file into /results and sends it back on its second serial port
//! ([`super::guest`]); [`Outcome`] reads them.
use std::path::Path;

use anyhow::{Context as _, Result, bail};

use super::guest::GuestResults;
use crate::trace::report::{Report, Verdict};

/// Files the guest sends back (it sends every file of /results; these the host reads).
pub const COMMAND_STATUS: &str = "command.status";
pub const COMMAND_LOG: &str = "command.log";

/// A module to load: its file and insmod's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleToLoad {
    /// The kernel's name for it: the file's stem, `-` read as `_` (as kbuild names modules).
    pub name: String,
    /// The file's name inside the guest (`/vm/modules/NAME.ko`).
    pub file_name: String,
    pub params: Vec<String>,
}

impl ModuleToLoad {
    pub fn from_path(path: &Path, params: Vec<String>) -> Result<Self> {
        let file_name = path
            .file_name()
            .and_then(|name| name.to_str())
            .with_context(|| format!("{} names no file", path.display()))?;
        let Some(stem) = file_name.strip_suffix(".ko") else {
            bail!("--module {}: not a .ko file", path.display());
        };
        if stem.is_empty()
            || !stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        {
            bail!(
                "--module {}: not a kernel module's file name",
                path.display()
            );
        }
        Ok(Self {
            name: stem.replace('-', "_"),
            file_name: file_name.to_owned(),
            params,
        })
    }
}

/// What the guest does, decided on the host.
#[derive(Debug, Clone)]
pub struct Job {
    pub modules: Vec<ModuleToLoad>,
    /// COMMAND and its arguments, run in /work.
    pub command: Vec<String>,
    /// Options of both `memleak run`s in the guest: the scope and thresholds.
    pub check_options: Vec<String>,
    /// `--grace`, as memleak reads it (`3s`).
    pub grace: String,
}

/// `word` quoted for sh: as it is when plainly safe, else in single quotes.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn quoted(words: &[String]) -> String {
    words
        .iter()
        .map(|word| shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Job {
    /// `memleak run` with the job's check, writing `name`.json and `name`.xml into /results.
    fn memleak_run(&self, name: &str) -> String {
        format!(
            "memleak run --fail-on-leak --grace {} --top 1000000 --format json \
             --output /results/{name}.json --junit /results/{name}.xml {}",
            shell_quote(&self.grace),
            quoted(&self.check_options)
        )
    }

    /// /vm/run.sh, which /init runs: the unload check around load, tests and unload.
    pub fn run_script(&self) -> String {
        format!(
            "#!/bin/sh\n\
             # The unload check: from before insmod to after rmmod.\n\
             {} -- sh /vm/phases.sh 2>/results/unload.stderr\n\
             echo $? >/results/unload.status\n",
            self.memleak_run("unload")
        )
    }

    /// /vm/phases.sh: loads the modules, runs COMMAND under the tests' check, unloads them
    /// in reverse order. A module that does not load or unload stops it (`setup.failed`).
    pub fn phases_script(&self) -> String {
        let mut script = String::from("#!/bin/sh\n");
        for module in &self.modules {
            script.push_str(&format!(
                "insmod /vm/modules/{} {} >>/results/insmod.log 2>&1 || \
                 {{ echo \"insmod {} failed\" >/results/setup.failed; exit 125; }}\n",
                shell_quote(&module.file_name),
                quoted(&module.params),
                shell_quote(&module.file_name)
            ));
        }
        script.push_str(&format!(
            "cd /work\n\
             {} -- sh /vm/command.sh 2>/results/tests.stderr\n\
             echo $? >/results/tests.status\n",
            self.memleak_run("tests")
        ));
        for module in self.modules.iter().rev() {
            script.push_str(&format!(
                "rmmod {} >>/results/rmmod.log 2>&1 || \
                 {{ echo \"rmmod {} failed\" >/results/setup.failed; exit 125; }}\n",
                shell_quote(&module.name),
                shell_quote(&module.name)
            ));
        }
        script
    }

    /// /vm/command.sh: COMMAND, its output kept, its status recorded apart from the check's.
    pub fn command_script(&self) -> String {
        format!(
            "#!/bin/sh\n\
             {} >/results/{COMMAND_LOG} 2>&1\n\
             status=$?\n\
             echo $status >/results/{COMMAND_STATUS}\n\
             exit $status\n",
            quoted(&self.command)
        )
    }
}

/// What one `memleak vm` run found.
#[derive(Debug)]
pub struct Outcome {
    /// COMMAND's exit status.
    pub command_status: i32,
    pub tests: Report,
    pub unload: Report,
}

impl Outcome {
    /// Reads the guest's results; a module that did not load or unload, or a check that did
    /// not run, is an error (status 2), not a verdict.
    pub fn read(results: &GuestResults) -> Result<Self> {
        if let Ok(failure) = results.file("setup.failed") {
            let log = |name: &str| results.file(name).unwrap_or("").trim().to_owned();
            bail!(
                "in the guest, {}: {} {}",
                failure.trim(),
                log("insmod.log"),
                log("rmmod.log")
            );
        }
        // Each check's report. Its status cannot tell a failed memleak (the run's status is
        // the command's when no leak is found, and a command may exit 2): a report that is
        // missing or does not parse does, and the last line of its stderr says why.
        let report = |check: &str| -> Result<Report> {
            let name = format!("{check}.json");
            let parsed = results
                .file(&name)
                .ok()
                .and_then(|text| serde_json::from_str(text).ok());
            parsed.with_context(|| {
                let stderr = results
                    .file(&format!("{check}.stderr"))
                    .unwrap_or("")
                    .trim();
                format!(
                    "the {check} check's memleak wrote no report in the guest: {}",
                    stderr.lines().last().unwrap_or("(nothing on stderr)")
                )
            })
        };
        let unload = report("unload")?;
        let tests = report("tests")?;
        let command_status = results
            .file(COMMAND_STATUS)
            .ok()
            .and_then(|status| status.trim().parse().ok())
            .context("the guest recorded no status of the command")?;
        Ok(Self {
            command_status,
            tests,
            unload,
        })
    }

    fn verdict(report: &Report) -> Option<&Verdict> {
        report.check.as_ref()
    }

    pub fn tests_failed(&self) -> bool {
        Self::verdict(&self.tests).is_some_and(|verdict| verdict.failed)
    }

    pub fn unload_failed(&self) -> bool {
        Self::verdict(&self.unload).is_some_and(|verdict| verdict.failed)
    }

    /// `memleak vm`'s status: 1 on a leak in either check, else COMMAND's.
    pub fn exit_status(&self) -> i32 {
        if self.tests_failed() || self.unload_failed() {
            1
        } else {
            self.command_status
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_words_for_sh() {
        assert_eq!(shell_quote("n=0"), "n=0");
        assert_eq!(shell_quote("/work/run-tests.sh"), "/work/run-tests.sh");
        assert_eq!(shell_quote("two words"), "'two words'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME;rm"), "'$HOME;rm'");
    }

    #[test]
    fn names_modules_as_kbuild_does() {
        let module =
            ModuleToLoad::from_path(Path::new("/tmp/my-driver.ko"), vec!["n=0".into()]).unwrap();
        assert_eq!(module.name, "my_driver");
        assert_eq!(module.file_name, "my-driver.ko");
        assert!(ModuleToLoad::from_path(Path::new("driver.o"), vec![]).is_err());
        assert!(ModuleToLoad::from_path(Path::new("bad name.ko"), vec![]).is_err());
        assert!(ModuleToLoad::from_path(Path::new(".ko"), vec![]).is_err());
    }

    fn job() -> Job {
        Job {
            modules: vec![
                ModuleToLoad::from_path(Path::new("dep.ko"), vec![]).unwrap(),
                ModuleToLoad::from_path(Path::new("leaky.ko"), vec!["n=0".into(), "hold=5".into()])
                    .unwrap(),
            ],
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo 5 > /sys/module/leaky/parameters/leak".into(),
            ],
            check_options: vec![
                "--module".into(),
                "dep".into(),
                "--module".into(),
                "leaky".into(),
            ],
            grace: "3s".into(),
        }
    }

    #[test]
    fn loads_in_order_tests_then_unloads_in_reverse() {
        let phases = job().phases_script();
        let position = |needle: &str| {
            phases
                .find(needle)
                .unwrap_or_else(|| panic!("{needle}: {phases}"))
        };
        assert!(
            position("insmod /vm/modules/dep.ko")
                < position("insmod /vm/modules/leaky.ko n=0 hold=5")
        );
        assert!(position("insmod /vm/modules/leaky.ko") < position("--output /results/tests.json"));
        assert!(position("-- sh /vm/command.sh") < position("rmmod leaky"));
        assert!(position("rmmod leaky") < position("rmmod dep"));
        assert!(phases.contains("--module dep --module leaky -- sh /vm/command.sh"));
        let run = job().run_script();
        assert!(run.contains("--output /results/unload.json --junit /results/unload.xml"));
        assert!(run.contains("-- sh /vm/phases.sh"));
        assert!(
            job().command_script().contains(
                "sh -c 'echo 5 > /sys/module/leaky/parameters/leak' >/results/command.log"
            )
        );
    }

    fn results(files: &[(&str, &str)]) -> GuestResults {
        GuestResults::from_files(files.iter().copied())
    }

    #[test]
    fn a_module_that_does_not_load_is_an_error_with_insmods_words() {
        let error = Outcome::read(&results(&[
            ("setup.failed", "insmod leaky.ko failed"),
            (
                "insmod.log",
                "insmod: can't insert 'leaky.ko': invalid module format",
            ),
        ]))
        .unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("insmod leaky.ko failed"), "{message}");
        assert!(message.contains("invalid module format"), "{message}");
    }

    #[test]
    fn a_check_that_did_not_run_is_an_error_with_its_stderr() {
        // As on Linux 5.10: the report file opened, empty, before memleak refused the kernel.
        let error = Outcome::read(&results(&[
            (
                "unload.stderr",
                "loading\nmemleak: error: Linux 5.10 predates BPF atomics",
            ),
            ("unload.status", "2"),
            ("unload.json", ""),
        ]))
        .unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("unload check's memleak wrote no report"),
            "{message}"
        );
        assert!(
            message.ends_with("memleak: error: Linux 5.10 predates BPF atomics"),
            "{message}"
        );
        // A check that never ran is an error too.
        assert!(Outcome::read(&results(&[("unload.json", "{}")])).is_err());
    }

    #[test]
    fn a_failing_command_is_its_status_not_an_error() {
        let report =
            serde_json::to_string(&crate::trace::report::fixtures::sample_report(1)).unwrap();
        // `memleak run` exits with the command's status when it finds no leak.
        let outcome = Outcome::read(&results(&[
            ("tests.json", &report),
            ("tests.status", "3"),
            ("unload.json", &report),
            ("unload.status", "3"),
            ("command.status", "3"),
        ]))
        .unwrap();
        assert_eq!(outcome.command_status, 3);
        assert_eq!(outcome.exit_status(), 3);
    }

    #[test]
    fn a_leak_in_either_check_exits_1_else_the_commands_status() {
        let report = |failed: bool| {
            let mut report = crate::trace::report::fixtures::sample_report(1);
            report.check = Some(Verdict {
                scope: "module=leaky function=* cache=*".into(),
                cache_merged_with: Vec::new(),
                bytes: 0,
                count: 0,
                max_bytes: 0,
                max_count: 0,
                failed,
                sites: Vec::new(),
            });
            report
        };
        let outcome = |command_status, tests, unload| Outcome {
            command_status,
            tests: report(tests),
            unload: report(unload),
        };
        assert_eq!(outcome(0, false, false).exit_status(), 0);
        assert_eq!(outcome(3, false, false).exit_status(), 3);
        assert_eq!(outcome(0, true, true).exit_status(), 1);
        assert_eq!(outcome(0, false, true).exit_status(), 1);
        assert_eq!(outcome(3, true, false).exit_status(), 1);
    }
}
