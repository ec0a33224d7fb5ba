//! End-to-end: `memleak run --user` and `memleak trace --user --pid` on a C program and a
//! Rust program whose leaks are known by construction (tests/user/leaky_user.c: through
//! malloc, calloc, realloc, posix_memalign, in a thread and in a shared library;
//! tests/user/leaky_user.rs: boxes, vectors, a vector grown by realloc), with valgrind's
//! definitely-lost records as the oracle: same functions, same counts, same bytes, same lines.
use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io::Write as _,
    ops::Deref,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use memleak::trace::report::{Entry, Report, UserStack};
use memleak_tests::{
    end_to_end, entries_at, finish_tracer, memleak_binary, share_of, start_attached, start_program,
};
use tempfile::TempDir;

/// Each leak of the C fixture: its function, blocks and bytes.
const C_LEAKS: [(&str, u64, u64); 6] = [
    ("leak_malloc", 10, 1000),
    ("leak_calloc", 7, 672),
    ("leak_realloc", 5, 20_000),
    ("leak_aligned", 3, 768),
    ("thread_main", 4, 192),
    ("library_leak", 6, 432),
];
/// The C fixture's leaks valgrind does not see: it follows the heap, not `mmap`.
const C_MAPPED_LEAKS: [(&str, u64, u64); 1] = [("leak_mapping", 2, 2 * 64 * 1024)];
const C_SOURCES: [&str; 2] = ["leaky_user.c:", "leaky_user_lib.c:"];

/// Each leak of the Rust fixture. leak_grown's block reaches malloc through Rust's vector
/// growth (alloc::raw_vec), which memleak looks through to its caller, as valgrind does.
const RUST_LEAKS: [(&str, u64, u64); 3] = [
    ("leaky_user::leak_boxes", 8, 800),
    ("leaky_user::leak_vecs", 5, 400),
    ("leaky_user::leak_grown", 1, 1024),
];
const RUST_SOURCES: [&str; 1] = ["leaky_user.rs:"];

/// Entries allowed beside a fixture's own: the language runtime's blocks that it never frees at
/// exit (a thread's TLS vector, the stdio buffer, Rust's thread info). valgrind frees glibc's
/// first (`__libc_freeres`) and counts the others as reachable, so its oracle lists none.
const MAX_RUNTIME_ENTRIES: usize = 2;

/// Per function: blocks, bytes, and the `file:line` of the allocating call.
type Leaks = BTreeMap<String, (u64, u64, String)>;

/// A fresh directory for one test's builds, removed when it is dropped.
fn build_dir(name: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("memleak-user-{name}-"))
        .tempdir()
        .context("creating a build directory")
}

/// A program built for a test, with the directory holding it (and the libraries it loads by
/// rpath): both go when the test is done with it.
struct Built {
    program: PathBuf,
    _dir: TempDir,
}

impl Built {
    fn new(dir: TempDir, name: &str) -> Self {
        Self {
            program: dir.path().join(name),
            _dir: dir,
        }
    }
}

impl AsRef<OsStr> for Built {
    fn as_ref(&self) -> &OsStr {
        self.program.as_os_str()
    }
}

impl Deref for Built {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.program
    }
}

/// Builds the Rust fixture with the workspace's pinned rustc, optimized, with frame pointers.
fn build_rust_fixture() -> Result<Built> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("no workspace")?;
    let program = Built::new(build_dir("rust")?, "leaky_user_rs");
    let output = Command::new("rustc")
        .args(["-O", "-g", "-C", "force-frame-pointers=yes", "-o"])
        .arg(&program)
        .arg(workspace.join("tests/user/leaky_user.rs"))
        .current_dir(workspace)
        .output()
        .context("running rustc")?;
    ensure!(
        output.status.success(),
        "rustc: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(program)
}

/// Runs gcc in `dir` with debug information and frame pointers, optimized.
fn gcc(dir: &Path, args: &[&str]) -> Result<()> {
    compile("gcc", dir, args)
}

