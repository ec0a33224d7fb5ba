//! Leak checks for CI: which report entries are in scope, whether they exceed the thresholds,
//! and the JUnit XML that CI systems display.
use std::{fmt::Write as _, path::PathBuf};

use clap::Args;
use serde::Serialize;

use crate::report::{Entry, human_bytes, thousands};

/// Exit status when a leak check fails (errors exit 2, a clean check 0).
pub const EXIT_LEAK: u8 = 1;

#[derive(Debug, Default, Args)]
pub struct LeakCheckArgs {
    /// Exit with status 1 when the outstanding allocations in scope exceed --max-bytes or
    /// --max-count.
    #[arg(long)]
    pub fail_on_leak: bool,

    /// Count only allocations with a stack frame in this kernel module.
    #[arg(long, value_name = "NAME")]
    pub module: Option<String>,

    /// Count only allocations with a stack frame in a function matching GLOB (`*`, `?`).
    #[arg(long, value_name = "GLOB")]
    pub function: Option<String>,

    /// Count only allocations from this slab cache (`kmalloc-64`, `filp`, ...). Also scans
    /// the cache's objects when the window ends, finds its largest group of objects with
    /// similar contents (as `memleak scan` does), and marks the traced allocations that look
    /// like it: their call site is the suspected leaker.
    #[arg(long, value_name = "NAME")]
    pub cache: Option<String>,

    /// Outstanding bytes allowed in scope.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub max_bytes: u64,

    /// Outstanding objects allowed in scope.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_count: u64,

    /// Write the check's result as JUnit XML to FILE (implies the check, not the exit status).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

impl LeakCheckArgs {
    pub fn enabled(&self) -> bool {
        self.fail_on_leak || self.junit.is_some()
    }

    /// `module=leaky function=leaky_* cache=*`, naming the scope in reports and JUnit.
    pub fn scope(&self) -> String {
        let part = |name: &str, value: &Option<String>| {
            format!("{name}={}", value.as_deref().unwrap_or("*"))
        };
        [
            part("module", &self.module),
            part("function", &self.function),
            part("cache", &self.cache),
        ]
        .join(" ")
    }

    fn in_scope(&self, entry: &Entry) -> bool {
        let frames = || {
            std::iter::once(&entry.call_site)
                .chain(&entry.frames)
                .chain(entry.other_stacks.iter().flat_map(|other| &other.frames))
        };
        let module_matches = self.module.as_ref().is_none_or(|module| {
            frames().any(|frame| frame.module.as_deref() == Some(module.as_str()))
        });
        let function_matches = self.function.as_ref().is_none_or(|pattern| {
            frames().any(|frame| {
                frame
                    .symbol
                    .as_deref()
                    .is_some_and(|s| glob_match(pattern, s))
            })
        });
        let cache_matches = self
            .cache
            .as_ref()
            .is_none_or(|cache| entry.cache.as_deref() == Some(cache.as_str()));
        module_matches && function_matches && cache_matches
    }

