//! The kernel's ORC unwind tables (x86-64, `CONFIG_UNWINDER_ORC`, the default since Linux
//! 4.14), and the page hook's table of the page allocator's frames made from them
//! (`memleak_common::page_callers`).
//!
//! The kernel keeps two parallel arrays: `__start_orc_unwind_ip`, one `s32` per entry, the
//! code address it starts at relative to the `s32`'s own address, sorted; and
//! `__start_orc_unwind`, one 6-byte entry each. An entry holds from its address to the next
//! one's.
use std::ops::Range;

use memleak_common::page_callers;
use thiserror::Error;

/// Bytes of one `struct orc_entry`.
pub const ENTRY_BYTES: usize = 6;
/// Bytes of one element of the address array.
pub const IP_BYTES: usize = 4;

/// `ORC_REG_SP`: the frame's base is the stack pointer plus `sp_offset` (every version).
const ORC_REG_SP: u16 = 5;

/// How an entry's flags read: Linux 6.4 widened `type` to three bits and renumbered it
/// (`ORC_TYPE_CALL` went from 0 to 2). Read with the wrong layout, a call frame reads as
/// another type, which the table marks unwalkable: the wrong guess costs stacks, not callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `sp_reg:4, bp_reg:4, type:2, ...`, `ORC_TYPE_CALL` 0.
    Before6_4,
    /// `sp_reg:4, bp_reg:4, type:3, signal:1`, `ORC_TYPE_CALL` 2.
    From6_4,
}

impl Layout {
    pub fn of_release(release: &str) -> Self {
        if super::release_predates(release, 6, 4) {
            Self::Before6_4
        } else {
            Self::From6_4
        }
    }

    fn is_call_frame(self, flags: u16) -> bool {
        match self {
            Self::Before6_4 => (flags >> 8) & 0b11 == 0,
            Self::From6_4 => (flags >> 8) & 0b111 == 2,
        }
    }
}

/// The distance from a return address's slot to its caller's return-address slot, for code
/// whose entry is `entry`: `sp_offset` when the entry is a plain call frame based on the stack
/// pointer (then, with the callee's return address popped, the frame's base is that many bytes
/// above it, and the caller's return address is the word below the base). `None` for any other
/// frame, and for offsets no call frame has.
pub fn call_frame_size(entry: [u8; ENTRY_BYTES], layout: Layout) -> Option<u32> {
    let sp_offset = i16::from_le_bytes([entry[0], entry[1]]);
    let flags = u16::from_le_bytes([entry[4], entry[5]]);
    let sp_reg = flags & 0xf;
    let plain = sp_reg == ORC_REG_SP && layout.is_call_frame(flags);
    (plain && sp_offset >= 8 && sp_offset % 8 == 0).then_some(sp_offset as u32)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TableError {
    #[error("no page allocator function was found in /proc/kallsyms")]
    NoFunctions,
    #[error("the page allocator's code spans more than 4 GiB ({first:#x} to {last:#x})")]
    TooFar { first: u64, last: u64 },
    #[error(
        "the page allocator's frames need {entries} entries, more than the {max} the hook searches"
    )]
    TooLarge { entries: usize, max: usize },
    #[error("no ORC entry covers the page allocator's code at {address:#x}")]
    NotCovered { address: u64 },
}

/// The table the page hook searches (`memleak_common::page_callers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCallerTable {
    /// The address entries count from.
    pub base: u64,
    /// Sorted, padded to a power of two with `page_callers::PADDING`.
    pub entries: Vec<u64>,
    /// Entries before the padding.
    pub used: usize,
    /// Of those, entries whose code can be walked.
    pub walkable: usize,
}

