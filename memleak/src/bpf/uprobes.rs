//! Attaching the user-space heap hooks (memleak-ebpf/src/user.rs) to one process: a uprobe at
//! the entry and a uretprobe at the return of each allocator function, in every object that
//! defines them (the C library, and jemalloc, tcmalloc or mimalloc when linked in or preloaded),
//! and a uprobe on `free`, `munmap` and `mremap`. Linux 4.17+ (BPF on uprobe perf events); aya takes uprobe_multi
//! links where the kernel has them (6.6+).
use std::{
    collections::BTreeSet,
    fs,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::MapData,
    programs::{UProbe, uprobe::UProbeScope},
};
use object::{Object as _, ObjectSymbol as _};

use super::{
    maps::TracerMaps,
    probes::{self, Tracer, TracerSettings},
};
use crate::kinds::KindAttach;

/// Allocator functions, each with the program at its entry. All return through
/// [`RETURN_PROGRAM`].
const ALLOCATOR_ENTRIES: [(&str, &str); 10] = [
    ("malloc", "user_malloc"),
    ("valloc", "user_malloc"),
    ("pvalloc", "user_malloc"),
    ("calloc", "user_calloc"),
    ("realloc", "user_realloc"),
    ("reallocarray", "user_reallocarray"),
    ("aligned_alloc", "user_aligned_alloc"),
    ("memalign", "user_aligned_alloc"),
    ("posix_memalign", "user_posix_memalign"),
    // `mmap64` is the same function: hooking both names would see each call twice.
    ("mmap", "user_mmap"),
];
const RETURN_PROGRAM: &str = "user_alloc_return";
/// Functions that free, each with its program: `free`, and the C library's unmapping.
const FREES: [(&str, &str); 3] = [
    ("free", "user_free"),
    ("munmap", "user_free_mapping"),
    ("mremap", "user_free_remapped"),
];
const FREE: &str = FREES[0].0;

/// The allocator functions a file defines (exports or has in its symbol table).
pub fn allocator_functions(path: &Path) -> Result<BTreeSet<&'static str>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{}: not an ELF file memleak can read", path.display()))?;
    let defined: BTreeSet<&str> = file
        .dynamic_symbols()
        .chain(file.symbols())
        .filter(|symbol| symbol.is_definition())
        .filter_map(|symbol| symbol.name().ok())
        .collect();
    Ok(ALLOCATOR_ENTRIES
        .iter()
        .chain(&FREES)
        .map(|&(function, _)| function)
        .filter(|function| defined.contains(function))
        .collect())
}

/// Attaches `program` at `functions` of `path`: one link (uprobe_multi, Linux 6.6+) or one
/// perf event each. Each link costs an RCU grace period to detach, so there are few.
fn attach(
    ebpf: &mut aya::Ebpf,
    program: &str,
    functions: &[&str],
    path: &Path,
    scope: UProbeScope,
) -> Result<()> {
    let uprobe: &mut UProbe = probes::program_mut(ebpf, program)?.try_into()?;
    uprobe
        .attach(functions.iter().copied(), path, scope)
        .with_context(|| {
            format!(
                "attaching {program} to {} in {}",
                functions.join(", "),
                path.display()
            )
        })?;
    Ok(())
}

/// Of `candidates`, the files that define `malloc` and `free`, each with the allocator
/// functions it defines; files that cannot be read are skipped.
pub fn allocators(candidates: &[PathBuf]) -> Vec<(PathBuf, BTreeSet<&'static str>)> {
    let mut found: Vec<(PathBuf, BTreeSet<&'static str>)> = Vec::new();
    for path in candidates {
        let Ok(functions) = allocator_functions(path) else {
            continue;
        };
        if functions.contains("malloc")
            && functions.contains(FREE)
            && !found.iter().any(|(known, _)| known == path)
        {
            found.push((path.clone(), functions));
        }
    }
    found
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
    if allocators.is_empty() {
        bail!("process {pid} maps no file that defines malloc and free: nothing to attach to");
    }
    let Some(process) = NonZeroU32::new(pid) else {
        bail!("process id 0 cannot be traced");
    };
    // Following forks, the programs check their process against the map instead.
    let only = (!follow_forks).then_some(pid);
    let (mut ebpf, buckets) = probes::load_for(settings, only, follow_forks)?;
    let (scope, mut followed) = if follow_forks {
        let map = ebpf
            .take_map("FOLLOWED_PROCESSES")
            .context("the eBPF object has no FOLLOWED_PROCESSES map")?;
        let map = aya::maps::HashMap::try_from(map).context("FOLLOWED_PROCESSES")?;
        (UProbeScope::AllProcesses, Some(FollowedProcesses(map)))
    } else {
        (UProbeScope::OneProcess(process), None)
    };
    if let Some(followed) = &mut followed {
        followed.follow(pid)?;
    }
    let programs = ALLOCATOR_ENTRIES
        .iter()
        .map(|&(_, program)| program)
        .chain([RETURN_PROGRAM])
        .chain(FREES.iter().map(|&(_, program)| program))
        .collect::<BTreeSet<_>>();
    for name in &programs {
        let program: &mut UProbe = probes::program_mut(&mut ebpf, name)?.try_into()?;
        program
            .load()
            .map_err(|error| probes::explain_load_error(name, error))?;
    }
    let mut files = Vec::new();
    for (path, functions) in allocators {
        // Frees first: a block allocated before the free hook is attached would stay listed;
        // returns before entries: an entry whose return is not seen would leave its thread's
        // next call counted as nested in it.
        for (function, program) in FREES {
            if functions.contains(function) {
                attach(&mut ebpf, program, &[function], path, scope)?;
            }
        }
        let hooked: Vec<&str> = ALLOCATOR_ENTRIES
            .iter()
            .map(|&(function, _)| function)
            .filter(|function| functions.contains(function))
            .collect();
        attach(&mut ebpf, RETURN_PROGRAM, &hooked, path, scope)?;
        for program in &programs {
            let entries: Vec<&str> = ALLOCATOR_ENTRIES
                .iter()
                .filter(|&&(function, entry)| entry == *program && functions.contains(function))
                .map(|&(function, _)| function)
                .collect();
            if !entries.is_empty() {
                attach(&mut ebpf, program, &entries, path, scope)?;
            }
        }
        files.push(format!("{} ({})", path.display(), hooked.join(", ")));
    }
    let maps = TracerMaps::take(&mut ebpf, buckets)?;
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
            method: "uprobe".to_owned(),
            why: None,
        }],
        vec![format!("{heaps}: uprobes on {}", files.join("; "))],
        allocators
            .iter()
            .map(|(path, functions)| {
                let frees: Vec<&str> = FREES
                    .iter()
                    .map(|&(function, _)| function)
                    .filter(|function| functions.contains(function))
                    .collect();
                format!("{} in {} (uprobe)", frees.join(", "), path.display())
            })
            .collect(),
    );
    Ok((tracer, followed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_programs_are_detached_last() {
        for (_, program) in FREES {
            assert!(probes::follows_frees(program), "{program}");
        }
        for program in ALLOCATOR_ENTRIES
            .iter()
            .map(|&(_, program)| program)
            .chain([RETURN_PROGRAM])
        {
            assert!(!probes::follows_frees(program), "{program}");
        }
    }
}
