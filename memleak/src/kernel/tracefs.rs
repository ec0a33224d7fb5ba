//! The tracing filesystem: where it is mounted, and what the classic `kmem` tracepoints look
//! like on this kernel.
//!
//! Classic tracepoint programs receive the raw trace record, whose layout changes between
//! kernel versions. The kernel describes each layout in a text `format` file; this module
//! parses those files and turns them into the field offsets the eBPF programs read.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use memleak_common::{ClassicOffsets, NO_FIELD};

use super::mounts;

/// Where tracefs lives on Linux 4.1+, and where this module mounts it if nobody has.
const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";

/// Finds the mounted tracefs, mounting it at /sys/kernel/tracing if it is mounted nowhere.
pub fn root() -> Result<PathBuf> {
    let table = mounts::read_table()?;
    if let Some(dir) = tracing_dirs(&table).find(|dir| dir.join("events").is_dir()) {
        return Ok(dir);
    }
    log::info!("mounting tracefs at {DEFAULT_TRACEFS}");
    if let Err(error) = mounts::mount_pseudo(c"tracefs", c"/sys/kernel/tracing") {
        bail!(
            "tracefs is not mounted, and mounting it at {DEFAULT_TRACEFS} failed: {error}; \
             mount it by hand with `mount -t tracefs tracefs {DEFAULT_TRACEFS}`"
        );
    }
    Ok(PathBuf::from(DEFAULT_TRACEFS))
}

/// The directories of a mount table that may hold the tracing files: tracefs mounts, and
/// `tracing/` under debugfs, where kernels before 4.1 kept them.
fn tracing_dirs(table: &str) -> impl Iterator<Item = PathBuf> {
    mounts::entries(table).filter_map(|(target, fstype)| match fstype {
        "tracefs" => Some(PathBuf::from(target)),
        "debugfs" => Some(Path::new(target).join("tracing")),
        _ => None,
    })
}

/// One event's `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFormat {
    pub name: String,
    pub id: Option<u32>,
    /// In record order, the `common_` header fields included.
    pub fields: Vec<Field>,
}

/// One field of a trace record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The declaration without the name: `const void *`, `char[16]`, `__data_loc char[]`.
    pub c_type: String,
    pub offset: u16,
    pub size: u16,
    /// False when the kernel does not say (kernels before 2.6.33 print no `signed:`).
    pub signed: bool,
}

impl EventFormat {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|field| field.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("line {line}: expected {expected}, found {found:?}")]
    Unexpected {
        /// 1-based.
        line: usize,
        expected: &'static str,
        found: String,
    },
    #[error("no `name:` line")]
    MissingName,
}

/// Parses the text of an event's `format` file:
///
/// ```text
/// name: kmalloc
/// ID: 658
/// format:
///         field:unsigned short common_type;       offset:0;       size:2; signed:0;
///         field:const void * ptr; offset:16;      size:8; signed:0;
///
/// print fmt: "..."
/// ```
///
/// Everything from `print fmt:` on is ignored: it is a C expression this tracer has no use for.
pub fn parse_format(text: &str) -> Result<EventFormat, FormatError> {
    let mut name = None;
    let mut id = None;
    let mut fields = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = raw.trim();
        let unexpected = |expected| FormatError::Unexpected {
            line: line_number,
            expected,
            found: line.to_owned(),
        };
        if line.starts_with("print fmt:") {
            break;
        } else if let Some(field) = line.strip_prefix("field:") {
            fields.push(parse_field(field, line_number)?);
        } else if let Some(value) = line.strip_prefix("name:") {
            let value = value.trim();
            if value.is_empty() {
                return Err(unexpected("an event name after `name:`"));
            }
            name = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("ID:") {
            id = Some(
                value
                    .trim()
                    .parse()
                    .map_err(|_| unexpected("a number after `ID:`"))?,
            );
        } else if !(line.is_empty() || line == "format:") {
            return Err(unexpected(
                "`name:`, `ID:`, `format:`, `field:` or `print fmt:`",
            ));
        }
    }
    Ok(EventFormat {
        name: name.ok_or(FormatError::MissingName)?,
        id,
        fields,
    })
}

/// Parses what follows `field:`: a declaration and attributes separated by `;` and tabs, e.g.
/// `char comm[16]; offset:8; size:16; signed:0;`.
fn parse_field(text: &str, line: usize) -> Result<Field, FormatError> {
    let unexpected = |expected, found: &str| FormatError::Unexpected {
        line,
        expected,
        found: found.to_owned(),
    };
    let mut parts = text.split(';').map(str::trim);
    let declaration = parts.next().unwrap_or_default();
    let (c_type, name) = split_declaration(declaration)
        .ok_or_else(|| unexpected("a declaration `type name` or `type name[N]`", declaration))?;
    let (mut offset, mut size, mut signed) = (None, None, false);
    for part in parts.filter(|part| !part.is_empty()) {
        let (key, value) = part.split_once(':').unwrap_or((part, ""));
        let number = |expected| {
            value
                .trim()
                .parse::<u16>()
                .map_err(|_| unexpected(expected, part))
        };
        match key.trim() {
            "offset" => offset = Some(number("`offset:` and a number")?),
            "size" => size = Some(number("`size:` and a number")?),
            "signed" => {
                signed = match number("`signed:0` or `signed:1`")? {
                    0 => false,
                    1 => true,
                    _ => return Err(unexpected("`signed:0` or `signed:1`", part)),
                }
            }
            _ => return Err(unexpected("`offset:`, `size:` or `signed:`", part)),
        }
    }
    Ok(Field {
        name,
        c_type,
        offset: offset.ok_or_else(|| unexpected("an `offset:` attribute", text))?,
        size: size.ok_or_else(|| unexpected("a `size:` attribute", text))?,
        signed,
    })
}

