//! Memory mappings of `BPF_F_MMAPABLE` array maps: the tracer's table, read in windows after
//! detaching, and the kernel reader's request and chunk arrays, shared with its program.
use std::{
    io,
    marker::PhantomData,
    ops::Range,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    slice,
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::Map;

/// How a mapping may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// A mapping of elements `range` of an array map whose value type is `T`. The size of `T`
/// must be a multiple of 8 (array maps pad values to 8 bytes), and `range.start` must make
/// the offset page-aligned. The kernel maps every page at mmap time, so large maps are
/// mapped in small windows.
pub struct MappedArray<T> {
    base: NonNull<T>,
    elements: usize,
    access: Access,
    _values: PhantomData<T>,
}

impl<T> MappedArray<T> {
    /// Maps `range` of `map`; `what` names the map in errors.
    pub fn new(map: &Map, range: Range<usize>, access: Access, what: &str) -> Result<Self> {
        let Map::Array(data) = map else {
            return Err(anyhow!("{what}: expected an array map"));
        };
        let elements = range.end.saturating_sub(range.start);
        let protection = match access {
            Access::Read => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                elements * size_of::<T>(),
                protection,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                (range.start * size_of::<T>()) as libc::off_t,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).with_context(|| format!("mmap of {what}"));
        }
        let base = NonNull::new(address.cast()).ok_or_else(|| anyhow!("mmap returned NULL"))?;
        Ok(Self {
            base,
            elements,
            access,
            _values: PhantomData,
        })
    }

    pub fn as_slice(&self) -> &[T] {
        // The mapping holds `elements` values of `T` until drop. The kernel writes them only
        // while a program runs: the table's are read after detaching, the reader's after the
        // test run this thread waits for.
        unsafe { slice::from_raw_parts(self.base.as_ptr(), self.elements) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        assert_eq!(self.access, Access::ReadWrite, "a read-only mapping");
        // As above; `&mut self` makes this the only view of the mapping.
        unsafe { slice::from_raw_parts_mut(self.base.as_ptr(), self.elements) }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.elements * size_of::<T>()) };
    }
}
