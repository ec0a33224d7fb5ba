//! Loads memleak's eBPF object and attaches it to the kernel's allocation events.
use std::{fmt, os::fd::AsFd as _, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        BtfTracePoint, FEntry, FExit, Program, ProgramError, RawTracePoint, TracePoint,
        fentry::FEntryLinkId, fexit::FExitLinkId, raw_trace_point::RawTracePointLinkId,
        tp_btf::BtfTracePointLinkId, trace_point::TracePointLinkId,
    },
};
use memleak_common::{SLOTS_PER_BUCKET, SampleMasks, TracerConfig};

use super::{
    clock::AllocationClock,
    maps::{STACK_MAP_ENTRIES, TableFormat, TracerMaps, USER_STACK_MAP_ENTRIES},
    object, page_callers,
    reader::KernelReader,
};
use crate::{
    kernel::{
        self, KmemCacheLayout,
        orc::PageCallerTable,
        tracefs::{self, ClassicProgram},
    },
    kinds::{Callers, Kind, KindAttach},
};

/// How to attach to the slab allocator's events: `Auto` takes the cheapest the kernel accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMethod {
    Auto,
    /// BTF tracepoints (tp_btf; Linux 5.5+ with kernel BTF).
    Btf,
    /// Raw tracepoints (Linux 4.17+; their argument list is read from kernel BTF).
    Raw,
    /// Classic tracepoints (Linux 4.7+; offsets from tracefs, no BTF needed).
    Classic,
}

/// How the slab programs ended up attached, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    BtfTracepoints,
    RawTracepoints,
    ClassicTracepoints,
    /// Uprobes on a user-space process's allocator.
    Uprobes,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BtfTracepoints => "tp_btf",
            Self::RawTracepoints => "raw_tp",
            Self::ClassicTracepoints => "tracepoint",
            Self::Uprobes => "uprobe",
        })
    }
}

/// What the tracer is asked to do, in the units of the command line.
#[derive(Debug, Clone)]
pub struct TracerSettings {
    pub capacity: u32,
    pub sample_rate: u32,
    pub stack_sample_rate: u32,
    pub filter_tgid: Option<u32>,
    pub filter_comm: Option<String>,
    pub min_size: Option<u32>,
    pub max_size: Option<u32>,
    pub method: AttachMethod,
    pub kinds: Vec<Kind>,
    /// Capture the user-space stack beside each captured kernel stack (`--user-stacks`).
    pub user_stacks: bool,
    /// The benchmark's floor: programs that return at once.
    pub empty_programs: bool,
    /// Load the build for kernels before Linux 5.12 on any kernel (tests and benchmarks).
    pub plain_claims: bool,
    /// Whether userspace will remove objects from the table while the programs run
    /// ([`crate::bpf::maps::remove_objects`]: `watch`, `run --user`). Without it the programs'
    /// frees empty slots with plain stores, which removals could race with.
    pub userspace_removes_objects: bool,
}

/// The attached programs and their maps. Dropping `programs` detaches every program; `maps`
/// stay readable until they are dropped too.
pub struct Tracer {
    pub programs: Ebpf,
    /// Every hook, attached or not, to detach and attach the slab ones again
    /// ([`Tracer::set_slab_hooks`]).
    links: Vec<Link>,
    pub maps: TracerMaps,
    pub attached: Attached,
    /// Whether kmem_cache records carry the cache's address (tp_btf, and raw tracepoints from
    /// Linux 6.1) rather than a hash of its name or nothing.
    pub cache_ids_are_pointers: bool,
    /// How each kind asked for is followed, and why not more cheaply.
    pub methods: Vec<KindAttach>,
    /// Events this kernel lacks, and why the tp_btf attempt failed when it fell back.
    pub notes: Vec<String>,
    /// The free paths followed, each with how: `kmem:kfree (tp_btf)`,
    /// `kvfree_call_rcu (fentry)`.
    pub free_paths: Vec<String>,
}

impl TracerSettings {
    /// Whether to load the object whose table claims are plain stores.
    fn loads_plain_claims(&self) -> bool {
        self.plain_claims || object::kernel_needs_plain_claims()
    }

    fn buckets(&self) -> u32 {
        (self.capacity.div_ceil(SLOTS_PER_BUCKET as u32)).next_power_of_two()
    }
}