/// Runs `compiler` (gcc or g++) in `dir` as [`gcc`] does.
fn compile(compiler: &str, dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new(compiler)
        .args(["-g", "-O1", "-fno-omit-frame-pointer"])
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {compiler}"))?;
    ensure!(
        output.status.success(),
        "{compiler} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("user")
}

/// Builds the C fixture and its library with gcc into a fresh directory.
fn build_fixture() -> Result<Built> {
    build_fixture_linked_with(None)
}

/// [`build_fixture`], with `allocator` (a shared library's path) linked in when given.
fn build_fixture_linked_with(allocator: Option<&Path>) -> Result<Built> {
    let sources = sources();
    let dir = build_dir("c")?;
    let gcc = |args: &[&str]| gcc(dir.path(), args);
    let library = sources.join("leaky_user_lib.c");
    gcc(&[
        "-fPIC",
        "-shared",
        "-o",
        "libleaky_user_lib.so",
        library.to_str().context("path")?,
    ])?;
    let program = sources.join("leaky_user.c");
    let rpath = format!("-Wl,-rpath,{}", dir.path().display());
    let name = match allocator {
        Some(allocator) => format!(
            "leaky_user_{}",
            allocator.file_name().context("a library's name")?.display()
        ),
        None => "leaky_user".to_owned(),
    };
    let mut args = vec![
        "-o",
        &name,
        program.to_str().context("path")?,
        "-L.",
        "-lleaky_user_lib",
        &rpath,
        "-lpthread",
    ];
    if let Some(allocator) = allocator {
        // By path: Debian's runtime packages ship no unversioned .so to link with -l.
        args.push(allocator.to_str().context("path")?);
    }
    gcc(&args)?;
    Ok(Built::new(dir, &name))
}

/// valgrind's definitely-lost records of `program`, by the first frame in one of the
/// fixture's `sources` (valgrind names inlined frames too: Rust's allocator is inlined).
fn valgrind_definitely_lost(program: &Path, sources: &[&str]) -> Result<Leaks> {
    let output = Command::new("valgrind")
        .args(["--leak-check=full", "--show-leak-kinds=definite"])
        .arg(program)
        .output()
        .context("running valgrind (apt-get install valgrind; `cargo xtask test-deps`)")?;
    ensure!(output.status.success(), "valgrind failed: {output:?}");
    parse_valgrind(&String::from_utf8_lossy(&output.stderr), sources)
}

/// `==PID== 1,000 bytes in 10 blocks are definitely lost in loss record 5 of 6`, then frames
/// `==PID==    by 0x109248: leak_malloc (leaky_user.c:30)`.
fn parse_valgrind(text: &str, sources: &[&str]) -> Result<Leaks> {
    let number = |text: &str| text.replace(',', "").parse::<u64>();
    let mut leaks = Leaks::new();
    let mut lines = text
        .lines()
        .map(|line| line.split_once("== ").map_or(line, |(_, rest)| rest).trim());
    while let Some(line) = lines.next() {
        let Some((record, _)) = line.split_once(" are definitely lost in loss record") else {
            continue;
        };
        let words: Vec<&str> = record.split_whitespace().collect();
        let [bytes, "bytes", "in", blocks, "blocks" | "block"] = words[..] else {
            bail!("unexpected valgrind record: {line}");
        };
        let (function, place) = lines
            .by_ref()
            .take_while(|line| line.starts_with("at ") || line.starts_with("by "))
            .filter_map(|frame| {
                let (_, located) = frame.split_once(": ")?;
                let (function, place) = located.rsplit_once(" (")?;
                Some((function, place.trim_end_matches(')')))
            })
            .find(|(_, place)| sources.iter().any(|source| place.starts_with(source)))
            .with_context(|| format!("no frame in {sources:?} for: {line}"))?;
        let entry = leaks
            .entry(function.to_owned())
            .or_insert((0, 0, place.to_owned()));
        entry.0 += number(blocks)?;
        entry.1 += number(bytes)?;
    }
    Ok(leaks)
}

/// memleak's user entries whose call site is in one of the fixture's `sources`, by function;
/// and the others (the language runtime's) apart.
fn memleak_leaks(report: &Report, sources: &[&str]) -> Result<(Leaks, Vec<String>)> {
    let mut leaks = Leaks::new();
    let mut runtime = Vec::new();
    for entry in &report.stacks {
        ensure!(
            entry.kind == "user",
            "a {} entry in a user trace",
            entry.kind
        );
        let call_site = &entry.call_site;
        let source = call_site.source.clone().unwrap_or_default();
        // A stripped runtime library's block has no symbol (libstdc++'s exception pool, which
        // jemalloc and tcmalloc bring in); a fixture's leak always has one and its line.
        let (Some(function), true) = (
            call_site.symbol.clone(),
            sources.iter().any(|own| source.starts_with(own)),
        ) else {
            runtime.push(call_site.to_string());
            continue;
        };
        let leak = leaks.entry(function).or_insert((0, 0, source));
        leak.0 += entry.count;
        leak.1 += entry.bytes;
    }
    Ok((leaks, runtime))
}

/// Checks memleak's report of `program` against the construction and valgrind's oracle
/// (`known_leaks`; `beyond_valgrind` are leaks only the construction knows), and that nothing
/// else is in it but a few of the language runtime's blocks.
fn check_against_valgrind(
    program: &Path,
    report: &Report,
    known_leaks: &[(&str, u64, u64)],
    beyond_valgrind: &[(&str, u64, u64)],
    sources: &[&str],
) -> Result<()> {
    let oracle = valgrind_definitely_lost(program, sources)?;
    // The oracle agrees with the construction, or the fixture is not what it says.
    assert_eq!(
        counts(&oracle),
        by_function(known_leaks),
        "valgrind on {}",
        program.display()
    );
    let (found, runtime) = memleak_leaks(report, sources)?;
    assert_eq!(
        counts(&found),
        by_function(&[known_leaks, beyond_valgrind].concat()),
        "memleak on {}",
        program.display()
    );
    for (function, (_, _, line)) in &oracle {
        assert_eq!(
            &found[function].2, line,
            "{function}: the allocating call's file:line"
        );
    }
    assert!(
        runtime.len() <= MAX_RUNTIME_ENTRIES,
        "runtime entries: {runtime:?}"
    );
    Ok(())
}

/// A fixture's known leaks, as [`counts`] gives them.
fn by_function(leaks: &[(&str, u64, u64)]) -> BTreeMap<String, (u64, u64)> {
    leaks
        .iter()
        .map(|&(function, blocks, bytes)| (function.to_owned(), (blocks, bytes)))
        .collect()
}

/// Every leak of the C fixture, the heap's and the mappings'.
fn all_c_leaks() -> BTreeMap<String, (u64, u64)> {
    by_function(&[&C_LEAKS[..], &C_MAPPED_LEAKS].concat())
}

fn counts(leaks: &Leaks) -> BTreeMap<String, (u64, u64)> {
    leaks
        .iter()
        .map(|(function, &(blocks, bytes, _))| (function.clone(), (blocks, bytes)))
        .collect()
}

fn memleak_run(program: &Path, extra: &[&str]) -> Result<(std::process::Output, Report)> {
    memleak_run_preloading(program, &[], extra, None)
}

/// [`memleak_run`] of `program` with its `arguments`, and LD_PRELOAD set to `preload` for
/// memleak and so for the command.
fn memleak_run_preloading(
    program: &Path,
    arguments: &[&str],
    extra: &[&str],
    preload: Option<&Path>,
) -> Result<(std::process::Output, Report)> {
    let mut command = Command::new(memleak_binary()?);
    command
        .args(["run", "--user", "--format", "json", "--top", "1000"])
        .args(extra)
        .arg("--")
        .arg(program)
        .args(arguments);
    if let Some(preload) = preload {
        command.env("LD_PRELOAD", preload);
    }
    let output = command.output().context("running memleak run --user")?;
    let report = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "memleak's report ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((output, report))
}

#[test]
fn run_user_finds_what_valgrind_finds_definitely_lost() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let program = build_fixture()?;
    let (output, report) = memleak_run(&program, &[])?;
    assert!(output.status.success(), "{output:?}");
    check_against_valgrind(&program, &report, &C_LEAKS, &C_MAPPED_LEAKS, &C_SOURCES)?;
    let library = report
        .stacks
        .iter()
        .find(|entry| entry.call_site.symbol.as_deref() == Some("library_leak"))
        .context("no library_leak entry")?;
    assert_eq!(
        library.call_site.module.as_deref(),
        Some("libleaky_user_lib.so")
    );
    assert!(
        library
            .frames
            .iter()
            .any(|frame| frame.symbol.as_deref() == Some("main")),
        "the library leak's stack reaches main: {:?}",
        library.frames
    );
    let thread = report
        .stacks
        .iter()
        .find(|entry| entry.call_site.symbol.as_deref() == Some("thread_main"))
        .context("no thread_main entry")?;
    assert!(
        thread
            .frames
            .iter()
            .any(|frame| frame.symbol.as_deref() == Some("start_thread")),
        "{:?}",
        thread.frames
    );
    let counters = &report.stats.counters;
    // churn_and_free: 1000 times malloc, realloc (a free at its entry), free, calloc, free.
    assert!(
        counters.allocs >= 3000 && counters.frees >= 3000,
        "churn_and_free's calls seen: {counters:?}"
    );
    assert_eq!(counters.dropped_table_full, 0);
    assert!(
        report
            .notes
            .iter()
            .any(|note| note.contains("not a reachability analysis")),
        "{:?}",
        report.notes
    );
    Ok(())
}

