//! `memleak watch --listen`: a read-only HTTP endpoint on the watch's runtime. `/` is the
//! dashboard page (embedded in the binary), `/metrics` the last interval for Prometheus,
//! `/api/interval` the same interval as JSON, `/api/timeline` the recent totals the page
//! draws, `/profile` what is outstanding now as a gzipped pprof profile and `/flamegraph.svg`
//! as a flame graph. Nothing is taken from a request but its path: no file names, no commands.
//! Connections are bounded in number and closed when idle or old, so that slow or stuck
//! clients cannot hold the watch's runtime.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use memleak::{
    output::{
        self, dashboard, profile,
        prometheus::{self, ProcessUsage, Totals},
    },
    trace::report::Entry,
    watch::{Interval, timeline::Timeline},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// Connections served at once; further clients wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection with no bytes moving for this long is closed (a client that sends a request
/// slowly, or never reads the answer).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, busy or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

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
    /// The recent intervals' totals, for the dashboard's charts.
    pub timeline: Timeline,
}

pub type Shared = Arc<Mutex<Exported>>;

/// Binds `address` (before anything is attached, so that a bad or busy address fails the watch
/// at once) and returns the server, to be spawned on the watch's runtime.
pub async fn bind(
    address: SocketAddr,
    shared: Shared,
) -> Result<impl Future<Output = std::io::Result<()>>> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("--listen {address}"))?;
    let listener = BoundedListener {
        listener,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    let metrics = from_exported(&shared, |exported| {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            prometheus::render(exported.last.as_ref(), &exported.totals, &process_usage()),
        )
            .into_response()
    });
    let profile = from_exported(&shared, |exported| {
        answer(
            "application/octet-stream",
            profile::pprof(&exported.entries, source(exported)),
        )
    });
    let flame_graph = from_exported(&shared, |exported| {
        answer(
            "image/svg+xml",
            profile::svg(&exported.entries, source(exported)),
        )
    });
    let timeline = from_exported(&shared, |exported| {
        json(output::json::render_json_line(&exported.timeline))
    });
    let interval = from_exported(&shared, |exported| {
        json(match &exported.last {
            Some(interval) => output::json::render_json_line(interval),
            None => "null\n".to_owned(),
        })
    });
    let page = || async {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            dashboard::PAGE,
        )
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/interval", get(interval))
        .route("/api/timeline", get(timeline))
        .route("/profile", get(profile))
        .route("/flamegraph.svg", get(flame_graph));
    Ok(async move { axum::serve(listener, app).await })
}

/// A handler answering from the exported state, locked while `respond` runs (never across an
/// await).
fn from_exported<Respond>(
    shared: &Shared,
    respond: Respond,
) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + Sync + 'static
where
    Respond: Fn(&Exported) -> Response + Clone + Send + Sync + 'static,
{
    let shared = shared.clone();
    move || {
        let exported = shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::future::ready(respond(&exported))
    }
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// What the profiles of the last snapshot say of their origin.
pub fn source(exported: &Exported) -> profile::Source<'_> {
    profile::Source {
        kernel: &exported.kernel,
        duration_ms: exported.last.as_ref().map_or(0, |last| last.elapsed_ms),
        sample_rate: exported.scale,
    }
}

/// A drawn profile, or the reason it could not be drawn.
fn answer<T: IntoResponse>(content_type: &'static str, body: Result<T>) -> Response {
    match body {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}\n")).into_response(),
    }
}

/// Accepts a connection only while fewer than MAX_CONNECTIONS are open.
struct BoundedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, address)) => {
                    let now = Instant::now();
                    return (
                        BoundedConnection {
                            stream,
                            _slot: slot,
                            idle: Box::pin(tokio::time::sleep_until(now + IDLE_TIMEOUT)),
                            end_of_life: Box::pin(tokio::time::sleep_until(
                                now + CONNECTION_LIFETIME,
                            )),
                        },
                        address,
                    );
                }
                // Out of descriptors or a connection reset before it was taken: wait a little
                // rather than spin.
                Err(error) => {
                    log::warn!("--listen: accepting a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A client's connection: its slot is given back when it is dropped, and reads and writes fail
/// once it has been idle for IDLE_TIMEOUT or open for CONNECTION_LIFETIME (hyper then closes
/// it).
struct BoundedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
    end_of_life: Pin<Box<Sleep>>,
}

impl BoundedConnection {
    /// Passes on a finished read or write (and restarts the idle clock), or fails a pending one
    /// whose time is up.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(result) => {
                self.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(result)
            }
            Poll::Pending => {
                if self.idle.as_mut().poll(cx).is_ready()
                    || self.end_of_life.as_mut().poll(cx).is_ready()
                {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client was idle or connected too long",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    /// Runs a read or write on the stream unless the connection is past its lifetime, which
    /// a client that keeps it busy would otherwise never reach.
    fn io<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.end_of_life.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let result = op(Pin::new(&mut self.stream), cx);
        self.timed(cx, result)
    }
}

impl AsyncRead for BoundedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io(cx, |stream, cx| stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for BoundedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_flush(cx);
        self.timed(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io(cx, |stream, cx| stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
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
