//! Workloads whose kernel allocations are known in advance.
//!
//! `hold-eventfds N`: creates N eventfds (each kmallocs one `struct eventfd_ctx` in
//! do_eventfd), prints `ready`, and holds them until standard input reaches EOF.
//! `wait-then-WORKLOAD N` (such as `wait-then-hold-eventfds N`): reads one line from standard
//! input, then does `WORKLOAD N`.
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
//! `leave-file-locks N`: creates N files in the new directory $MEMLEAK_LOCKS_DIR and takes a
//! POSIX lock on each (the first lock on an inode kmem_cache_allocs its `struct
//! file_lock_context` in locks_get_lock_context), closes them, prints the directory and exits:
//! the locks go with the files, the contexts stay with the inodes until they are evicted.
//! `halve-file-locks N`: the same, but removes every other file before exiting, which evicts
//! its inode and frees its context (N/2 are left).
//! `hold-messages N`: sends N 16-byte messages (each a 64-byte `struct msg_msg` kmalloc'ed in
//! load_msg) to as many System V message queues as they need, prints `ready`, and holds them
//! until standard input reaches EOF (no open files: more objects than RLIMIT_NOFILE allows
//! eventfds).
//!
//! Free-path churn, for the liveness check (every object these allocate is freed before they
//! print `done`, but through kernel paths that fire no per-object free tracepoint on 6.18:
//! kfree_rcu batches, bulk frees, slab sheaves). Each names its task after itself with
//! prctl(PR_SET_NAME), then does its work in a child process, which inherits the name from its
//! start (as do its own children), so reports attribute entries by `processes[].comm`:
//! `churn-epolls N`: epoll_create1 and close, N times (a `struct eventpoll`, kmalloc-256, freed
//! with kfree_rcu).
//! `churn-processes N`: N child processes, one at a time, each mmapping and touching 32
//! anonymous regions, then munmapping them, before it exits (maple nodes and VMAs, freed through
//! sheaves and kfree_rcu).
//! `churn-threads N`: N threads, one at a time, each spawned and joined (its stack is mmapped
//! and munmapped: VMAs and maple nodes).
//! `churn-timerfds N`: timerfd_create, armed, and closed, N times (a `struct timerfd_ctx`,
//! freed with kfree_rcu).
//! `churn-tcp N`: N loopback TCP connections, each connected, accepted and closed with a reset
//! (SO_LINGER 0), so no TIME_WAIT socket outlives it.
//! `churn-udp N`, `churn-unix N`: N UDP sockets bound to loopback / N unix socketpairs, each
//! sending one datagram, then closed.
//! `churn-io-uring N`: io_uring_setup (8 entries) and close, N times.
//! `churn-bpf-hash N`: N BPF hash maps of 64 entries allocated on update (BPF_F_NO_PREALLOC),
//! each filled, emptied and closed.
//! `churn-inotify N`: inotify_init1 with a watch on /tmp, and close, N times.
//! `churn-mount-ns N`: N child processes, one at a time, each unsharing its mount namespace
//! (copying the mount tree) before it exits.
//! `churn-pidfds N`: N child processes, each opened as a pidfd, reaped, and closed.
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
//! `grow-file-locks RATE SECONDS`: the same with files in the new directory $MEMLEAK_LOCKS_DIR,
//! each locked once and closed (a `struct file_lock_context` each, as `leave-file-locks`);
//! nothing is held open.
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
//! `bench-build MILLIS`: compiles a small C file with gcc-12 -O2, over and over, like a build:
//! fork/exec of a compiler process tree (cc1, as), page faults, short-lived mappings and files;
//! one op per compile.
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

/// The compiler `bench-build` runs (`cargo xtask bench` installs it).
const BUILD_COMPILER: &str = "gcc-12";

/// What `bench-build` compiles: a few headers and functions, about 20 ms of gcc.
const BUILD_UNIT: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct entry { char name[32]; unsigned long count; struct entry *next; };

static unsigned long hash(const char *text)
{
	unsigned long value = 5381;
	while (*text)
		value = value * 33 + (unsigned char)*text++;
	return value;
}

