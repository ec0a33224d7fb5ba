//! `memleak watch --listen`: a read-only HTTP endpoint on the watch's runtime. `/metrics` is the
//! last interval for Prometheus, `/api/interval` the same interval as JSON, `/profile` what is
//! outstanding now as a gzipped pprof profile. Nothing is taken from a request but its path: no
//! file names, no commands.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use memleak::{
    output::{
        self, profile,
        prometheus::{self, ProcessUsage, Totals},
    },
    trace::report::Entry,
    watch::Interval,
};

/// What the endpoints serve, updated by the watch after each interval.
#[derive(Default)]
pub struct Exported {
    pub last: Option<Interval>,
    pub totals: Totals,
    /// Every site of the last snapshot, with its stacks.
    pub entries: Vec<Entry>,
    pub kernel: String,
    /// What one tracked object stands for (sample rate and duty cycle).
    pub scale: u32,
}

pub type Shared = Arc<Mutex<Exported>>;

/// Binds `address` (before anything is attached, so that a bad or busy address fails the watch
/// at once) and returns the server, to be spawned on the watch's runtime.
pub async fn bind(
    address: SocketAddr,
    shared: Shared,
) -> Result<impl Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--listen {address}"))?;
    let metrics = {
        let shared = shared.clone();
        move || async move {
            let page = {
                let exported = shared
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                prometheus::render(exported.last.as_ref(), &exported.totals, &process_usage())
            };
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                page,
            )
        }
    };
    let profile = {
        let shared = shared.clone();
        move || async move {
            let exported = shared
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let source = profile::Source {
                kernel: &exported.kernel,
                duration_ms: exported.last.as_ref().map_or(0, |last| last.elapsed_ms),
                sample_rate: exported.scale,
            };
            match profile::pprof(&exported.entries, source) {
                Ok(bytes) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/octet-stream")],
                    bytes,
                )
                    .into_response(),
                Err(error) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}\n")).into_response()
                }
            }
        }
    };
    let interval = move || async move {
        let body = {
            let exported = shared
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match &exported.last {
                Some(interval) => output::json::render_json_line(interval),
                None => "null\n".to_owned(),
            }
        };
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/interval", get(interval))
        .route("/profile", get(profile));
    Ok(async move { axum::serve(listener, app).await })
}

/// The watch's own CPU time and resident memory, from /proc/self; zeros where unreadable.
fn process_usage() -> ProcessUsage {
    // SAFETY: sysconf has no memory effects.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are the 12th and 13th of them (14th and 15th of the line).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    let cpu_ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let resident_pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    ProcessUsage {
        cpu_seconds: cpu_ticks as f64 / ticks.max(1) as f64,
        resident_bytes: resident_pages * page.max(0) as u64,
    }
}