/// The page hook's table for the code in `functions` (the page allocator's, as half-open
/// address ranges), from the ORC entries that cover it: `orc` holds, sorted by address, at
/// least the entry in force at each range's start and every entry inside each range.
pub fn page_caller_table(
    functions: &[Range<u64>],
    orc: &[(u64, [u8; ENTRY_BYTES])],
    layout: Layout,
) -> Result<PageCallerTable, TableError> {
    let mut functions: Vec<Range<u64>> = functions
        .iter()
        .filter(|range| range.start < range.end)
        .cloned()
        .collect();
    functions.sort_by_key(|range| range.start);
    // Aliases (two names at one address) and overlaps become one range.
    functions.dedup_by(|later, earlier| {
        let overlaps = later.start < earlier.end;
        if overlaps {
            earlier.end = earlier.end.max(later.end);
        }
        overlaps
    });
    let (Some(first), Some(last)) = (functions.first(), functions.iter().map(|r| r.end).max())
    else {
        return Err(TableError::NoFunctions);
    };
    let base = first.start;
    if last - base >= u64::from(u32::MAX) {
        return Err(TableError::TooFar { first: base, last });
    }
    let what = |entry: [u8; ENTRY_BYTES]| {
        call_frame_size(entry, layout).unwrap_or(page_callers::UNWALKABLE)
    };
    // (address, what), sorted by address; a later entry at the same address replaces an
    // earlier one (a function that starts where the previous one ends).
    let mut spans: Vec<(u64, u32)> = Vec::new();
    let mut push = |address: u64, said: u32| {
        if let Some(last) = spans.last_mut()
            && last.0 == address
        {
            last.1 = said;
        } else {
            spans.push((address, said));
        }
    };
    for range in &functions {
        let in_force = orc.partition_point(|&(address, _)| address <= range.start);
        let Some(in_force) = in_force.checked_sub(1) else {
            return Err(TableError::NotCovered {
                address: range.start,
            });
        };
        push(range.start, what(orc[in_force].1));
        for &(address, entry) in &orc[in_force + 1..] {
            if address >= range.end {
                break;
            }
            push(address, what(entry));
        }
        push(range.end, page_callers::OUTSIDE);
    }
    // An entry saying what the one before it said adds nothing.
    spans.dedup_by(|later, earlier| later.1 == earlier.1);
    let used = spans.len();
    let size = used.next_power_of_two().max(2);
    let max = 1usize << page_callers::MAX_STEPS;
    if size > max {
        return Err(TableError::TooLarge { entries: used, max });
    }
    let walkable = spans
        .iter()
        .filter(|&&(_, said)| said != page_callers::OUTSIDE && said != page_callers::UNWALKABLE)
        .count();
    let mut entries: Vec<u64> = spans
        .into_iter()
        .map(|(address, said)| page_callers::entry((address - base) as u32, said))
        .collect();
    entries.resize(size, page_callers::PADDING);
    Ok(PageCallerTable {
        base,
        entries,
        used,
        walkable,
    })
}

impl PageCallerTable {
    /// The binary search's steps: log2 of the table's length, a power of two.
    pub fn steps(&self) -> u32 {
        self.entries.len().trailing_zeros()
    }

    /// What the table says of the code a return address returns to, searched as the page hook
    /// searches it (`memleak_common::page_callers::frame_size`).
    pub fn frame_size(&self, return_address: u64) -> u32 {
        page_callers::frame_size(return_address, self.base, self.steps(), |index| {
            self.entries.get(index as usize).copied()
        })
        .expect("the search reads indices below 1 << steps, the table's length")
    }
}

