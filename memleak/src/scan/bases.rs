//! Finds the two bases the scanner needs under KASLR, and proves each before it is used:
//! `page_offset_base`, where the direct map of physical memory starts, and `vmemmap_base`,
//! where the `struct page` array starts. Both are 1 GiB aligned on x86_64.
//!
//! Neither is guessed by probing the address space. Each starts from a kernel pointer known to
//! lie in its region, and only candidates within the region's size below that pointer are
//! read, each at a place that must hold bytes memleak itself wrote:
//! - direct map: the reader's own `task_struct` (a slab object) bounds the base from above; the
//!   candidate at which a locked page of random bytes, found through /proc/self/pagemap, reads
//!   back is the base;
//! - vmemmap: a TCP send over loopback leaves `current->task_frag.page` pointing at the
//!   `struct page` that holds the sent bytes; the candidate whose page number for it leads,
//!   through the direct map, to those bytes is the base. Slab pages from /proc/kpageflags must
//!   then lead to slab caches with readable names.
use std::{
    fs::File,
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::unix::fs::FileExt as _,
};

use anyhow::{Context as _, Result};

use super::layout::SlabLayout;
use crate::bpf::reader::KernelReader;

pub const GIB: u64 = 1 << 30;
use super::PAGE;
/// The lowest address KASLR gives the direct map, with 4-level and with 5-level page tables.
const DIRECT_MAP_FLOOR_L4: u64 = 0xffff_8880_0000_0000;
const DIRECT_MAP_FLOOR_L5: u64 = 0xff11_0000_0000_0000;

/// Why a base could not be found; nothing is read from kernel memory after this.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("cannot find the direct map base (page_offset_base): {reason}")]
    DirectMap { reason: String },
    #[error("cannot find the struct page array base (vmemmap_base): {reason}")]
    Vmemmap { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelBases {
    pub page_offset: u64,
    pub vmemmap: u64,
    /// One past the highest page frame number (from /proc/kpageflags).
    pub max_pfn: u64,
}

impl KernelBases {
    /// The direct-map address of a page frame.
    pub fn direct(&self, pfn: u64) -> u64 {
        self.page_offset + pfn * PAGE
    }

    pub fn in_direct_map(&self, address: u64) -> bool {
        (self.page_offset..self.direct(self.max_pfn)).contains(&address)
    }
}

/// Candidate bases: `anchor` rounded down to 1 GiB, then each GiB below it, as far as a region
/// of `span` bytes could reach, never below `floor`.
pub fn candidates(anchor: u64, span: u64, floor: u64) -> Vec<u64> {
    let top = anchor & !(GIB - 1);
    (0..=span.div_ceil(GIB))
        .filter_map(|k| top.checked_sub(k * GIB))
        .filter(|&base| base >= floor)
        .collect()
}

/// Finds and proves `page_offset_base` and `vmemmap_base`.
pub fn find(reader: &mut KernelReader, layout: &SlabLayout, max_pfn: u64) -> Result<KernelBases> {
    let page_offset = find_direct_map(reader, max_pfn)?;
    let vmemmap = find_vmemmap(reader, layout, page_offset, max_pfn)?;
    Ok(KernelBases {
        page_offset,
        vmemmap,
        max_pfn,
    })
}

fn find_direct_map(reader: &mut KernelReader, max_pfn: u64) -> Result<u64> {
    let fail = |reason: String| BaseError::DirectMap { reason };
    let marker = MarkerPage::new()?;
    let pfn = marker.pfn()?.ok_or_else(|| {
        fail("/proc/self/pagemap shows no page frame number (needs CAP_SYS_ADMIN)".into())
    })?;
    let task = reader.current_task()?;
    let floor = if task < DIRECT_MAP_FLOOR_L4 {
        DIRECT_MAP_FLOOR_L5
    } else {
        DIRECT_MAP_FLOOR_L4
    };
    if task < floor {
        return Err(fail(format!(
            "the reader's task_struct at {task:#x} is not a kernel address"
        ))
        .into());
    }
    let bases = candidates(task, max_pfn * PAGE, floor);
    let reads: Vec<(u64, u32)> = bases.iter().map(|base| (base + pfn * PAGE, 64)).collect();
    let mut matches = Vec::new();
    reader.read_each(&reads, |index, bytes| {
        if bytes == Some(&marker.bytes()[..64]) {
            matches.push(bases[index]);
        }
    })?;
    let [base] = matches[..] else {
        return Err(fail(format!(
            "{} of {} candidates below {task:#x} hold memleak's marker page (PFN {pfn:#x}); \
             expected exactly one",
            matches.len(),
            bases.len()
        ))
        .into());
    };
    // The whole page must match, not just its first bytes.
    if reader.read(base + pfn * PAGE, PAGE as u32)?.as_deref() != Some(marker.bytes()) {
        return Err(fail(format!(
            "the marker page reads back only in part at {base:#x}"
        ))
        .into());
    }
    Ok(base)
}

fn find_vmemmap(
    reader: &mut KernelReader,
    layout: &SlabLayout,
    page_offset: u64,
    max_pfn: u64,
) -> Result<u64> {
    let fail = |reason: String| BaseError::Vmemmap { reason };
    let payload = random_bytes::<64>()?;
    let sent = send_over_loopback(reader, layout, &payload)?;
    let (Some(frag_page), Some(frag_offset)) = (sent.page, sent.offset) else {
        return Err(fail("current->task_frag is unreadable after a TCP send".into()).into());
    };
    if frag_page < page_offset || frag_offset < payload.len() as u64 {
        return Err(fail(format!(
            "current->task_frag ({frag_page:#x}, offset {frag_offset}) does not describe the \
             page of a TCP send"
        ))
        .into());
    }
    let stride = layout.page_size as u64;
    let bases: Vec<u64> = candidates(frag_page, max_pfn * stride, page_offset)
        .into_iter()
        .filter(|&base| (frag_page - base) % stride == 0 && (frag_page - base) / stride < max_pfn)
        .collect();
    let reads: Vec<(u64, u32)> = bases
        .iter()
        .map(|base| {
            let pfn = (frag_page - base) / stride;
            (
                page_offset + pfn * PAGE + frag_offset - payload.len() as u64,
                64,
            )
        })
        .collect();
    let mut matches = Vec::new();
    reader.read_each(&reads, |index, bytes| {
        if bytes == Some(&payload[..]) {
            matches.push(bases[index]);
        }
    })?;
    let [base] = matches[..] else {
        return Err(fail(format!(
            "{} of {} candidates below {frag_page:#x} lead to the bytes memleak sent; expected \
             exactly one",
            matches.len(),
            bases.len()
        ))
        .into());
    };
    Ok(base)
}

/// Where a TCP send of this thread put its data: `current->task_frag.page` and `.offset`.
struct LoopbackSend {
    page: Option<u64>,
    offset: Option<u64>,
    /// Both ends, open until the page has been looked at.
    _connection: (TcpStream, TcpStream),
}

/// Sends `payload` over a loopback TCP connection from this thread, and reads where the kernel
/// put it. The task keeps a reference to its frag page, so the bytes stay there.
fn send_over_loopback(
    reader: &mut KernelReader,
    layout: &SlabLayout,
    payload: &[u8],
) -> Result<LoopbackSend> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback TCP socket")?;
    let mut client = TcpStream::connect(listener.local_addr().context("loopback address")?)
        .context("connecting over loopback TCP")?;
    let (server, _) = listener.accept().context("accepting over loopback TCP")?;
    client
        .write_all(payload)
        .context("sending over loopback TCP")?;
    let task = reader.current_task()?;
    let page = reader.read_u64(task + layout.task_frag_page.offset as u64)?;
    let offset = reader
        .read(task + layout.task_frag_offset.offset as u64, 4)?
        .and_then(|bytes| Some(u64::from(u32::from_le_bytes(*bytes.first_chunk()?))));
    Ok(LoopbackSend {
        page,
        offset,
        _connection: (client, server),
    })
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let got = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if got < 0 {
            return Err(std::io::Error::last_os_error()).context("getrandom");
        }
        filled += got as usize;
    }
    Ok(bytes)
}

