//! Leak checks for CI: which report entries are in scope and whether they exceed the
//! thresholds (`output::junit` writes the JUnit XML CI systems display).
use std::path::PathBuf;

use super::report::{Entry, LeakingSite, Verdict};
use crate::kernel::slab_merges::SlabMerges;

/// Exit status when a leak check fails (errors exit 2, a clean check 0).
pub const EXIT_LEAK: u8 = 1;

#[derive(Debug, Default, Clone)]
pub struct LeakCheck {
    /// Exit with status 1 when the outstanding allocations in scope exceed --max-bytes or
    /// --max-count.
    pub fail_on_leak: bool,

    /// Count only allocations with a stack frame in one of these kernel modules (all when
    /// empty).
    pub modules: Vec<String>,

    /// Count only allocations with a stack frame in a function matching GLOB (`*`, `?`).
    pub function: Option<String>,

    /// Count only allocations from this slab cache (`kmalloc-64`, `filp`, ...); when SLUB
    /// merged it with others, its kmem_cache allocations under any of their names. Also scans
    /// the cache's objects when the window ends, finds its largest group of objects with
    /// similar contents (as `memleak scan` does), and marks the traced allocations that look
    /// like it: their call site is the suspected leaker.
    pub cache: Option<String>,

    /// The other names of `cache`'s slab cache, when SLUB merged it with others, for the
    /// verdict to say so even with nothing in scope ([`LeakCheck::with_cache_merges`]).
    pub cache_merged_with: Vec<String>,

    /// Outstanding bytes allowed in scope.
    pub max_bytes: u64,

    /// Outstanding objects allowed in scope.
    pub max_count: u64,

    /// Write the check's result as JUnit XML to FILE (implies the check, not the exit status).
    pub junit: Option<PathBuf>,
}

impl LeakCheck {
    /// The check with the other names of its `--cache`, from the merges the entries were
    /// named with ([`Entry::name_merged_caches`]).
    pub fn with_cache_merges(mut self, merges: &SlabMerges) -> Self {
        if let Some(cache) = &self.cache {
            self.cache_merged_with = merges.others(cache);
        }
        self
    }

    pub fn enabled(&self) -> bool {
        self.fail_on_leak || self.junit.is_some()
    }

