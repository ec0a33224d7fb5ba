//! The page `watch --listen` serves at `/`: one self-contained HTML file (no CDN, no network)
//! that reads `/api/interval` and `/api/timeline` every few seconds and draws the verdicts with
//! their stacks, the per-kind totals and the largest sites over time, what was lost, and the
//! flame graph at `/flamegraph.svg`.
pub const PAGE: &str = include_str!("dashboard.html");
