//! Kernel addresses to functions: frames, the symbolizer, and the allocator functions a stack
//! passes through.
pub mod allocators;
pub mod frame;
pub mod symbolizer;

pub use frame::Frame;
pub use symbolizer::KernelSymbolizer;