struct entry *insert(struct entry **table, unsigned int size, const char *name)
{
	struct entry **slot = &table[hash(name) % size];
	for (struct entry *entry = *slot; entry; entry = entry->next)
		if (!strcmp(entry->name, name)) {
			entry->count++;
			return entry;
		}
	struct entry *entry = calloc(1, sizeof(*entry));
	if (!entry)
		return NULL;
	snprintf(entry->name, sizeof(entry->name), "%s", name);
	entry->count = 1;
	entry->next = *slot;
	*slot = entry;
	return entry;
}
"#;

fn bench_build(window: Duration) -> Result<(), String> {
    let directory =
        std::env::temp_dir().join(format!("memleak-bench-build-{}", std::process::id()));
    fs::create_dir_all(&directory)
        .map_err(|error| format!("creating {}: {error}", directory.display()))?;
    fs::write(directory.join("unit.c"), BUILD_UNIT)
        .map_err(|error| format!("writing unit.c: {error}"))?;
    let result = bench(window, || {
        let status = std::process::Command::new(BUILD_COMPILER)
            .args(["-O2", "-c", "unit.c", "-o", "unit.o"])
            .current_dir(&directory)
            .status()
            .map_err(|error| format!("running {BUILD_COMPILER}: {error}"))?;
        if !status.success() {
            return Err(format!("{BUILD_COMPILER} failed ({status})"));
        }
        Ok(1)
    });
    let _ = fs::remove_dir_all(&directory);
    result
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
    create_bpf_map_with_flags(map_type, value_size, max_entries, 0)
}

