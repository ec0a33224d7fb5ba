//! One module per subcommand: orchestration only (attach, wait, build the model, render, exit
//! status). Models and logic live in the library, rendering in `memleak::output`.
pub mod classify;
pub mod kmemleak;
pub mod scan;
pub mod signals;
pub mod trace;
pub mod watch;