/// Code addresses of the entries of an address array read from `array_start`: each element
/// is relative to its own address.
pub fn entry_addresses(array_start: u64, bytes: &[u8]) -> Vec<u64> {
    bytes
        .as_chunks::<IP_BYTES>()
        .0
        .iter()
        .enumerate()
        .map(|(index, element)| {
            let relative = i32::from_le_bytes(*element);
            array_start
                .wrapping_add((index * IP_BYTES) as u64)
                .wrapping_add_signed(i64::from(relative))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as the kernel stores it.
    fn entry(sp_offset: i16, sp_reg: u16, kind: u16) -> [u8; ENTRY_BYTES] {
        let flags = sp_reg | 4 << 4 | kind << 8;
        let mut bytes = [0; ENTRY_BYTES];
        bytes[..2].copy_from_slice(&sp_offset.to_le_bytes());
        bytes[4..].copy_from_slice(&flags.to_le_bytes());
        bytes
    }

    /// Recorded on this machine's Linux 6.18.44 (the layout from 6.4 on) with the reader:
    /// entry 124,478 of 478,288, in force from `__alloc_frozen_pages_noprof+0x22a` to `+0xb52`,
    /// over the return address `+695` of its call to the tracepoint's handler. A frame walk of
    /// 39,046 events found the caller's return address 27 words (216 bytes) above it in each.
    /// bp is at the frame's base minus 48 (`bp_reg` 1, `ORC_REG_PREV_SP`).
    #[test]
    fn reads_a_recorded_call_frame() {
        let recorded = [0xd8, 0x00, 0xd0, 0xff, 0x15, 0x02];
        assert_eq!(call_frame_size(recorded, Layout::From6_4), Some(216));
        // Read as an older kernel's, the same flags are not a call frame.
        assert_eq!(call_frame_size(recorded, Layout::Before6_4), None);
    }

    #[test]
    fn only_plain_stack_based_call_frames_are_walked() {
        assert_eq!(call_frame_size(entry(16, 5, 2), Layout::From6_4), Some(16));
        assert_eq!(
            call_frame_size(entry(16, 5, 0), Layout::Before6_4),
            Some(16)
        );
        // Based on the frame pointer register.
        assert_eq!(call_frame_size(entry(16, 4, 2), Layout::From6_4), None);
        // A register frame (entry code), and the end of the stack.
        assert_eq!(call_frame_size(entry(16, 5, 3), Layout::From6_4), None);
        assert_eq!(call_frame_size(entry(16, 5, 1), Layout::From6_4), None);
        // Offsets no call frame has.
        assert_eq!(call_frame_size(entry(4, 5, 2), Layout::From6_4), None);
        assert_eq!(call_frame_size(entry(-8, 5, 2), Layout::From6_4), None);
    }

    #[test]
    fn the_entry_layout_follows_the_release() {
        assert_eq!(Layout::of_release("6.1.0-30-amd64"), Layout::Before6_4);
        assert_eq!(Layout::of_release("5.10.0-33-amd64"), Layout::Before6_4);
        assert_eq!(Layout::of_release("6.4.0"), Layout::From6_4);
        assert_eq!(Layout::of_release("6.18.44-fc-v1252"), Layout::From6_4);
    }

    #[test]
    fn addresses_are_relative_to_their_elements() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(-0x100i32).to_le_bytes());
        bytes.extend_from_slice(&(-0x0fci32).to_le_bytes());
        assert_eq!(
            entry_addresses(0x2000, &bytes),
            vec![0x1f00, 0x2000 + 4 - 0x0fc]
        );
    }

    const CALL: fn(i16) -> [u8; ENTRY_BYTES] = |offset| entry(offset, 5, 2);

    /// Two functions: `outer` at 0x1000..0x1100 calls `inner` at 0x1200..0x1280.
    fn table() -> PageCallerTable {
        let orc = [
            (0x0f00, CALL(8)),
            (0x1000, CALL(8)),
            (0x1004, CALL(48)),
            (0x10f0, CALL(8)),
            (0x1100, CALL(8)),
            (0x1200, CALL(8)),
            (0x1201, CALL(16)),
            (0x1240, entry(16, 4, 2)),
            (0x1250, CALL(16)),
            (0x1300, CALL(8)),
        ];
        page_caller_table(&[0x1200..0x1280, 0x1000..0x1100], &orc, Layout::From6_4).unwrap()
    }

    #[test]
    fn builds_a_searchable_table() {
        let table = table();
        assert_eq!(table.base, 0x1000);
        // 0x1000 8, 0x1004 48, 0x10f0 8, 0x1100 out, 0x1200 8, 0x1201 16, 0x1240 unwalkable,
        // 0x1250 16, 0x1280 out.
        assert_eq!(table.used, 9);
        assert_eq!(table.walkable, 6);
        assert_eq!(table.entries.len(), 16);
        assert_eq!(table.steps(), 4);
        assert!(table.entries.is_sorted());
        // A return address is looked up at the call instruction, the byte before it.
        assert_eq!(table.frame_size(0x1005), 48);
        assert_eq!(table.frame_size(0x1004), 8);
        assert_eq!(table.frame_size(0x10f0), 48);
        assert_eq!(table.frame_size(0x1100), 8);
        assert_eq!(table.frame_size(0x1101), page_callers::OUTSIDE);
        assert_eq!(table.frame_size(0x1210), 16);
        assert_eq!(table.frame_size(0x1245), page_callers::UNWALKABLE);
        assert_eq!(table.frame_size(0x1260), 16);
        assert_eq!(table.frame_size(0x1281), page_callers::OUTSIDE);
        assert_eq!(table.frame_size(0x0fff), page_callers::OUTSIDE);
        assert_eq!(
            table.frame_size(0xffff_ffff_8100_0000),
            page_callers::OUTSIDE
        );
    }

    #[test]
    fn the_frame_cache_answers_as_the_table_does() {
        let table = table();
        let searches = std::cell::Cell::new(0);
        let mut cache = [page_callers::CachedFrame::default(); page_callers::FRAME_CACHE_ENTRIES];
        let mut ask = |address: u64| {
            let cached = &mut cache[page_callers::cache_index(address)];
            let before = searches.get();
            let said = page_callers::cached_frame_size(
                cached,
                address,
                table.base,
                table.steps(),
                |index| {
                    searches.set(searches.get() + 1);
                    table.entries.get(index as usize).copied()
                },
            );
            assert_eq!(said, Some(table.frame_size(address)), "{address:#x}");
            searches.get() > before
        };
        // In `inner`, where the table's answer differs from 0x1005's.
        let collider = (0x1202..0x1240)
            .find(|&address| {
                page_callers::cache_index(address) == page_callers::cache_index(0x1005)
            })
            .unwrap();
        // Every kind of answer, two addresses sharing an entry, and 0 (an empty entry's).
        let addresses = [
            0x1005, 0x1004, 0x1101, 0x1210, 0x1245, 0x1281, 0x0fff, 0, collider,
        ];
        for _ in 0..3 {
            for address in addresses.into_iter().chain(addresses.into_iter().rev()) {
                ask(address);
            }
        }
        // The passes ended on 0x1005, which took the entry the collider shares.
        assert!(ask(collider));
        assert!(!ask(collider), "a kept answer is not searched again");
        assert!(ask(0x1005));
        assert!(!ask(0x1005));
    }

    #[test]
    fn adjacent_functions_share_their_boundary() {
        let orc = [(0x1000, CALL(8)), (0x1040, CALL(24))];
        let table =
            page_caller_table(&[0x1000..0x1040, 0x1040..0x1080], &orc, Layout::From6_4).unwrap();
        assert_eq!(table.frame_size(0x1041), 24);
        assert_eq!(table.frame_size(0x1081), page_callers::OUTSIDE);
    }

    #[test]
    fn aliases_are_one_function() {
        let orc = [(0x1000, CALL(8)), (0x1010, CALL(24))];
        let table =
            page_caller_table(&[0x1000..0x1040, 0x1000..0x1040], &orc, Layout::From6_4).unwrap();
        assert!(table.entries.is_sorted());
        assert_eq!(table.used, 3);
        assert_eq!(table.frame_size(0x1011), 24);
    }

    #[test]
    fn refuses_what_it_cannot_search() {
        assert_eq!(
            page_caller_table(&[], &[], Layout::From6_4),
            Err(TableError::NoFunctions)
        );
        assert_eq!(
            page_caller_table(
                &[0x1000..0x1100, 0x1200..0x1300],
                &[(0x1001, CALL(8))],
                Layout::From6_4
            ),
            Err(TableError::NotCovered { address: 0x1000 })
        );
        let far = [0x1000..0x1100, 0x2_0000_0000..0x2_0000_0100];
        assert!(matches!(
            page_caller_table(&far, &[(0x1000, CALL(8))], Layout::From6_4),
            Err(TableError::TooFar { .. })
        ));
        let many: Vec<(u64, [u8; ENTRY_BYTES])> = (0..70_000u64)
            .map(|i| (0x1000 + i, CALL(8 * (1 + (i % 2) as i16))))
            .collect();
        assert!(matches!(
            page_caller_table(
                &[0x1000..0x1000 + 70_000, 0x20_0000..0x20_0010],
                &many,
                Layout::From6_4
            ),
            Err(TableError::TooLarge { .. })
        ));
    }
}