    pub fn evaluate(&self, entries: &[Entry]) -> Verdict {
        let leaking: Vec<LeakingSite> = entries
            .iter()
            .filter(|entry| self.in_scope(entry))
            .map(|entry| LeakingSite {
                call_site: entry.call_site.to_string(),
                kind: entry.kind,
                cache: entry.cache.clone(),
                bytes: entry.bytes,
                count: entry.count,
            })
            .collect();
        let bytes = leaking.iter().map(|site| site.bytes).sum();
        let count = leaking.iter().map(|site| site.count).sum();
        Verdict {
            scope: self.scope(),
            bytes,
            count,
            max_bytes: self.max_bytes,
            max_count: self.max_count,
            failed: bytes > self.max_bytes || count > self.max_count,
            sites: leaking,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LeakingSite {
    pub call_site: String,
    pub kind: &'static str,
    pub cache: Option<String>,
    pub bytes: u64,
    pub count: u64,
}

/// The result of a leak check, serialized as the report's `check` field.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub scope: String,
    pub bytes: u64,
    pub count: u64,
    pub max_bytes: u64,
    pub max_count: u64,
    pub failed: bool,
    /// The allocation sites in scope, largest first.
    pub sites: Vec<LeakingSite>,
}

impl Verdict {
    pub fn summary(&self) -> String {
        if self.failed {
            format!(
                "leak check failed ({}): {} in {} objects from {} allocation sites outstanding \
                 (allowed: {} bytes, {} objects)",
                self.scope,
                human_bytes(self.bytes),
                thousands(self.count),
                self.sites.len(),
                self.max_bytes,
                self.max_count
            )
        } else {
            format!(
                "leak check passed ({}): {} in {} objects outstanding",
                self.scope,
                human_bytes(self.bytes),
                thousands(self.count)
            )
        }
    }

    fn details(&self) -> String {
        let mut text = String::new();
        for site in &self.sites {
            let _ = writeln!(
                text,
                "{} in {} objects, {}{} at {}",
                human_bytes(site.bytes),
                thousands(site.count),
                site.kind,
                site.cache
                    .as_deref()
                    .map(|cache| format!(" ({cache})"))
                    .unwrap_or_default(),
                site.call_site
            );
        }
        text
    }

    /// One test suite with one test case for the scope.
    pub fn junit_xml(&self, seconds: f64) -> String {
        let failures = u32::from(self.failed);
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            xml,
            "<testsuites name=\"memleak\" tests=\"1\" failures=\"{failures}\" time=\"{seconds:.3}\">"
        );
        let _ = writeln!(
            xml,
            "  <testsuite name=\"memleak\" tests=\"1\" failures=\"{failures}\" time=\"{seconds:.3}\">"
        );
        let _ = write!(
            xml,
            "    <testcase classname=\"memleak\" name=\"no kernel memory leaks ({})\" time=\"{seconds:.3}\"",
            escape(&self.scope)
        );
        if self.failed {
            let _ = writeln!(
                xml,
                ">\n      <failure type=\"leak\" message=\"{}\">{}</failure>\n    </testcase>",
                escape(&self.summary()),
                escape(&self.details())
            );
        } else {
            xml.push_str("/>\n");
        }
        xml.push_str("  </testsuite>\n</testsuites>\n");
        xml
    }
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\n' && c != '\t' => escaped.push('?'),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Shell-style glob: `*` matches any run of characters, `?` any one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it currently absorbs up to.
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                backtrack = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((star, absorbed)) => {
                    p = star + 1;
                    t = absorbed + 1;
                    backtrack = Some((star, absorbed + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;

    fn frame(symbol: &str, module: Option<&str>) -> Frame {
        Frame {
            addr: Some(0xffff_ffff_c000_0000),
            symbol: Some(symbol.into()),
            offset: Some(0x10),
            size: Some(0x40),
            module: module.map(Into::into),
        }
    }

    fn entry(symbol: &str, module: Option<&str>, cache: &str, count: u64) -> Entry {
        Entry {
            bytes: count * 64,
            count,
            bytes_requested: count * 60,
            estimated: false,
            kind: "kmalloc",
            cache: Some(cache.into()),
            oldest_age_ms: 1000,
            call_site: frame(symbol, module),
            frames: vec![frame(symbol, module), frame("do_one_initcall", None)],
            stack_samples: 1,
            frames_samples: 1,
            stack_failures: 0,
            other_stacks: vec![],
            processes: vec![],
            unverified: 0,
            unreliable: false,
            marks: None,
        }
    }

    fn entries() -> Vec<Entry> {
        vec![
            entry("leaky_kmalloc", Some("leaky"), "kmalloc-64", 100),
            entry("leaky_cache_alloc", Some("leaky"), "leaky_cache", 50),
            entry("ext4_alloc_inode", None, "ext4_inode_cache", 7),
        ]
    }

    #[test]
    fn scopes_by_module_function_and_cache() {
        let by_module = LeakCheckArgs {
            module: Some("leaky".into()),
            ..Default::default()
        };
        let verdict = by_module.evaluate(&entries());
        assert_eq!((verdict.count, verdict.sites.len()), (150, 2));
        assert!(verdict.failed);

        let by_function = LeakCheckArgs {
            function: Some("leaky_cache_*".into()),
            ..Default::default()
        };
        assert_eq!(by_function.evaluate(&entries()).count, 50);

        let by_cache = LeakCheckArgs {
            module: Some("leaky".into()),
            cache: Some("kmalloc-64".into()),
            ..Default::default()
        };
        assert_eq!(by_cache.evaluate(&entries()).count, 100);

        let clean = LeakCheckArgs {
            function: Some("clean_alloc".into()),
            ..Default::default()
        };
        let verdict = clean.evaluate(&entries());
        assert!(!verdict.failed);
        assert_eq!(verdict.count, 0);
    }

    #[test]
    fn thresholds_allow_up_to_their_value() {
        let lenient = LeakCheckArgs {
            module: Some("leaky".into()),
            max_count: 150,
            max_bytes: 150 * 64,
            ..Default::default()
        };
        assert!(!lenient.evaluate(&entries()).failed);
        let strict_bytes = LeakCheckArgs {
            max_bytes: 150 * 64 - 1,
            ..lenient
        };
        assert!(strict_bytes.evaluate(&entries()).failed);
    }

    #[test]
    fn no_scope_counts_everything() {
        let everything = LeakCheckArgs::default();
        assert_eq!(everything.scope(), "module=* function=* cache=*");
        assert_eq!(everything.evaluate(&entries()).count, 157);
        assert!(!everything.enabled());
    }

    #[test]
    fn junit_reports_failures_with_the_leaking_sites() {
        let args = LeakCheckArgs {
            module: Some("leaky".into()),
            ..Default::default()
        };
        let xml = args.evaluate(&entries()).junit_xml(1.5);
        assert!(xml.starts_with("<?xml"));
        assert!(xml.contains("tests=\"1\" failures=\"1\" time=\"1.500\""));
        assert!(xml.contains("name=\"no kernel memory leaks (module=leaky function=* cache=*)\""));
        assert!(xml.contains("<failure type=\"leak\""));
        assert!(xml.contains("leaky_kmalloc+0x10/0x40 [leaky]"));
        let passing = LeakCheckArgs {
            function: Some("clean_alloc".into()),
            ..Default::default()
        };
        let xml = passing.evaluate(&entries()).junit_xml(0.2);
        assert!(xml.contains("failures=\"0\""));
        assert!(!xml.contains("<failure"));
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(escape("a<b>&\"c'\u{1}"), "a&lt;b&gt;&amp;&quot;c&apos;?");
    }

    #[test]
    fn globs_like_a_shell() {
        assert!(glob_match("leaky_*", "leaky_kmalloc"));
        assert!(glob_match("*alloc", "leaky_kmalloc"));
        assert!(glob_match("l?aky*c", "leaky_kmalloc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("leaky", "leaky_kmalloc"));
        assert!(!glob_match("?", ""));
    }

    #[test]
    fn enabled_by_either_the_exit_status_or_junit() {
        let fail_on_leak = LeakCheckArgs {
            fail_on_leak: true,
            ..Default::default()
        };
        assert!(fail_on_leak.enabled());
        let junit = LeakCheckArgs {
            junit: Some("check.xml".into()),
            ..Default::default()
        };
        assert!(junit.enabled());
    }

    #[test]
    fn each_threshold_fails_alone_and_only_above_its_value() {
        let lenient = LeakCheckArgs {
            max_count: 1_000,
            max_bytes: 1 << 20,
            ..Default::default()
        };
        assert!(!lenient.evaluate(&entries()).failed);
        let strict_count = LeakCheckArgs {
            max_count: 156,
            ..lenient
        };
        assert!(strict_count.evaluate(&entries()).failed);
    }

    #[test]
    fn scopes_need_every_filter_to_match() {
        let wrong_cache = LeakCheckArgs {
            module: Some("leaky".into()),
            function: Some("leaky_*".into()),
            cache: Some("ext4_inode_cache".into()),
            ..Default::default()
        };
        assert_eq!(wrong_cache.evaluate(&entries()).count, 0);
        let wrong_module = LeakCheckArgs {
            module: Some("ext4".into()),
            function: Some("leaky_*".into()),
            ..Default::default()
        };
        assert_eq!(wrong_module.evaluate(&entries()).count, 0);
        let wrong_function = LeakCheckArgs {
            module: Some("leaky".into()),
            function: Some("ext4_*".into()),
            cache: Some("kmalloc-64".into()),
            ..Default::default()
        };
        assert_eq!(wrong_function.evaluate(&entries()).count, 0);
    }

    #[test]
    fn summaries_say_what_was_found_and_allowed() {
        let args = LeakCheckArgs {
            module: Some("leaky".into()),
            max_count: 10,
            ..Default::default()
        };
        assert_eq!(
            args.evaluate(&entries()).summary(),
            "leak check failed (module=leaky function=* cache=*): 9.4 KiB in 150 objects from 2 \
             allocation sites outstanding (allowed: 0 bytes, 10 objects)"
        );
        let passing = LeakCheckArgs {
            function: Some("clean_alloc".into()),
            ..Default::default()
        };
        assert_eq!(
            passing.evaluate(&entries()).summary(),
            "leak check passed (module=* function=clean_alloc cache=*): 0 B in 0 objects \
             outstanding"
        );
        let details = args.evaluate(&entries()).details();
        assert!(
            details.starts_with("6.2 KiB in 100 objects, kmalloc (kmalloc-64) at leaky_kmalloc"),
            "{details}"
        );
    }

    #[test]
    fn escapes_keep_newlines_and_tabs() {
        assert_eq!(escape("a\n\tb"), "a\n\tb");
    }
}
