//! Types of the on-demand kernel memory reader used by `memleak scan` and `trace --cache`.
//!
//! Userspace writes up to [`MAX_READS_PER_RUN`] [`ReadRequest`]s into the `READ_REQUESTS` map,
//! runs the reader program once with `BPF_PROG_TEST_RUN` (the request count in its first
//! argument), and finds request `i`'s bytes at the start of chunk `chunk` of `READ_CHUNKS`.

/// Bytes in one chunk of the output map: one page, the most one request reads.
pub const READ_CHUNK_BYTES: usize = 4096;

/// Requests handled by one test run of the reader program.
pub const MAX_READS_PER_RUN: u32 = 512;

/// Read `length` bytes (at most [`READ_CHUNK_BYTES`]) of kernel memory at `address` into
/// chunk `chunk`. The reader sets `address` to 0 when the read fails (an unmapped address);
/// the chunk then holds zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadRequest {
    pub address: u64,
    pub chunk: u32,
    pub length: u32,
}

/// One page of bytes read from the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReadChunk {
    pub bytes: [u8; READ_CHUNK_BYTES],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ReadRequest {}
    unsafe impl aya::Pod for ReadChunk {}
}
