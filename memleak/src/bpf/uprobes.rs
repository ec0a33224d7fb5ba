//! Attaching the user-space heap hooks (memleak-ebpf/src/user.rs) to one process: a uprobe at
//! the entry and a uretprobe at the return of each allocator function, in every object that
//! defines them (the C library, and jemalloc, tcmalloc or mimalloc when linked in or preloaded),
//! and a uprobe on each function that frees. Each program serves many functions, told apart by
//! attach cookies (Linux 5.15+). Where the kernel has uprobe_multi links (6.6+, and for one
//! process the fix that filters by address space rather than by thread), each program takes
//! one link per file; otherwise one perf event per function, and each costs an RCU grace
//! period to detach.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::MapData,
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeAttachPoint, UProbeScope},
    },
    sys::{UProbeMultiFeature, is_uprobe_multi_supported},
};
use memleak_common::user_call;
use object::{Object as _, ObjectSymbol as _};

use super::{
    maps::TracerMaps,
    probes::{self, Tracer, TracerSettings},
};
use crate::kinds::KindAttach;

/// Allocator functions, each with the call its entry hook is told by its cookie. Beside the C
/// library's: C++'s `operator new` in its forms (jemalloc, tcmalloc and mimalloc define them
/// apart from malloc; the C++ library's, which calls malloc, see [`allocators`]) and
/// jemalloc's `mallocx`/`rallocx`.
const ALLOCATOR_ENTRIES: [(&str, u64); 20] = [
    ("malloc", user_call::MALLOC),
    ("valloc", user_call::MALLOC),
    ("pvalloc", user_call::MALLOC),
    ("calloc", user_call::CALLOC),
    ("realloc", user_call::REALLOC),
    ("reallocarray", user_call::REALLOCARRAY),
    ("aligned_alloc", user_call::ALIGNED_ALLOC),
    ("memalign", user_call::ALIGNED_ALLOC),
    ("posix_memalign", user_call::POSIX_MEMALIGN),
    // `mmap64` is the same function: hooking both names would see each call twice.
    ("mmap", user_call::MMAP),
    ("mallocx", user_call::MALLOC),
    ("rallocx", user_call::REALLOC),
    // operator new(size_t) and new[], each also nothrow, aligned, aligned nothrow: the size
    // comes first in all.
    ("_Znwm", user_call::MALLOC),
    ("_Znam", user_call::MALLOC),
    ("_ZnwmRKSt9nothrow_t", user_call::MALLOC),
    ("_ZnamRKSt9nothrow_t", user_call::MALLOC),
    ("_ZnwmSt11align_val_t", user_call::MALLOC),
    ("_ZnamSt11align_val_t", user_call::MALLOC),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", user_call::MALLOC),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", user_call::MALLOC),
];
/// Functions that free, each with the call its hook is told by its cookie: `free`, the C
/// library's unmapping, jemalloc's `dallocx`/`sdallocx`, and C++'s `operator delete` in its
/// forms (the pointer first in all).
const FREES: [(&str, u64); 15] = [
    ("free", user_call::FREE),
    ("munmap", user_call::FREE),
    ("mremap", user_call::MREMAP),
    ("dallocx", user_call::FREE),
    ("sdallocx", user_call::FREE),
    ("_ZdlPv", user_call::FREE),
    ("_ZdaPv", user_call::FREE),
    ("_ZdlPvm", user_call::FREE),
    ("_ZdaPvm", user_call::FREE),
    ("_ZdlPvRKSt9nothrow_t", user_call::FREE),
    ("_ZdaPvRKSt9nothrow_t", user_call::FREE),
    ("_ZdlPvSt11align_val_t", user_call::FREE),
    ("_ZdaPvSt11align_val_t", user_call::FREE),
    ("_ZdlPvmSt11align_val_t", user_call::FREE),
    ("_ZdaPvmSt11align_val_t", user_call::FREE),
];
/// The hooks: at allocator functions' entries, at their returns, at functions that free.
struct Programs {
    entry: &'static str,
    exit: &'static str,
    free: &'static str,
    /// The method, as the report names it.
    method: &'static str,
}

/// One perf event per function (Linux 5.15+ with cookies).
const PER_FUNCTION: Programs = Programs {
    entry: "user_alloc_entry",
    exit: "user_alloc_return",
    free: "user_free_entry",
    method: "uprobe",
};

/// One uprobe_multi link per file (Linux 6.6+).
const PER_FILE: Programs = Programs {
    entry: "user_alloc_entry_multi",
    exit: "user_alloc_return_multi",
    free: "user_free_entry_multi",
    method: "uprobe_multi",
};

const FREE: &str = FREES[0].0;

/// The allocator functions a file defines (exports or has in its symbol table), one name per
/// address: allocators alias their names (tcmalloc's `operator delete` is its `free`), and a
/// function hooked under two names would be seen twice per call.
pub fn allocator_functions(path: &Path) -> Result<BTreeSet<&'static str>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{}: not an ELF file memleak can read", path.display()))?;
    let addresses: BTreeMap<&str, u64> = file
        .dynamic_symbols()
        .chain(file.symbols())
        .filter(|symbol| symbol.is_definition())
        .filter_map(|symbol| Some((symbol.name().ok()?, symbol.address())))
        .collect();
    Ok(first_name_per_address(&addresses))
}