/// BTF tracepoint programs (Linux 5.5+ with kernel BTF), by program name and event.
const SLAB_PROGRAMS: [(&str, &str); 4] = [
    ("kmalloc_btf", "kmalloc"),
    ("kmem_cache_alloc_btf", "kmem_cache_alloc"),
    ("kfree_btf", "kfree"),
    ("kmem_cache_free_btf", "kmem_cache_free"),
];
/// Raw tracepoint programs (Linux 4.17+), by program name and the classic program serving the
/// same events ([`tracefs::classic_plan`] lists the events the kernel has, `_node` ones too).
const RAW_SLAB_PROGRAMS: [(&str, ClassicProgram); 4] = [
    ("kmalloc_raw", ClassicProgram::Kmalloc),
    ("kmem_cache_alloc_raw", ClassicProgram::KmemCacheAlloc),
    ("kfree_raw", ClassicProgram::Kfree),
    ("kmem_cache_free_raw", ClassicProgram::KmemCacheFree),
];
/// vmalloc's area events are Linux 6.4+.
const VMALLOC_PROGRAMS: [(&str, &str); 2] = [
    ("vmap_alloc_btf", "alloc_vmap_area"),
    ("vmap_free_btf", "free_vmap_area_noflush"),
];
/// Before Linux 6.4, the functions those events are in, followed with fexit and fentry.
const VMALLOC_ALLOC_FEXIT: (&str, &str) = ("vmap_alloc_fexit", "alloc_vmap_area");
const VMALLOC_FREE_FENTRY: (&str, &str) = ("vmap_free_fentry", "free_vmap_area_noflush");
const PERCPU_PROGRAMS: [(&str, &str); 2] = [
    ("percpu_alloc_btf", "percpu_alloc_percpu"),
    ("percpu_free_btf", "percpu_free_percpu"),
];
/// Before Linux 6.0 the allocation event passes seven arguments: no call site, no allocated size.
const PERCPU_PROGRAMS_BEFORE_6_0: [(&str, &str); 2] = [
    ("percpu_alloc_btf_before_6_0", "percpu_alloc_percpu"),
    ("percpu_free_btf", "percpu_free_percpu"),
];
const PERCPU_ARGUMENTS_BEFORE_6_0: u32 = 7;

/// Frees that fire no per-object kmem event, followed with fentry (Linux 5.5+, kernel BTF,
/// ftrace direct calls): kfree_rcu and kvfree_rcu, and bulk frees (kfree_bulk, kfree_rcu's
/// batches; Linux 5.17+ for the bpf_loop over the objects).
const FREE_PATH_PROGRAMS: [(&str, &str); 2] = [
    ("kvfree_call_rcu_fentry", "kvfree_call_rcu"),
    ("kmem_cache_free_bulk_fentry", BULK_FREE),
];
const BULK_FREE: &str = "kmem_cache_free_bulk";

/// Classic tracepoint programs: Linux 4.7+.
fn classic_program_name(program: ClassicProgram) -> &'static str {
    match program {
        ClassicProgram::Kmalloc => "kmalloc_classic",
        ClassicProgram::KmemCacheAlloc => "kmem_cache_alloc_classic",
        ClassicProgram::Kfree => "kfree_classic",
        ClassicProgram::KmemCacheFree => "kmem_cache_free_classic",
        ClassicProgram::PageAlloc => "page_alloc_classic",
        ClassicProgram::PageFree => "page_free_classic",
    }
}