/// Heap allocators other than glibc's (Debian's libjemalloc2, libtcmalloc-minimal4 and
/// libmimalloc2.0, installed by `cargo xtask test-deps`), each of which replaces malloc and free.
const OTHER_ALLOCATORS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
];

/// At most [`MAX_RUNTIME_ENTRIES`] runtime entries beside the blocks `allocator` (glibc's when
/// `None`) allocates for itself with its own `operator new` (tcmalloc's start-up objects),
/// which are listed under its library's name.
fn check_runtime_entries(runtime: &[String], allocator: Option<&Path>, what: &str) {
    let own = allocator
        .and_then(Path::file_name)
        .map(|name| format!("[{}", name.to_string_lossy()));
    let others: Vec<&String> = runtime
        .iter()
        .filter(|entry| own.as_ref().is_none_or(|own| !entry.contains(own)))
        .collect();
    assert!(
        others.len() <= MAX_RUNTIME_ENTRIES,
        "{what}: runtime entries {runtime:?}"
    );
}

#[test]
fn run_user_hooks_jemalloc_tcmalloc_and_mimalloc_preloaded_or_linked_in() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let plain = build_fixture()?;
    for allocator in OTHER_ALLOCATORS.map(Path::new) {
        let name = allocator.file_name().context("a name")?.to_string_lossy();
        let linked = build_fixture_linked_with(Some(allocator))?;
        for (how, program, preload) in [
            ("preloaded", &plain, Some(allocator)),
            ("linked in", &linked, None),
        ] {
            let (output, report) = memleak_run_preloading(program, &[], &[], preload)?;
            assert!(output.status.success(), "{name} {how}: {output:?}");
            // Blocks from the allocator glibc's malloc never sees: found only where memleak
            // hooked the allocator the program calls.
            let (found, runtime) = memleak_leaks(&report, &C_SOURCES)?;
            assert_eq!(counts(&found), all_c_leaks(), "{name} {how}");
            check_runtime_entries(&runtime, Some(allocator), &format!("{name} {how}"));
            let hooked = report
                .notes
                .iter()
                .find(|note| note.contains("uprobes on"))
                .with_context(|| format!("{name} {how}: no attach note: {:?}", report.notes))?;
            assert!(hooked.contains(&*name), "{name} {how}: {hooked}");
            let counters = &report.stats.counters;
            assert!(
                counters.allocs >= 3000 && counters.frees >= 3000,
                "{name} {how}: churn_and_free's calls seen: {counters:?}"
            );
            // Ages run to the window's end, not to the report's making after detaching.
            for entry in &report.stacks {
                assert!(
                    entry.oldest_age_ms <= report.duration_ms + 1,
                    "{name} {how}: {} ms old in a {} ms window",
                    entry.oldest_age_ms,
                    report.duration_ms
                );
            }
        }
    }
    Ok(())
}