/// Of the hooked functions in `addresses` (name to address), the first in hooking order at
/// each address.
fn first_name_per_address(addresses: &BTreeMap<&str, u64>) -> BTreeSet<&'static str> {
    let mut taken = BTreeSet::new();
    ALLOCATOR_ENTRIES
        .iter()
        .chain(&FREES)
        .map(|&(function, _)| function)
        .filter(|function| {
            addresses
                .get(function)
                .is_some_and(|&address| taken.insert(address))
        })
        .collect()
}

/// `functions` as a note names them: C++'s operators by their C++ names.
fn describe(functions: &[&str]) -> String {
    let mut names: Vec<&str> = functions
        .iter()
        .copied()
        .filter(|function| !function.starts_with("_Z"))
        .collect();
    if functions.iter().any(|function| function.starts_with("_Zn")) {
        names.push("operator new");
    }
    if functions.iter().any(|function| function.starts_with("_Zd")) {
        names.push("operator delete");
    }
    names.join(", ")
}

/// Attaches `program` at `functions` of `path`, each with its cookie.
fn attach(
    ebpf: &mut aya::Ebpf,
    program: &str,
    functions: &[(&str, u64)],
    path: &Path,
    scope: UProbeScope,
) -> Result<()> {
    let uprobe: &mut UProbe = probes::program_mut(ebpf, program)?.try_into()?;
    let points = functions
        .iter()
        .map(|&(function, cookie)| UProbeAttachPoint {
            location: function.into(),
            cookie: Some(cookie),
        });
    uprobe.attach(points, path, scope).map_err(|error| {
        let context = format!(
            "attaching {program} to {} in {}",
            names_of(functions).join(", "),
            path.display()
        );
        match error {
            ProgramError::AttachCookieNotSupported => anyhow::anyhow!(
                "{context}: this kernel has no BPF attach cookies, which --user needs (Linux \
                 5.15+)"
            ),
            error => anyhow::Error::new(error).context(context),
        }
    })?;
    Ok(())
}

/// The names of hooked `functions`.
fn names_of<'a>(functions: &[(&'a str, u64)]) -> Vec<&'a str> {
    functions.iter().map(|&(function, _)| function).collect()
}