/// Loads and attaches the programs; `btf` is the kernel's BTF ([`kernel::parse_btf`]).
pub fn attach(settings: &TracerSettings, btf: Option<&btf_rs::Btf>) -> Result<Tracer> {
    let tracefs_root = tracefs::root()?;
    let formats =
        |category: &str, event: &str| tracefs::read_format(&tracefs_root, category, event);
    let plan = tracefs::classic_plan(&formats)?;
    let mut notes = plan.missing.clone();
    // Page events are classic tracepoints whatever --attach says (see memleak-ebpf/src/page.rs).
    let page_plan = settings.kinds.contains(&Kind::Page).then(|| {
        tracefs::page_plan(&formats, plan.offsets)
            .map_err(|error| not_followed(&mut notes, Kind::Page, &error))
    });

    if btf.is_none() {
        notes.push(format!(
            "{} not found: kernel has no BTF, using classic tracepoints",
            kernel::BTF_PATH
        ));
    }
    let layout = btf.map(KmemCacheLayout::from_btf).transpose()?;

    let (mut config, table) = base_config(settings);
    let plain_claims = settings.loads_plain_claims();
    if plain_claims {
        notes.push(
            "the object table claims its slots with plain stores, each checked once its \
             record is written (this kernel's BPF has no compare-and-swap, Linux 5.12+, or \
             --plain-claims asked for it); an allocation recorded into the same slot as \
             another CPU's at the same moment is dropped, and counted as a claim race"
                .to_owned(),
        );
    }
    if let Some(layout) = layout {
        config.kmem_cache_size_offset = layout.size;
        config.kmem_cache_object_size_offset = layout.object_size;
        config.kmem_cache_name_offset = layout.name;
    }
    config.classic = match &page_plan {
        Some(Ok(pages)) => pages.offsets,
        _ => plan.offsets,
    };
    config.kvfree_rcu_passes_offset = btf.is_some_and(kernel::kvfree_rcu_passes_offset).into();
    let raw_cache_alloc_passes_cache = btf.and_then(kernel::raw_cache_alloc_passes_cache);
    config.raw_cache_alloc_passes_cache = raw_cache_alloc_passes_cache.unwrap_or(false).into();
    let percpu_before_6_0 = btf
        .and_then(|btf| kernel::tracepoint_argument_count(btf, "percpu_alloc_percpu"))
        == Some(PERCPU_ARGUMENTS_BEFORE_6_0);
    config.possible_cpus = aya::util::nr_cpus()
        .map_err(|(path, error)| anyhow!("reading {path}: {error}"))?
        .get();
    config.alloc_vmap_area_arguments = btf
        .and_then(|btf| kernel::argument_count(btf, VMALLOC_ALLOC_FEXIT.1))
        .unwrap_or(0);

    let page_callers = matches!(page_plan, Some(Ok(_)))
        .then(|| page_caller_table(&mut notes))
        .flatten();
    if let Some(page_callers) = &page_callers {
        config.page_callers_steps = page_callers.steps();
        config.page_callers_base = page_callers.base;
    }

    // Every program is loaded (verified) before any is attached, and frees are attached
    // before allocations: otherwise the verifier's own allocations while later programs load
    // would be recorded with no free hook to see them go.
    let mut ebpf = load_object(&config, table.buckets, plain_claims, page_callers.as_ref())?;
    let tp_btf = LazyBtf::default();
    let mut hooks = Vec::new();
    let mut methods = Vec::new();
    let mut attached = Attached::BtfTracepoints;
    if settings.kinds.contains(&Kind::Slab) {
        let slab = SlabLadder {
            method: settings.method,
            has_layout: layout.is_some(),
            raw_cache_alloc_passes_cache,
            plan: &plan,
        };
        let why;
        (attached, why) = slab.load(&mut ebpf, &tp_btf, &mut hooks, &mut notes)?;
        methods.push(KindAttach::new(Kind::Slab, &attached.to_string(), why));
        if attached == Attached::ClassicTracepoints {
            prefer_fentry_for_frees(&mut ebpf, &tp_btf, &mut hooks);
        }
        let release = kernel::release().unwrap_or_default();
        for &(name, function) in &FREE_PATH_PROGRAMS {
            let loaded = if function == BULK_FREE && kernel::release_predates(&release, 5, 17) {
                Err(anyhow!(
                    "its program walks the freed objects with bpf_loop, Linux 5.17+"
                ))
            } else {
                load_fentry(&mut ebpf, name, function, &tp_btf)
            };
            match loaded {
                Ok(()) => hooks.push(Hook::FEntry { name, function }),
                Err(error) => notes.push(format!(
                    "frees through {function} are not followed as they happen ({}): slab \
                     objects freed that way are left to the report-time check of outstanding \
                     objects in kernel memory",
                    one_line(&format!("{error:#}"))
                )),
            }
        }
    }
    if settings.kinds.contains(&Kind::Vmalloc) {
        methods.push(load_vmalloc(&mut ebpf, &tp_btf, &mut hooks, &mut notes));
    }
    if settings.kinds.contains(&Kind::Percpu) {
        let (programs, why) = if percpu_before_6_0 {
            (
                &PERCPU_PROGRAMS_BEFORE_6_0,
                Some(format!(
                    "before Linux 6.0 the allocation event has no call site and no allocated \
                     size: each allocation's stack names its caller, and its size is the \
                     per-CPU size times the {} possible CPUs",
                    config.possible_cpus
                )),
            )
        } else {
            (&PERCPU_PROGRAMS, None)
        };
        methods.push(match load_btf(&mut ebpf, programs, &tp_btf) {
            Ok(()) => {
                hooks.extend(
                    programs
                        .iter()
                        .map(|&(name, event)| Hook::Btf { name, event }),
                );
                KindAttach::new(Kind::Percpu, "tp_btf", why)
            }
            Err(error) => {
                let why = not_followed(&mut notes, Kind::Percpu, &error);
                KindAttach::new(Kind::Percpu, "none", Some(why))
            }
        });
    }
    if let Some(page_plan) = &page_plan {
        let loaded = match page_plan {
            Ok(page_plan) => load_classic(&mut ebpf, page_plan)
                .map_err(|error| not_followed(&mut notes, Kind::Page, &error)),
            Err(why) => Err(why.clone()),
        };
        methods.push(match loaded {
            Ok(page_hooks) => {
                hooks.extend(page_hooks);
                KindAttach::new(
                    Kind::Page,
                    "tracepoint",
                    Some(
                        "the classic records carry the page frame number, which \
                         /proc/kpageflags is checked with; tp_btf and raw ones carry a struct \
                         page pointer"
                            .to_owned(),
                    ),
                )
                .with_callers(if page_callers.is_some() {
                    Callers::FrameWalk
                } else {
                    Callers::Stacks
                })
            }
            Err(why) => KindAttach::new(Kind::Page, "none", Some(why)),
        });
    }
    hooks.sort_by_key(|hook| !hook.event().contains("free"));
    let mut links = Vec::with_capacity(hooks.len());
    for hook in hooks {
        let id = hook.attach(&mut ebpf)?;
        links.push(Link { hook, id: Some(id) });
    }
    let free_paths = links
        .iter()
        .filter(|link| link.hook.event().contains("free"))
        .map(|link| link.hook.describe())
        .collect();
    let maps = TracerMaps::take(&mut ebpf, table)?;
    Ok(Tracer {
        programs: ebpf,
        links,
        maps,
        attached,
        cache_ids_are_pointers: match attached {
            Attached::BtfTracepoints => true,
            Attached::RawTracepoints => raw_cache_alloc_passes_cache == Some(true),
            Attached::ClassicTracepoints | Attached::Uprobes => false,
        },
        methods,
        notes,
        free_paths,
    })
}

