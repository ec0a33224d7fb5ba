//! `memleak watch`: continuous leak detection. Every interval it snapshots each allocation
//! site's outstanding objects, keeps the series (in memory and in the history store) and
//! judges each site from its series (verdict.rs).
pub mod verdict;
