//! Judges what the guest sent: the statuses and reports of the two `memleak run` checks
//! around one load of the leaky module (tests/vm/init.sh).
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use super::guest::GuestResults;

/// One leaking function of tests/kmod/leaky and what memleak must report for it.
struct ExpectedLeak {
    function: &'static str,
    kind: &'static str,
    /// `None`: the slab cache named in the kernel's own event (see `cache_names_known`).
    cache: Option<&'static str>,
}

const LEAKS: [ExpectedLeak; 2] = [
    ExpectedLeak {
        function: "leaky_kmalloc",
        kind: "kmalloc",
        cache: Some("kmalloc-64"),
    },
    ExpectedLeak {
        function: "leaky_cache_alloc",
        kind: "kmem_cache",
        cache: None,
    },
];
const MODULE: &str = "leaky";
const OWN_CACHE: &str = "leaky_cache";
const CLEAN_FUNCTION: &str = "clean_alloc";

/// What the checks found, for the summary line.
pub struct Findings {
    pub kernel: String,
    pub attach: String,
    pub notes: Vec<String>,
    /// `leaky_kmalloc+0x2b/0x42 [leaky]: 100 kmalloc objects in kmalloc-64`, one per leak.
    pub leaks: Vec<String>,
}

/// `objects`: how many objects each leaking function allocated (the module's `n`).
pub fn judge(results: &GuestResults, objects: u64) -> Result<Findings> {
    let leaky_status = results.file("leaky.status")?;
    let leaky_stderr = results.file("leaky.stderr").unwrap_or_default();
    ensure!(
        leaky_status == "1",
        "`memleak run --fail-on-leak --module leaky -- insmod leaky.ko` exited {leaky_status}, \
         expected 1 (leak found); its stderr:\n{leaky_stderr}"
    );
    let leaky = report(results, "leaky.json")?;
    let check = &leaky["check"];
    ensure!(
        check["failed"] == true,
        "the module-scoped check did not fail: {check:#}"
    );
    let sites = check["sites"]
        .as_array()
        .context("the check has no sites")?;
    // Older kernels' classic kmem_cache_alloc event (Linux 6.1's among them) does not name the
    // cache; memleak then reads it from kernel memory at report time, which needs kernel BTF.
    // The guest says whether it has BTF (Debian's kernel does; the kmemleak kernel, built from
    // tinyconfig, does not): with BTF, or where the event names the cache, the cache must be
    // the module's own. memleak's own note that it could not read the cache is no excuse (a
    // kernel memory reader that always failed would pass); it is required, though, where the
    // cache stays unnamed. (`kmalloc-64` proves no read: it is the size class anyway.)
    let event_names_caches = results
        .file("kmem_cache_alloc.format")?
        .lines()
        .any(|line| line.contains(" name;"));
    let guest_has_btf = match results.file("btf")? {
        "yes" => true,
        "no" => false,
        other => anyhow::bail!("the guest's btf file says {other:?}, expected yes or no"),
    };
    let caches_not_read = leaky["notes"].as_array().is_some_and(|notes| {
        notes.iter().any(|note| {
            note.as_str()
                .is_some_and(|note| note.contains("not read from the kernel"))
        })
    });
    let cache_names_known = event_names_caches || guest_has_btf;
    ensure!(
        cache_names_known || caches_not_read,
        "the guest has no kernel BTF and its kmem_cache_alloc event names no cache, yet memleak \
         does not note that it could not read cache names: {:#}",
        leaky["notes"]
    );
    // How memleak attached, and why: tests/vm/init.sh leaves --attach at auto, so classic
    // tracepoints need a note saying why BTF tracepoints were not used, and a guest without
    // BTF cannot have used them.
    let attach = leaky["attach"].as_str().unwrap_or_default();
    let has_note = |text: &str| {
        leaky["notes"].as_array().is_some_and(|notes| {
            notes
                .iter()
                .any(|note| note.as_str().is_some_and(|note| note.contains(text)))
        })
    };
    ensure!(
        match attach {
            "tp_btf" => guest_has_btf,
            "tracepoint" =>
                has_note("using classic tracepoints")
                    && (guest_has_btf || has_note("kernel has no BTF")),
            _ => false,
        },
        "memleak attached with {attach:?} on a guest {} kernel BTF; its notes: {:#}",
        if guest_has_btf { "with" } else { "without" },
        leaky["notes"]
    );
    let mut leaks = Vec::new();
    for leak in &LEAKS {
        let site = sites
            .iter()
            .find(|site| is_in(site["call_site"].as_str(), leak.function))
            .with_context(|| {
                format!(
                    "no {} site in the module-scoped check: {check:#}",
                    leak.function
                )
            })?;
        let expected_cache = match leak.cache {
            Some(cache) => Value::from(cache),
            None if cache_names_known => Value::from(OWN_CACHE),
            None => Value::Null,
        };
        ensure!(
            site["kind"] == leak.kind
                && site["cache"] == expected_cache
                && site["count"].as_u64() == Some(objects),
            "{}: expected {objects} {} objects in {expected_cache}, memleak reported {site:#}",
            leak.function,
            leak.kind
        );
        leaks.push(format!(
            "{}: {objects} {} objects in {}",
            site["call_site"].as_str().unwrap_or_default(),
            leak.kind,
            expected_cache.as_str().unwrap_or("an unnamed cache")
        ));
    }
    ensure!(
        !sites
            .iter()
            .any(|site| is_in(site["call_site"].as_str(), CLEAN_FUNCTION)),
        "{CLEAN_FUNCTION} frees what it allocates, yet the check lists it: {check:#}"
    );
    // The JUnit file: one failure, whose text lists each leaking function with its count (the
    // test case's name holds the scope, `--module leaky`, which proves nothing).
    let junit = results.file("leaky.xml")?;
    let failure = junit_failure_text(junit);
    ensure!(
        junit.matches("<failure").count() == 1
            && LEAKS.iter().all(|leak| {
                failure.is_some_and(|text| {
                    text.lines().any(|line| {
                        line.contains(&format!(" in {} objects", thousands(objects)))
                            && line.split_once(" at ").is_some_and(|(_, frame)| {
                                is_in(Some(frame), leak.function)
                                    || frame.starts_with(&format!("{} ", leak.function))
                            })
                    })
                })
            }),
        "the JUnit report does not list both leaks, {objects} objects each, in one failure:\n\
         {junit}"
    );

    let clean_status = results.file("clean.status")?;
    ensure!(
        clean_status == "0",
        "`memleak run --fail-on-leak --function {CLEAN_FUNCTION}` exited {clean_status}, expected \
         0; its stderr:\n{}",
        results.file("clean.stderr").unwrap_or_default()
    );
    let clean = report(results, "clean.json")?;
    ensure!(
        clean["check"]["failed"] == false && clean["check"]["count"] == 0,
        "the {CLEAN_FUNCTION} check: {:#}",
        clean["check"]
    );
    // The passing check means something only if that tracer saw the module's allocations.
    let seen = clean["stacks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|entry| is_in(entry["call_site"]["symbol"].as_str(), LEAKS[0].function))
        .and_then(|entry| entry["count"].as_u64());
    ensure!(
        seen == Some(objects),
        "the tracer scoped to {CLEAN_FUNCTION} did not see the module's {objects} {} objects \
         (saw {seen:?})",
        LEAKS[0].function
    );

    Ok(Findings {
        kernel: leaky["kernel"].as_str().unwrap_or("?").to_owned(),
        attach: leaky["attach"].as_str().unwrap_or("?").to_owned(),
        notes: leaky["notes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|note| note.as_str().map(str::to_owned))
            .collect(),
        leaks,
    })
}

impl Findings {
    pub fn summary(&self) -> String {
        format!(
            "on Linux {} ({}) the module check failed with {}, and the {CLEAN_FUNCTION} check \
             passed",
            self.kernel,
            self.attach,
            self.leaks.join(", ")
        )
    }
}

/// Checks that kmemleak, asked after the checks, names the same leaking functions of the
/// module as memleak did (`judge` has established memleak's) with the same counts, less at most
/// a few: a stale copy of a pointer to a leaked object (on a stack, in a register) hides that
/// object from kmemleak, but the module zeroes its objects, so that no chain of them hides.
/// More objects than memleak's, or many fewer, is a disagreement (one of the two parsers or
/// counters is wrong).
pub fn compare_with_kmemleak(results: &GuestResults) -> Result<String> {
    let status = results.file("kmemleak.status")?;
    ensure!(
        status == "0",
        "`memleak kmemleak` exited {status}; its stderr:\n{}",
        results.file("kmemleak.stderr").unwrap_or_default()
    );
    let report = report(results, "kmemleak.json")?;
    let mut named: BTreeMap<&str, u64> = BTreeMap::new();
    for stack in report["stacks"].as_array().into_iter().flatten() {
        // The innermost frame in the module is the function that called the allocator.
        let function = stack["frames"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|frame| frame["module"] == MODULE)
            .and_then(|frame| frame["symbol"].as_str());
        if let Some(function) = function {
            *named.entry(function).or_default() += stack["count"].as_u64().unwrap_or(0);
        }
    }
    let mut expected: Vec<&str> = LEAKS.iter().map(|leak| leak.function).collect();
    expected.sort_unstable();
    ensure!(
        named.keys().copied().eq(expected.iter().copied()),
        "kmemleak names {named:?} in the module, memleak names {expected:?}; kmemleak's report: \
         {report:#}"
    );
    let memleak = memleak_counts(results)?;
    for (function, &count) in &named {
        let theirs = memleak.get(function).copied().unwrap_or(0);
        ensure!(
            count <= theirs && count + kmemleak_slack(theirs) >= theirs,
            "kmemleak counts {count} objects from {function}, memleak {theirs} (kmemleak may \
             miss at most {}); kmemleak's report: {report:#}",
            kmemleak_slack(theirs)
        );
    }
    Ok(format!(
        "kmemleak named the same functions ({})",
        named
            .iter()
            .map(|(function, count)| format!("{function}: {count} objects"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Objects kmemleak may miss out of `count` (stale pointers to them): 2, or 5% of many.
fn kmemleak_slack(count: u64) -> u64 {
    (count / 20).max(2)
}

/// The objects memleak's module-scoped check counted per leaking function.
fn memleak_counts(results: &GuestResults) -> Result<BTreeMap<&'static str, u64>> {
    let leaky = report(results, "leaky.json")?;
    let sites = leaky["check"]["sites"]
        .as_array()
        .context("the module-scoped check has no sites")?;
    Ok(LEAKS
        .iter()
        .map(|leak| {
            let count = sites
                .iter()
                .filter(|site| is_in(site["call_site"].as_str(), leak.function))
                .filter_map(|site| site["count"].as_u64())
                .sum();
            (leak.function, count)
        })
        .collect())
}

/// The text of the `<failure>` element of a JUnit file (memleak escapes no character that a
/// function name or a count holds).
fn junit_failure_text(junit: &str) -> Option<&str> {
    let element = &junit[junit.find("<failure")?..];
    let text = &element[element.find('>')? + 1..];
    Some(&text[..text.find("</failure>")?])
}

/// `1234567` as memleak prints counts: `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn report(results: &GuestResults, name: &str) -> Result<Value> {
    serde_json::from_str(results.file(name)?).with_context(|| format!("parsing the guest's {name}"))
}

/// Whether a symbol (`leaky_kmalloc`) or a `%pS`-style frame (`leaky_kmalloc+0x2b/0x42 [leaky]`)
/// is in `function`.
fn is_in(frame: Option<&str>, function: &str) -> bool {
    frame.is_some_and(|frame| {
        frame == function
            || frame
                .strip_prefix(function)
                .is_some_and(|rest| rest.starts_with('+'))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const N: u64 = 100;

    fn site(function: &str, kind: &str, cache: Value, count: u64) -> Value {
        json!({"call_site": format!("{function}+0x2b/0x42 [leaky]"), "kind": kind,
               "cache": cache, "bytes": count * 64, "count": count})
    }

    const NOT_READ: &str = "slab caches are not read from the kernel: no BTF";
    const NO_BTF: &str =
        "/sys/kernel/btf/vmlinux not found: kernel has no BTF, using classic tracepoints";
    const FELL_BACK: &str =
        "BTF tracepoints unavailable (verifier: invalid access); using classic tracepoints";

    /// What a correct run on Linux 6.1 (no cache names in classic kmem_cache_alloc) without
    /// kernel BTF (so no cache read from kernel memory either) sends.
    fn guest(leaky_sites: Vec<Value>, clean_seen: u64) -> GuestResults {
        let leaky = json!({"kernel": "6.1.0-56-amd64", "attach": "tracepoint", "notes": [NOT_READ, NO_BTF],
            "check": {"failed": true, "count": 2 * N, "sites": leaky_sites}, "stacks": []});
        let clean = json!({"check": {"failed": false, "count": 0, "sites": []}, "stacks": [
            {"call_site": {"symbol": "leaky_kmalloc"}, "count": clean_seen}]});
        let files = [
            ("leaky.status", "1".to_owned()),
            ("leaky.json", leaky.to_string()),
            ("leaky.xml", junit(N)),
            ("clean.status", "0".to_owned()),
            ("clean.json", clean.to_string()),
            (
                "kmem_cache_alloc.format",
                "\tfield:const void * ptr;\toffset:16;".to_owned(),
            ),
            ("btf", "no".to_owned()),
        ];
        GuestResults {
            files: files
                .into_iter()
                .map(|(name, text)| (name.to_owned(), text))
                .collect(),
            done: true,
        }
    }

    /// What memleak writes for the module check with `count` objects per leak.
    fn junit(count: u64) -> String {
        format!(
            "<testsuites failures=\"1\">\n  <testsuite failures=\"1\">\n    <testcase \
             name=\"no kernel memory leaks (module leaky)\">\n      <failure type=\"leak\" \
             message=\"leak check failed\">6.2 KiB in {count} objects, kmalloc (kmalloc-64) at \
             leaky_kmalloc+0x2b/0x42 [leaky]\n6.2 KiB in {count} objects, kmem_cache at \
             leaky_cache_alloc+0x2b/0x42 [leaky]\n</failure>\n    </testcase>\n  \
             </testsuite>\n</testsuites>\n"
        )
    }

    #[test]
    fn the_junit_failure_must_list_each_leak_with_its_count() {
        let mut results = guest(correct_sites(), N);
        // The names in the test case's name (the scope) or only in the message prove nothing.
        for xml in [
            "<testsuite failures=\"1\"><testcase name=\"leaky_kmalloc leaky_cache_alloc\">\
             <failure message=\"leak\"></failure></testcase></testsuite>"
                .to_owned(),
            junit(N - 1),
            junit(N).replace("leaky_cache_alloc+", "other+"),
            format!("{}{}", junit(N), junit(N)),
        ] {
            results.files.insert("leaky.xml".into(), xml.clone());
            assert!(judge(&results, N).is_err(), "{xml}");
        }
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(100), "100");
    }

    fn correct_sites() -> Vec<Value> {
        vec![
            site("leaky_cache_alloc", "kmem_cache", Value::Null, N),
            site("leaky_kmalloc", "kmalloc", json!("kmalloc-64"), N),
        ]
    }

    #[test]
    fn accepts_both_leaks_with_exact_counts() {
        let findings = judge(&guest(correct_sites(), N), N).unwrap();
        assert_eq!(findings.leaks.len(), 2);
        assert_eq!(findings.attach, "tracepoint");
    }

    #[test]
    fn rejects_missing_or_miscounted_leaks() {
        let mut one_missing = correct_sites();
        one_missing.pop();
        assert!(judge(&guest(one_missing, N), N).is_err());
        let mut miscounted = correct_sites();
        miscounted[0]["count"] = json!(N - 1);
        assert!(judge(&guest(miscounted, N), N).is_err());
        let mut wrong_cache = correct_sites();
        wrong_cache[1]["cache"] = json!("kmalloc-128");
        assert!(judge(&guest(wrong_cache, N), N).is_err());
    }

    #[test]
    fn the_cache_must_be_named_where_the_kernel_names_it() {
        let mut results = guest(correct_sites(), N);
        results.files.insert(
            "kmem_cache_alloc.format".into(),
            "\tfield:__data_loc char[] name;\toffset:56;".into(),
        );
        assert!(judge(&results, N).is_err());
        let mut named = correct_sites();
        named[0]["cache"] = json!(OWN_CACHE);
        results.files.insert(
            "leaky.json".into(),
            json!({"attach": "tracepoint", "notes": [NO_BTF],
                   "check": {"failed": true, "sites": named}})
            .to_string(),
        );
        assert!(judge(&results, N).is_ok());
    }

    #[test]
    fn the_cache_must_be_named_where_the_guest_has_btf() {
        // A kernel memory reader that always fails notes that it could not read the cache; on
        // a guest with BTF that is a failure, not an excuse.
        let mut results = guest(correct_sites(), N);
        results.files.insert("btf".into(), "yes".into());
        assert!(judge(&results, N).is_err());
        let mut named = correct_sites();
        named[0]["cache"] = json!(OWN_CACHE);
        results.files.insert(
            "leaky.json".into(),
            json!({"attach": "tracepoint", "notes": [FELL_BACK],
                   "check": {"failed": true, "sites": named}})
            .to_string(),
        );
        assert!(judge(&results, N).is_ok());
        // The guest must say.
        results.files.remove("btf");
        assert!(judge(&results, N).is_err());
        results.files.insert("btf".into(), "maybe".into());
        assert!(judge(&results, N).is_err());
    }

    #[test]
    fn the_attach_method_must_fit_the_guest_and_be_explained() {
        let leaky = |attach: &str, notes: &[&str], btf: &str| {
            let mut results = guest(correct_sites(), N);
            // Without BTF the cache stays unnamed, and memleak says so.
            let mut named = correct_sites();
            let mut notes = notes.to_vec();
            if btf == "yes" {
                named[0]["cache"] = json!(OWN_CACHE);
            } else {
                notes.push(NOT_READ);
            }
            results.files.insert(
                "leaky.json".into(),
                json!({"attach": attach, "notes": notes,
                       "check": {"failed": true, "sites": named}})
                .to_string(),
            );
            results.files.insert("btf".into(), btf.into());
            judge(&results, N)
        };
        assert!(leaky("tp_btf", &[], "yes").is_ok());
        assert!(leaky("tracepoint", &[FELL_BACK], "yes").is_ok());
        assert!(leaky("tracepoint", &[NO_BTF], "no").is_ok());
        // Classic tracepoints without a word why, BTF tracepoints without BTF, or nonsense.
        assert!(leaky("tracepoint", &[], "yes").is_err());
        assert!(leaky("tracepoint", &[FELL_BACK], "no").is_err());
        assert!(leaky("tp_btf", &[], "no").is_err());
        assert!(leaky("kprobe", &[], "yes").is_err());
    }

    #[test]
    fn an_unnamed_cache_needs_memleak_to_say_why() {
        let mut results = guest(correct_sites(), N);
        results.files.insert(
            "leaky.json".into(),
            json!({"attach": "tracepoint", "notes": [NO_BTF],
                   "check": {"failed": true, "sites": correct_sites()}})
            .to_string(),
        );
        assert!(judge(&results, N).is_err());
    }

    #[test]
    fn rejects_a_listed_clean_function_and_wrong_statuses() {
        let mut with_clean = correct_sites();
        with_clean.push(site(CLEAN_FUNCTION, "kmalloc", json!("kmalloc-64"), 1));
        assert!(judge(&guest(with_clean, N), N).is_err());

        for (file, status) in [
            ("leaky.status", "0"),
            ("leaky.status", "2"),
            ("clean.status", "1"),
        ] {
            let mut results = guest(correct_sites(), N);
            results.files.insert(file.into(), status.into());
            assert!(judge(&results, N).is_err(), "{file} {status}");
        }
    }

    #[test]
    fn a_clean_pass_counts_only_if_that_tracer_saw_the_leaks() {
        assert!(judge(&guest(correct_sites(), 0), N).is_err());
    }

    fn kmemleak_results(stacks: Value) -> GuestResults {
        let mut results = guest(correct_sites(), N);
        results.files.insert("kmemleak.status".into(), "0".into());
        results.files.insert(
            "kmemleak.json".into(),
            json!({"source": "kmemleak", "stacks": stacks}).to_string(),
        );
        results
    }

    fn kmemleak_stack(function: &str, count: u64) -> Value {
        json!({"count": count, "frames": [
            {"symbol": function, "module": MODULE},
            {"symbol": null, "module": null},
            {"symbol": "do_one_initcall", "module": null}]})
    }

    #[test]
    fn kmemleak_must_name_the_same_functions_with_the_same_counts() {
        let both = json!([
            kmemleak_stack("leaky_cache_alloc", 99),
            kmemleak_stack("leaky_kmalloc", 100)
        ]);
        let agreement = compare_with_kmemleak(&kmemleak_results(both)).unwrap();
        assert!(
            agreement.contains("leaky_cache_alloc: 99 objects"),
            "{agreement}"
        );

        // Counts: more than memleak's, or many fewer, is a disagreement.
        for (cache, kmalloc) in [(100, 50), (100, 101), (0, 100)] {
            let stacks = json!([
                kmemleak_stack("leaky_cache_alloc", cache),
                kmemleak_stack("leaky_kmalloc", kmalloc)
            ]);
            assert!(
                compare_with_kmemleak(&kmemleak_results(stacks)).is_err(),
                "{cache} and {kmalloc} objects"
            );
        }
        // Split over several stacks, the counts add up.
        let split = json!([
            kmemleak_stack("leaky_cache_alloc", 60),
            kmemleak_stack("leaky_cache_alloc", 40),
            kmemleak_stack("leaky_kmalloc", 98)
        ]);
        assert!(compare_with_kmemleak(&kmemleak_results(split)).is_ok());

        let one = json!([kmemleak_stack("leaky_cache_alloc", 100)]);
        assert!(compare_with_kmemleak(&kmemleak_results(one)).is_err());
        let extra = json!([
            kmemleak_stack("leaky_cache_alloc", 100),
            kmemleak_stack("leaky_kmalloc", 100),
            kmemleak_stack(CLEAN_FUNCTION, 1)
        ]);
        assert!(compare_with_kmemleak(&kmemleak_results(extra)).is_err());
        let mut failed = kmemleak_results(json!([]));
        failed.files.insert("kmemleak.status".into(), "2".into());
        assert!(compare_with_kmemleak(&failed).is_err());
    }

    #[test]
    fn matches_functions_not_prefixes() {
        assert!(is_in(
            Some("leaky_kmalloc+0x2b/0x42 [leaky]"),
            "leaky_kmalloc"
        ));
        assert!(is_in(Some("leaky_kmalloc"), "leaky_kmalloc"));
        assert!(!is_in(Some("leaky_kmalloc_more+0x1/0x2"), "leaky_kmalloc"));
        assert!(!is_in(None, "leaky_kmalloc"));
    }
}
