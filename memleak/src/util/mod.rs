//! Units and durations, shared by every layer; imports nothing of memleak.
pub mod clock;
pub mod duration;
pub mod hex;
#[doc(hidden)]
pub mod scratch;
pub mod units;
