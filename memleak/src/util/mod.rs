//! Units and durations, shared by every layer; imports nothing of memleak.
pub mod duration;
#[doc(hidden)]
pub mod scratch;
pub mod units;