/// The page hook's table of the page allocator's frames, or `None` with a note saying why
/// every tracked page's stack is captured instead.
fn page_caller_table(notes: &mut Vec<String>) -> Option<PageCallerTable> {
    let release = kernel::release().unwrap_or_default();
    let table = KernelReader::load()
        .and_then(|mut reader| page_callers::read(&mut reader, &release))
        .context("the page allocator's frames cannot be walked");
    match table {
        Ok(table) => {
            log::info!(
                "page callers: {} table entries ({} walkable) from {:#x}",
                table.used,
                table.walkable,
                table.base
            );
            Some(table)
        }
        Err(error) => {
            notes.push(format!(
                "each tracked page's stack is captured to name its caller, about 1 µs a page \
                 ({})",
                one_line(&format!("{error:#}"))
            ));
            None
        }
    }
}

/// vmalloc areas: the tracepoints (Linux 6.4+), else fexit and fentry on the functions they
/// are in, else not followed.
fn load_vmalloc(
    ebpf: &mut Ebpf,
    tp_btf: &LazyBtf,
    hooks: &mut Vec<Hook>,
    notes: &mut Vec<String>,
) -> KindAttach {
    let tracepoints = match load_btf(ebpf, &VMALLOC_PROGRAMS, tp_btf) {
        Ok(()) => {
            hooks.extend(
                VMALLOC_PROGRAMS
                    .iter()
                    .map(|&(name, event)| Hook::Btf { name, event }),
            );
            return KindAttach::new(Kind::Vmalloc, "tp_btf", None);
        }
        Err(error) => one_line(&format!("{error:#}")),
    };
    let trampolines = (|| -> Result<()> {
        let (name, function) = VMALLOC_ALLOC_FEXIT;
        let program: &mut FExit = program_mut(ebpf, name)?.try_into()?;
        program
            .load(function, tp_btf.get()?)
            .map_err(|error| explain_load_error(name, error))?;
        load_fentry(ebpf, VMALLOC_FREE_FENTRY.0, VMALLOC_FREE_FENTRY.1, tp_btf)
    })();
    match trampolines {
        Ok(()) => {
            let why = format!("no vmalloc tracepoints (Linux 6.4+): {tracepoints}");
            notes.push(format!(
                "vmalloc areas are followed with fexit and fentry on {} and {}: {why}",
                VMALLOC_ALLOC_FEXIT.1, VMALLOC_FREE_FENTRY.1
            ));
            hooks.push(Hook::FExit {
                name: VMALLOC_ALLOC_FEXIT.0,
                function: VMALLOC_ALLOC_FEXIT.1,
            });
            hooks.push(Hook::FEntry {
                name: VMALLOC_FREE_FENTRY.0,
                function: VMALLOC_FREE_FENTRY.1,
            });
            KindAttach::new(Kind::Vmalloc, "fexit/fentry", Some(why))
        }
        Err(error) => {
            let error = error.context(format!(
                "no vmalloc tracepoints (Linux 6.4+: {tracepoints}), and fexit/fentry on \
                 {} and {} did not load",
                VMALLOC_ALLOC_FEXIT.1, VMALLOC_FREE_FENTRY.1
            ));
            let why = not_followed(notes, Kind::Vmalloc, &error);
            KindAttach::new(Kind::Vmalloc, "none", Some(why))
        }
    }
}

/// The slab free hooks as fentry programs, for kernels where the slab hooks are classic
/// tracepoints (see memleak-ebpf/src/free_paths.rs for why).
const FENTRY_FREE_PROGRAMS: [(&str, &str); 2] = [
    ("kfree_fentry", "kfree"),
    ("kmem_cache_free_fentry", "kmem_cache_free"),
];

/// Replaces the classic kfree and kmem_cache_free hooks with fentry ones, when both load.
fn prefer_fentry_for_frees(ebpf: &mut Ebpf, btf: &LazyBtf, hooks: &mut Vec<Hook>) {
    for &(name, function) in &FENTRY_FREE_PROGRAMS {
        if let Err(error) = load_fentry(ebpf, name, function, btf) {
            log::info!("frees stay on classic tracepoints: {error:#}");
            return;
        }
    }
    hooks.retain(|hook| {
        !matches!(hook, Hook::Classic { event, .. }
            if FENTRY_FREE_PROGRAMS.iter().any(|&(_, function)| function == event))
    });
    hooks.extend(
        FENTRY_FREE_PROGRAMS
            .iter()
            .map(|&(name, function)| Hook::FEntry { name, function }),
    );
}

/// Loads (verifies) one fentry program of the free paths without a kmem event.
fn load_fentry(ebpf: &mut Ebpf, name: &str, function: &str, btf: &LazyBtf) -> Result<()> {
    let program: &mut FEntry = program_mut(ebpf, name)?.try_into()?;
    program
        .load(function, btf.get()?)
        .map_err(|error| explain_load_error(name, error))
}

/// Records in the report's notes that a kind of memory is not followed, and why.
/// Returns the reason, for the kind's attach method.
fn not_followed(notes: &mut Vec<String>, kind: Kind, error: &anyhow::Error) -> String {
    log::info!("{kind:?} not followed: {error:#}");
    let why = one_line(&format!("{error:#}"));
    notes.push(format!("{} allocations not followed: {why}", kind.label()));
    why
}

/// A loaded program and where it attaches.
enum Hook {
    Btf {
        name: &'static str,
        event: &'static str,
    },
    Classic {
        name: &'static str,
        category: String,
        event: String,
    },
    Raw {
        name: &'static str,
        event: String,
    },
    FEntry {
        name: &'static str,
        function: &'static str,
    },
    FExit {
        name: &'static str,
        function: &'static str,
    },
}