/// Splits `const void * ptr` into (`const void *`, `ptr`) and `char comm[16]` into
/// (`char[16]`, `comm`): the name is the last identifier before an optional array suffix.
fn split_declaration(declaration: &str) -> Option<(String, String)> {
    let (head, array) = match declaration.rfind('[') {
        Some(open) if declaration.ends_with(']') => declaration.split_at(open),
        _ => (declaration, ""),
    };
    let head = head.trim_end();
    let c_type = head.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_');
    let name = &head[c_type.len()..];
    let c_type = c_type.trim_end();
    if c_type.is_empty() || name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    Some((format!("{c_type}{array}"), name.to_owned()))
}

/// Reads and parses `events/<category>/<event>/format` under the tracefs `root`; `None` when
/// this kernel has no such event.
pub fn read_format(root: &Path, category: &str, event: &str) -> Result<Option<EventFormat>> {
    let path = root
        .join("events")
        .join(category)
        .join(event)
        .join("format");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let format = parse_format(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(format))
}

/// The classic tracepoint programs of the eBPF object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassicProgram {
    Kmalloc,
    KmemCacheAlloc,
    Kfree,
    KmemCacheFree,
    PageAlloc,
    PageFree,
}

/// What to attach the classic programs to, and the record offsets they need.
#[derive(Debug, Clone)]
pub struct ClassicPlan {
    pub offsets: ClassicOffsets,
    /// (category, event, program); one program may serve several events.
    pub attach: Vec<(String, String, ClassicProgram)>,
    /// Events this kernel lacks or that cannot be used, each with what goes unseen because of it.
    pub missing: Vec<String>,
}

const CATEGORY: &str = "kmem";

/// How a program reads a field.
#[derive(Clone, Copy)]
enum FieldKind {
    /// Read as a u64, so it must be 8 bytes: pointers, and `size_t` on 64-bit kernels.
    Word,
    /// Read as a u32, so it must be 4 bytes: `unsigned int`, `int`.
    Int,
    /// A `__data_loc char[]` (4 bytes: the string's offset and length in the record), which
    /// older kernels do not have.
    OptionalString,
    /// Flags read as a u32: 4 bytes (`gfp_t`, Linux 5.15), or 8 (`unsigned long`, 6.1 and
    /// 6.18), whose low half comes first on little-endian.
    Flags,
}

/// A field a program reads, and where in [`ClassicOffsets`] its offset goes.
struct WantedField {
    name: &'static str,
    kind: FieldKind,
    slot: fn(&mut ClassicOffsets) -> &mut u16,
}

struct ProgramSpec {
    program: ClassicProgram,
    event: &'static str,
    /// Before Linux 6.1 the allocations that name a NUMA node have their own event, with the
    /// base event's fields plus `node`.
    node_event: Option<&'static str>,
    /// What the tracer misses without the event; `None` when it cannot work without it.
    unseen_without: Option<&'static str>,
    fields: &'static [WantedField],
}

const SLAB_PROGRAMS: [ProgramSpec; 4] = [
    ProgramSpec {
        program: ClassicProgram::Kmalloc,
        event: "kmalloc",
        node_event: Some("kmalloc_node"),
        unseen_without: None,
        fields: &[
            WantedField {
                name: "call_site",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.kmalloc_call_site,
            },
            WantedField {
                name: "ptr",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.kmalloc_ptr,
            },
            WantedField {
                name: "bytes_req",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.kmalloc_bytes_req,
            },
            WantedField {
                name: "bytes_alloc",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.kmalloc_bytes_alloc,
            },
            WantedField {
                name: "gfp_flags",
                kind: FieldKind::Flags,
                slot: |offsets| &mut offsets.kmalloc_gfp_flags,
            },
        ],
    },
    ProgramSpec {
        program: ClassicProgram::KmemCacheAlloc,
        event: "kmem_cache_alloc",
        node_event: Some("kmem_cache_alloc_node"),
        unseen_without: Some("allocations of cache objects will not be seen"),
        fields: &[
            WantedField {
                name: "call_site",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.cache_alloc_call_site,
            },
            WantedField {
                name: "ptr",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.cache_alloc_ptr,
            },
            WantedField {
                name: "bytes_req",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.cache_alloc_bytes_req,
            },
            WantedField {
                name: "bytes_alloc",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.cache_alloc_bytes_alloc,
            },
            WantedField {
                name: "name",
                kind: FieldKind::OptionalString,
                slot: |offsets| &mut offsets.cache_alloc_name,
            },
        ],
    },
    ProgramSpec {
        program: ClassicProgram::Kfree,
        event: "kfree",
        node_event: None,
        unseen_without: None,
        fields: &[WantedField {
            name: "ptr",
            kind: FieldKind::Word,
            slot: |offsets| &mut offsets.kfree_ptr,
        }],
    },
    ProgramSpec {
        program: ClassicProgram::KmemCacheFree,
        event: "kmem_cache_free",
        node_event: None,
        unseen_without: Some("frees of cache objects will not be seen"),
        fields: &[WantedField {
            name: "ptr",
            kind: FieldKind::Word,
            slot: |offsets| &mut offsets.cache_free_ptr,
        }],
    },
];

