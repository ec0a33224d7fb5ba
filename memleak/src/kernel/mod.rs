//! Facts about the running kernel: its release, its BTF, its loaded modules.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, anyhow};

pub mod btf;
pub mod invariants;
pub mod kallsyms;
pub mod mounts;
pub mod orc;
pub mod privileges;
pub mod process;
pub mod procfs;
pub mod slab_merges;
pub mod tracefs;

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// `uname -r`.
pub fn release() -> Result<String> {
    let text = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    Ok(text.trim().to_owned())
}

/// Whether a kernel release (`5.10.0-32-amd64`) is older than Linux `major.minor`; false for
/// a release that does not start with a version.
pub fn release_predates(release: &str, major: u32, minor: u32) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(release_major), Some(release_minor)) => {
            (release_major, release_minor) < (major, minor)
        }
        _ => false,
    }
}

/// This boot's random id: kernel addresses and monotonic timestamps mean the same only
/// within one boot.
pub fn boot_id() -> Result<String> {
    let text = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("reading /proc/sys/kernel/random/boot_id")?;
    Ok(text.trim().to_owned())
}

pub fn has_btf() -> bool {
    Path::new(BTF_PATH).exists()
}

/// The running kernel's BTF, or `None` when it has none. Parsing takes about 150 ms and tens
/// of megabytes, so a command parses it once and derives every layout it needs from it.
pub fn parse_btf() -> Result<Option<btf_rs::Btf>> {
    if !has_btf() {
        return Ok(None);
    }
    btf_rs::Btf::from_file(BTF_PATH)
        .context("parsing kernel BTF")
        .map(Some)
}

/// Whether `kvfree_call_rcu` takes the offset of the object's rcu_head as its second argument
/// (`rcu_callback_t func`, before Linux 6.3) rather than the object (`void *ptr`), from the
/// name of that parameter in the kernel's BTF.
pub fn kvfree_rcu_passes_offset(btf: &btf_rs::Btf) -> bool {
    let second_parameter = || -> Option<String> {
        let prototype = function_prototype(btf, "kvfree_call_rcu")?;
        btf.resolve_name(prototype.parameters.get(1)?).ok()
    };
    second_parameter().as_deref() == Some("func")
}

/// How many arguments the kernel function `name` takes, from its BTF prototype; `None` where
/// the kernel's BTF has no such function (it was inlined, or does not exist).
pub fn argument_count(btf: &btf_rs::Btf, name: &str) -> Option<u32> {
    u32::try_from(function_prototype(btf, name)?.parameters.len()).ok()
}

/// Whether the raw `kmem_cache_alloc` tracepoint passes the cache (`struct kmem_cache *s`,
/// Linux 6.1+) as its third argument, rather than the requested size; from the prototype of
/// the tracepoint's BTF typedef, `btf_trace_kmem_cache_alloc` (its first parameter is the
/// probe's `void *__data`). `None` where the kernel's BTF has no such typedef.
pub fn raw_cache_alloc_passes_cache(btf: &btf_rs::Btf) -> Option<bool> {
    let prototype = tracepoint_prototype(btf, "kmem_cache_alloc")?;
    let third = prototype.parameters.get(3)?;
    let mut pointee = match btf.resolve_chained_type(third).ok()? {
        btf_rs::Type::Ptr(pointer) => btf.resolve_chained_type(&pointer).ok()?,
        _ => return Some(false),
    };
    // `const struct kmem_cache *` on some kernels.
    while let btf_rs::Type::Const(qualified) | btf_rs::Type::Volatile(qualified) = pointee {
        pointee = btf.resolve_chained_type(&qualified).ok()?;
    }
    Some(match pointee {
        btf_rs::Type::Struct(structure) => {
            btf.resolve_name(&structure).ok().as_deref() == Some("kmem_cache")
        }
        _ => false,
    })
}

/// How many arguments the tracepoint `event` passes its programs (`percpu_alloc_percpu`: 7
/// before Linux 6.0, 10 or more since), from its BTF typedef, less the probe's `__data`.
pub fn tracepoint_argument_count(btf: &btf_rs::Btf, event: &str) -> Option<u32> {
    let parameters = tracepoint_prototype(btf, event)?.parameters.len();
    u32::try_from(parameters.checked_sub(1)?).ok()
}