/// A hook and its link while it is attached.
struct Link {
    hook: Hook,
    id: Option<LinkId>,
}

enum LinkId {
    Btf(BtfTracePointLinkId),
    Classic(TracePointLinkId),
    Raw(RawTracePointLinkId),
    FEntry(FEntryLinkId),
    FExit(FExitLinkId),
}

/// Which slab hooks are attached ([`Tracer::set_slab_hooks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlabHooks {
    All,
    /// The frees only: the objects already tracked are still seen going.
    FreesOnly,
}

/// What a hook sees of the slab allocator's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    SlabAlloc,
    SlabFree,
    /// Pages, vmalloc, percpu: stay attached (their frees cannot be checked in kernel memory).
    Other,
}

impl Hook {
    fn event(&self) -> &str {
        match self {
            Self::Btf { event, .. } => event,
            Self::Classic { event, .. } | Self::Raw { event, .. } => event,
            Self::FEntry { function, .. } | Self::FExit { function, .. } => function,
        }
    }

    fn role(&self) -> Role {
        match self.event() {
            "kmalloc" | "kmalloc_node" | "kmem_cache_alloc" | "kmem_cache_alloc_node" => {
                Role::SlabAlloc
            }
            "kfree" | "kmem_cache_free" | "kvfree_call_rcu" | "kmem_cache_free_bulk" => {
                Role::SlabFree
            }
            _ => Role::Other,
        }
    }

    /// The event or function, and how it is hooked, for the report.
    fn describe(&self) -> String {
        match self {
            Self::Btf { event, .. } => format!("{event} (tp_btf)"),
            Self::Classic {
                category, event, ..
            } => format!("{category}:{event} (tracepoint)"),
            Self::Raw { event, .. } => format!("{event} (raw_tp)"),
            Self::FEntry { function, .. } => format!("{function} (fentry)"),
            Self::FExit { function, .. } => format!("{function} (fexit)"),
        }
    }

    fn attach(&self, ebpf: &mut Ebpf) -> Result<LinkId> {
        Ok(match *self {
            Self::Btf { name, event } => {
                let program: &mut BtfTracePoint = program_mut(ebpf, name)?.try_into()?;
                LinkId::Btf(
                    program
                        .attach()
                        .with_context(|| format!("attaching {name} to tp_btf/{event}"))?,
                )
            }
            Self::Classic {
                name,
                ref category,
                ref event,
            } => {
                let program: &mut TracePoint = program_mut(ebpf, name)?.try_into()?;
                LinkId::Classic(program.attach(category, event).with_context(|| {
                    format!("attaching {name} to tracepoint {category}:{event}")
                })?)
            }
            Self::Raw { name, ref event } => {
                let program: &mut RawTracePoint = program_mut(ebpf, name)?.try_into()?;
                LinkId::Raw(
                    program
                        .attach(event)
                        .with_context(|| format!("attaching {name} to raw_tp/{event}"))?,
                )
            }
            Self::FEntry { name, function } => {
                let program: &mut FEntry = program_mut(ebpf, name)?.try_into()?;
                LinkId::FEntry(
                    program
                        .attach()
                        .with_context(|| format!("attaching {name} to fentry/{function}"))?,
                )
            }
            Self::FExit { name, function } => {
                let program: &mut FExit = program_mut(ebpf, name)?.try_into()?;
                LinkId::FExit(
                    program
                        .attach()
                        .with_context(|| format!("attaching {name} to fexit/{function}"))?,
                )
            }
        })
    }

    fn detach(&self, ebpf: &mut Ebpf, id: LinkId) -> Result<()> {
        let name = match *self {
            Self::Btf { name, .. }
            | Self::Classic { name, .. }
            | Self::Raw { name, .. }
            | Self::FEntry { name, .. }
            | Self::FExit { name, .. } => name,
        };
        let program = program_mut(ebpf, name)?;
        match id {
            LinkId::Btf(id) => <&mut BtfTracePoint>::try_from(program)?.detach(id),
            LinkId::Classic(id) => <&mut TracePoint>::try_from(program)?.detach(id),
            LinkId::Raw(id) => <&mut RawTracePoint>::try_from(program)?.detach(id),
            LinkId::FEntry(id) => <&mut FEntry>::try_from(program)?.detach(id),
            LinkId::FExit(id) => <&mut FExit>::try_from(program)?.detach(id),
        }
        .with_context(|| format!("detaching {name} from {}", self.describe()))
    }
}

/// The slab hooks' attach ladder: tp_btf, raw tracepoints, classic tracepoints, each tried
/// when `--attach` allows it and the kernel has what it needs.
struct SlabLadder<'a> {
    method: AttachMethod,
    /// `struct kmem_cache`'s layout is known (kernel BTF).
    has_layout: bool,
    /// The raw `kmem_cache_alloc` argument list, from kernel BTF.
    raw_cache_alloc_passes_cache: Option<bool>,
    /// The classic events the kernel has, `_node` ones included.
    plan: &'a tracefs::ClassicPlan,
}

