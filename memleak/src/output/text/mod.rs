//! Reports as text, one file per model.
pub mod classify;
pub mod kmemleak;
pub mod scan;
pub mod trace;
pub mod watch;

/// ` (merged with a, b)`, after the name of a slab cache SLUB merged with the caches named, or
/// nothing when it merged none.
fn merged_with(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (merged with {})", names.join(", "))
    }
}