/// Page allocator events (`kmem:mm_page_alloc` and `kmem:mm_page_free`, laid out this way
/// since Linux 2.6.33 apart from the page pointer that became a pfn in 4.x).
const PAGE_PROGRAMS: [ProgramSpec; 2] = [
    ProgramSpec {
        program: ClassicProgram::PageAlloc,
        event: "mm_page_alloc",
        node_event: None,
        unseen_without: None,
        fields: &[
            WantedField {
                name: "pfn",
                kind: FieldKind::Word,
                slot: |offsets| &mut offsets.page_alloc_pfn,
            },
            WantedField {
                name: "order",
                kind: FieldKind::Int,
                slot: |offsets| &mut offsets.page_alloc_order,
            },
            WantedField {
                name: "migratetype",
                kind: FieldKind::Int,
                slot: |offsets| &mut offsets.page_alloc_migratetype,
            },
        ],
    },
    ProgramSpec {
        program: ClassicProgram::PageFree,
        event: "mm_page_free",
        node_event: None,
        unseen_without: None,
        fields: &[WantedField {
            name: "pfn",
            kind: FieldKind::Word,
            slot: |offsets| &mut offsets.page_free_pfn,
        }],
    },
];

impl WantedField {
    /// The field's offset in `format`, [`NO_FIELD`] for an optional field the event lacks; an
    /// error when the program would misread the field.
    fn offset_in(&self, format: &EventFormat) -> Result<u16> {
        let event = &format.name;
        let name = self.name;
        let Some(field) = format.field(name) else {
            return match self.kind {
                FieldKind::Word | FieldKind::Int | FieldKind::Flags => {
                    Err(anyhow!("{CATEGORY}:{event} has no field `{name}`"))
                }
                FieldKind::OptionalString => Ok(NO_FIELD),
            };
        };
        match self.kind {
            FieldKind::Word if field.size != 8 => bail!(
                "{CATEGORY}:{event} field `{name}` is {} bytes, but this tracer reads it as a \
                 64-bit value (only 64-bit kernels are supported)",
                field.size
            ),
            FieldKind::Flags if field.size != 4 && field.size != 8 => bail!(
                "{CATEGORY}:{event} field `{name}` is {} bytes, but this tracer reads flags of \
                 4 or 8 bytes",
                field.size
            ),
            FieldKind::Int if field.size != 4 => bail!(
                "{CATEGORY}:{event} field `{name}` is {} bytes, but this tracer reads it as a \
                 32-bit value",
                field.size
            ),
            FieldKind::OptionalString
                if !(field.c_type.starts_with("__data_loc") && field.size == 4) =>
            {
                bail!(
                    "{CATEGORY}:{event} field `{name}` is `{}` of {} bytes, not the \
                     4-byte `__data_loc char[]` this tracer reads",
                    field.c_type,
                    field.size
                )
            }
            _ => Ok(field.offset),
        }
    }
}

/// Decides which classic tracepoints to attach for slab allocations and where the programs
/// find their fields. `formats(category, event)` returns an event's format, `None` if the
/// kernel lacks it.
pub fn classic_plan(
    formats: &impl Fn(&str, &str) -> Result<Option<EventFormat>>,
) -> Result<ClassicPlan> {
    plan_programs(&SLAB_PROGRAMS, formats, ClassicOffsets::NONE)
}

/// The same for page allocations, filling the page fields of `offsets`; an error when the
/// kernel lacks either page event or lays it out unexpectedly.
pub fn page_plan(
    formats: &impl Fn(&str, &str) -> Result<Option<EventFormat>>,
    offsets: ClassicOffsets,
) -> Result<ClassicPlan> {
    plan_programs(&PAGE_PROGRAMS, formats, offsets)
}

