//! Which slab cache names SLUB merged into one cache. SLUB merges caches of compatible object
//! size, alignment and flags (unless booted with `slab_nomerge`): the merged cache keeps the
//! name of the first cache created, which is the name its allocation events carry, and
//! /sys/kernel/slab links every merged name to one directory with a generated name
//! (`damon_region -> :0000056`, `file_lock_ctx -> :0000056`).
use std::{collections::BTreeMap, fs, path::Path};

pub const SYS_SLAB: &str = "/sys/kernel/slab";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlabMerges {
    /// Each name's directory under /sys/kernel/slab: itself for a cache of its own, the shared
    /// directory for a merged one.
    directory_of: BTreeMap<String, String>,
}

impl SlabMerges {
    /// This kernel's merges; none known when /sys/kernel/slab cannot be read (a kernel without
    /// sysfs, or SLUB_TINY, or SLAB before Linux 6.8), though caches may still be merged.
    pub fn read() -> Self {
        Self::read_from(Path::new(SYS_SLAB))
    }

    pub fn read_from(root: &Path) -> Self {
        let Ok(entries) = fs::read_dir(root) else {
            return Self::default();
        };
        Self::from_directories(entries.flatten().filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            // SLUB's generated names (:0000064) are no cache's name; the names link there.
            if name.starts_with(':') {
                return None;
            }
            let directory = fs::read_link(entry.path())
                .ok()
                .and_then(|link| Some(link.file_name()?.to_string_lossy().into_owned()))
                .unwrap_or_else(|| name.clone());
            Some((name, directory))
        }))
    }

    /// From (name, directory) pairs, as /sys/kernel/slab lists them.
    pub fn from_directories(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            directory_of: pairs.into_iter().collect(),
        }
    }

    /// The directory of the cache named `name`: a generated name (`:0000056`) is its own.
    fn directory<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if name.starts_with(':') {
            return Some(name);
        }
        self.directory_of.get(name).map(String::as_str)
    }

    /// Whether `name` names a cache: one of its names, or SLUB's generated name of a merged one.
    pub fn knows(&self, name: &str) -> bool {
        self.directory_of.contains_key(name)
            || self
                .directory_of
                .values()
                .any(|directory| directory == name)
    }

    /// Every cache name, merged or not.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.directory_of.keys().map(String::as_str)
    }

    /// The other names of the cache `name` is, sorted: empty when it was not merged, or is
    /// unknown.
    pub fn others(&self, name: &str) -> Vec<String> {
        let Some(directory) = self.directory(name) else {
            return Vec::new();
        };
        self.directory_of
            .iter()
            .filter(|(other, other_directory)| *other != name && *other_directory == directory)
            .map(|(other, _)| other.clone())
            .collect()
    }

    /// Whether the names `a` and `b` are one cache.
    pub fn same_cache(&self, a: &str, b: &str) -> bool {
        a == b
            || self
                .directory(a)
                .is_some_and(|directory| self.directory(b) == Some(directory))
    }

    /// The first name, sorted, of the cache whose directory is `directory`.
    pub fn first_name_in(&self, directory: &str) -> Option<&str> {
        self.directory_of
            .iter()
            .find(|(_, of)| *of == directory)
            .map(|(name, _)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::scratch::ScratchDir;

    #[test]
    fn reads_merged_names_from_sysfs_links() {
        let scratch = ScratchDir::new("slab-merges");
        let root = scratch.path();
        for directory in ["filp", ":0000056", ":0000016"] {
            fs::create_dir(root.join(directory)).unwrap();
        }
        for name in ["ftrace_event_field", "file_lock_ctx", "damon_region"] {
            std::os::unix::fs::symlink(":0000056", root.join(name)).unwrap();
        }
        // A mergeable cache that found no partner still gets a generated directory.
        std::os::unix::fs::symlink(":0000016", root.join("blkdev_ioc")).unwrap();

        let merges = SlabMerges::read_from(root);
        assert_eq!(
            merges.others("ftrace_event_field"),
            ["damon_region", "file_lock_ctx"]
        );
        assert_eq!(
            merges.others("file_lock_ctx"),
            ["damon_region", "ftrace_event_field"]
        );
        assert!(merges.others("blkdev_ioc").is_empty());
        assert!(merges.others("filp").is_empty());
        assert!(merges.others("no_such_cache").is_empty());
        assert!(merges.same_cache("file_lock_ctx", "ftrace_event_field"));
        assert!(!merges.same_cache("file_lock_ctx", "filp"));
        assert!(!merges.same_cache("file_lock_ctx", "blkdev_ioc"));
        assert!(merges.same_cache("unknown", "unknown"));
        assert!(!merges.same_cache("unknown", "other"));
        // SLUB's generated names are accepted for the cache too.
        assert!(merges.same_cache(":0000056", "file_lock_ctx"));
        assert_eq!(
            merges.others(":0000056"),
            ["damon_region", "file_lock_ctx", "ftrace_event_field"]
        );
        assert_eq!(merges.names().count(), 5);
        for known in ["filp", "file_lock_ctx", ":0000056", ":0000016"] {
            assert!(merges.knows(known), "{known}");
        }
        assert!(!merges.knows("no_such_cache"));
        assert!(!merges.knows(":0000099"));
        assert_eq!(merges.first_name_in(":0000056"), Some("damon_region"));
        assert_eq!(merges.first_name_in("filp"), Some("filp"));
        assert_eq!(merges.first_name_in(":0000099"), None);

        assert_eq!(
            SlabMerges::read_from(&root.join("missing")),
            SlabMerges::default()
        );
    }
}