/// A locked page of random bytes in memleak's own memory.
struct MarkerPage {
    page: *mut u8,
}

impl MarkerPage {
    fn new() -> Result<Self> {
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the marker page");
        }
        let marker = Self { page: page.cast() };
        let random = random_bytes::<{ PAGE as usize }>()?;
        unsafe { std::ptr::copy_nonoverlapping(random.as_ptr(), marker.page, random.len()) };
        // Locked, so the page stays at its frame while the candidates are read.
        if unsafe { libc::mlock(page, PAGE as usize) } != 0 {
            return Err(std::io::Error::last_os_error()).context("mlock of the marker page");
        }
        Ok(marker)
    }

    fn bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.page, PAGE as usize) }
    }

    /// The page's frame number from /proc/self/pagemap (0 there without CAP_SYS_ADMIN).
    fn pfn(&self) -> Result<Option<u64>> {
        let pagemap = File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
        let mut entry = [0u8; 8];
        pagemap
            .read_exact_at(&mut entry, self.page as u64 / PAGE * 8)
            .context("reading /proc/self/pagemap")?;
        let entry = u64::from_le_bytes(entry);
        let present = entry >> 63 == 1;
        let pfn = entry & ((1 << 55) - 1);
        Ok((present && pfn != 0).then_some(pfn))
    }
}

impl Drop for MarkerPage {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.page.cast(), PAGE as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_map_ends_with_memory() {
        let bases = KernelBases {
            page_offset: 0xffff_9a00_0000_0000,
            vmemmap: 0xffff_ea00_0000_0000,
            max_pfn: 0x10_0000,
        };
        assert_eq!(bases.direct(3), 0xffff_9a00_0000_3000);
        assert!(bases.in_direct_map(0xffff_9a00_0000_0000));
        assert!(bases.in_direct_map(0xffff_9a00_ffff_fff8));
        assert!(!bases.in_direct_map(0xffff_9a01_0000_0000));
        assert!(!bases.in_direct_map(0xffff_99ff_ffff_fff8));
    }

    #[test]
    fn candidates_cover_the_region_below_the_anchor() {
        let base = 0xffff_9a00_0000_0000;
        // 24 GiB of RAM: the anchor can be up to 24 GiB above the base.
        let anchor = base + 23 * GIB + 12_345;
        let found = candidates(anchor, 24 * GIB, DIRECT_MAP_FLOOR_L4);
        assert!(found.contains(&base));
        assert_eq!(found[0], base + 23 * GIB);
        assert!(found.iter().all(|&c| c % GIB == 0 && c <= anchor));
        assert_eq!(found.len(), 25);
        // Never below the floor.
        let low = candidates(DIRECT_MAP_FLOOR_L4 + GIB, 24 * GIB, DIRECT_MAP_FLOOR_L4);
        assert_eq!(low, [DIRECT_MAP_FLOOR_L4 + GIB, DIRECT_MAP_FLOOR_L4]);
    }
}
