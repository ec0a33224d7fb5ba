//! Units and durations, and what built this binary, shared by every layer; imports nothing of
//! memleak.
pub mod build;
pub mod clock;
pub mod duration;
pub mod hex;
#[doc(hidden)]
pub mod scratch;
pub mod units;
