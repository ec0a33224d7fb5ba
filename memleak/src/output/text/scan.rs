//! The scan report as text, alone (`memleak scan`) or inside a trace report.
use std::fmt::Write as _;

use crate::{
    scan::report::{Marking, ScanReport},
    trace::report::SiteMarks,
    util::{
        duration,
        units::{human_bytes, thousands},
    },
};

/// `kmalloc-64: 593,975 similar objects (71% of cache); suspected: f+0x7c/0x200 (62 of 66
/// traced allocations similar)`.
pub fn summary(report: &ScanReport) -> String {
    let Some(group) = report.groups.first() else {
        return format!(
            "{}: no group of similar objects among {} objects",
            report.cache,
            thousands(report.objects)
        );
    };
    let mut line = format!(
        "{}: {} similar objects ({:.0}% of cache)",
        report.cache,
        thousands(group.objects),
        group.share_percent
    );
    match &report.marking {
        Some(Marking {
            suspected: Some(suspect),
            ..
        }) => {
            let _ = write!(
                line,
                "; suspected: {} ({} of {} traced allocations similar)",
                suspect.call_site,
                thousands(suspect.marked),
                thousands(suspect.traced)
            );
        }
        Some(marking) if marking.traced == 0 => {
            line.push_str("; no traced allocation is still in this cache");
        }
        Some(marking) => {
            let _ = write!(
                line,
                "; none of the {} traced allocations in this cache is similar",
                thousands(marking.traced)
            );
        }
        None => {}
    }
    line
}

pub fn render_text(report: &ScanReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "memleak scan: {} (kernel {})",
        report.cache, report.kernel
    );
    let _ = writeln!(out, "{}", summary(report));
    render_details(&mut out, report);
    out
}

