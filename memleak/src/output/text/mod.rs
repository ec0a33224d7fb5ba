//! Reports as text, one file per model.
pub mod classify;
pub mod kmemleak;
pub mod scan;
pub mod trace;
pub mod watch;
