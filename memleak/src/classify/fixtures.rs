//! Recorded and synthetic series for classify's tests, here and in the binary's (which checks
//! that the suggested commands parse). Not part of the API.
use std::{fs, path::PathBuf, time::Duration};

use super::analysis::{self, CacheFacts, Context, Report, Sample, Thresholds};
use crate::kernel::{
    procfs::{self, parse_name_values},
    slab_merges::SlabMerges,
};

pub const PAGE: u64 = memleak_common::PAGE_SIZE as u64;

pub fn recorded_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/classify")
        .join(name)
}

pub fn read(path: PathBuf) -> String {
    fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The samples and cache facts recorded in testdata/classify/NAME.
pub fn recorded(name: &str) -> (Vec<Sample>, CacheFacts) {
    let dir = recorded_dir(name);
    let samples = read(dir.join("times"))
        .lines()
        .enumerate()
        .map(|(index, millis)| Sample {
            at: Duration::from_millis(millis.trim().parse().expect("milliseconds")),
            meminfo: procfs::parse_meminfo(&read(dir.join(format!("meminfo.{index}")))),
            pcp_free_bytes: procfs::parse_zoneinfo_pcp_pages(&read(
                dir.join(format!("zoneinfo.{index}")),
            ))
            .expect("recorded zoneinfo")
                * PAGE,
            slab: Some(
                procfs::parse_slabinfo(&read(dir.join(format!("slabinfo.{index}"))))
                    .expect("recorded slabinfo")
                    .caches,
            ),
            vmalloc: Some(procfs::parse_vmallocinfo(
                &read(dir.join(format!("vmallocinfo.{index}"))),
                PAGE,
            )),
        })
        .collect();
    let facts = CacheFacts {
        reclaimable: parse_name_values(&read(dir.join("reclaim_account")))
            .into_iter()
            .map(|(name, value)| (name, value == "1"))
            .collect(),
        merges: SlabMerges::from_directories(parse_name_values(&read(dir.join("aliases")))),
    };
    (samples, facts)
}

pub const DEFAULT_THRESHOLDS: Thresholds = Thresholds {
    min_rate_bytes_per_second: 1024,
    noise_floor_bytes: 256 * 1024,
    scatter_factor: analysis::SCATTER_FACTOR,
};

pub fn context(facts: CacheFacts, thresholds: Thresholds) -> Context {
    Context {
        kernel: "6.18.0-test".into(),
        page_size: PAGE,
        thresholds,
        facts,
        notes: Vec::new(),
        top: 10,
        traceable: vec!["slab".into(), "vmalloc".into(), "percpu".into()],
        requested: Duration::from_secs(10),
        blame_reclaimable: false,
    }
}

pub fn classify_recorded(name: &str) -> Report {
    let (samples, facts) = recorded(name);
    analysis::analyze(&samples, &context(facts, DEFAULT_THRESHOLDS))
}

pub fn meminfo(fields: &[(&str, u64)]) -> procfs::Meminfo {
    let text: String = fields
        .iter()
        .map(|(name, kib)| format!("{name}: {kib} kB\n"))
        .collect();
    procfs::parse_meminfo(&text)
}

pub fn cache(name: &str, slabs: u64) -> procfs::SlabCache {
    procfs::SlabCache {
        name: name.into(),
        active_objects: slabs * 32,
        objects: slabs * 32,
        object_size: 128,
        pages_per_slab: 1,
        slabs,
    }
}

/// Ten samples a second apart; `at(second)` gives meminfo and caches.
pub fn synthetic(
    at: impl Fn(u64) -> (Vec<(&'static str, u64)>, Vec<procfs::SlabCache>),
) -> Vec<Sample> {
    (0..10)
        .map(|second| {
            let (fields, caches) = at(second);
            Sample {
                at: Duration::from_secs(second),
                meminfo: meminfo(&fields),
                pcp_free_bytes: 0,
                slab: Some(caches),
                vmalloc: None,
            }
        })
        .collect()
}

pub fn facts(caches: &[(&str, bool)]) -> CacheFacts {
    CacheFacts {
        reclaimable: caches
            .iter()
            .map(|(name, reclaimable)| ((*name).to_owned(), *reclaimable))
            .collect(),
        merges: SlabMerges::from_directories(
            caches
                .iter()
                .map(|(name, _)| ((*name).to_owned(), (*name).to_owned())),
        ),
    }
}