/// The scan's counters and its groups, for the scan command and the end of a trace report.
pub fn render_details(out: &mut String, report: &ScanReport) {
    let mut sharing = String::new();
    if report.merged {
        let _ = write!(sharing, "; merged by SLUB into {}", report.scanned_cache);
    }
    if !report.shares_slabs_with.is_empty() {
        let _ = write!(
            sharing,
            "; shares its slabs with {}",
            report.shares_slabs_with.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "objects: {} in use in {} slabs, {}-byte objects, read in {}{sharing}",
        thousands(report.objects),
        thousands(report.slabs),
        report.object_size,
        duration::display(std::time::Duration::from_millis(report.read_ms)),
    );
    let _ = writeln!(
        out,
        "scanned: {} free objects left out, {} unreadable pages, {} slabs changed while read, \
         {} objects without content; similarity >= {}% of informative bytes, {} objects sampled",
        thousands(report.free_objects),
        thousands(report.unreadable_pages),
        thousands(report.broken_freelists),
        thousands(report.empty_objects),
        report.similarity_percent,
        thousands(report.sampled),
    );
    let _ = writeln!(
        out,
        "bases:   page_offset_base {:#x}, vmemmap_base {:#x} (verified)",
        report.page_offset_base, report.vmemmap_base
    );
    for site in report.marking.iter().flat_map(|marking| &marking.sites) {
        let _ = writeln!(
            out,
            "marked:  {} of {} traced allocations from {}",
            thousands(site.marked),
            thousands(site.traced),
            site.call_site
        );
    }
    for (rank, group) in report.groups.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n#{:<3} {} similar objects ({:.1}% of in-use objects, {}), like the one at {:#x}",
            rank + 1,
            thousands(group.objects),
            group.share_percent,
            human_bytes(group.bytes),
            group.representative,
        );
        if report.contents_withheld {
            let _ = writeln!(out, "     (contents left out: --no-contents)");
        }
        let bytes: Vec<u8> = (0..group.contents.len() / 2)
            .filter_map(|index| {
                u8::from_str_radix(&group.contents[index * 2..index * 2 + 2], 16).ok()
            })
            .collect();
        for (line, chunk) in bytes.chunks(16).enumerate() {
            let hex: Vec<String> = chunk.iter().map(|byte| format!("{byte:02x}")).collect();
            let ascii: String = chunk
                .iter()
                .map(|&byte| {
                    if byte.is_ascii_graphic() || byte == b' ' {
                        byte as char
                    } else {
                        '.'
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "     {:04x}  {:<47}  |{ascii}|",
                line * 16,
                hex.join(" ")
            );
        }
        for symbol in &group.symbols {
            let _ = writeln!(out, "     +{:#06x}: {}", symbol.offset, symbol.frame);
        }
        for string in &group.strings {
            let _ = writeln!(out, "     +{:#06x}: \"{}\"", string.offset, string.text);
        }
    }
}

/// `similar: 62 of 66 objects in kmalloc-64 look like its largest group` for one entry.
pub fn describe_marks(marks: &SiteMarks, scan: &ScanReport) -> String {
    format!(
        "similar: {} of {} objects in {} look like its largest group",
        thousands(marks.marked),
        thousands(marks.in_scanned_cache),
        scan.cache
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::report::{GroupReport, ObjectString};
    use crate::trace::marks::{
        fixtures::{marks, site},
        rank_sites,
    };

    fn report(groups: u64, marking: Option<Marking>) -> ScanReport {
        ScanReport {
            memleak: crate::util::build::Producer::default(),
            kernel: "6.18.0-test".into(),
            cache: "kmalloc-64".into(),
            scanned_cache: "kmalloc-64".into(),
            merged: false,
            shares_slabs_with: vec!["anon_vma_chain".into()],
            object_size: 64,
            slot_size: 64,
            slabs: 10,
            objects: 640,
            free_objects: 0,
            inuse_by_counters: 640,
            unreadable_pages: 0,
            broken_freelists: 0,
            failed_reads: 0,
            empty_objects: 0,
            sampled: 640,
            similarity_percent: 65,
            page_offset_base: 0xffff_8880_0000_0000,
            vmemmap_base: 0xffff_ea00_0000_0000,
            read_ms: 1,
            scan_ms: 2,
            groups: (0..groups)
                .map(|_| GroupReport {
                    objects: 455,
                    share_percent: 71.1,
                    bytes: 455 * 64,
                    representative: 0xffff_8880_0123_4000,
                    sample_support: 455,
                    contents: "6d".repeat(64),
                    symbols: Vec::new(),
                    strings: vec![ObjectString {
                        offset: 0,
                        text: "mmmm".into(),
                    }],
                })
                .collect(),
            marking,
            contents_withheld: false,
        }
    }

    #[test]
    fn no_contents_leaves_out_every_byte_and_string_and_says_so() {
        let mut withheld = report(2, None);
        withheld.withhold_contents();
        let text = render_text(&withheld);
        assert!(!text.contains("6d") && !text.contains("mmmm"), "{text}");
        assert_eq!(
            text.matches("(contents left out: --no-contents)").count(),
            2
        );
        let json = crate::output::json::render_json(&withheld);
        assert!(!json.contains("6d6d") && !json.contains("mmmm"), "{json}");
        let read: ScanReport = serde_json::from_str(&json).expect("a report reads back");
        assert!(read.contents_withheld);
        assert!(render_text(&report(1, None)).contains("+0x0000: \"mmmm\""));
    }

    #[test]
    fn summary_names_the_suspect() {
        let a = site("bond_vminfo_add", 0x10);
        let marking = rank_sites([(&a, marks(62, 66))]);
        assert_eq!(
            summary(&report(1, Some(marking))),
            "kmalloc-64: 455 similar objects (71% of cache); suspected: \
             bond_vminfo_add+0x41/0x1e0 (62 of 66 traced allocations similar)"
        );
        let unmarked = rank_sites([(&a, marks(0, 66))]);
        assert!(
            summary(&report(1, Some(unmarked)))
                .ends_with("; none of the 66 traced allocations in this cache is similar")
        );
        assert!(
            summary(&report(1, Some(rank_sites([]))))
                .ends_with("; no traced allocation is still in this cache")
        );
        assert_eq!(
            summary(&report(0, None)),
            "kmalloc-64: no group of similar objects among 640 objects"
        );
        let text = render_text(&report(1, None));
        assert!(text.contains("0000  6d 6d 6d"), "{text}");
        assert!(
            text.contains("64-byte objects, read in 1ms; shares its slabs with anon_vma_chain"),
            "{text}"
        );
    }

    #[test]
    fn json_reads_back_into_the_report_it_came_from() {
        let a = site("bond_vminfo_add", 0x10);
        let json =
            crate::output::json::render_json(&report(2, Some(rank_sites([(&a, marks(62, 66))]))));
        let read: ScanReport = serde_json::from_str(&json).expect("a report reads back");
        assert_eq!(crate::output::json::render_json(&read), json);
    }
}
