//! Workloads whose kernel allocations are known in advance.
//!
//! `hold-eventfds N`: creates N eventfds (each kmallocs one `struct eventfd_ctx` in
//! do_eventfd), prints `ready`, and holds them until standard input reaches EOF.
//! `wait-then-hold-eventfds N`: reads one line from standard input, then does `hold-eventfds N`.
//! `churn-eventfds N`: creates and closes N eventfds, one at a time, then prints `done`.
//! `hold-bpf-maps N`: creates N 1 MiB BPF array maps (each vmallocs its storage) and N percpu
//! array maps of 16 elements (each element a percpu allocation), prints `ready`, and holds them
//! until standard input reaches EOF.
//! `hold-pipe-pages N`: fills pipes with N pages of data, 16 pages a pipe (each 4 KiB write
//! allocates one page in the pipe's write path), prints `ready`, and holds them until standard
//! input reaches EOF.
//! `churn-pipe-pages N`: the same, but closes the pipes (freeing the pages) before printing
//! `done`.
//! `leave-messages N`: sends N messages to a new System V message queue (each kmallocs a
//! `struct msg_msg` in load_msg), prints the queue id and exits, leaving the queue behind.
//! `clean-messages N`: the same, but removes the queue before exiting.
//!
//! Steady growth, for `memleak classify` (RATE per second for SECONDS, then hold):
//! `grow-eventfds RATE SECONDS`: prints `started`, creates RATE eventfds per second (each one
//! a `struct eventfd_ctx` from kmalloc, a `struct file` from the filp cache, both unreclaimable
//! slab, and a dentry, reclaimable) for SECONDS, prints `done`, and holds them until standard
//! input reaches EOF.
//! `grow-bpf-maps RATE SECONDS`: the same with 1 MiB BPF array maps (each one vmallocs its
//! storage).
//! `grow-pipe-pages RATE SECONDS`: the same with full pipes, 16 pages (64 KiB) each, taken
//! straight from the page allocator and in no meminfo counter.
//!
//! Content similarity, for `memleak scan` and `trace --cache`:
//! `similar-messages HELD MORE`: sends HELD identical 16-byte System V messages (each a 64-byte
//! `struct msg_msg` with the same type, size and text, from alloc_msg), prints `ready`, waits
//! for a line on standard input, sends MORE of the same, prints `sent`, and holds them all
//! until standard input reaches EOF.
//! `dissimilar-messages N`: sends N 16-byte messages of random types and texts: objects in the
//! same cache, from the same call site, unlike the ones above and unlike each other. Prints
//! `sent` and holds them until EOF.
//!
//! Benchmark workloads (`cargo xtask bench`) run for MILLIS milliseconds, then print
//! `ops=<N> seconds=<F>`:
//! `bench-churn MILLIS`: creates and closes eventfds in a loop; one op per eventfd.
//! `bench-mixed MILLIS`: loopback TCP echo round trips of 16 KiB, on a new connection every
//! 256 messages, each followed by a file create/write/delete in a temporary directory; one op
//! per round trip and one per file.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

const MESSAGE_BYTES: usize = 16 * 1024;
const MESSAGES_PER_CONNECTION: u64 = 256;
const FILE_BYTES: usize = 4096;

