//! What must hold for any input to the parsers of what memleak reads from the kernel and from
//! its user (tracefs event formats, /proc and /sys texts, process maps, durations): the checks
//! of the fuzz targets in fuzz/fuzz_targets, replayed over their corpora on stable Rust in
//! every `./x test` (tests/tests/fuzz_corpus.rs). They panic on a violation, as fuzzers expect;
//! the parsers themselves must return errors, never panic.
use super::{process::ProcessMaps, procfs, tracefs};
use crate::util::duration;

/// A tracefs `format` file: a parsed event finds each of its fields by name, and no field
/// ends past the 16-bit offsets the programs read with.
pub fn tracefs_format(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(format) = tracefs::parse_format(&text) else {
        return;
    };
    for field in &format.fields {
        let found = format
            .field(&field.name)
            .expect("a parsed field is found by its name");
        assert_eq!(found.name, field.name);
        assert!(u32::from(field.offset) + u32::from(field.size) <= 2 * u32::from(u16::MAX));
    }
}

/// The /proc and /sys texts `classify` and the accounting read, each parser on the same input.
pub fn procfs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let meminfo = procfs::parse_meminfo(&text);
    let _ = meminfo.bytes("Slab");
    if let Ok(slabinfo) = procfs::parse_slabinfo(&text) {
        for cache in &slabinfo.caches {
            // Saturating: a malformed count must not overflow.
            let _ = cache.bytes(4096);
        }
    }
    let vmalloc = procfs::parse_vmallocinfo(&text, 4096);
    assert!(vmalloc.lines_unparsed <= text.lines().count());
    let _ = procfs::parse_zoneinfo_pcp_pages(&text);
    let values = procfs::parse_name_values(&text);
    let files = procfs::SysSlabFiles {
        objects: values.get("objects").map(String::as_str),
        total_objects: values.get("total_objects").map(String::as_str),
        object_size: values.get("object_size").map(String::as_str),
        order: values.get("order").map(String::as_str),
        slabs: values.get("slabs").map(String::as_str),
    };
    let _ = procfs::parse_sys_slab("fuzzed", &files);
}

/// `/proc/PID/maps`: every mapping kept is file-backed, and every address inside one maps to
/// an offset in its file.
pub fn process_maps(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let maps = ProcessMaps::parse(&text);
    assert!(maps.mappings.len() <= text.lines().count());
    for mapping in &maps.mappings {
        assert!(mapping.path.is_absolute());
        if mapping.start < mapping.end
            && let Some((path, offset)) = maps.file_offset(mapping.start)
        {
            // An earlier mapping may cover the same address: the first one wins.
            assert!(path.is_absolute());
            let _ = offset;
        }
    }
    let _ = maps.executable_files();
}

/// A duration as the user types it: surrounding blanks do not change it, and it displays.
/// (The display is for reading: `5.0s` is not taken back as an option, where fractions are
/// refused by design; the fuzzer's first finding was exactly that.)
pub fn duration(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(parsed) = duration::parse(&text) else {
        return;
    };
    let unspaced: String = text.split_whitespace().collect();
    assert_eq!(
        duration::parse(&unspaced),
        Ok(parsed),
        "{text:?} and {unspaced:?}"
    );
    assert!(!duration::display(parsed).is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by reading the maps parser for its fuzz target: a malformed file offset made the
    /// offset arithmetic overflow (a panic in debug builds and under the fuzzer).
    #[test]
    fn a_huge_file_offset_does_not_overflow() {
        process_maps(b"1000-2000 r-xp ffffffffffffffff 00:01 5 /usr/bin/x\n");
        let maps = ProcessMaps::parse("1000-2000 r-xp ffffffffffffffff 00:01 5 /usr/bin/x\n");
        assert_eq!(maps.file_offset(0x1800), None);
    }

    #[test]
    fn durations_with_blanks_around_agree() {
        for input in ["200s", "1h30m", " 90ms ", "7d", "59s999ms", "1d23h59m59s"] {
            assert!(duration::parse(input).is_ok(), "{input}");
            duration(input.as_bytes());
        }
    }
}