/// The prototype of the raw tracepoint `event`'s probes, `btf_trace_EVENT` (a typedef of a
/// pointer to it); its first parameter is the probe's `void *__data`.
fn tracepoint_prototype(btf: &btf_rs::Btf, event: &str) -> Option<btf_rs::FuncProto> {
    let typedef = btf
        .resolve_types_by_name(&format!("btf_trace_{event}"))
        .ok()?
        .into_iter()
        .find(|candidate| matches!(candidate, btf_rs::Type::Typedef(_)))?;
    let btf_rs::Type::Typedef(typedef) = typedef else {
        return None;
    };
    let btf_rs::Type::Ptr(pointer) = btf.resolve_chained_type(&typedef).ok()? else {
        return None;
    };
    match btf.resolve_chained_type(&pointer).ok()? {
        btf_rs::Type::FuncProto(prototype) => Some(prototype),
        _ => None,
    }
}

/// The BTF prototype of the kernel function `name`.
fn function_prototype(btf: &btf_rs::Btf, name: &str) -> Option<btf_rs::FuncProto> {
    let function =
        btf.resolve_types_by_name(name).ok()?.into_iter().find_map(
            |candidate| match candidate {
                btf_rs::Type::Func(function) => Some(function),
                _ => None,
            },
        )?;
    match btf.resolve_chained_type(&function).ok()? {
        btf_rs::Type::FuncProto(prototype) => Some(prototype),
        _ => None,
    }
}

/// Offsets in `struct kmem_cache` that the tp_btf programs read through the cache pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmemCacheLayout {
    pub size: u32,
    pub object_size: u32,
    pub name: u32,
}

impl KmemCacheLayout {
    pub fn from_btf(btf: &btf_rs::Btf) -> Result<Self> {
        let layout = btf::find_struct(btf, "kmem_cache")?;
        let offset_of = |wanted: &str| -> Result<u32> {
            btf::member(btf, &layout, wanted)?
                .byte_offset()
                .ok_or_else(|| anyhow!("struct kmem_cache::{wanted} is a bit field"))
        };
        Ok(Self {
            size: offset_of("size")?,
            object_size: offset_of("object_size")?,
            name: offset_of("name")?,
        })
    }
}

/// A loaded module's text range, from /proc/modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub base: u64,
    pub size: u64,
}

/// Parses /proc/modules: `name size refcount deps state address [taint]`. Lines that do not
/// parse (or show address 0, as they do to unprivileged readers) are skipped.
pub fn parse_modules(text: &str) -> Vec<Module> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = *fields.first()?;
            let size = fields.get(1)?.parse().ok()?;
            let base = u64::from_str_radix(fields.get(5)?.trim_start_matches("0x"), 16).ok()?;
            (base != 0).then(|| Module {
                name: name.to_owned(),
                base,
                size,
            })
        })
        .collect()
}

pub fn loaded_modules() -> Vec<Module> {
    fs::read_to_string("/proc/modules")
        .map(|text| parse_modules(&text))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_modules() {
        let text = "leaky 16384 0 - Live 0xffffffffc0a00000 (OE)\n\
                    bonding 200704 0 - Live 0xffffffffc0b00000\n\
                    hidden 4096 0 - Live 0x0000000000000000\n\
                    garbage\n";
        let modules = parse_modules(text);
        assert_eq!(
            modules,
            vec![
                Module {
                    name: "leaky".into(),
                    base: 0xffff_ffff_c0a0_0000,
                    size: 16384
                },
                Module {
                    name: "bonding".into(),
                    base: 0xffff_ffff_c0b0_0000,
                    size: 200_704
                },
            ]
        );
    }

    #[test]
    fn finds_kmem_cache_layout_in_running_kernel_btf() {
        if !has_btf() {
            return;
        }
        let btf = btf_rs::Btf::from_file(BTF_PATH).unwrap();
        let layout = KmemCacheLayout::from_btf(&btf).unwrap();
        // object_size follows size in every SLUB layout since 2.6.
        assert_eq!(layout.object_size, layout.size + 4);
        assert!(layout.name > layout.object_size);
    }
}
