//! Reads kernel memory through the `read_kernel_memory` eBPF program, in batches.
use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun as _},
};
use memleak_common::scan::{MAX_READS_PER_RUN, READ_CHUNK_BYTES, ReadChunk, ReadRequest};

use super::{
    mmap::{Access, MappedArray},
    object::{ebpf_object, kernel_needs_plain_claims},
};

const PROGRAM: &str = "read_kernel_memory";

/// A loaded reader program and the mappings of its request and chunk maps.
pub struct KernelReader {
    // Field order: the mappings go before the object that owns the maps.
    requests: MappedArray<ReadRequest>,
    chunks: MappedArray<ReadChunk>,
    ebpf: Ebpf,
    /// Reads that failed (unmapped addresses, pages freed while the scan ran) since the
    /// count was last reset.
    pub failed_reads: u64,
}

impl KernelReader {
    /// Loads the reader from memleak's eBPF object. The tracer's maps in that object are
    /// created too, at their smallest.
    pub fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("READ_REQUESTS", MAX_READS_PER_RUN)
            .map_max_entries("READ_CHUNKS", MAX_READS_PER_RUN)
            .map_max_entries("CACHE_NAMES", 1)
            .map_max_entries("COMMS", 1)
            .map_max_entries("MISSED_FREE_SITES", 1)
            .load(ebpf_object(kernel_needs_plain_claims())?)
            .context("creating the kernel memory reader's eBPF maps")?;
        let program: &mut RawTracePoint = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("eBPF object has no program {PROGRAM}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading the kernel memory reader ({PROGRAM})"))?;
        let requests = MappedArray::new(
            map(&ebpf, "READ_REQUESTS")?,
            0..MAX_READS_PER_RUN as usize,
            Access::ReadWrite,
            "READ_REQUESTS",
        )?;
        let chunks = MappedArray::new(
            map(&ebpf, "READ_CHUNKS")?,
            0..MAX_READS_PER_RUN as usize,
            Access::ReadWrite,
            "READ_CHUNKS",
        )?;
        Ok(Self {
            requests,
            chunks,
            ebpf,
            failed_reads: 0,
        })
    }

    fn run(&mut self, requests: usize) -> Result<()> {
        self.run_on(requests, None)
    }

    fn run_on(&mut self, requests: usize, cpu: Option<u32>) -> Result<()> {
        let program: &RawTracePoint = self
            .ebpf
            .program(PROGRAM)
            .ok_or_else(|| anyhow!("eBPF object has no program {PROGRAM}"))?
            .try_into()?;
        let mut options = RawTracePointRunOptions::new();
        options.args[0] = requests as u64;
        options.cpu = cpu;
        program
            .test_run(options)
            .context("running the kernel memory reader (BPF_PROG_TEST_RUN)")?;
        Ok(())
    }

    /// Each online CPU's `__per_cpu_offset`, proven: a value memleak writes into each CPU's
    /// slot of a per-CPU map must read back at the map's per-CPU pointer plus the offset.
    /// `pptrs_offset` is `offsetof(struct bpf_array, pptrs)`.
    pub fn percpu_offsets(&mut self, pptrs_offset: u64) -> Result<Vec<(u32, u64)>> {
        let cpus =
            aya::util::online_cpus().map_err(|(path, error)| anyhow!("reading {path}: {error}"))?;
        let possible = aya::util::nr_cpus()
            .map_err(|(path, error)| anyhow!("reading {path}: {error}"))?
            .get() as usize;
        let mut elements = Vec::with_capacity(cpus.len());
        let mut map_address = 0;
        for &cpu in &cpus {
            self.run_on(0, Some(cpu))
                .with_context(|| format!("running the reader on CPU {cpu}"))?;
            let addresses: aya::maps::Array<&aya::maps::MapData, u64> =
                aya::maps::Array::try_from(map(&self.ebpf, "READER_PERCPU_ADDRESSES")?)?;
            elements.push(
                addresses
                    .get(&0, 0)
                    .context("reading READER_PERCPU_ADDRESSES")?,
            );
            map_address = addresses
                .get(&1, 0)
                .context("reading READER_PERCPU_ADDRESSES")?;
        }
        let pointer = self
            .read_u64(map_address.wrapping_add(pptrs_offset))?
            .ok_or_else(|| anyhow!("the per-CPU map at {map_address:#x} cannot be read"))?;
        let markers: Vec<u64> = (0..possible)
            .map(|cpu| 0x6d65_6d6c_6561_6b00 ^ (cpu as u64) << 8 ^ u64::from(std::process::id()))
            .collect();
        let mut slots: aya::maps::PerCpuArray<&mut aya::maps::MapData, u64> =
            aya::maps::PerCpuArray::try_from(map_mut(&mut self.ebpf, "READER_PERCPU")?)?;
        slots
            .set(0, markers.clone().try_into()?, 0)
            .context("writing READER_PERCPU")?;
        let offsets: Vec<(u32, u64)> = cpus
            .iter()
            .zip(elements)
            .map(|(&cpu, element)| (cpu, element.wrapping_sub(pointer)))
            .collect();
        for &(cpu, offset) in &offsets {
            let read = self.read_u64(pointer.wrapping_add(offset))?;
            if read != Some(markers[cpu as usize]) {
                bail!(
                    "CPU {cpu}'s per-CPU offset {offset:#x} does not lead to memleak's marker \
                     (per-CPU pointer {pointer:#x})"
                );
            }
        }
        Ok(offsets)
    }

    /// Reads each `(address, length)` (length at most one page) and calls `visit` with its
    /// index and its bytes, or `None` when the read failed.
    pub fn read_each(
        &mut self,
        reads: &[(u64, u32)],
        mut visit: impl FnMut(usize, Option<&[u8]>),
    ) -> Result<()> {
        for (batch_index, batch) in reads.chunks(MAX_READS_PER_RUN as usize).enumerate() {
            let requests = self.requests.as_mut_slice();
            for (chunk, (request, &(address, length))) in requests.iter_mut().zip(batch).enumerate()
            {
                *request = ReadRequest {
                    address,
                    chunk: chunk as u32,
                    length: length.min(READ_CHUNK_BYTES as u32),
                };
            }
            self.run(batch.len())?;
            let requests = self.requests.as_mut_slice();
            let chunks = self.chunks.as_mut_slice();
            for (index, (request, chunk)) in requests
                .iter()
                .zip(chunks.iter())
                .take(batch.len())
                .enumerate()
            {
                let position = batch_index * MAX_READS_PER_RUN as usize + index;
                if request.address == 0 {
                    self.failed_reads += 1;
                    visit(position, None);
                } else {
                    visit(position, Some(&chunk.bytes[..request.length as usize]));
                }
            }
        }
        Ok(())
    }

    /// Reads one range of up to a page.
    pub fn read(&mut self, address: u64, length: u32) -> Result<Option<Vec<u8>>> {
        let mut bytes = None;
        self.read_each(&[(address, length)], |_, read| {
            bytes = read.map(<[u8]>::to_vec)
        })?;
        Ok(bytes)
    }

    /// Reads a little-endian word, `None` when unreadable.
    pub fn read_u64(&mut self, address: u64) -> Result<Option<u64>> {
        Ok(self
            .read(address, 8)?
            .and_then(|bytes| Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))))
    }

    /// The `struct task_struct *` of this thread, as the kernel sees it.
    pub fn current_task(&mut self) -> Result<u64> {
        self.run(0)?;
        let tasks: aya::maps::Array<&aya::maps::MapData, u64> =
            aya::maps::Array::try_from(map(&self.ebpf, "READER_TASK")?)?;
        tasks.get(&0, 0).context("reading READER_TASK")
    }
}

fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Map> {
    ebpf.map(name)
        .ok_or_else(|| anyhow!("eBPF object has no {name} map"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no {name} map"))
}