impl SlabLadder<'_> {
    /// Loads the first rung that loads; returns it, and why the cheaper ones were not used
    /// (also added to `notes`).
    fn load(
        &self,
        ebpf: &mut Ebpf,
        tp_btf: &LazyBtf,
        hooks: &mut Vec<Hook>,
        notes: &mut Vec<String>,
    ) -> Result<(Attached, Option<String>)> {
        let mut passed_over = Vec::new();
        let wanted = |rung: AttachMethod| self.method == AttachMethod::Auto || self.method == rung;
        if wanted(AttachMethod::Btf) {
            match self.btf_unusable() {
                None => match load_btf(ebpf, &SLAB_PROGRAMS, tp_btf) {
                    Ok(()) => {
                        hooks.extend(
                            SLAB_PROGRAMS
                                .iter()
                                .map(|&(name, event)| Hook::Btf { name, event }),
                        );
                        return Ok((Attached::BtfTracepoints, None));
                    }
                    Err(error) => {
                        passed_over.push(format!("tp_btf: {}", one_line(&format!("{error:#}"))));
                    }
                },
                Some(why) => passed_over.push(format!("tp_btf: {why}")),
            }
        }
        if wanted(AttachMethod::Raw) {
            match self.load_raw(ebpf) {
                Ok(raw_hooks) => {
                    hooks.extend(raw_hooks);
                    return Ok((Attached::RawTracepoints, self.explain(passed_over, notes)));
                }
                Err(error) => {
                    passed_over.push(format!("raw_tp: {}", one_line(&format!("{error:#}"))));
                }
            }
        }
        if wanted(AttachMethod::Classic) {
            hooks.extend(load_classic(ebpf, self.plan)?);
            return Ok((
                Attached::ClassicTracepoints,
                self.explain(passed_over, notes),
            ));
        }
        bail!(
            "--attach {}: the kernel refused it ({})",
            match self.method {
                AttachMethod::Btf => "btf",
                _ => "raw",
            },
            passed_over.join("; ")
        )
    }

    /// Why tp_btf cannot serve this kernel, before trying it.
    fn btf_unusable(&self) -> Option<String> {
        if !self.has_layout {
            return Some(format!("no kernel BTF at {}", kernel::BTF_PATH));
        }
        let node_events: Vec<&str> = self
            .plan
            .attach
            .iter()
            .map(|(_, event, _)| event.as_str())
            .filter(|event| event.ends_with("_node"))
            .collect();
        (!node_events.is_empty()).then(|| {
            format!(
                "this kernel has separate {} events (before Linux 6.1), and a tp_btf program \
                 attaches to one event only",
                node_events.join(" and ")
            )
        })
    }

    /// Loads the raw tracepoint programs, one hook per event the kernel has.
    fn load_raw(&self, ebpf: &mut Ebpf) -> Result<Vec<Hook>> {
        if !self.has_layout || self.raw_cache_alloc_passes_cache.is_none() {
            bail!(
                "their arguments are untyped words, whose order memleak reads from kernel BTF \
                 (btf_trace_kmem_cache_alloc), and this kernel has none"
            );
        }
        let mut hooks = Vec::new();
        for &(name, which) in &RAW_SLAB_PROGRAMS {
            let program: &mut RawTracePoint = program_mut(ebpf, name)?.try_into()?;
            program
                .load()
                .map_err(|error| explain_load_error(name, error))?;
            hooks.extend(
                self.plan
                    .attach
                    .iter()
                    .filter(|(_, _, serves)| *serves == which)
                    .map(|(_, event, _)| Hook::Raw {
                        name,
                        event: event.to_string(),
                    }),
            );
        }
        Ok(hooks)
    }

    /// The note on why the cheaper rungs were passed over, and that reason for the report.
    fn explain(&self, passed_over: Vec<String>, notes: &mut Vec<String>) -> Option<String> {
        if passed_over.is_empty() {
            return None;
        }
        let why = passed_over.join("; ");
        log::info!("slab hooks passed over cheaper methods: {why}");
        notes.push(format!("slab events not followed more cheaply: {why}"));
        Some(why)
    }
}

/// Loads (verifies) the classic tracepoint programs of `plan`; one program may serve several
/// events.
fn load_classic(ebpf: &mut Ebpf, plan: &tracefs::ClassicPlan) -> Result<Vec<Hook>> {
    let mut hooks = Vec::new();
    for (category, event, which) in &plan.attach {
        let name = classic_program_name(*which);
        let program: &mut TracePoint = program_mut(ebpf, name)?.try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|error| explain_load_error(name, error))?;
        }
        hooks.push(Hook::Classic {
            name,
            category: category.to_string(),
            event: event.to_string(),
        });
    }
    Ok(hooks)
}

impl Tracer {
    /// A tracer of uprobes, which no slab hook is swapped on.
    pub(crate) fn of_uprobes(
        programs: Ebpf,
        maps: TracerMaps,
        methods: Vec<KindAttach>,
        notes: Vec<String>,
        free_paths: Vec<String>,
    ) -> Self {
        Self {
            programs,
            links: Vec::new(),
            maps,
            attached: Attached::Uprobes,
            cache_ids_are_pointers: false,
            methods,
            notes,
            free_paths,
        }
    }

