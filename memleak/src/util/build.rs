//! What built this memleak: its version, the git commit of its source, the aya and blazesym it
//! links, and its target (set by build.rs). `--version` prints them and every report records
//! the version and commit, so a report read months later says which memleak wrote it.
use serde::{Deserialize, Serialize};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The short git commit, or `unknown` when built outside a git checkout.
pub const GIT_COMMIT: &str = env!("MEMLEAK_GIT_COMMIT");
pub const AYA_VERSION: &str = env!("MEMLEAK_AYA_VERSION");
pub const BLAZESYM_VERSION: &str = env!("MEMLEAK_BLAZESYM_VERSION");
/// The Rust target triple, `x86_64-unknown-linux-musl` for the static release binary.
pub const TARGET: &str = env!("MEMLEAK_TARGET");

/// `memleak -V`.
pub const SHORT_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MEMLEAK_GIT_COMMIT"),
    ")"
);

/// `memleak --version`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MEMLEAK_GIT_COMMIT"),
    ")\naya ",
    env!("MEMLEAK_AYA_VERSION"),
    ", blazesym ",
    env!("MEMLEAK_BLAZESYM_VERSION"),
    "\ntarget ",
    env!("MEMLEAK_TARGET"),
);

/// The memleak that wrote a report, recorded in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    pub version: String,
    pub commit: String,
}

impl Producer {
    /// This binary.
    pub fn this() -> Self {
        Self {
            version: VERSION.to_owned(),
            commit: GIT_COMMIT.to_owned(),
        }
    }
}

impl Default for Producer {
    /// A report written before reports recorded their producer.
    fn default() -> Self {
        Self {
            version: "unknown".to_owned(),
            commit: "unknown".to_owned(),
        }
    }
}