fn eventfd() -> std::io::Result<libc::c_int> {
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Makes room for `needed` more descriptors; never lowers the limit (grow-pipe-pages calls
/// this once per pipe).
fn raise_fd_limit(needed: u64) {
    if open_files_limit() >= needed + 64 {
        return;
    }
    let limit = libc::rlimit {
        rlim_cur: needed + 64,
        rlim_max: needed + 64,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

/// Runs `one_op` (which returns how many ops it completed) until `window` has passed, then
/// prints the op count and the time it took.
fn bench(window: Duration, mut one_op: impl FnMut() -> Result<u64, String>) -> Result<(), String> {
    let started = Instant::now();
    let mut ops = 0;
    while started.elapsed() < window {
        ops += one_op()?;
    }
    say(&format!(
        "ops={ops} seconds={:.3}",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Echoes every connection's bytes back, one connection at a time, until the listener fails.
fn serve_echo(listener: TcpListener) {
    let mut buffer = vec![0; MESSAGE_BYTES];
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        while let Ok(read @ 1..) = stream.read(&mut buffer) {
            if stream.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
    }
}

fn bench_mixed(window: Duration) -> Result<(), String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|error| format!("listening on 127.0.0.1: {error}"))?;
    let address = listener
        .local_addr()
        .map_err(|error| format!("listener address: {error}"))?;
    std::thread::spawn(move || serve_echo(listener));

    let directory =
        std::env::temp_dir().join(format!("memleak-bench-mixed-{}", std::process::id()));
    fs::create_dir(&directory)
        .map_err(|error| format!("creating {}: {error}", directory.display()))?;
    let message = vec![0x5a; MESSAGE_BYTES];
    let mut echo = vec![0; MESSAGE_BYTES];
    let file_content = vec![0xa5; FILE_BYTES];
    let mut connection: Option<TcpStream> = None;
    let mut round_trips = 0;
    let result = bench(window, || {
        if round_trips % MESSAGES_PER_CONNECTION == 0 {
            connection = None;
        }
        let stream = match &mut connection {
            Some(stream) => stream,
            None => connection.insert(
                TcpStream::connect(address)
                    .map_err(|error| format!("connecting to {address}: {error}"))?,
            ),
        };
        stream
            .write_all(&message)
            .and_then(|()| stream.read_exact(&mut echo))
            .map_err(|error| format!("echo over {address}: {error}"))?;
        round_trips += 1;
        file_cycle(
            &directory.join(format!("file-{round_trips}")),
            &file_content,
        )?;
        Ok(2)
    });
    let _ = fs::remove_dir_all(&directory);
    result
}

fn file_cycle(path: &Path, content: &[u8]) -> Result<(), String> {
    fs::write(path, content)
        .and_then(|()| fs::remove_file(path))
        .map_err(|error| format!("writing and removing {}: {error}", path.display()))
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// Elements of each percpu array map: one percpu allocation each.
const PERCPU_ENTRIES: u32 = 16;

/// Creates a BPF array map. A 1 MiB array (256 values of 4 KiB) has its storage vmalloc'ed
/// (bpf_map_area_alloc); a percpu array allocates each element with __alloc_percpu_gfp.
fn create_bpf_map(map_type: u32, value_size: u32, max_entries: u32) -> Result<libc::c_int, String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = MapCreate {
        map_type,
        key_size: 4,
        value_size,
        max_entries,
        map_flags: 0,
    };
    const BPF_MAP_CREATE: libc::c_long = 0;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            std::ptr::from_ref(&attr),
            size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        return Err(format!(
            "bpf(BPF_MAP_CREATE): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd as libc::c_int)
}

/// Creates a System V message queue and sends it `count` 64-byte messages: each one kmallocs a
/// `struct msg_msg` in load_msg, which outlives this process until the queue is removed.
/// Returns the queue id.
fn fill_message_queue(count: u64) -> Result<libc::c_int, String> {
    let queue = unsafe { libc::msgget(libc::IPC_PRIVATE, libc::IPC_CREAT | 0o600) };
    if queue < 0 {
        return Err(format!("msgget: {}", std::io::Error::last_os_error()));
    }
    #[repr(C)]
    struct Message {
        kind: libc::c_long,
        text: [u8; 64],
    }
    let message = Message {
        kind: 1,
        text: [0x6d; 64],
    };
    for _ in 0..count {
        let sent = unsafe {
            libc::msgsnd(
                queue,
                std::ptr::from_ref(&message).cast(),
                message.text.len(),
                libc::IPC_NOWAIT,
            )
        };
        if sent < 0 {
            let error = std::io::Error::last_os_error();
            let _ = remove_message_queue(queue);
            return Err(format!("msgsnd: {error}"));
        }
    }
    Ok(queue)
}

fn remove_message_queue(queue: libc::c_int) -> Result<(), String> {
    if unsafe { libc::msgctl(queue, libc::IPC_RMID, std::ptr::null_mut()) } < 0 {
        return Err(format!(
            "msgctl IPC_RMID: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Calls `create` RATE times per second for `seconds`, keeping the descriptors it returns,
/// then prints `done` and holds everything until standard input reaches EOF.
fn grow(
    rate: u64,
    seconds: u64,
    mut create: impl FnMut() -> Result<Vec<libc::c_int>, String>,
) -> Result<(), String> {
    let window = Duration::from_secs(seconds);
    let mut held = Vec::new();
    let mut created = 0;
    say("started");
    let started = Instant::now();
    loop {
        let elapsed = started.elapsed().min(window);
        let due = (elapsed.as_secs_f64() * rate as f64) as usize;
        while created < due {
            held.extend(create()?);
            created += 1;
        }
        if elapsed >= window {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    announce_and_hold("done", held)
}

/// The soft limit on open files (RLIMIT_NOFILE), which raise_fd_limit may fail to raise
/// without CAP_SYS_RESOURCE.
fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur
}

/// `grow-eventfds`, `grow-bpf-maps` and `grow-pipe-pages`, with RATE and SECONDS.
fn run_growth(command: &str, rate: &str, seconds: &str) -> Result<(), String> {
    let rate: u64 = rate.parse().map_err(|_| format!("bad rate `{rate}`"))?;
    let seconds: u64 = seconds
        .parse()
        .map_err(|_| format!("bad number of seconds `{seconds}`"))?;
    let descriptors_each = if command == "grow-pipe-pages" { 2 } else { 1 };
    let descriptors = rate
        .saturating_mul(seconds)
        .saturating_mul(descriptors_each);
    raise_fd_limit(descriptors);
    let limit = open_files_limit();
    if descriptors + 64 > limit {
        return Err(format!(
            "{descriptors} descriptors needed but this process may open only {limit}"
        ));
    }
    match command {
        "grow-eventfds" => grow(rate, seconds, || {
            Ok(vec![
                eventfd().map_err(|error| format!("eventfd: {error}"))?,
            ])
        }),
        "grow-bpf-maps" => grow(rate, seconds, || {
            Ok(vec![create_bpf_map(BPF_MAP_TYPE_ARRAY, 4096, 256)?])
        }),
        "grow-pipe-pages" => grow(rate, seconds, || fill_pipes(PAGES_PER_PIPE)),
        other => Err(format!("unknown workload `{other}`")),
    }
}

fn run(args: &[String]) -> Result<(), String> {
    if let [command, held, more] = args
        && command == "similar-messages"
    {
        return similar_messages(held, more);
    }
    if let [command, count] = args
        && command == "dissimilar-messages"
    {
        return dissimilar_messages(count);
    }
    if let [command, rate, seconds] = args
        && command.starts_with("grow-")
    {
        return run_growth(command, rate, seconds);
    }
    let [command, number] = args else {
        return Err(
            "usage: memleak-fixture hold-eventfds|wait-then-hold-eventfds|churn-eventfds|hold-bpf-maps\
             |hold-pipe-pages|churn-pipe-pages|leave-messages|clean-messages N \
             | bench-churn|bench-mixed MILLIS | grow-eventfds|grow-bpf-maps|grow-pipe-pages RATE SECONDS"
                .into(),
        );
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("bad number `{number}`"))?;
    match command.as_str() {
        "hold-eventfds" => {
            raise_fd_limit(number);
            let fds = (0..number)
                .map(|_| eventfd())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| format!("eventfd: {error}"))?;
            announce_and_hold("ready", fds)
        }
        "wait-then-hold-eventfds" => {
            // Allocates nothing until told to, so a tracer filtering on this pid can attach
            // first.
            let mut go = String::new();
            std::io::stdin()
                .read_line(&mut go)
                .map_err(|error| format!("reading stdin: {error}"))?;
            run(&["hold-eventfds".to_owned(), number.to_string()])
        }
        "churn-eventfds" => {
            for _ in 0..number {
                let fd = eventfd().map_err(|error| format!("eventfd: {error}"))?;
                unsafe { libc::close(fd) };
            }
            say("done");
            Ok(())
        }
        "bench-churn" => bench(Duration::from_millis(number), || {
            let fd = eventfd().map_err(|error| format!("eventfd: {error}"))?;
            unsafe { libc::close(fd) };
            Ok(1)
        }),
        "bench-mixed" => bench_mixed(Duration::from_millis(number)),
        "hold-bpf-maps" => {
            let maps = (0..number)
                .map(|_| {
                    Ok([
                        create_bpf_map(BPF_MAP_TYPE_ARRAY, 4096, 256)?,
                        create_bpf_map(BPF_MAP_TYPE_PERCPU_ARRAY, 64, PERCPU_ENTRIES)?,
                    ])
                })
                .collect::<Result<Vec<_>, String>>()?;
            announce_and_hold("ready", maps.into_iter().flatten())
        }
        "hold-pipe-pages" => announce_and_hold("ready", fill_pipes(number)?),
        "churn-pipe-pages" => {
            for fd in fill_pipes(number)? {
                unsafe { libc::close(fd) };
            }
            say("done");
            Ok(())
        }
        "leave-messages" => {
            let queue = fill_message_queue(number)?;
            say(&queue.to_string());
            Ok(())
        }
        "clean-messages" => {
            let queue = fill_message_queue(number)?;
            remove_message_queue(queue)
        }
        other => Err(format!("unknown workload `{other}`")),
    }
}

/// Pages a pipe holds by default (`pipe-max-size` aside): its 16 buffers.
const PAGES_PER_PIPE: u64 = 16;

/// Writes `pages` whole pages into as many pipes as they need; returns both ends of each.
fn fill_pipes(pages: u64) -> Result<Vec<libc::c_int>, String> {
    raise_fd_limit(2 * pages.div_ceil(PAGES_PER_PIPE));
    let page = [0x5au8; 4096];
    let mut fds = Vec::new();
    let mut written = 0;
    while written < pages {
        let mut ends = [0; 2];
        if unsafe { libc::pipe(ends.as_mut_ptr()) } != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        fds.extend(ends);
        for _ in 0..PAGES_PER_PIPE.min(pages - written) {
            let wrote = unsafe { libc::write(ends[1], page.as_ptr().cast(), page.len()) };
            if wrote != page.len() as isize {
                return Err(format!("pipe write: {}", std::io::Error::last_os_error()));
            }
            written += 1;
        }
    }
    Ok(fds)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("memleak-fixture: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The text of every `similar-messages` message: with the type and size, it makes each
/// `struct msg_msg` alike and unlike anything else in the cache.
const SIMILAR_TEXT: [u8; 16] = *b"memleak-scan-fix";
const SIMILAR_TYPE: libc::c_long = 0x5ca7;

fn parse_count(text: &str) -> Result<u64, String> {
    text.parse().map_err(|_| format!("bad number `{text}`"))
}

/// System V message queues, a new one whenever the last is full (each holds msgmnb bytes
/// of text, 16 KiB by default), all removed on drop.
struct MessageQueues {
    queues: Vec<libc::c_int>,
}

impl MessageQueues {
    fn new() -> Self {
        Self { queues: Vec::new() }
    }

    /// Sends a message as msgsnd takes it: the type, then the text.
    fn send(&mut self, kind: libc::c_long, text: &[u8]) -> Result<(), String> {
        let mut message = kind.to_ne_bytes().to_vec();
        message.extend_from_slice(text);
        loop {
            if let Some(&queue) = self.queues.last() {
                let sent = unsafe {
                    libc::msgsnd(queue, message.as_ptr().cast(), text.len(), libc::IPC_NOWAIT)
                };
                if sent == 0 {
                    return Ok(());
                }
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::EAGAIN) {
                    return Err(format!("msgsnd: {error}"));
                }
            }
            let queue = unsafe { libc::msgget(libc::IPC_PRIVATE, libc::IPC_CREAT | 0o600) };
            if queue < 0 {
                return Err(format!("msgget: {}", std::io::Error::last_os_error()));
            }
            self.queues.push(queue);
        }
    }
}

impl Drop for MessageQueues {
    fn drop(&mut self) {
        for &queue in &self.queues {
            let _ = remove_message_queue(queue);
        }
    }
}

fn hold_until_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// Prints `line`, holds `fds` until standard input reaches EOF, then closes them.
fn announce_and_hold(line: &str, fds: impl IntoIterator<Item = libc::c_int>) -> Result<(), String> {
    say(line);
    hold_until_eof();
    for fd in fds {
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn similar_messages(held: &str, more: &str) -> Result<(), String> {
    let (held, more) = (parse_count(held)?, parse_count(more)?);
    let mut queues = MessageQueues::new();
    for _ in 0..held {
        queues.send(SIMILAR_TYPE, &SIMILAR_TEXT)?;
    }
    say("ready");
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .map_err(|error| format!("reading stdin: {error}"))?;
    for _ in 0..more {
        queues.send(SIMILAR_TYPE, &SIMILAR_TEXT)?;
    }
    say("sent");
    hold_until_eof();
    Ok(())
}

fn dissimilar_messages(count: &str) -> Result<(), String> {
    let count = parse_count(count)?;
    let mut queues = MessageQueues::new();
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    let mut random = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..count {
        let text: Vec<u8> = [random(), random()]
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        // Message types must be positive.
        let kind = (random() >> 33) as libc::c_long + 1;
        queues.send(kind, &text)?;
    }
    say("sent");
    hold_until_eof();
    Ok(())
}
