//! Kernel addresses to functions: frames, the symbolizer, and the allocator functions a stack
//! passes through.
pub mod allocators;
pub mod frame;
pub mod modules;
pub mod symbolizer;

pub use frame::Frame;
pub use modules::ModuleSymbols;
pub use symbolizer::KernelSymbolizer;