fn plan_programs(
    specs: &[ProgramSpec],
    formats: &impl Fn(&str, &str) -> Result<Option<EventFormat>>,
    offsets: ClassicOffsets,
) -> Result<ClassicPlan> {
    let mut plan = ClassicPlan {
        offsets,
        attach: Vec::new(),
        missing: Vec::new(),
    };
    for spec in specs {
        let event = spec.event;
        let Some(format) = formats(CATEGORY, event)? else {
            match spec.unseen_without {
                Some(unseen) => plan.missing.push(format!("{CATEGORY}:{event} ({unseen})")),
                None => {
                    bail!("this kernel has no {CATEGORY}:{event} tracepoint, which memleak needs")
                }
            }
            continue;
        };
        for wanted in spec.fields {
            *(wanted.slot)(&mut plan.offsets) = wanted.offset_in(&format)?;
        }
        plan.attach
            .push((CATEGORY.to_owned(), event.to_owned(), spec.program));

        let Some(node_event) = spec.node_event else {
            continue;
        };
        let Some(node_format) = formats(CATEGORY, node_event)? else {
            continue;
        };
        let layout = |format: &EventFormat, name| format.field(name).map(|f| (f.offset, f.size));
        match spec
            .fields
            .iter()
            .find(|wanted| layout(&format, wanted.name) != layout(&node_format, wanted.name))
        {
            Some(moved) => plan.missing.push(format!(
                "{CATEGORY}:{node_event} (its field `{}` is not laid out as in \
                 {CATEGORY}:{event}, so its allocations will not be seen)",
                moved.name
            )),
            None => plan
                .attach
                .push((CATEGORY.to_owned(), node_event.to_owned(), spec.program)),
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memleak_common::{DIRECT_FIELD_OFFSETS_32, DIRECT_FIELD_OFFSETS_64};

    // The recorded `format` files under memleak/testdata/tracefs/, one directory per kernel.
    // Their `print fmt:` lines are cut short (the parser ignores them); all else is as the
    // kernel prints it.
    //
    // 6.18/: copied from /sys/kernel/tracing/events/kmem/*/format of a running 6.18.44 x86_64
    //   kernel.
    // 6.1/: Debian 12's kernel. Derived from include/trace/events/kmem.h of Debian's
    //   linux-headers-6.1.0-50-common (6.1.176-1): the TP_STRUCT__entry lists after the 8-byte
    //   common header, with C alignment. kmem_cache_alloc has no `name` yet; `char` is still
    //   signed on x86 before 6.2, hence `signed:1` on `__data_loc char[]`. IDs are
    //   illustrative: they depend on the kernel's configuration.
    // 5.15/: the pre-6.1 layout (Ubuntu 22.04's kernel). Derived the same way from v5.15's
    //   include/trace/events/kmem.h (read from the 5.15-based tree
    //   NothingOSS/android_kernel_5.15_nothing_mt6886 at 4d06da2e, whose kmem events match
    //   upstream): event classes kmem_alloc (kmalloc, kmem_cache_alloc; `gfp_t` is 4 bytes)
    //   and kmem_alloc_node (kmalloc_node, kmem_cache_alloc_node: the same plus `int node`);
    //   kmem_cache_free already has `name` (added in 5.12). IDs are illustrative.
    const KERNEL_6_18: &[(&str, &str)] = &[
        (
            "kmalloc",
            include_str!("../../testdata/tracefs/6.18/kmalloc.format"),
        ),
        (
            "kfree",
            include_str!("../../testdata/tracefs/6.18/kfree.format"),
        ),
        (
            "kmem_cache_alloc",
            include_str!("../../testdata/tracefs/6.18/kmem_cache_alloc.format"),
        ),
        (
            "kmem_cache_free",
            include_str!("../../testdata/tracefs/6.18/kmem_cache_free.format"),
        ),
        (
            "mm_page_alloc",
            include_str!("../../testdata/tracefs/6.18/mm_page_alloc.format"),
        ),
        (
            "mm_page_free",
            include_str!("../../testdata/tracefs/6.18/mm_page_free.format"),
        ),
    ];
    const KERNEL_6_1: &[(&str, &str)] = &[
        (
            "kmalloc",
            include_str!("../../testdata/tracefs/6.1/kmalloc.format"),
        ),
        (
            "kfree",
            include_str!("../../testdata/tracefs/6.1/kfree.format"),
        ),
        (
            "kmem_cache_alloc",
            include_str!("../../testdata/tracefs/6.1/kmem_cache_alloc.format"),
        ),
        (
            "kmem_cache_free",
            include_str!("../../testdata/tracefs/6.1/kmem_cache_free.format"),
        ),
    ];
    const KERNEL_5_15: &[(&str, &str)] = &[
        (
            "kmalloc",
            include_str!("../../testdata/tracefs/5.15/kmalloc.format"),
        ),
        (
            "kmalloc_node",
            include_str!("../../testdata/tracefs/5.15/kmalloc_node.format"),
        ),
        (
            "kfree",
            include_str!("../../testdata/tracefs/5.15/kfree.format"),
        ),
        (
            "kmem_cache_alloc",
            include_str!("../../testdata/tracefs/5.15/kmem_cache_alloc.format"),
        ),
        (
            "kmem_cache_alloc_node",
            include_str!("../../testdata/tracefs/5.15/kmem_cache_alloc_node.format"),
        ),
        (
            "kmem_cache_free",
            include_str!("../../testdata/tracefs/5.15/kmem_cache_free.format"),
        ),
    ];

    fn text<'a>(kernel: &[(&str, &'a str)], event: &str) -> &'a str {
        kernel
            .iter()
            .find(|(name, _)| *name == event)
            .map(|(_, text)| *text)
            .unwrap_or_else(|| panic!("no recorded format for {event}"))
    }

    /// A `formats` source serving recorded texts, as `read_format` serves the live ones.
    fn recorded(
        kernel: Vec<(&'static str, String)>,
    ) -> impl Fn(&str, &str) -> Result<Option<EventFormat>> {
        move |category, event| {
            assert_eq!(category, "kmem");
            kernel
                .iter()
                .find(|(name, _)| *name == event)
                .map(|(_, text)| parse_format(text).map_err(Into::into))
                .transpose()
        }
    }

    fn owned(kernel: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        kernel
            .iter()
            .map(|(event, text)| (*event, (*text).to_owned()))
            .collect()
    }

    /// `kernel` with `from` replaced by `to` in `event`'s format.
    fn edited(
        kernel: &[(&'static str, &str)],
        event: &str,
        from: &str,
        to: &str,
    ) -> Vec<(&'static str, String)> {
        let mut kernel = owned(kernel);
        let (_, text) = kernel
            .iter_mut()
            .find(|(name, _)| *name == event)
            .unwrap_or_else(|| panic!("no recorded format for {event}"));
        assert!(text.contains(from), "{event} has no `{from}`");
        *text = text.replace(from, to);
        kernel
    }

    fn attached(plan: &ClassicPlan) -> Vec<(&str, ClassicProgram)> {
        plan.attach
            .iter()
            .map(|(category, event, program)| {
                assert_eq!(category, "kmem");
                (event.as_str(), *program)
            })
            .collect()
    }

    fn field(name: &str, c_type: &str, offset: u16, size: u16, signed: bool) -> Field {
        Field {
            name: name.to_owned(),
            c_type: c_type.to_owned(),
            offset,
            size,
            signed,
        }
    }

    #[test]
    fn parses_real_6_18_kmalloc() {
        let format = parse_format(text(KERNEL_6_18, "kmalloc")).unwrap();
        assert_eq!(format.name, "kmalloc");
        assert_eq!(format.id, Some(658));
        assert_eq!(
            format.fields,
            [
                field("common_type", "unsigned short", 0, 2, false),
                field("common_flags", "unsigned char", 2, 1, false),
                field("common_preempt_count", "unsigned char", 3, 1, false),
                field("common_pid", "int", 4, 4, true),
                field("call_site", "unsigned long", 8, 8, false),
                field("ptr", "const void *", 16, 8, false),
                field("bytes_req", "size_t", 24, 8, false),
                field("bytes_alloc", "size_t", 32, 8, false),
                field("gfp_flags", "unsigned long", 40, 8, false),
                field("node", "int", 48, 4, true),
            ]
        );
    }

    #[test]
    fn parses_every_recorded_file() {
        for (kernel, files) in [
            ("6.18", KERNEL_6_18),
            ("6.1", KERNEL_6_1),
            ("5.15", KERNEL_5_15),
        ] {
            for (event, text) in files {
                let format =
                    parse_format(text).unwrap_or_else(|error| panic!("{kernel} {event}: {error}"));
                assert_eq!(format.name, *event);
                let (field, offset) = if event.starts_with("mm_page") {
                    ("pfn", 8)
                } else {
                    ("ptr", 16)
                };
                assert_eq!(
                    format.field(field).map(|f| (f.offset, f.size)),
                    Some((offset, 8))
                );
                assert_eq!(format.fields[0].name, "common_type");
            }
        }
    }

    #[test]
    fn parses_real_6_18_data_loc_and_bool() {
        let format = parse_format(text(KERNEL_6_18, "kmem_cache_alloc")).unwrap();
        assert_eq!(
            format.field("name"),
            Some(&field("name", "__data_loc char[]", 24, 4, false))
        );
        assert_eq!(
            format.field("accounted"),
            Some(&field("accounted", "bool", 60, 1, false))
        );
        assert_eq!(format.field("bytes_alloc").unwrap().offset, 40);
        assert_eq!(format.field("missing"), None);
    }

    #[test]
    fn parses_arrays_and_files_without_signed() {
        let format = parse_format(
            "name: sched_switch\nID: 1\nformat:\n\
             \tfield:char prev_comm[16];\toffset:8;\tsize:16;\n\
             \tfield:pid_t prev_pid;\toffset:24;\tsize:4;\n",
        )
        .unwrap();
        assert_eq!(
            format.fields,
            [
                field("prev_comm", "char[16]", 8, 16, false),
                field("prev_pid", "pid_t", 24, 4, false),
            ]
        );
    }

    #[test]
    fn parses_crlf_and_ignores_print_fmt_garbage() {
        let crlf = text(KERNEL_6_18, "kfree").replace('\n', "\r\n")
            + "print fmt: more ; field:garbage\r\n\u{0}\u{ff}";
        let format = parse_format(&crlf).unwrap();
        assert_eq!(format, parse_format(text(KERNEL_6_18, "kfree")).unwrap());
    }

    #[test]
    fn reports_where_a_format_goes_wrong() {
        let bad_offset = "name: x\nformat:\n\tfield:int a;\toffset:abc;\tsize:4;\tsigned:1;\n";
        assert_eq!(
            parse_format(bad_offset),
            Err(FormatError::Unexpected {
                line: 3,
                expected: "`offset:` and a number",
                found: "offset:abc".to_owned(),
            })
        );
        let no_name = "\tfield:int;\toffset:0;\tsize:4;\n";
        assert!(matches!(
            parse_format(no_name),
            Err(FormatError::Unexpected { line: 1, .. })
        ));
        assert_eq!(parse_format(""), Err(FormatError::MissingName));
        assert_eq!(parse_format("ID: 5\n"), Err(FormatError::MissingName));
        assert!(parse_format("name: x\nID: -1\n").is_err());
        assert!(parse_format("name: x\nhello\n").is_err());
    }

    #[test]
    fn truncated_input_never_panics() {
        for (_, text) in KERNEL_6_18.iter().chain(KERNEL_5_15) {
            for end in 0..=text.len() {
                let _ = parse_format(&text[..end]);
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        const ALPHABET: &[char] = &[
            'f', 'i', 'e', 'l', 'd', ':', ';', '[', ']', ' ', '\t', '\n', '\r', '0', '9', '_', 'n',
            'a', 'm', 'é', '\u{0}', 'o', 's', 'z', 'g', '-',
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let length = (state % 64) as usize;
            let garbage: String = (0..length)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ALPHABET[(state >> 33) as usize % ALPHABET.len()]
                })
                .collect();
            let _ = parse_format(&garbage);
            let _ = parse_format(&format!("name: x\n\tfield:{garbage}"));
        }
    }

    #[test]
    fn plan_for_6_18_reads_the_cache_name() {
        let plan = classic_plan(&recorded(owned(KERNEL_6_18))).unwrap();
        let offsets = plan.offsets;
        assert_eq!(
            [
                offsets.kmalloc_call_site,
                offsets.kmalloc_ptr,
                offsets.kmalloc_bytes_req,
                offsets.kmalloc_bytes_alloc,
                offsets.kmalloc_gfp_flags,
            ],
            [8, 16, 24, 32, 40]
        );
        assert_eq!(
            [
                offsets.cache_alloc_call_site,
                offsets.cache_alloc_ptr,
                offsets.cache_alloc_name,
                offsets.cache_alloc_bytes_req,
                offsets.cache_alloc_bytes_alloc,
            ],
            [8, 16, 24, 32, 40]
        );
        assert_eq!([offsets.kfree_ptr, offsets.cache_free_ptr], [16, 16]);
        assert_eq!(
            attached(&plan),
            [
                ("kmalloc", ClassicProgram::Kmalloc),
                ("kmem_cache_alloc", ClassicProgram::KmemCacheAlloc),
                ("kfree", ClassicProgram::Kfree),
                ("kmem_cache_free", ClassicProgram::KmemCacheFree),
            ]
        );
        assert!(plan.missing.is_empty(), "{:?}", plan.missing);
    }

    #[test]
    fn page_plan_for_6_18_keeps_the_slab_offsets() {
        let formats = recorded(owned(KERNEL_6_18));
        let slab = classic_plan(&formats).unwrap();
        let plan = page_plan(&formats, slab.offsets).unwrap();
        let offsets = plan.offsets;
        assert_eq!(
            [
                offsets.page_alloc_pfn,
                offsets.page_alloc_order,
                offsets.page_alloc_migratetype,
                offsets.page_free_pfn,
            ],
            [8, 16, 32, 8]
        );
        assert_eq!(offsets.kmalloc_ptr, 16);
        assert_eq!(
            attached(&plan),
            [
                ("mm_page_alloc", ClassicProgram::PageAlloc),
                ("mm_page_free", ClassicProgram::PageFree),
            ]
        );
    }

    /// The programs load a field with an instruction of its own only at the offsets of
    /// `DIRECT_FIELD_OFFSETS_*` (elsewhere, a helper call per field): every field they read on
    /// the recorded kernels must be at one of them.
    #[test]
    fn every_field_of_the_recorded_kernels_is_loaded_directly() {
        let read_as_32_bits = |offsets: &ClassicOffsets| {
            [
                offsets.kmalloc_gfp_flags,
                offsets.page_alloc_order,
                offsets.page_alloc_migratetype,
            ]
        };
        let read_as_64_bits = |offsets: &ClassicOffsets| {
            [
                offsets.kmalloc_call_site,
                offsets.kmalloc_ptr,
                offsets.kmalloc_bytes_req,
                offsets.kmalloc_bytes_alloc,
                offsets.cache_alloc_call_site,
                offsets.cache_alloc_ptr,
                offsets.cache_alloc_bytes_req,
                offsets.cache_alloc_bytes_alloc,
                offsets.cache_alloc_name,
                offsets.kfree_ptr,
                offsets.cache_free_ptr,
                offsets.page_alloc_pfn,
                offsets.page_free_pfn,
            ]
        };
        let slab_6_18 = classic_plan(&recorded(owned(KERNEL_6_18))).unwrap().offsets;
        let kernels = [
            (
                "5.15",
                classic_plan(&recorded(owned(KERNEL_5_15))).unwrap().offsets,
            ),
            (
                "6.1",
                classic_plan(&recorded(owned(KERNEL_6_1))).unwrap().offsets,
            ),
            (
                "6.18",
                page_plan(&recorded(owned(KERNEL_6_18)), slab_6_18)
                    .unwrap()
                    .offsets,
            ),
        ];
        let mut fields = 0;
        for (kernel, offsets) in &kernels {
            for (width, planned, direct) in [
                (
                    32,
                    read_as_32_bits(offsets).to_vec(),
                    &DIRECT_FIELD_OFFSETS_32[..],
                ),
                (
                    64,
                    read_as_64_bits(offsets).to_vec(),
                    &DIRECT_FIELD_OFFSETS_64[..],
                ),
            ] {
                for offset in planned.into_iter().filter(|&offset| offset != NO_FIELD) {
                    assert!(
                        direct.contains(&offset),
                        "{kernel}: a {width}-bit field at {offset} would cost a helper call"
                    );
                    fields += 1;
                }
            }
        }
        // 5.15: twelve slab fields (its cache name among them), 6.1: eleven, 6.18: eleven
        // and the page hooks' four.
        assert_eq!(fields, 38);
    }

    #[test]
    fn page_plan_without_page_events_is_an_error() {
        let error = page_plan(&recorded(owned(KERNEL_6_1)), ClassicOffsets::NONE).unwrap_err();
        assert!(error.to_string().contains("mm_page_alloc"), "{error}");
    }

    #[test]
    fn page_order_read_as_a_word_is_refused() {
        let kernel = edited(
            KERNEL_6_18,
            "mm_page_alloc",
            "unsigned int order;\toffset:16;\tsize:4;",
            "unsigned long order;\toffset:16;\tsize:8;",
        );
        let error = page_plan(&recorded(kernel), ClassicOffsets::NONE).unwrap_err();
        assert!(error.to_string().contains("32-bit"), "{error}");
    }

    #[test]
    fn plan_for_6_1_has_no_cache_name() {
        let plan = classic_plan(&recorded(owned(KERNEL_6_1))).unwrap();
        let offsets = plan.offsets;
        assert_eq!(
            [
                offsets.kmalloc_call_site,
                offsets.kmalloc_ptr,
                offsets.kmalloc_bytes_req,
                offsets.kmalloc_bytes_alloc,
                offsets.kmalloc_gfp_flags,
            ],
            [8, 16, 24, 32, 40]
        );
        assert_eq!(
            [
                offsets.cache_alloc_call_site,
                offsets.cache_alloc_ptr,
                offsets.cache_alloc_bytes_req,
                offsets.cache_alloc_bytes_alloc,
                offsets.cache_alloc_name,
            ],
            [8, 16, 24, 32, NO_FIELD]
        );
        assert_eq!([offsets.kfree_ptr, offsets.cache_free_ptr], [16, 16]);
        assert_eq!(plan.attach.len(), 4);
        assert!(plan.missing.is_empty(), "{:?}", plan.missing);
    }

    #[test]
    fn plan_for_5_15_also_attaches_node_events() {
        let plan = classic_plan(&recorded(owned(KERNEL_5_15))).unwrap();
        assert_eq!(plan.offsets.cache_alloc_name, NO_FIELD);
        assert_eq!(plan.offsets.cache_alloc_bytes_alloc, 32);
        // A 4-byte gfp_t here, 8 bytes on 6.1 and 6.18: both are read as 32 bits.
        assert_eq!(plan.offsets.kmalloc_gfp_flags, 40);
        assert_eq!(
            attached(&plan),
            [
                ("kmalloc", ClassicProgram::Kmalloc),
                ("kmalloc_node", ClassicProgram::Kmalloc),
                ("kmem_cache_alloc", ClassicProgram::KmemCacheAlloc),
                ("kmem_cache_alloc_node", ClassicProgram::KmemCacheAlloc),
                ("kfree", ClassicProgram::Kfree),
                ("kmem_cache_free", ClassicProgram::KmemCacheFree),
            ]
        );
        assert!(plan.missing.is_empty(), "{:?}", plan.missing);
    }

    #[test]
    fn node_event_laid_out_differently_is_not_attached() {
        let kernel = edited(
            KERNEL_5_15,
            "kmalloc_node",
            "bytes_alloc;\toffset:32;",
            "bytes_alloc;\toffset:48;",
        );
        let plan = classic_plan(&recorded(kernel)).unwrap();
        assert!(!attached(&plan).contains(&("kmalloc_node", ClassicProgram::Kmalloc)));
        assert!(
            attached(&plan).contains(&("kmem_cache_alloc_node", ClassicProgram::KmemCacheAlloc))
        );
        assert_eq!(plan.missing.len(), 1);
        assert!(plan.missing[0].starts_with("kmem:kmalloc_node ("));
        assert!(plan.missing[0].contains("bytes_alloc"));
    }

    #[test]
    fn four_byte_pointer_is_an_error() {
        let kernel = edited(
            KERNEL_6_18,
            "kfree",
            "ptr;\toffset:16;\tsize:8;",
            "ptr;\toffset:16;\tsize:4;",
        );
        let error = classic_plan(&recorded(kernel)).unwrap_err().to_string();
        assert!(error.contains("kmem:kfree"), "{error}");
        assert!(error.contains("`ptr`"), "{error}");
        assert!(error.contains("4 bytes"), "{error}");
    }

    #[test]
    fn missing_cache_free_is_listed() {
        let kernel = owned(KERNEL_6_18)
            .into_iter()
            .filter(|(event, _)| *event != "kmem_cache_free")
            .collect();
        let plan = classic_plan(&recorded(kernel)).unwrap();
        assert_eq!(
            plan.missing,
            ["kmem:kmem_cache_free (frees of cache objects will not be seen)"]
        );
        assert_eq!(plan.offsets.cache_free_ptr, NO_FIELD);
        assert_eq!(plan.attach.len(), 3);
    }

    #[test]
    fn missing_kmalloc_or_kfree_is_an_error() {
        for needed in ["kmalloc", "kfree"] {
            let kernel = owned(KERNEL_6_18)
                .into_iter()
                .filter(|(event, _)| *event != needed)
                .collect();
            let error = classic_plan(&recorded(kernel)).unwrap_err().to_string();
            assert!(error.contains(&format!("kmem:{needed} ")), "{error}");
        }
    }

    #[test]
    fn finds_tracing_dirs_in_mount_table() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0\n\
                      debugfs /sys/kernel/debug debugfs rw,relatime 0 0\n\
                      tracefs /sys/kernel/tracing tracefs rw,relatime 0 0\n\
                      garbage\n";
        assert_eq!(
            tracing_dirs(mounts).collect::<Vec<_>>(),
            [
                PathBuf::from("/sys/kernel/debug/tracing"),
                PathBuf::from("/sys/kernel/tracing"),
            ]
        );
    }

    #[test]
    fn flags_of_four_or_eight_bytes_are_read_and_others_refused() {
        let recorded_6_18 = "gfp_flags;\toffset:40;\tsize:8;";
        for (size, read) in [(2, false), (4, true), (8, true), (16, false)] {
            let kernel = edited(
                KERNEL_6_18,
                "kmalloc",
                recorded_6_18,
                &format!("gfp_flags;\toffset:40;\tsize:{size};"),
            );
            match classic_plan(&recorded(kernel)) {
                Ok(plan) => {
                    assert!(read, "gfp_flags of {size} bytes accepted");
                    assert_eq!(plan.offsets.kmalloc_gfp_flags, 40);
                }
                Err(error) => {
                    assert!(!read, "gfp_flags of {size} bytes refused: {error}");
                    let error = error.to_string();
                    assert!(error.contains("flags of 4 or 8 bytes"), "{error}");
                    assert!(error.contains(&format!("is {size} bytes")), "{error}");
                }
            }
        }
    }

    #[test]
    fn a_cache_name_that_is_not_a_4_byte_data_loc_is_refused() {
        let recorded_6_18 = "__data_loc char[] name;\toffset:24;\tsize:4;";
        for declaration in [
            "__data_loc char[] name;\toffset:24;\tsize:8;",
            "char name[4];\toffset:24;\tsize:4;",
        ] {
            let kernel = edited(KERNEL_6_18, "kmem_cache_alloc", recorded_6_18, declaration);
            let error = classic_plan(&recorded(kernel))
                .expect_err(declaration)
                .to_string();
            assert!(
                error.contains("kmem:kmem_cache_alloc field `name`"),
                "{error}"
            );
            assert!(error.contains("4-byte `__data_loc char[]`"), "{error}");
        }
    }

    #[test]
    fn declarations_without_a_name_or_with_a_number_for_one_are_refused() {
        assert_eq!(
            split_declaration("const void * ptr"),
            Some(("const void *".to_owned(), "ptr".to_owned()))
        );
        assert_eq!(
            split_declaration("char comm[16]"),
            Some(("char[16]".to_owned(), "comm".to_owned()))
        );
        for nameless in ["const void *", "int 16", "ptr", "char [16]", ""] {
            assert_eq!(split_declaration(nameless), None, "{nameless:?}");
        }
    }

    #[test]
    fn a_format_that_cannot_be_read_is_an_error_and_a_missing_one_is_none() {
        let root = crate::util::scratch::ScratchDir::new("tracefs-unreadable");
        let event = root.path().join("events/kmem/kmalloc");
        std::fs::create_dir_all(event.join("format")).unwrap();
        let error = read_format(root.path(), "kmem", "kmalloc").unwrap_err();
        assert!(format!("{error:#}").contains("reading "), "{error:#}");
        assert_eq!(read_format(root.path(), "kmem", "kfree").unwrap(), None);
    }

    #[test]
    fn reads_live_formats() {
        let root = Path::new(DEFAULT_TRACEFS);
        if !root.join("events/kmem").is_dir() {
            return; // No tracefs mounted here (or not readable): nothing to read.
        }
        // Mounted, so `root` finds it rather than mounting it.
        assert!(super::root().unwrap().join("events/kmem").is_dir());
        let kmalloc = read_format(root, "kmem", "kmalloc").unwrap().unwrap();
        assert_eq!(kmalloc.field("ptr").map(|f| f.size), Some(8));
        assert_eq!(read_format(root, "kmem", "no_such_event").unwrap(), None);
        assert_eq!(
            read_format(root, "no_such_category", "kmalloc").unwrap(),
            None
        );
    }
}
