//! Makes the page hook's table of the page allocator's frames (`memleak::kernel::orc`) from
//! the running kernel: the functions' ranges from /proc/kallsyms, their ORC entries read from
//! kernel memory with the reader program (there is no /proc/kcore to read them from).
use std::{fs, ops::Range};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use super::reader::KernelReader;
use crate::kernel::{
    kallsyms,
    orc::{self, ENTRY_BYTES, IP_BYTES, Layout, PageCallerTable},
};

/// Name prefixes of the page allocator's functions (those of the allocator prefixes in
/// `symbols::allocators` that name the page allocator) and of the page event's tracepoint
/// iterator, without leading underscores: the frames the page hook walks through to find the
/// code that asked for pages.
const PAGE_ALLOCATOR_PREFIXES: &[&str] = &[
    "alloc_pages",
    "alloc_frozen_pages",
    "get_free_pages",
    "get_zeroed_page",
    "folio_alloc",
    "traceiter_mm_page_alloc",
];

/// Whether the kernel function `name` is in the page allocator ([`PAGE_ALLOCATOR_PREFIXES`]).
fn is_page_allocator(name: &str) -> bool {
    let name = name.trim_start_matches('_');
    PAGE_ALLOCATOR_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// The symbols the table is made from, out of a kallsyms text.
#[derive(Debug, Default, PartialEq, Eq)]
struct KallsymsFacts {
    /// `__start_orc_unwind_ip`, `__stop_orc_unwind_ip`, `__start_orc_unwind`.
    orc_ips: Option<Range<u64>>,
    orc_entries: Option<u64>,
    /// The page allocator's functions, each up to the next symbol.
    page_allocator: Vec<Range<u64>>,
}

fn kallsyms_facts(text: &str) -> KallsymsFacts {
    let symbols: Vec<kallsyms::Symbol> = kallsyms::symbols(text)
        .filter(|symbol| symbol.module.is_none() && symbol.address != 0)
        .collect();
    let find = |wanted: &str| {
        symbols
            .iter()
            .find(|symbol| symbol.name == wanted)
            .map(|symbol| symbol.address)
    };
    let starts = kallsyms::starts(symbols.iter().copied());
    let page_allocator = symbols
        .iter()
        .filter(|symbol| matches!(symbol.kind, 't' | 'T') && is_page_allocator(symbol.name))
        .filter_map(|symbol| {
            let next = starts.partition_point(|&address| address <= symbol.address);
            Some(symbol.address..*starts.get(next)?)
        })
        .collect();
    KallsymsFacts {
        orc_ips: find("__start_orc_unwind_ip")
            .zip(find("__stop_orc_unwind_ip"))
            .map(|(start, stop)| start..stop),
        orc_entries: find("__start_orc_unwind"),
        page_allocator,
    }
}

/// The table for the running kernel (ORC: Linux 4.14+). Fails where the kernel has no ORC
/// tables (built with frame pointers), kallsyms hides data symbols, or the tables cannot be
/// read.
pub fn read(reader: &mut KernelReader, release: &str) -> Result<PageCallerTable> {
    let text = fs::read_to_string(kallsyms::PATH)
        .with_context(|| format!("reading {}", kallsyms::PATH))?;
    let facts = kallsyms_facts(&text);
    let (Some(ips), Some(entries_start)) = (facts.orc_ips, facts.orc_entries) else {
        bail!(
            "{} names no ORC unwind tables (a kernel built without the ORC unwinder)",
            kallsyms::PATH
        );
    };
    ensure!(
        ips.end > ips.start && (ips.end - ips.start) % IP_BYTES as u64 == 0,
        "the ORC address table's bounds {:#x}..{:#x} are not a whole number of entries",
        ips.start,
        ips.end
    );
    let addresses = read_range(reader, ips.clone())
        .map(|bytes| orc::entry_addresses(ips.start, &bytes))
        .context("reading the ORC address table")?;
    ensure!(
        addresses.is_sorted(),
        "the ORC address table read at {:#x} is not sorted",
        ips.start
    );
    // The entries in force in each function: from the one at or before its start to the last
    // one inside it. Adjacent functions share an entry (the one in force where the second
    // starts), so the index ranges are merged: each entry is read once, in address order.
    let mut wanted: Vec<Range<usize>> = facts
        .page_allocator
        .iter()
        .map(|function| {
            let first = addresses
                .partition_point(|&address| address <= function.start)
                .saturating_sub(1);
            let end = addresses.partition_point(|&address| address < function.end);
            first..end.max(first + 1).min(addresses.len())
        })
        .collect();
    wanted.sort_by_key(|range| range.start);
    wanted.dedup_by(|later, earlier| {
        let touches = later.start <= earlier.end;
        if touches {
            earlier.end = earlier.end.max(later.end);
        }
        touches
    });
    let mut orc_entries = Vec::new();
    for range in &wanted {
        let start = entries_start + (range.start * ENTRY_BYTES) as u64;
        let end = entries_start + (range.end * ENTRY_BYTES) as u64;
        let bytes = read_range(reader, start..end).context("reading ORC entries")?;
        orc_entries.extend(
            bytes
                .as_chunks::<ENTRY_BYTES>()
                .0
                .iter()
                .zip(&addresses[range.clone()])
                .map(|(entry, &address)| (address, *entry)),
        );
    }
    orc::page_caller_table(
        &facts.page_allocator,
        &orc_entries,
        Layout::of_release(release),
    )
    .map_err(|error| anyhow!(error))
}

/// Reads `range` of kernel memory in page-sized pieces.
fn read_range(reader: &mut KernelReader, range: Range<u64>) -> Result<Vec<u8>> {
    const PIECE: u64 = 4096;
    let pieces: Vec<(u64, u32)> = (range.start..range.end)
        .step_by(PIECE as usize)
        .map(|address| (address, (range.end - address).min(PIECE) as u32))
        .collect();
    let mut bytes = Vec::with_capacity((range.end - range.start) as usize);
    let mut unreadable = None;
    reader.read_each(&pieces, |index, read| match read {
        Some(read) => bytes.extend_from_slice(read),
        None => {
            unreadable.get_or_insert(pieces[index].0);
        }
    })?;
    if let Some(address) = unreadable {
        bail!("kernel memory at {address:#x} could not be read");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tables_and_the_page_allocator() {
        // Lines recorded from this machine's /proc/kallsyms (Linux 6.18.44), and a module's.
        let text = "ffffffff815e2310 T __traceiter_mm_page_alloc\n\
                    ffffffff815e23b0 T __traceiter_mm_page_alloc_zone_locked\n\
                    ffffffff8163d400 T __alloc_frozen_pages_noprof\n\
                    ffffffff8163e420 T __alloc_pages_noprof\n\
                    ffffffff8163e460 T alloc_pages_bulk_noprof\n\
                    ffffffff81678a10 t alloc_pages_mpol\n\
                    ffffffff81678d10 T alloc_pages_noprof\n\
                    ffffffff81678dc0 T folio_alloc_noprof\n\
                    ffffffff81678e50 T vma_alloc_folio_noprof\n\
                    ffffffff8309bcf0 R __start_orc_unwind_ip\n\
                    ffffffff8326ee30 R __start_orc_unwind\n\
                    ffffffff8326ee30 R __stop_orc_unwind_ip\n\
                    ffffffffc0a00000 t alloc_pages_in_module\t[leaky]\n";
        let facts = kallsyms_facts(text);
        assert_eq!(
            facts.orc_ips,
            Some(0xffff_ffff_8309_bcf0..0xffff_ffff_8326_ee30)
        );
        assert_eq!(facts.orc_entries, Some(0xffff_ffff_8326_ee30));
        assert_eq!(
            facts.page_allocator,
            vec![
                0xffff_ffff_815e_2310..0xffff_ffff_815e_23b0,
                // The zone-locked event's iterator matches the prefix: walking through it is
                // harmless, as it never calls the allocator.
                0xffff_ffff_815e_23b0..0xffff_ffff_8163_d400,
                0xffff_ffff_8163_d400..0xffff_ffff_8163_e420,
                0xffff_ffff_8163_e420..0xffff_ffff_8163_e460,
                0xffff_ffff_8163_e460..0xffff_ffff_8167_8a10,
                0xffff_ffff_8167_8a10..0xffff_ffff_8167_8d10,
                0xffff_ffff_8167_8d10..0xffff_ffff_8167_8dc0,
                0xffff_ffff_8167_8dc0..0xffff_ffff_8167_8e50,
            ]
        );
    }

    #[test]
    fn a_kernel_without_orc_has_no_tables() {
        let facts = kallsyms_facts("ffffffff8163d400 T __alloc_pages\n");
        assert_eq!(facts.orc_ips, None);
        assert_eq!(facts.orc_entries, None);
    }
}