fn create_bpf_map_with_flags(
    map_type: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> Result<libc::c_int, String> {
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
        map_flags,
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

/// `grow-eventfds`, `grow-bpf-maps`, `grow-pipe-pages` and `grow-file-locks`, with RATE and
/// SECONDS.
fn run_growth(command: &str, rate: &str, seconds: &str) -> Result<(), String> {
    let rate: u64 = rate.parse().map_err(|_| format!("bad rate `{rate}`"))?;
    let seconds: u64 = seconds
        .parse()
        .map_err(|_| format!("bad number of seconds `{seconds}`"))?;
    let descriptors_each = match command {
        "grow-pipe-pages" => 2,
        "grow-file-locks" => 0,
        _ => 1,
    };
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
        "grow-file-locks" => {
            let directory = lock_files(0)?;
            let mut index = 0;
            grow(rate, seconds, || {
                index += 1;
                lock_file(&directory, index).map(|()| Vec::new())
            })
        }
        other => Err(format!("unknown workload `{other}`")),
    }
}

/// The workload `memleak watch` must judge: for SECONDS, a leak of RATE eventfds a second
/// (never closed: `struct eventfd_ctx` from do_eventfd), among a pool of 300 pipes that fills
/// over its first 3 seconds and then replaces its oldest pipe every 10 ms (each lives about
/// 3 s: alloc_pipe_info's objects grow, level off and never age), and epoll instances
/// created and closed all the time (churn, freed through RCU). Prints `ready` first.
fn watch_mix(rate: &str, seconds: &str) -> Result<(), String> {
    let rate: u64 = rate.parse().map_err(|_| format!("bad rate `{rate}`"))?;
    let seconds: u64 = seconds
        .parse()
        .map_err(|_| format!("bad number of seconds `{seconds}`"))?;
    raise_fd_limit(rate * seconds + 2 * POOL_PIPES + 64);
    const POOL_PIPES: u64 = 300;
    const STEP: Duration = Duration::from_millis(10);
    let mut leaked = Vec::new();
    let mut pool: std::collections::VecDeque<[libc::c_int; 2]> = std::collections::VecDeque::new();
    say("ready");
    let started = Instant::now();
    let mut next_leak = Duration::ZERO;
    let mut step = 0u32;
    while started.elapsed() < Duration::from_secs(seconds) {
        while started.elapsed() >= next_leak && rate > 0 {
            leaked.push(eventfd().map_err(|error| format!("eventfd: {error}"))?);
            next_leak += Duration::from_secs(1) / rate as u32;
        }
        let mut ends = [0; 2];
        if unsafe { libc::pipe(ends.as_mut_ptr()) } != 0 {
            return Err(last_error("pipe"));
        }
        pool.push_back(ends);
        if pool.len() as u64 > POOL_PIPES
            && let Some(oldest) = pool.pop_front()
        {
            oldest.iter().for_each(|&fd| unsafe {
                libc::close(fd);
            });
        }
        epoll_cycle()?;
        step += 1;
        let due = STEP * step;
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    std::hint::black_box(&leaked);
    say("done");
    Ok(())
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
    if let [command, rate, seconds] = args
        && command == "watch-mix"
    {
        return watch_mix(rate, seconds);
    }
    let [command, number] = args else {
        return Err(
            "usage: memleak-fixture [wait-then-]hold-eventfds|churn-eventfds|hold-bpf-maps\
             |hold-pipe-pages|churn-pipe-pages|leave-messages|clean-messages|hold-messages\
             |leave-file-locks|halve-file-locks N \
             | churn-epolls|churn-processes|churn-threads|churn-timerfds|churn-tcp|churn-udp\
             |churn-unix|churn-io-uring|churn-bpf-hash|churn-inotify|churn-mount-ns|churn-pidfds N \
             | bench-churn|bench-mixed|bench-build MILLIS \
             | grow-eventfds|grow-bpf-maps|grow-pipe-pages|grow-file-locks|watch-mix RATE SECONDS"
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
        waiting if waiting.starts_with("wait-then-") => {
            // Allocates nothing until told to, so a tracer filtering on this pid (or name) can
            // attach first.
            let mut go = String::new();
            std::io::stdin()
                .read_line(&mut go)
                .map_err(|error| format!("reading stdin: {error}"))?;
            let workload = &waiting["wait-then-".len()..];
            run(&[workload.to_owned(), number.to_string()])
        }
        "churn-eventfds" => {
            for _ in 0..number {
                let fd = eventfd().map_err(|error| format!("eventfd: {error}"))?;
                unsafe { libc::close(fd) };
            }
            say("done");
            Ok(())
        }
        churn if churn.starts_with("churn-") && churn != "churn-pipe-pages" => {
            free_path_churn(churn, number)
        }
        "bench-churn" => bench(Duration::from_millis(number), || {
            let fd = eventfd().map_err(|error| format!("eventfd: {error}"))?;
            unsafe { libc::close(fd) };
            Ok(1)
        }),
        "bench-mixed" => bench_mixed(Duration::from_millis(number)),
        "bench-build" => bench_build(Duration::from_millis(number)),
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
        "hold-messages" => {
            // Limited by the message queues (msgmni), not by open files like eventfds.
            let mut queues = MessageQueues::new();
            for _ in 0..number {
                queues.send(1, &SIMILAR_TEXT)?;
            }
            say("ready");
            hold_until_eof();
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
        "leave-file-locks" => {
            let directory = lock_files(number)?;
            say(&directory.display().to_string());
            Ok(())
        }
        "halve-file-locks" => {
            let directory = lock_files(number)?;
            for index in (0..number).step_by(2) {
                let path = directory.join(index.to_string());
                std::fs::remove_file(&path)
                    .map_err(|error| format!("removing {}: {error}", path.display()))?;
            }
            say(&directory.display().to_string());
            Ok(())
        }
        other => Err(format!("unknown workload `{other}`")),
    }
}

/// Creates `count` files in the new directory $MEMLEAK_LOCKS_DIR and takes a POSIX write lock
/// on each, then closes them; returns the directory.
fn lock_files(count: u64) -> Result<std::path::PathBuf, String> {
    let directory = std::path::PathBuf::from(
        std::env::var_os("MEMLEAK_LOCKS_DIR").ok_or("MEMLEAK_LOCKS_DIR names no directory")?,
    );
    std::fs::create_dir(&directory)
        .map_err(|error| format!("creating {}: {error}", directory.display()))?;
    lock_files_in(&directory, count).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&directory);
    })?;
    Ok(directory)
}

fn lock_files_in(directory: &std::path::Path, count: u64) -> Result<(), String> {
    (0..count).try_for_each(|index| lock_file(directory, index))
}

/// Creates the file `index` in `directory`, takes a POSIX write lock on it and closes it: the
/// lock goes, the inode's lock context stays.
fn lock_file(directory: &std::path::Path, index: u64) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let path = directory.join(index.to_string());
    let file = std::fs::File::create(&path)
        .map_err(|error| format!("creating {}: {error}", path.display()))?;
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } != 0 {
        return Err(format!(
            "locking {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
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

/// Names this task (and the children it forks) `name`, as `/proc/PID/comm` and the kernel's
/// `current->comm` show it; the kernel keeps the first 15 bytes.
fn set_task_name(name: &str) -> Result<(), String> {
    let mut bytes = [0u8; 16];
    for (to, from) in bytes.iter_mut().zip(name.bytes().take(15)) {
        *to = from;
    }
    if unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) } != 0 {
        return Err(format!(
            "prctl(PR_SET_NAME): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A syscall's descriptor result, or the error it set.
fn fd_or_error(fd: libc::c_long, what: &str) -> Result<libc::c_int, String> {
    if fd < 0 {
        return Err(last_error(what));
    }
    Ok(fd as libc::c_int)
}

/// The `churn-*` workloads that free through RCU, bulk or sheaf paths: names the task after the
/// workload, runs one cycle `count` times (every cycle frees all it allocated), prints `done`.
fn free_path_churn(workload: &str, count: u64) -> Result<(), String> {
    let cycle: fn() -> Result<(), String> = match workload {
        "churn-epolls" => epoll_cycle,
        "churn-processes" => || run_child(touch_anonymous_regions),
        "churn-threads" => || {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(|| std::hint::black_box(0))
                .map_err(|error| format!("spawning a thread: {error}"))?
                .join()
                .map(drop)
                .map_err(|_| "a thread panicked".to_owned())
        },
        "churn-timerfds" => timerfd_cycle,
        "churn-tcp" => tcp_cycle,
        "churn-udp" => udp_cycle,
        "churn-unix" => unix_cycle,
        "churn-io-uring" => io_uring_cycle,
        "churn-bpf-hash" => bpf_hash_cycle,
        "churn-inotify" => inotify_cycle,
        "churn-mount-ns" => || run_child(|| unsafe { libc::unshare(libc::CLONE_NEWNS) } == 0),
        "churn-pidfds" => pidfd_cycle,
        other => return Err(format!("unknown workload `{other}`")),
    };
    set_task_name(workload)?;
    // The work runs in a child: memleak names a process by its task name at the first
    // allocation it sees from it, which for this process came before prctl, at exec.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_error("fork"));
    }
    if pid == 0 {
        let status = match (0..count).try_for_each(|_| cycle()) {
            Ok(()) => 0,
            Err(message) => {
                eprintln!("memleak-fixture: {message}");
                1
            }
        };
        unsafe { libc::_exit(status) };
    }
    reap(pid)?;
    say("done");
    Ok(())
}

fn epoll_cycle() -> Result<(), String> {
    let fd = fd_or_error(
        unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }.into(),
        "epoll_create1",
    )?;
    unsafe { libc::close(fd) };
    Ok(())
}

/// Forks a child that runs `work` (async-signal-safe calls only: this process may have
/// threads) and exits with its verdict; waits for it.
fn run_child(work: fn() -> bool) -> Result<(), String> {
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_error("fork"));
    }
    if pid == 0 {
        let status = if work() { 0 } else { 1 };
        unsafe { libc::_exit(status) };
    }
    reap(pid)
}

fn reap(pid: libc::pid_t) -> Result<(), String> {
    let mut status = 0;
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(last_error("waitpid"));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("child {pid} failed: wait status {status:#x}"));
    }
    Ok(())
}