/// The C++ fixture's leaks (tests/user/leaky_cpp.cpp).
const CPP_LEAKS: [(&str, u64, u64); 2] = [("leak_objects()", 4, 192), ("leak_arrays()", 2, 600)];
const CPP_SOURCES: [&str; 1] = ["leaky_cpp.cpp:"];

#[test]
fn run_user_hooks_operator_new_and_delete_of_every_allocator() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let source = sources().join("leaky_cpp.cpp");
    let dir = build_dir("cpp")?;
    compile(
        "g++",
        dir.path(),
        &["-o", "leaky_cpp", source.to_str().context("path")?],
    )?;
    let program = Built::new(dir, "leaky_cpp");
    for preload in [None]
        .into_iter()
        .chain(OTHER_ALLOCATORS.map(|path| Some(Path::new(path))))
    {
        let allocator = preload.map_or("glibc".into(), |path| path.display().to_string());
        let (output, report) = memleak_run_preloading(&program, &[], &[], preload)?;
        assert!(output.status.success(), "{allocator}: {output:?}");
        let (found, runtime) = memleak_leaks(&report, &CPP_SOURCES)?;
        assert_eq!(counts(&found), by_function(&CPP_LEAKS), "{allocator}");
        check_runtime_entries(&runtime, preload, &allocator);
        // The churn's 2,000 news and deletes, each seen once whatever names share an address.
        let counters = &report.stats.counters;
        assert!(
            (2000..2100).contains(&counters.allocs) && counters.frees >= 2000,
            "{allocator}: {counters:?}"
        );
    }
    Ok(())
}

