//! Addresses to functions: frames, the kernel and user-space symbolizers, and the allocator
//! functions a kernel stack passes through.
pub mod allocators;
pub mod frame;
pub mod modules;
pub mod symbolizer;
pub mod user;

pub use frame::Frame;
pub use modules::ModuleSymbols;
pub use symbolizer::KernelSymbolizer;
pub use user::UserSymbolizer;

use anyhow::Result;

/// The symbolizer for a report's stacks: kernel ones, or one user-space process's.
pub enum StackSymbolizer {
    Kernel(KernelSymbolizer),
    User(UserSymbolizer),
}

impl StackSymbolizer {
    pub fn resolve(&mut self, addrs: impl IntoIterator<Item = u64>) -> Result<()> {
        match self {
            Self::Kernel(symbolizer) => symbolizer.resolve(addrs),
            Self::User(symbolizer) => symbolizer.resolve(addrs),
        }
    }

    pub fn frame(&self, addr: u64) -> Frame {
        match self {
            Self::Kernel(symbolizer) => symbolizer.frame(addr),
            Self::User(symbolizer) => symbolizer.frame(addr),
        }
    }
}