/// Anonymous regions each `churn-processes` child maps, and the pages of each. Neighbours get
/// different protections, so that each is a VMA of its own (and a maple tree entry).
const CHILD_REGIONS: usize = 32;
const CHILD_REGION_PAGES: usize = 4;

/// In a forked child: maps CHILD_REGIONS regions, writes a byte to each of their pages, then
/// unmaps them all.
fn touch_anonymous_regions() -> bool {
    let length = CHILD_REGION_PAGES * 4096;
    let mut regions = [std::ptr::null_mut(); CHILD_REGIONS];
    for (index, region) in regions.iter_mut().enumerate() {
        let protection = if index % 2 == 0 {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC
        };
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                protection,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        for page in 0..CHILD_REGION_PAGES {
            unsafe { mapped.cast::<u8>().add(page * 4096).write_volatile(1) };
        }
        *region = mapped;
    }
    regions
        .iter()
        .all(|&region| unsafe { libc::munmap(region, length) } == 0)
}

fn timerfd_cycle() -> Result<(), String> {
    let fd = fd_or_error(
        unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) }.into(),
        "timerfd_create",
    )?;
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: 3600,
            tv_nsec: 0,
        },
    };
    let armed = unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) };
    unsafe { libc::close(fd) };
    if armed != 0 {
        return Err(last_error("timerfd_settime"));
    }
    Ok(())
}