#[test]
fn run_user_follows_forked_children_only_with_follow_forks() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let program = build_fixture()?;
    let run = |extra: &[&str]| {
        let (output, report) = memleak_run_preloading(&program, &["fork"], extra, None)?;
        ensure!(output.status.success(), "{output:?}");
        let (found, _) = memleak_leaks(&report, &C_SOURCES)?;
        anyhow::Ok((counts(&found), report.notes))
    };
    // The parent's block stays listed although each child freed its copy: blocks are told
    // apart by process.
    let mut parent_only = all_c_leaks();
    parent_only.insert("leak_shared_before_fork".to_owned(), (1, 88));

    let (found, notes) = run(&[])?;
    assert_eq!(found, parent_only, "without --follow-forks");
    assert!(
        notes
            .iter()
            .any(|note| note.contains("forked 3 processes, whose heaps are not followed")),
        "{notes:?}"
    );

    let (found, notes) = run(&["--follow-forks"])?;
    let mut with_children = parent_only;
    // Two children, three blocks of 40 bytes each; leak_before_exec's went with the exec.
    with_children.insert("leak_in_child".to_owned(), (6, 240));
    assert_eq!(found, with_children, "with --follow-forks");
    for said in [
        "followed 3 processes forked by the command",
        "1 of them exec'ed another program",
        "2 blocks of forked processes that exec'ed another program are left out",
    ] {
        assert!(
            notes.iter().any(|note| note.contains(said)),
            "{said}: {notes:?}"
        );
    }
    Ok(())
}

#[test]
fn run_user_finds_a_rust_programs_leaks_as_valgrind_does() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let program = build_rust_fixture()?;
    let (output, report) = memleak_run(&program, &[])?;
    assert!(output.status.success(), "{output:?}");
    check_against_valgrind(&program, &report, &RUST_LEAKS, &[], &RUST_SOURCES)
}

#[test]
fn leak_checks_judge_user_entries() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let program = build_fixture()?;
    let junit = program.with_file_name("junit.xml");
    let junit_arg = junit.to_str().context("path")?;
    let (output, report) = memleak_run(
        &program,
        &[
            "--fail-on-leak",
            "--function",
            "leak_calloc",
            "--junit",
            junit_arg,
        ],
    )?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let check = report.check.context("no leak check in the report")?;
    assert_eq!(check.sites.len(), 1, "{:?}", check.sites);
    assert_eq!(check.sites[0].count, 7);
    assert!(check.failed);
    let xml = std::fs::read_to_string(&junit)?;
    assert!(xml.contains("leak_calloc"), "{xml}");

    // A function that frees all it allocates passes, and the command's status (0) stands.
    let (output, report) = memleak_run(
        &program,
        &["--fail-on-leak", "--function", "churn_and_free"],
    )?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(report.check.is_some_and(|check| !check.failed));
    Ok(())
}

#[test]
fn trace_by_pid_reports_only_what_was_allocated_in_the_window() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let program = build_fixture()?;
    let mut command = Command::new(&program);
    command.arg("wait");
    let (mut fixture, line) = start_program(command)?;
    assert_eq!(line, "waiting");
    let pid = fixture.child().id().to_string();
    let (tracer, _stderr) = start_attached(
        "trace",
        &[
            "--user",
            "--pid",
            &pid,
            "--duration",
            "4s",
            "--format",
            "json",
            "--top",
            "1000",
        ],
    )?;
    fixture
        .child()
        .stdin
        .take()
        .context("fixture stdin")?
        .write_all(b"go\n")?;
    let status = fixture.into_child().wait()?;
    assert!(status.success(), "fixture: {status}");
    let report: Report = finish_tracer(tracer)?;
    let (found, _) = memleak_leaks(&report, &C_SOURCES)?;
    // leak_before_wait's 9 blocks were allocated before the tracer attached.
    assert_eq!(counts(&found), all_c_leaks(), "memleak trace --user --pid");
    Ok(())
}

