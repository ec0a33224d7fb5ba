//! Kernel memory as the scan reads it: ranges in batches, each of which may fail. The reader
//! program reads the running kernel; the tests read a kernel image built by hand.
use anyhow::Result;

use crate::bpf::reader::KernelReader;

pub trait KernelMemory {
    /// Reads each `(address, length)` (length at most one page) and calls `visit` with its
    /// index and its bytes, or `None` when the read failed.
    fn read_each(
        &mut self,
        reads: &[(u64, u32)],
        visit: impl FnMut(usize, Option<&[u8]>),
    ) -> Result<()>;
}

impl KernelMemory for KernelReader {
    fn read_each(
        &mut self,
        reads: &[(u64, u32)],
        visit: impl FnMut(usize, Option<&[u8]>),
    ) -> Result<()> {
        KernelReader::read_each(self, reads, visit)
    }
}

#[cfg(test)]
pub(in crate::scan) mod image {
    use std::collections::BTreeMap;

    use super::*;

    /// Kernel memory made of regions written by a test; a read that leaves its region fails,
    /// as a read of an unmapped address does.
    #[derive(Debug, Default)]
    pub struct Image {
        regions: BTreeMap<u64, Vec<u8>>,
    }

    impl Image {
        /// Maps `length` zero bytes at `address`.
        pub fn map(&mut self, address: u64, length: usize) {
            let overlaps = self
                .regions
                .range(..address + length as u64)
                .next_back()
                .is_some_and(|(&start, bytes)| start + bytes.len() as u64 > address);
            assert!(!overlaps, "region at {address:#x} overlaps another");
            self.regions.insert(address, vec![0; length]);
        }

        /// Writes `bytes` at `address`, inside a region mapped before.
        pub fn write(&mut self, address: u64, bytes: &[u8]) {
            let (start, region) = self
                .regions
                .range_mut(..=address)
                .next_back()
                .unwrap_or_else(|| panic!("nothing mapped at {address:#x}"));
            let at = (address - start) as usize;
            region[at..at + bytes.len()].copy_from_slice(bytes);
        }

        pub fn write_u64(&mut self, address: u64, value: u64) {
            self.write(address, &value.to_le_bytes());
        }

        pub fn write_u32(&mut self, address: u64, value: u32) {
            self.write(address, &value.to_le_bytes());
        }

        /// Unmaps the region that starts at `address`.
        pub fn unmap(&mut self, address: u64) {
            self.regions.remove(&address).expect("a mapped region");
        }
    }

    fn bytes(regions: &BTreeMap<u64, Vec<u8>>, address: u64, length: u32) -> Option<&[u8]> {
        let (start, region) = regions.range(..=address).next_back()?;
        let at = usize::try_from(address - start).ok()?;
        region.get(at..at.checked_add(length as usize)?)
    }

    impl KernelMemory for Image {
        fn read_each(
            &mut self,
            reads: &[(u64, u32)],
            mut visit: impl FnMut(usize, Option<&[u8]>),
        ) -> Result<()> {
            for (index, &(address, length)) in reads.iter().enumerate() {
                visit(index, bytes(&self.regions, address, length));
            }
            Ok(())
        }
    }
}
