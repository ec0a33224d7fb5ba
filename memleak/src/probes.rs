//! Loads memleak's eBPF object and attaches it to the kernel's allocation events.
use std::{fmt, os::fd::AsFd as _};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{BtfTracePoint, ProgramError, TracePoint},
};
use memleak_common::{SLOTS_PER_BUCKET, TracerConfig};

use crate::{
    cli::AttachMethod,
    kernel::{self, KmemCacheLayout},
    table::TracerMaps,
    tracefs::{self, ClassicProgram},
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memleak"));

/// Stack map entries: each holds up to 127 frames (1 KiB), preallocated by the kernel.
const STACK_MAP_ENTRIES: u32 = 16_384;

/// How the programs ended up attached, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    BtfTracepoints,
    ClassicTracepoints,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BtfTracepoints => "tp_btf",
            Self::ClassicTracepoints => "tracepoint",
        })
    }
}

/// What the tracer is asked to do, in the units of the command line.
pub struct TracerSettings {
    pub capacity: u32,
    pub sample_rate: u32,
    pub stack_sample_rate: u32,
    pub filter_tgid: Option<u32>,
    pub method: AttachMethod,
}

/// The attached programs and their maps. Dropping `programs` detaches every program; `maps`
/// stay readable until they are dropped too.
pub struct Tracer {
    pub programs: Ebpf,
    pub maps: TracerMaps,
    pub attached: Attached,
    /// Events this kernel lacks, and why the tp_btf attempt failed when it fell back.
    pub notes: Vec<String>,
}

impl TracerSettings {
    fn buckets(&self) -> u32 {
        (self.capacity.div_ceil(SLOTS_PER_BUCKET as u32)).next_power_of_two()
    }
}

/// The BTF tracepoint programs (Linux 5.5+ with kernel BTF), by program name and event.
const BTF_PROGRAMS: [(&str, &str); 4] = [
    ("kmalloc_btf", "kmalloc"),
    ("kmem_cache_alloc_btf", "kmem_cache_alloc"),
    ("kfree_btf", "kfree"),
    ("kmem_cache_free_btf", "kmem_cache_free"),
];

fn classic_program_name(program: ClassicProgram) -> &'static str {
    match program {
        ClassicProgram::Kmalloc => "kmalloc_classic",
        ClassicProgram::KmemCacheAlloc => "kmem_cache_alloc_classic",
        ClassicProgram::Kfree => "kfree_classic",
        ClassicProgram::KmemCacheFree => "kmem_cache_free_classic",
    }
}

pub fn attach(settings: &TracerSettings) -> Result<Tracer> {
    let tracefs_root = tracefs::root()?;
    let plan = tracefs::classic_plan(&|category, event| {
        tracefs::read_format(&tracefs_root, category, event)
    })?;
    let mut notes = plan.missing.clone();

    let btf = if kernel::has_btf() {
        Some(btf_rs::Btf::from_file(kernel::BTF_PATH).context("parsing kernel BTF")?)
    } else {
        notes.push(format!(
            "{} not found: kernel has no BTF, using classic tracepoints",
            kernel::BTF_PATH
        ));
        None
    };
    let layout = btf.as_ref().map(KmemCacheLayout::from_btf).transpose()?;

    let buckets = settings.buckets();
    let mut config = TracerConfig::DEFAULT;
    config.bucket_mask = buckets - 1;
    config.sample_shift = settings.sample_rate.trailing_zeros();
    // The stack rate counts all allocations; among tracked ones it is that much denser.
    config.stack_shift = settings
        .stack_sample_rate
        .trailing_zeros()
        .saturating_sub(config.sample_shift);
    config.filter_tgid = settings.filter_tgid.unwrap_or(0);
    if let Some(layout) = layout {
        config.kmem_cache_size_offset = layout.size;
        config.kmem_cache_object_size_offset = layout.object_size;
        config.kmem_cache_name_offset = layout.name;
    }
    config.classic = plan.offsets;

    let mut ebpf = load_object(&config, buckets)?;

    let try_btf = match settings.method {
        AttachMethod::Auto => layout.is_some(),
        AttachMethod::Btf => {
            if layout.is_none() {
                bail!("--attach btf needs kernel BTF at {}", kernel::BTF_PATH);
            }
            true
        }
        AttachMethod::Classic => false,
    };
    if try_btf {
        match attach_btf(&mut ebpf) {
            Ok(()) => return Tracer::new(ebpf, Attached::BtfTracepoints, buckets, notes),
            Err(error) if settings.method == AttachMethod::Auto => {
                log::info!("BTF tracepoints unavailable, falling back: {error:#}");
                notes.push(format!(
                    "BTF tracepoints unavailable ({}); using classic tracepoints",
                    one_line(&format!("{error:#}"))
                ));
                // Fresh object: the failed attempt may have attached some programs.
                drop(ebpf);
                ebpf = load_object(&config, buckets)?;
            }
            Err(error) => return Err(error),
        }
    }
    attach_classic(&mut ebpf, &plan.attach)?;
    Tracer::new(ebpf, Attached::ClassicTracepoints, buckets, notes)
}