/// eventfds and messages tests/user/user_stacks.c makes while the kernel is traced.
const OPENED: u64 = 300;
const POSTED: u64 = 100;

/// Builds tests/user/user_stacks.c; returns it with its source's text.
fn build_user_stacks_program() -> Result<(Built, String)> {
    let source = sources().join("user_stacks.c");
    let dir = build_dir("user-stacks")?;
    gcc(
        dir.path(),
        &["-o", "user_stacks", source.to_str().context("path")?],
    )?;
    Ok((
        Built::new(dir, "user_stacks"),
        std::fs::read_to_string(&source)?,
    ))
}

/// Checks that the user stacks of `pid` among `entries` cover at least 95% of `objects` (each
/// kernel stack was captured: --stack-sample-rate 1; a user capture fails only on a full map
/// or a collision), and that each leads through `function`, called by main, at the line of
/// user_stacks.c marked `expected: MARK`.
fn check_user_stacks(
    entries: &[&Entry],
    pid: u32,
    objects: u64,
    function: &str,
    source: &str,
    mark: &str,
) -> Result<()> {
    let line = source
        .lines()
        .position(|line| line.contains(&format!("expected: {mark}")))
        .with_context(|| format!("user_stacks.c lost its line marked {mark}"))?
        + 1;
    let stacks: Vec<&UserStack> = entries
        .iter()
        .filter_map(|entry| entry.user_stacks.as_ref())
        .flat_map(|user| &user.stacks)
        .filter(|stack| stack.pid == pid)
        .collect();
    let samples: u64 = stacks.iter().map(|stack| stack.samples).sum();
    ensure!(
        samples * 100 >= objects * 95,
        "user stacks for {samples} of {objects} objects: {stacks:#?}"
    );
    for stack in &stacks {
        let symbols: Vec<&str> = stack
            .frames
            .iter()
            .map(|frame| frame.symbol.as_deref().unwrap_or("?"))
            .collect();
        let at = symbols
            .iter()
            .position(|symbol| symbol.starts_with(function))
            .with_context(|| format!("no {function} in {symbols:?}"))?;
        ensure!(
            symbols.get(at + 1) == Some(&"main"),
            "{function} is called by main: {symbols:?}"
        );
        let at_source = stack.frames[at].source.as_deref().unwrap_or("");
        ensure!(
            at_source.ends_with(&format!("user_stacks.c:{line}")),
            "{function}'s frame is at {at_source:?}, not user_stacks.c:{line}"
        );
        ensure!(
            stack.frames[0]
                .module
                .as_deref()
                .is_some_and(|module| module.starts_with("libc")),
            "the innermost frame is the C library's system call: {:?}",
            stack.frames[0]
        );
    }
    Ok(())
}

#[test]
fn user_stacks_lead_from_a_kernel_entry_to_the_program_line() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let (program, source) = build_user_stacks_program()?;
    let (tracer, _stderr) = start_attached(
        "trace",
        &[
            "--user-stacks",
            "--kinds",
            "slab",
            "--stack-sample-rate",
            "1",
            "--duration",
            "3s",
            "--format",
            "json",
            "--top",
            "100000",
        ],
    )?;
    let mut command = Command::new(&program);
    command.args(["eventfds", &OPENED.to_string()]);
    // Still running, holding its eventfds, when the report is made: its mappings name frames.
    let (mut opener, line) = start_program(command)?;
    assert_eq!(line, "ready");
    let report: Report = finish_tracer(tracer)?;
    let pid = opener.child().id();
    drop(opener.child().stdin.take());
    opener.child().wait()?;

    let counters = &report.stats.counters;
    ensure!(
        counters.user_stack_captures > 0,
        "no user stack captured: {counters:?}"
    );
    let entries = entries_at(&report, "kmalloc", "do_eventfd");
    let held = share_of(entries.iter().copied(), u64::from(pid)).0;
    ensure!(held == OPENED, "{held} of the {OPENED} eventfd contexts");
    check_user_stacks(
        &entries,
        pid,
        OPENED,
        "open_session_fds",
        &source,
        "eventfds",
    )?;
    // Kernel threads have no user stack, and an entry never shows one of them.
    for entry in &report.stacks {
        for stack in entry.user_stacks.iter().flat_map(|user| &user.stacks) {
            let comm = stack.comm.as_deref().unwrap_or("");
            ensure!(
                !["kworker", "ksoftirqd", "rcu_"]
                    .iter()
                    .any(|kernel| comm.starts_with(kernel)),
                "a kernel thread's user stack: {stack:?}"
            );
        }
    }

    // Without the option, no entry carries user stacks and nothing is captured.
    let output = Command::new(memleak_binary()?)
        .args([
            "trace",
            "--kinds",
            "slab",
            "--duration",
            "1s",
            "--format",
            "json",
        ])
        .output()?;
    ensure!(output.status.success(), "{output:?}");
    let plain: Report = serde_json::from_slice(&output.stdout)?;
    ensure!(plain.stats.counters.user_stack_captures == 0);
    ensure!(plain.stacks.iter().all(|entry| entry.user_stacks.is_none()));
    Ok(())
}