fn set_socket_option<T>(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: &T) {
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
}

/// One loopback TCP connection: listen, connect, accept, then close all three with a reset
/// (linger 0) so that no TIME_WAIT socket is left behind.
fn tcp_cycle() -> Result<(), String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|error| format!("listening on 127.0.0.1: {error}"))?;
    let address = listener
        .local_addr()
        .map_err(|error| format!("listener address: {error}"))?;
    let client =
        TcpStream::connect(address).map_err(|error| format!("connecting to {address}: {error}"))?;
    let (server, _) = listener
        .accept()
        .map_err(|error| format!("accepting on {address}: {error}"))?;
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    use std::os::fd::AsRawFd as _;
    for stream in [&client, &server] {
        set_socket_option(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &reset,
        );
    }
    drop((client, server, listener));
    Ok(())
}

fn udp_cycle() -> Result<(), String> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|error| format!("binding a UDP socket: {error}"))?;
    let address = socket
        .local_addr()
        .map_err(|error| format!("UDP address: {error}"))?;
    socket
        .send_to(b"memleak", address)
        .map_err(|error| format!("sending to {address}: {error}"))?;
    let mut buffer = [0; 16];
    socket
        .recv(&mut buffer)
        .map_err(|error| format!("receiving on {address}: {error}"))?;
    Ok(())
}

fn unix_cycle() -> Result<(), String> {
    let (one, other) =
        std::os::unix::net::UnixDatagram::pair().map_err(|error| format!("socketpair: {error}"))?;
    one.send(b"memleak")
        .map_err(|error| format!("unix send: {error}"))?;
    let mut buffer = [0; 16];
    other
        .recv(&mut buffer)
        .map_err(|error| format!("unix recv: {error}"))?;
    Ok(())
}

fn io_uring_cycle() -> Result<(), String> {
    // struct io_uring_params: 120 bytes, all zero but what the kernel fills in.
    let mut params = [0u8; 120];
    let fd = fd_or_error(
        unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_mut_ptr()) },
        "io_uring_setup",
    )?;
    unsafe { libc::close(fd) };
    Ok(())
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const HASH_ENTRIES: u32 = 64;

/// A BPF hash map: created, filled with HASH_ENTRIES elements, emptied, closed.
fn bpf_hash_cycle() -> Result<(), String> {
    #[repr(C)]
    struct ElementAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    /// Elements allocated on update and freed on delete, instead of preallocated with the map.
    const BPF_F_NO_PREALLOC: u32 = 1;
    let map = create_bpf_map_with_flags(BPF_MAP_TYPE_HASH, 8, HASH_ENTRIES, BPF_F_NO_PREALLOC)?;
    let value = 0u64;
    let mut result = Ok(());
    'elements: for command in [BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM] {
        for key in 0..HASH_ENTRIES {
            let attr = ElementAttr {
                map_fd: map as u32,
                _pad: 0,
                key: std::ptr::from_ref(&key) as u64,
                // Deleting takes no value: the field must be zero.
                value: if command == BPF_MAP_UPDATE_ELEM {
                    std::ptr::from_ref(&value) as u64
                } else {
                    0
                },
                flags: 0,
            };
            let done = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    command,
                    std::ptr::from_ref(&attr),
                    size_of::<ElementAttr>(),
                )
            };
            if done != 0 {
                result = Err(last_error("bpf map element"));
                break 'elements;
            }
        }
    }
    unsafe { libc::close(map) };
    result
}

fn inotify_cycle() -> Result<(), String> {
    let fd = fd_or_error(
        unsafe { libc::inotify_init1(libc::IN_CLOEXEC) }.into(),
        "inotify_init1",
    )?;
    let watched = unsafe { libc::inotify_add_watch(fd, c"/tmp".as_ptr(), libc::IN_CREATE) };
    unsafe { libc::close(fd) };
    if watched < 0 {
        return Err(last_error("inotify_add_watch"));
    }
    Ok(())
}

fn pidfd_cycle() -> Result<(), String> {
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_error("fork"));
    }
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let reaped = reap(pid);
    if pidfd >= 0 {
        unsafe { libc::close(pidfd as libc::c_int) };
    }
    fd_or_error(pidfd, "pidfd_open")?;
    reaped
}