    /// Attaches or detaches the slab hooks (`memleak watch --duty`); the page, vmalloc and
    /// percpu hooks stay. Frees are attached before allocations and detached after them, so
    /// that no object is recorded while its free could go unseen. Costs a few system calls
    /// per hook.
    pub fn set_slab_hooks(&mut self, which: SlabHooks) -> Result<()> {
        let wanted = |role: Role| match role {
            Role::SlabAlloc => which == SlabHooks::All,
            Role::SlabFree | Role::Other => true,
        };
        // Frees first when attaching (sorted so), allocations first when detaching.
        let mut order: Vec<usize> = (0..self.links.len()).collect();
        order.sort_by_key(|&index| self.links[index].hook.role() != Role::SlabFree);
        for index in order.iter().copied() {
            let link = &mut self.links[index];
            if wanted(link.hook.role()) && link.id.is_none() {
                link.id = Some(link.hook.attach(&mut self.programs)?);
            }
        }
        for index in order.into_iter().rev() {
            let link = &mut self.links[index];
            if !wanted(link.hook.role())
                && let Some(id) = link.id.take()
            {
                link.hook.detach(&mut self.programs, id)?;
            }
        }
        Ok(())
    }
}

/// The shortest time between two sampled stacks on one CPU. A walk of a deep kernel stack (the
/// network stack's) costs up to 15 µs on a VM, and the sample's candidates come faster than
/// that on busy paths: at one a clock tick (250 a second at HZ=250, 1,000 at HZ=1000) the
/// walks took 28 ns of each slab allocation on loopback TCP (docs/overhead.md); at this
/// interval, about 60 a second per CPU, a 200 s trace still samples 12,000 stacks per CPU.
const STACK_SAMPLE_INTERVAL: Duration = Duration::from_millis(16);

/// The settings every program reads, whatever it hooks, and how the table reads.
fn base_config(settings: &TracerSettings) -> (TracerConfig, TableFormat) {
    let buckets = settings.buckets();
    let clock = AllocationClock::detect();
    let mut config = TracerConfig::DEFAULT;
    config.bucket_mask = buckets - 1;
    let sample_shift = settings.sample_rate.trailing_zeros();
    config.sample = SampleMasks::for_shift(sample_shift);
    // The stack rate counts all allocations; among tracked ones it is that much denser.
    config.stack_shift = settings
        .stack_sample_rate
        .trailing_zeros()
        .saturating_sub(sample_shift);
    if settings.stack_sample_rate > 1 {
        config.stack_sample_ticks = clock.ticks_spanning(STACK_SAMPLE_INTERVAL);
    }
    config.filter_tgid = settings.filter_tgid.unwrap_or(0);
    if let Some(comm) = &settings.filter_comm {
        config.filter_comm_enabled = 1;
        config.filter_comm[..comm.len()].copy_from_slice(comm.as_bytes());
    }
    config.min_size = settings.min_size.unwrap_or(0);
    config.max_size = settings.max_size.unwrap_or(u32::MAX);
    config.return_at_once = settings.empty_programs.into();
    config.user_stacks = settings.user_stacks.into();
    config.jiffies_clock = clock.uses_jiffies().into();
    config.plain_releases = (!settings.userspace_removes_objects).into();
    let table = TableFormat {
        buckets,
        clock,
        removals_allowed: settings.userspace_removes_objects,
        stack_sample_ticks: config.stack_sample_ticks,
    };
    (config, table)
}

/// The object with the settings every program reads (none of the kernel-specific ones),
/// recording only allocations by `filter_tgid`, or with `follow_processes` only those of the
/// processes listed in its `FOLLOWED_PROCESSES` map; and how its table reads.
pub(crate) fn load_for(
    settings: &TracerSettings,
    filter_tgid: Option<u32>,
    follow_processes: bool,
) -> Result<(Ebpf, TableFormat)> {
    let (mut config, table) = base_config(settings);
    config.filter_tgid = filter_tgid.or(settings.filter_tgid).unwrap_or(0);
    config.follow_processes = follow_processes.into();
    Ok((
        load_object(&config, table.buckets, settings.loads_plain_claims(), None)?,
        table,
    ))
}

/// Creates the maps and fills `page_callers` into its map.
fn load_object(
    config: &TracerConfig,
    buckets: u32,
    plain_claims: bool,
    page_callers: Option<&PageCallerTable>,
) -> Result<Ebpf> {
    // Derived here, after every field is final and where every configuration passes on its
    // way to the kernel: a filter it did not enable would be skipped by the allocation hooks.
    let config = config.with_allocation_filters_enabled();
    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", &config, true)
        .map_max_entries("OBJECT_KEYS", buckets)
        .map_max_entries("OBJECT_RECORDS", buckets)
        .map_max_entries(
            "PAGE_CALLERS",
            page_callers.map_or(1, |table| table.entries.len() as u32),
        )
        .map_max_entries("STACKS", STACK_MAP_ENTRIES)
        .map_max_entries(
            "USER_STACKS",
            if config.user_stacks != 0 {
                USER_STACK_MAP_ENTRIES
            } else {
                1
            },
        )
        .load(object::ebpf_object(plain_claims)?)
        .context("creating eBPF maps")?;
    if let Some(table) = page_callers {
        let mut map: aya::maps::Array<&mut aya::maps::MapData, u64> = aya::maps::Array::try_from(
            ebpf.map_mut("PAGE_CALLERS")
                .ok_or_else(|| anyhow!("eBPF object has no map PAGE_CALLERS"))?,
        )?;
        for (index, &entry) in table.entries.iter().enumerate() {
            map.set(index as u32, &entry, 0)
                .context("filling the PAGE_CALLERS map")?;
        }
    }
    Ok(ebpf)
}