/// The functions of `table` among `functions`, with their cookies.
fn hooked_in(
    table: &[(&'static str, u64)],
    functions: &BTreeSet<&str>,
) -> Vec<(&'static str, u64)> {
    table
        .iter()
        .copied()
        .filter(|(function, _)| functions.contains(function))
        .collect()
}

/// Of `candidates`, the files that define `malloc` and `free`, each with the allocator
/// functions it defines, and the C++ libraries, with their `operator new` forms only: theirs
/// call malloc, and are built without frame pointers, so that a stack walked from malloc skips
/// the code that called `new`; hooked, `new` is the outer call, and its caller the call site.
/// (Their `operator delete` calls free, hooked already.) Files that cannot be read are skipped.
pub fn allocators(candidates: &[PathBuf]) -> Vec<(PathBuf, BTreeSet<&'static str>)> {
    let mut found: Vec<(PathBuf, BTreeSet<&'static str>)> = Vec::new();
    for path in candidates {
        let Ok(functions) = allocator_functions(path) else {
            continue;
        };
        if found.iter().any(|(known, _)| known == path) {
            continue;
        }
        if defines_malloc_and_free(&functions) {
            found.push((path.clone(), functions));
        } else {
            let news: BTreeSet<&str> = functions
                .into_iter()
                .filter(|function| is_operator_new(function))
                .collect();
            if !news.is_empty() {
                found.push((path.clone(), news));
            }
        }
    }
    found
}

fn defines_malloc_and_free(functions: &BTreeSet<&str>) -> bool {
    functions.contains("malloc") && functions.contains(FREE)
}

/// `operator new` and `new[]` in their forms (mangled).
fn is_operator_new(function: &str) -> bool {
    function.starts_with("_Znwm") || function.starts_with("_Znam")
}

/// The processes whose heaps the hooks record when they are attached in every process
/// (`run --user --follow-forks`): the command, and each child it forks, added while the child
/// is held before its first instruction.
pub struct FollowedProcesses(aya::maps::HashMap<MapData, u32, u8>);

impl FollowedProcesses {
    pub fn follow(&mut self, pid: u32) -> Result<()> {
        self.0
            .insert(&pid, &1, 0)
            .with_context(|| format!("following process {pid}"))
    }

    /// Stops recording `pid` (it exited, or exec replaced its program); its id may be reused.
    pub fn forget(&mut self, pid: u32) {
        let _ = self.0.remove(&pid);
    }
}

/// Loads the tracer and attaches the heap hooks to `pid` in each of `allocators`. With
/// `follow_forks`, the hooks are attached in every process that maps those files (a forked
/// child is another address space, which a hook scoped to `pid` does not see), record only
/// the processes in the returned [`FollowedProcesses`], and `pid` is the first of them.
pub fn attach_user(
    settings: &TracerSettings,
    pid: u32,
    allocators: &[(PathBuf, BTreeSet<&'static str>)],
    follow_forks: bool,
) -> Result<(Tracer, Option<FollowedProcesses>)> {
    if !allocators
        .iter()
        .any(|(_, functions)| defines_malloc_and_free(functions))
    {
        bail!("process {pid} maps no file that defines malloc and free: nothing to attach to");
    }
    let Some(process) = NonZeroU32::new(pid) else {
        bail!("process id 0 cannot be traced");
    };
    // Following forks, the programs check their process against the map instead.
    let only = (!follow_forks).then_some(pid);
    let (mut ebpf, table) = probes::load_for(settings, only, follow_forks)?;
    let (scope, followed) = if follow_forks {
        let map = ebpf
            .take_map("FOLLOWED_PROCESSES")
            .context("the eBPF object has no FOLLOWED_PROCESSES map")?;
        let mut followed =
            FollowedProcesses(aya::maps::HashMap::try_from(map).context("FOLLOWED_PROCESSES")?);
        followed.follow(pid)?;
        (UProbeScope::AllProcesses, Some(followed))
    } else {
        (UProbeScope::OneProcess(process), None)
    };
    // uprobe_multi links filtered by one process once matched one thread only; with that fix,
    // or for every process, links per file.
    let needed = if follow_forks {
        UProbeMultiFeature::LinkCreation
    } else {
        UProbeMultiFeature::ProcessScopedPidFilter
    };
    let programs = if is_uprobe_multi_supported(needed).unwrap_or(false) {
        PER_FILE
    } else {
        PER_FUNCTION
    };
    for name in [programs.entry, programs.exit, programs.free] {
        let program: &mut UProbe = probes::program_mut(&mut ebpf, name)?.try_into()?;
        program
            .load()
            .map_err(|error| probes::explain_load_error(name, error))?;
    }
    let mut files = Vec::new();
    let mut free_paths = Vec::new();
    for (path, functions) in allocators {
        // Frees first: a block allocated before the free hook is attached would stay listed;
        // returns before entries: an entry whose return is not seen would leave its thread's
        // next call counted as nested in it.
        let frees = hooked_in(&FREES, functions);
        if !frees.is_empty() {
            attach(&mut ebpf, programs.free, &frees, path, scope)?;
            free_paths.push(format!(
                "{} in {} (uprobe)",
                describe(&names_of(&frees)),
                path.display()
            ));
        }
        let entries = hooked_in(&ALLOCATOR_ENTRIES, functions);
        if entries.is_empty() {
            continue;
        }
        attach(&mut ebpf, programs.exit, &entries, path, scope)?;
        attach(&mut ebpf, programs.entry, &entries, path, scope)?;
        files.push(format!(
            "{} ({})",
            path.display(),
            describe(&names_of(&entries))
        ));
    }
    let maps = TracerMaps::take(&mut ebpf, table)?;
    let heaps = if follow_forks {
        format!(
            "user-space heaps of process {pid} and the processes it forks (hooked in every \
             process, recorded in these)"
        )
    } else {
        format!("user-space heap of process {pid}")
    };
    let tracer = Tracer::of_uprobes(
        ebpf,
        maps,
        vec![KindAttach {
            kind: "user".to_owned(),
            method: programs.method.to_owned(),
            why: None,
            callers: None,
        }],
        vec![format!("{heaps}: uprobes on {}", files.join("; "))],
        free_paths,
    );
    Ok((tracer, followed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_is_hooked_under_one_name() {
        // tcmalloc's exports: free, tc_free and operator delete are one function.
        let addresses = BTreeMap::from([
            ("malloc", 0x1ed40),
            ("tc_malloc", 0x1ed40),
            ("free", 0x1d100),
            ("tc_free", 0x1d100),
            ("_ZdlPv", 0x1d100),
            ("_ZdlPvm", 0x1d280),
            ("_Znwm", 0x1e6c0),
            ("calloc", 0x1dae0),
            ("unrelated", 0x1000),
        ]);
        assert_eq!(
            first_name_per_address(&addresses),
            BTreeSet::from(["malloc", "free", "_ZdlPvm", "_Znwm", "calloc"])
        );
    }

    #[test]
    fn notes_name_the_operators_by_their_cpp_names() {
        assert_eq!(
            describe(&["malloc", "_Znwm", "_ZnamRKSt9nothrow_t", "mallocx"]),
            "malloc, mallocx, operator new"
        );
        assert_eq!(describe(&["free", "_ZdlPvm"]), "free, operator delete");
        assert_eq!(describe(&["free"]), "free");
    }

    #[test]
    fn the_free_programs_are_detached_last() {
        for programs in [PER_FUNCTION, PER_FILE] {
            assert!(probes::follows_frees(programs.free), "{}", programs.free);
            for program in [programs.entry, programs.exit] {
                assert!(!probes::follows_frees(program), "{program}");
            }
        }
    }
}