    /// `module=leaky function=leaky_* cache=*`, naming the scope in reports and JUnit
    /// (`module=a,b` for two modules).
    pub fn scope(&self) -> String {
        let part = |name: &str, value: &Option<String>| {
            format!("{name}={}", value.as_deref().unwrap_or("*"))
        };
        let modules = (!self.modules.is_empty()).then(|| self.modules.join(","));
        [
            part("module", &modules),
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
        let module_matches = self.modules.is_empty()
            || frames().any(|frame| {
                frame
                    .module
                    .as_ref()
                    .is_some_and(|module| self.modules.contains(module))
            });
        let function_matches = self.function.as_ref().is_none_or(|pattern| {
            frames().any(|frame| {
                frame
                    .symbol
                    .as_deref()
                    .is_some_and(|s| glob_match(pattern, s))
            })
        });
        // An entry whose cache SLUB merged with the wanted one is that cache, named by another
        // of its names (`Verdict::cache_merged_with` says so).
        let cache_matches = self.cache.as_ref().is_none_or(|cache| {
            entry.cache.as_deref() == Some(cache.as_str())
                || entry.cache_merged_with.contains(cache)
        });
        module_matches && function_matches && cache_matches
    }

    pub fn evaluate(&self, entries: &[Entry]) -> Verdict {
        let leaking: Vec<LeakingSite> = entries
            .iter()
            .filter(|entry| self.in_scope(entry))
            .map(|entry| LeakingSite {
                call_site: entry.call_site.to_string(),
                kind: entry.kind.clone(),
                cache: entry.cache.clone(),
                bytes: entry.bytes,
                count: entry.count,
            })
            .collect();
        let bytes = leaking.iter().map(|site| site.bytes).sum();
        let count = leaking.iter().map(|site| site.count).sum();
        Verdict {
            scope: self.scope(),
            cache_merged_with: self.cache_merged_with.clone(),
            bytes,
            count,
            max_bytes: self.max_bytes,
            max_count: self.max_count,
            failed: bytes > self.max_bytes || count > self.max_count,
            sites: leaking,
        }
    }
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

/// Report entries for the leak check's tests and its renderers'.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::Entry;
    use crate::symbols::Frame;

    fn frame(symbol: &str, module: Option<&str>) -> Frame {
        Frame {
            addr: Some(0xffff_ffff_c000_0000),
            symbol: Some(symbol.into()),
            offset: Some(0x10),
            size: Some(0x40),
            module: module.map(Into::into),
            source: None,
        }
    }

    pub fn entry(symbol: &str, module: Option<&str>, cache: &str, count: u64) -> Entry {
        Entry {
            bytes: count * 64,
            count,
            bytes_requested: count * 60,
            estimated: false,
            kind: "kmalloc".into(),
            cache: Some(cache.into()),
            cache_merged_with: Vec::new(),
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
            user_stacks: None,
        }
    }

    pub fn entries() -> Vec<Entry> {
        vec![
            entry("leaky_kmalloc", Some("leaky"), "kmalloc-64", 100),
            entry("leaky_cache_alloc", Some("leaky"), "leaky_cache", 50),
            entry("ext4_alloc_inode", None, "ext4_inode_cache", 7),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::fixtures::{entries, entry};

    #[test]
    fn scopes_by_module_function_and_cache() {
        let by_module = LeakCheck {
            modules: vec!["leaky".into()],
            ..Default::default()
        };
        let verdict = by_module.evaluate(&entries());
        assert_eq!((verdict.count, verdict.sites.len()), (150, 2));
        assert!(verdict.failed);

        let by_function = LeakCheck {
            function: Some("leaky_cache_*".into()),
            ..Default::default()
        };
        assert_eq!(by_function.evaluate(&entries()).count, 50);

        let by_cache = LeakCheck {
            modules: vec!["leaky".into()],
            cache: Some("kmalloc-64".into()),
            ..Default::default()
        };
        assert_eq!(by_cache.evaluate(&entries()).count, 100);

        let by_either_module = LeakCheck {
            modules: vec!["ext4".into(), "leaky".into()],
            ..Default::default()
        };
        assert_eq!(
            by_either_module.scope(),
            "module=ext4,leaky function=* cache=*"
        );
        assert_eq!(by_either_module.evaluate(&entries()).count, 150);

        let clean = LeakCheck {
            function: Some("clean_alloc".into()),
            ..Default::default()
        };
        let verdict = clean.evaluate(&entries());
        assert!(!verdict.failed);
        assert_eq!(verdict.count, 0);
    }

    #[test]
    fn a_cache_name_merged_with_others_matches_their_kmem_cache_entries() {
        let merges = SlabMerges::from_directories(
            [
                ("ftrace_event_field", ":0000056"),
                ("file_lock_ctx", ":0000056"),
                ("kmalloc-64", ":0000064"),
                ("Acpi-Namespace", ":0000064"),
                ("filp", "filp"),
            ]
            .map(|(name, directory)| (name.to_owned(), directory.to_owned())),
        );
        let mut entries = entries();
        entries.push(Entry {
            kind: "kmem_cache".into(),
            ..entry("locks_get_lock_context", None, "ftrace_event_field", 30)
        });
        entries.push(Entry {
            kind: "kmem_cache".into(),
            ..entry("acpi_ns_create_node", None, "kmalloc-64", 20)
        });
        for entry in &mut entries {
            entry.name_merged_caches(&merges);
        }
        let check = |cache: &str| {
            LeakCheck {
                cache: Some(cache.into()),
                ..Default::default()
            }
            .with_cache_merges(&merges)
            .evaluate(&entries)
        };

        let by_merged_name = check("file_lock_ctx");
        assert_eq!((by_merged_name.count, by_merged_name.sites.len()), (30, 1));
        assert_eq!(by_merged_name.cache_merged_with, ["ftrace_event_field"]);
        // The events' own name counts the other names' objects too, and says so.
        let by_event_name = check("ftrace_event_field");
        assert_eq!(by_event_name.count, 30);
        assert_eq!(by_event_name.cache_merged_with, ["file_lock_ctx"]);
        // kmalloc's objects are kmalloc's: only the kmem_cache entry of the shared cache counts.
        let by_alias_of_kmalloc = check("Acpi-Namespace");
        assert_eq!(
            (by_alias_of_kmalloc.count, by_alias_of_kmalloc.sites.len()),
            (20, 1)
        );
        assert_eq!(check("kmalloc-64").count, 120);
        let unmerged = check("filp");
        assert_eq!(unmerged.count, 0);
        assert!(unmerged.cache_merged_with.is_empty());
        // Nothing in scope: the check still says the name is merged.
        let nothing = LeakCheck {
            cache: Some("file_lock_ctx".into()),
            ..Default::default()
        }
        .with_cache_merges(&merges)
        .evaluate(&super::fixtures::entries());
        assert_eq!(nothing.count, 0);
        assert_eq!(nothing.cache_merged_with, ["ftrace_event_field"]);
    }

    #[test]
    fn thresholds_allow_up_to_their_value() {
        let lenient = LeakCheck {
            modules: vec!["leaky".into()],
            max_count: 150,
            max_bytes: 150 * 64,
            ..Default::default()
        };
        assert!(!lenient.evaluate(&entries()).failed);
        let strict_bytes = LeakCheck {
            max_bytes: 150 * 64 - 1,
            ..lenient
        };
        assert!(strict_bytes.evaluate(&entries()).failed);
    }

    #[test]
    fn no_scope_counts_everything() {
        let everything = LeakCheck::default();
        assert_eq!(everything.scope(), "module=* function=* cache=*");
        assert_eq!(everything.evaluate(&entries()).count, 157);
        assert!(!everything.enabled());
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
        let fail_on_leak = LeakCheck {
            fail_on_leak: true,
            ..Default::default()
        };
        assert!(fail_on_leak.enabled());
        let junit = LeakCheck {
            junit: Some("check.xml".into()),
            ..Default::default()
        };
        assert!(junit.enabled());
    }

    #[test]
    fn each_threshold_fails_alone_and_only_above_its_value() {
        let lenient = LeakCheck {
            max_count: 1_000,
            max_bytes: 1 << 20,
            ..Default::default()
        };
        assert!(!lenient.evaluate(&entries()).failed);
        let strict_count = LeakCheck {
            max_count: 156,
            ..lenient
        };
        assert!(strict_count.evaluate(&entries()).failed);
    }

    #[test]
    fn scopes_need_every_filter_to_match() {
        let wrong_cache = LeakCheck {
            modules: vec!["leaky".into()],
            function: Some("leaky_*".into()),
            cache: Some("ext4_inode_cache".into()),
            ..Default::default()
        };
        assert_eq!(wrong_cache.evaluate(&entries()).count, 0);
        let wrong_module = LeakCheck {
            modules: vec!["ext4".into()],
            function: Some("leaky_*".into()),
            ..Default::default()
        };
        assert_eq!(wrong_module.evaluate(&entries()).count, 0);
        let wrong_function = LeakCheck {
            modules: vec!["leaky".into()],
            function: Some("ext4_*".into()),
            cache: Some("kmalloc-64".into()),
            ..Default::default()
        };
        assert_eq!(wrong_function.evaluate(&entries()).count, 0);
    }
}