/// Loads (verifies) tp_btf programs: Linux 5.5+. The 6.1 verifier rejects the BTF that Rust
/// emits for them, so slab tracing falls back to classic tracepoints there.
fn load_btf(ebpf: &mut Ebpf, programs: &[(&str, &str)], btf: &LazyBtf) -> Result<()> {
    let btf = btf.get()?;
    for &(name, event) in programs {
        let program: &mut BtfTracePoint = program_mut(ebpf, name)?.try_into()?;
        program
            .load(event, btf)
            .map_err(|error| explain_load_error(name, error))?;
    }
    Ok(())
}

/// aya's parse of the kernel's BTF, which loading tp_btf programs needs: made once, on first
/// use (a trace may load no tp_btf program at all), for every kind that loads them.
#[derive(Default)]
struct LazyBtf(std::cell::OnceCell<Result<Btf, String>>);

impl LazyBtf {
    fn get(&self) -> Result<&Btf> {
        self.0
            .get_or_init(|| {
                Btf::from_sys_fs().map_err(|error| {
                    format!(
                        "{:#}",
                        anyhow::Error::new(error).context("loading kernel BTF")
                    )
                })
            })
            .as_ref()
            .map_err(|message| anyhow!("{message}"))
    }
}

pub(crate) fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))
}

/// The verifier's log is long; its last lines say why it refused.
pub(crate) fn explain_load_error(program: &str, error: ProgramError) -> anyhow::Error {
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
            if tail.is_empty() {
                return anyhow!("the kernel refused to load {program}: {io_error}");
            }
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

/// Whether the program named `program` follows frees (its hooks' events and functions are
/// frees too: `free_vmap_area_noflush`, `kvfree_call_rcu`).
pub(crate) fn follows_frees(program: &str) -> bool {
    program.contains("free")
}

/// Detaches and unloads every program, those that record allocations before those that
/// follow frees. Dropping `Ebpf` detaches in its hash map's order: a free hook gone while an
/// allocation hook stays lets an object be freed unseen and then recorded again at the same
/// address (a missed free), or listed as outstanding although it is free; on a TCG guest,
/// where detaching an fentry link takes an RCU tasks grace period, a forking shell lost a
/// whole address space's frees that way. Program names say which are frees (`kfree_btf`,
/// `user_free_entry`, `vmap_free_fentry`).
pub fn detach_allocations_first(programs: &mut Ebpf) -> Result<()> {
    let mut names: Vec<String> = programs
        .programs()
        .map(|(name, _)| name.to_owned())
        .collect();
    names.sort_by_key(|name| follows_frees(name));
    for name in names {
        let unloaded = match program_mut(programs, &name)? {
            Program::TracePoint(program) => program.unload(),
            Program::BtfTracePoint(program) => program.unload(),
            Program::RawTracePoint(program) => program.unload(),
            Program::FEntry(program) => program.unload(),
            Program::FExit(program) => program.unload(),
            Program::UProbe(program) => program.unload(),
            _ => Ok(()),
        };
        match unloaded {
            // A program never loaded (a rung of the ladder not taken) has nothing to unload.
            Ok(()) | Err(ProgramError::NotLoaded) => {}
            Err(error) => return Err(error).with_context(|| format!("detaching {name}")),
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frees_release_plainly_unless_userspace_removes_objects() {
        let settings = |userspace_removes_objects| TracerSettings {
            capacity: 1 << 16,
            sample_rate: 1,
            stack_sample_rate: 1,
            filter_tgid: None,
            filter_comm: None,
            min_size: None,
            max_size: None,
            method: AttachMethod::Auto,
            kinds: Vec::new(),
            user_stacks: false,
            empty_programs: false,
            plain_claims: false,
            userspace_removes_objects,
        };
        let (config, table) = base_config(&settings(false));
        assert_eq!(config.plain_releases, 1);
        assert!(!table.removals_allowed);
        let (config, table) = base_config(&settings(true));
        assert_eq!(config.plain_releases, 0);
        assert!(table.removals_allowed);
    }

    #[test]
    fn free_programs_are_told_from_allocation_programs_by_name() {
        let hooks = SLAB_PROGRAMS
            .iter()
            .chain(&VMALLOC_PROGRAMS)
            .chain(&PERCPU_PROGRAMS)
            .chain(&PERCPU_PROGRAMS_BEFORE_6_0)
            .chain(&FREE_PATH_PROGRAMS)
            .chain(&FENTRY_FREE_PROGRAMS)
            .chain([&VMALLOC_ALLOC_FEXIT, &VMALLOC_FREE_FENTRY]);
        for &(program, event) in hooks {
            assert_eq!(
                follows_frees(program),
                event.contains("free"),
                "{program} on {event}"
            );
        }
        for (program, classic) in RAW_SLAB_PROGRAMS {
            let classic = classic_program_name(classic);
            assert_eq!(follows_frees(program), follows_frees(classic), "{program}");
        }
        assert!(follows_frees(classic_program_name(
            ClassicProgram::PageFree
        )));
        assert!(!follows_frees(classic_program_name(
            ClassicProgram::PageAlloc
        )));
    }
}