impl Tracer {
    fn new(
        mut programs: Ebpf,
        attached: Attached,
        buckets: u32,
        notes: Vec<String>,
    ) -> Result<Self> {
        let maps = TracerMaps::take(&mut programs, buckets)?;
        Ok(Self {
            programs,
            maps,
            attached,
            notes,
        })
    }
}

fn load_object(config: &TracerConfig, buckets: u32) -> Result<Ebpf> {
    EbpfLoader::new()
        .override_global("CONFIG", config, true)
        .map_max_entries("OBJECT_KEYS", buckets)
        .map_max_entries("OBJECT_RECORDS", buckets)
        .map_max_entries("STACKS", STACK_MAP_ENTRIES)
        .load(EBPF_OBJECT)
        .context("creating eBPF maps")
}

/// Loads the tp_btf programs (Linux 5.5+; the 6.1 verifier rejects Rust's tp_btf BTF, so
/// `auto` falls back to classic tracepoints there), then attaches them.
fn attach_btf(ebpf: &mut Ebpf) -> Result<()> {
    let btf = Btf::from_sys_fs().context("loading kernel BTF")?;
    for (name, event) in BTF_PROGRAMS {
        let program: &mut BtfTracePoint = program_mut(ebpf, name)?.try_into()?;
        program
            .load(event, &btf)
            .map_err(|error| explain_load_error(name, error))?;
    }
    for (name, event) in attach_order(&BTF_PROGRAMS, |(_, event)| *event) {
        let program: &mut BtfTracePoint = program_mut(ebpf, name)?.try_into()?;
        program
            .attach()
            .with_context(|| format!("attaching {name} to tp_btf/{event}"))?;
    }
    Ok(())
}

/// Loads the classic tracepoint programs (Linux 4.7+), then attaches them to every event of
/// the plan; one program may serve several events (kmalloc and kmalloc_node before 6.1).
fn attach_classic(ebpf: &mut Ebpf, events: &[(String, String, ClassicProgram)]) -> Result<()> {
    for (_, _, which) in events {
        let name = classic_program_name(*which);
        let program: &mut TracePoint = program_mut(ebpf, name)?.try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|error| explain_load_error(name, error))?;
        }
    }
    for (category, event, which) in attach_order(events, |(_, event, _)| event.as_str()) {
        let name = classic_program_name(*which);
        let program: &mut TracePoint = program_mut(ebpf, name)?.try_into()?;
        program
            .attach(category, event)
            .with_context(|| format!("attaching {name} to tracepoint {category}:{event}"))?;
    }
    Ok(())
}

/// Free hooks first: an allocation hook attached before them would record objects whose
/// frees nobody sees yet (the verifier's own allocations while the rest load, for one).
fn attach_order<T>(events: &[T], event_name: impl Fn(&T) -> &str) -> Vec<&T> {
    let mut ordered: Vec<&T> = events.iter().collect();
    ordered.sort_by_key(|event| !event_name(event).contains("free"));
    ordered
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))
}

/// The verifier's log is long; its last lines say why it refused.
fn explain_load_error(program: &str, error: ProgramError) -> anyhow::Error {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // The log ends with statistics; the reason comes just before them.
            let statistics = ["verification time", "stack depth", "processed "];
            let tail: Vec<&str> = log
                .lines()
                .filter(|line| {
                    !line.trim().is_empty()
                        && !statistics.iter().any(|prefix| line.starts_with(prefix))
                })
                .rev()
                .take(3)
                .collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow!(
                "the kernel's verifier rejected {program} ({io_error}): {}",
                tail.join(" | ")
            )
        }
        other => anyhow::Error::new(other).context(format!("loading {program}")),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs of memleak's programs that the kernel skipped because one of them was already running
/// on that CPU (an interrupt allocated or freed while a program ran). Each is an allocation or
/// a free memleak did not see. Read from `bpf_prog_info::recursion_misses` (Linux 5.12+; 0
/// before).
pub fn skipped_runs(programs: &Ebpf) -> u64 {
    programs
        .programs()
        .filter_map(|(_, program)| program.fd().ok())
        .map(|fd| recursion_misses(fd.as_fd()).unwrap_or(0))
        .sum()
}

fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    // struct bpf_prog_info up to verified_insns; recursion_misses is the u64 at offset 208.
    const INFO_LEN: usize = 216;
    const RECURSION_MISSES: usize = 208;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u8; INFO_LEN];
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::from_mut(&mut attr),
            size_of::<InfoByFd>(),
        )
    };
    // The kernel writes back how much of the struct it knows; older ones stop short.
    if result != 0 || (attr.info_len as usize) < RECURSION_MISSES + 8 {
        return None;
    }
    let bytes = info[RECURSION_MISSES..RECURSION_MISSES + 8]
        .try_into()
        .ok()?;
    Some(u64::from_ne_bytes(bytes))
}