#[test]
fn run_user_stacks_name_the_lines_of_a_command_that_has_exited() -> Result<()> {
    let Some(_lock) = end_to_end() else {
        return Ok(());
    };
    let (program, source) = build_user_stacks_program()?;
    let output = Command::new(memleak_binary()?)
        .args([
            "run",
            "--user-stacks",
            "--kinds",
            "slab",
            "--stack-sample-rate",
            "1",
        ])
        .args(["--comm", "user_stacks", "--grace", "1s", "--format", "json"])
        .args(["--top", "1000", "--"])
        .arg(&program)
        .args(["messages", &POSTED.to_string()])
        .output()
        .context("running memleak run")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The command's output (the queue's id) comes first, the JSON report after it.
    let (queue, json) = stdout.split_once('{').context("no JSON report on stdout")?;
    if let Ok(queue) = queue.trim().parse::<libc::c_int>() {
        unsafe { libc::msgctl(queue, libc::IPC_RMID, std::ptr::null_mut()) };
    }
    ensure!(output.status.success(), "{output:?}");
    let report: Report = serde_json::from_str(&format!("{{{json}"))?;
    let entries: Vec<&Entry> = report
        .stacks
        .iter()
        .filter(|entry| {
            entry
                .frames
                .iter()
                .any(|frame| frame.symbol.as_deref() == Some("load_msg"))
        })
        .collect();
    let posted: u64 = entries.iter().map(|entry| entry.count).sum();
    ensure!(posted == POSTED, "{posted} of the {POSTED} messages");
    let pid = entries
        .iter()
        .flat_map(|entry| &entry.processes)
        .map(|process| process.pid)
        .next()
        .context("no process")?;
    check_user_stacks(&entries, pid, POSTED, "post_messages", &source, "messages")?;
    ensure!(
        !report
            .notes
            .iter()
            .any(|note| note.contains("bare addresses")),
        "the command's mappings were read as it exited: {:?}",
        report.notes
    );
    Ok(())
}

#[test]
fn user_needs_a_process() -> Result<()> {
    let output = Command::new(memleak_binary()?)
        .args(["trace", "--user", "--duration", "1s"])
        .output()?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--user needs --pid"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    Ok(())
}

#[test]
fn parses_valgrind_records() -> Result<()> {
    let text = "\
==14551== 192 bytes in 4 blocks are definitely lost in loss record 1 of 6
==14551==    at 0x48417B4: malloc (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==14551==    by 0x109218: thread_main (leaky_user.c:57)
==14551==    by 0x48EA1F4: start_thread (pthread_create.c:442)
==14551== 
==14551== 768 bytes in 3 blocks are definitely lost in loss record 4 of 6
==14551==    at 0x4846990: memalign (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==14551==    by 0x4846AED: posix_memalign (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==14551==    by 0x1092F3: leak_aligned (leaky_user.c:49)
==14551== 
==14551== 20,000 bytes in 5 blocks are definitely lost in loss record 6 of 6
==14551==    at 0x484682F: realloc (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==14551==    by 0x1092B3: leak_realloc (leaky_user.c:42)
";
    let leaks = parse_valgrind(text, &C_SOURCES)?;
    assert_eq!(leaks["thread_main"], (4, 192, "leaky_user.c:57".to_owned()));
    assert_eq!(
        leaks["leak_aligned"],
        (3, 768, "leaky_user.c:49".to_owned())
    );
    assert_eq!(
        leaks["leak_realloc"],
        (5, 20_000, "leaky_user.c:42".to_owned())
    );
    assert_eq!(leaks.len(), 3);
    Ok(())
}
