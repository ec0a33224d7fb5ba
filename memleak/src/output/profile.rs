//! A trace report as the stack formats people feed to their tools: folded lines (flamegraph.pl,
//! inferno, speedscope), a flame graph SVG (inferno), and a pprof heap profile (`go tool pprof`,
//! Pyroscope, Parca). All three weigh each stack by the outstanding memory allocated through it.
use std::io::Write as _;

use anyhow::{Context as _, Result};
use hashbrown::HashMap;
use prost::Message as _;

use crate::{
    symbols::Frame,
    trace::report::{Entry, Report},
};

/// What a profile says about where its stacks come from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Kernel release.
    pub kernel: &'a str,
    /// How long the stacks were gathered (the trace's window, the watch's age).
    pub duration_ms: u64,
    /// What one tracked object stands for.
    pub sample_rate: u32,
}

impl<'a> Source<'a> {
    pub fn of(report: &'a Report) -> Self {
        Self {
            kernel: &report.kernel,
            duration_ms: report.duration_ms,
            sample_rate: report.sample_rate,
        }
    }
}

/// Outstanding memory allocated through one stack of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedStack<'a> {
    /// Innermost first, from the call site.
    pub frames: &'a [Frame],
    pub bytes: u64,
    pub count: u64,
    pub kind: &'a str,
    pub cache: Option<&'a str>,
}

/// Every entry's stacks with its bytes and objects shared among them by their sampled
/// captures. Captures that the report does not list stack by stack (beyond its most common
/// stacks) go to the most common one; an entry with no capture is its call site alone.
pub fn weighted_stacks(entries: &[Entry]) -> Vec<WeightedStack<'_>> {
    let mut stacks = Vec::new();
    for entry in entries {
        let listed: u64 = entry.other_stacks.iter().map(|other| other.samples).sum();
        let captured = entry.stack_samples.max(entry.frames_samples + listed);
        let share = |samples: u64, of: u64| -> u64 {
            if captured == 0 {
                0
            } else {
                (u128::from(of) * u128::from(samples) / u128::from(captured)) as u64
            }
        };
        let mut others = Vec::new();
        for other in &entry.other_stacks {
            let (bytes, count) = (
                share(other.samples, entry.bytes),
                share(other.samples, entry.count),
            );
            if bytes > 0 || count > 0 {
                others.push((other.frames.as_slice(), bytes, count));
            }
        }
        let others_bytes: u64 = others.iter().map(|other| other.1).sum();
        let others_count: u64 = others.iter().map(|other| other.2).sum();
        stacks.push(WeightedStack {
            frames: &entry.frames,
            bytes: entry.bytes - others_bytes,
            count: entry.count - others_count,
            kind: &entry.kind,
            cache: entry.cache.as_deref(),
        });
        stacks.extend(
            others
                .into_iter()
                .map(|(frames, bytes, count)| WeightedStack {
                    frames,
                    bytes,
                    count,
                    kind: &entry.kind,
                    cache: entry.cache.as_deref(),
                }),
        );
    }
    stacks
}

/// A frame's function as the stack formats name it: the symbol and its module, or the address.
fn function_name(frame: &Frame) -> String {
    match (&frame.symbol, &frame.module) {
        (Some(symbol), Some(module)) => format!("{symbol} [{module}]"),
        (Some(symbol), None) => symbol.clone(),
        (None, _) => frame
            .addr
            .map_or_else(|| "?".to_owned(), |addr| format!("{addr:#x}")),
    }
}

/// Folded stacks: `root;...;call_site BYTES`, one line per distinct stack, sorted.
pub fn folded(entries: &[Entry]) -> String {
    let mut lines: HashMap<String, u64> = HashMap::new();
    for stack in weighted_stacks(entries) {
        if stack.bytes == 0 {
            continue;
        }
        let names: Vec<String> = stack
            .frames
            .iter()
            .rev()
            // `;` separates frames and the last space the weight: neither may appear inside.
            .map(|frame| function_name(frame).replace(';', ":"))
            .collect();
        *lines.entry(names.join(";")).or_default() += stack.bytes;
    }
    let mut lines: Vec<(String, u64)> = lines.into_iter().collect();
    lines.sort();
    lines
        .into_iter()
        .map(|(stack, bytes)| format!("{stack} {bytes}\n"))
        .collect()
}

/// A flame graph of the outstanding bytes, drawn by inferno from the folded stacks.
pub fn svg(entries: &[Entry], source: Source<'_>) -> Result<String> {
    let folded = folded(entries);
    let mut options = inferno::flamegraph::Options::default();
    options.title = format!(
        "memleak: outstanding kernel memory after {} ms on {}",
        source.duration_ms, source.kernel
    );
    options.count_name = "bytes".to_owned();
    options.colors =
        inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    let mut svg = Vec::new();
    if folded.is_empty() {
        // inferno refuses an empty profile; an empty window is still a valid answer.
        options.subtitle = Some("nothing outstanding".to_owned());
        inferno::flamegraph::from_lines(&mut options, ["(none) 0"], &mut svg)
    } else {
        inferno::flamegraph::from_lines(&mut options, folded.lines(), &mut svg)
    }
    .context("drawing the flame graph")?;
    String::from_utf8(svg).context("the flame graph is not UTF-8")
}

/// The report as a gzipped pprof profile (profile.proto): samples `inuse_objects/count` and
/// `inuse_space/bytes` per stack, a location and a function per distinct frame, kind, cache and
/// module as labels, `period` the sample rate.
pub fn pprof(entries: &[Entry], source: Source<'_>) -> Result<Vec<u8>> {
    let profile = build_profile(entries, source);
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&profile.encode_to_vec())
        .and_then(|()| gzip.finish())
        .context("compressing the profile")
}

fn build_profile(entries: &[Entry], source: Source<'_>) -> proto::Profile {
    let mut table = Strings::default();
    let mut profile = proto::Profile {
        sample_type: vec![
            proto::ValueType {
                r#type: table.id("inuse_objects"),
                unit: table.id("count"),
            },
            proto::ValueType {
                r#type: table.id("inuse_space"),
                unit: table.id("bytes"),
            },
        ],
        period_type: Some(proto::ValueType {
            r#type: table.id("space"),
            unit: table.id("bytes"),
        }),
        period: i64::from(source.sample_rate),
        duration_nanos: (source.duration_ms as i64).saturating_mul(1_000_000),
        default_sample_type: table.id("inuse_space"),
        ..proto::Profile::default()
    };
    profile.comment.push(table.id(&format!(
        "memleak on Linux {}: outstanding kernel memory",
        source.kernel
    )));
    // By address; frames without one (none in a trace) by name.
    let mut locations: HashMap<(Option<u64>, String), u64> = HashMap::new();
    let mut functions: HashMap<String, u64> = HashMap::new();
    let (kind_key, cache_key, module_key) =
        (table.id("kind"), table.id("cache"), table.id("module"));
    for stack in weighted_stacks(entries) {
        if stack.bytes == 0 && stack.count == 0 {
            continue;
        }
        let mut location_ids = Vec::with_capacity(stack.frames.len());
        for frame in stack.frames {
            let name = function_name(frame);
            let key = (
                frame.addr,
                if frame.addr.is_some() {
                    String::new()
                } else {
                    name.clone()
                },
            );
            let next_location = locations.len() as u64 + 1;
            let location_id = *locations.entry(key).or_insert_with(|| {
                let next_function = functions.len() as u64 + 1;
                let function_id = *functions.entry(name.clone()).or_insert_with(|| {
                    profile.function.push(proto::Function {
                        id: next_function,
                        name: table.id(&name),
                        system_name: table.id(frame.symbol.as_deref().unwrap_or(&name)),
                        filename: table.id(frame.module.as_deref().unwrap_or("vmlinux")),
                        start_line: 0,
                    });
                    next_function
                });
                profile.location.push(proto::Location {
                    id: next_location,
                    mapping_id: 0,
                    address: frame.addr.unwrap_or(0),
                    line: vec![proto::Line {
                        function_id,
                        line: 0,
                    }],
                    is_folded: false,
                });
                next_location
            });
            location_ids.push(location_id);
        }
        let mut label = vec![proto::Label {
            key: kind_key,
            str: table.id(stack.kind),
            ..proto::Label::default()
        }];
        if let Some(cache) = stack.cache {
            label.push(proto::Label {
                key: cache_key,
                str: table.id(cache),
                ..proto::Label::default()
            });
        }
        if let Some(module) = stack
            .frames
            .first()
            .and_then(|frame| frame.module.as_deref())
        {
            label.push(proto::Label {
                key: module_key,
                str: table.id(module),
                ..proto::Label::default()
            });
        }
        profile.sample.push(proto::Sample {
            location_id: location_ids,
            value: vec![stack.count as i64, stack.bytes as i64],
            label,
        });
    }
    profile.string_table = table.strings;
    profile
}

/// profile.proto's string table: index 0 is the empty string.
struct Strings {
    strings: Vec<String>,
    ids: HashMap<String, i64>,
}

impl Default for Strings {
    fn default() -> Self {
        Self {
            strings: vec![String::new()],
            ids: HashMap::from([(String::new(), 0)]),
        }
    }
}

impl Strings {
    fn id(&mut self, text: &str) -> i64 {
        if let Some(&id) = self.ids.get(text) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(text.to_owned());
        self.ids.insert(text.to_owned(), id);
        id
    }
}

/// The messages of pprof's profile.proto that memleak writes (github.com/google/pprof,
/// proto/profile.proto), with their field numbers.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::report::fixtures::sample_report;

    #[test]
    fn stacks_share_their_entry_by_sampled_captures() {
        // The top entry: 4 objects, 256 bytes; 3 captures, 2 through its main stack and 1
        // through another. The filp entry has no capture: its call site alone.
        let report = sample_report(1);
        let stacks = weighted_stacks(&report.stacks);
        let summary: Vec<(String, u64, u64)> = stacks
            .iter()
            .map(|stack| {
                let names: Vec<String> = stack.frames.iter().map(function_name).collect();
                (names.join(","), stack.count, stack.bytes)
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("alloc_site,caller".to_owned(), 3, 171),
                ("alloc_site,other_caller".to_owned(), 1, 85),
                ("0x99".to_owned(), 1, 64),
            ]
        );
        // Nothing is lost or made up in the split.
        let total: u64 = stacks.iter().map(|stack| stack.bytes).sum();
        assert_eq!(
            total,
            report.stacks.iter().map(|entry| entry.bytes).sum::<u64>()
        );
    }

    #[test]
    fn shares_round_down_and_stacks_left_with_nothing_are_dropped() {
        let mut report = sample_report(1);
        let top = &mut report.stacks[0];
        // The captures counted from the stacks listed when the entry's own count is lower, and
        // a stack of 2 samples in 3 takes two thirds.
        top.stack_samples = 0;
        top.frames_samples = 1;
        top.other_stacks[0].samples = 2;
        let stacks = weighted_stacks(&report.stacks);
        let shares: Vec<(u64, u64)> = stacks
            .iter()
            .take(2)
            .map(|stack| (stack.count, stack.bytes))
            .collect();
        assert_eq!(shares, [(2, 86), (2, 170)]);

        // One object of 64 bytes; a stack of 10 captures in 100 gets 6 bytes and no object,
        // and one of 1 in 100 nothing: it is left out.
        let mut report = sample_report(1);
        let top = &mut report.stacks[0];
        (top.count, top.bytes, top.stack_samples, top.frames_samples) = (1, 64, 100, 89);
        let other = crate::trace::report::OtherStack {
            samples: 1,
            frames: top.other_stacks[0].frames.clone(),
        };
        top.other_stacks[0].samples = 10;
        top.other_stacks.push(other);
        let stacks = weighted_stacks(&report.stacks);
        let shares: Vec<(u64, u64)> = stacks
            .iter()
            .take(3)
            .map(|stack| (stack.count, stack.bytes))
            .collect();
        assert_eq!(shares[..2], [(1, 58), (0, 6)]);
        assert_eq!(stacks.len(), 3, "the empty stack is listed: {shares:?}");
        // The 6 bytes without an object are still a sample of the profile.
        let profile = build_profile(&report.stacks, Source::of(&report));
        assert_eq!(profile.sample.len(), 3);
        assert_eq!(profile.sample[1].value, [0, 6]);
    }

    #[test]
    fn frames_without_an_address_are_one_location_per_name_and_modules_are_labels() {
        let mut report = sample_report(1);
        let top = &mut report.stacks[0];
        top.other_stacks.clear();
        top.frames = vec![
            Frame {
                addr: None,
                symbol: Some("leaky_alloc".into()),
                offset: None,
                size: None,
                module: Some("leaky".into()),
                source: None,
            },
            Frame {
                addr: None,
                symbol: Some("leaky_init".into()),
                offset: None,
                size: None,
                module: Some("leaky".into()),
                source: None,
            },
        ];
        let profile = build_profile(&report.stacks, Source::of(&report));
        let text = |id: i64| profile.string_table[id as usize].as_str();
        let names: Vec<&str> = profile
            .function
            .iter()
            .map(|function| text(function.name))
            .collect();
        assert_eq!(names[..2], ["leaky_alloc [leaky]", "leaky_init [leaky]"]);
        assert_eq!(profile.sample[0].location_id, [1, 2]);
        let labels: Vec<(&str, &str)> = profile.sample[0]
            .label
            .iter()
            .map(|label| (text(label.key), text(label.str)))
            .collect();
        assert_eq!(
            labels,
            [
                ("kind", "kmalloc"),
                ("cache", "kmalloc-64"),
                ("module", "leaky")
            ]
        );
    }

    #[test]
    fn folded_lines_are_root_first_and_weighted_by_bytes() {
        assert_eq!(
            folded(&sample_report(1).stacks),
            "0x99 64\ncaller;alloc_site 171\nother_caller;alloc_site 85\n"
        );
    }

    #[test]
    fn the_flame_graph_names_the_functions() {
        let report = sample_report(1);
        let svg = svg(&report.stacks, Source::of(&report)).expect("an svg");
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("alloc_site") && svg.contains("other_caller"));
    }

    #[test]
    fn the_pprof_profile_decodes_to_the_same_samples() {
        let report = sample_report(64);
        let gzipped = pprof(&report.stacks, Source::of(&report)).expect("a profile");
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(gzipped.as_slice()),
            &mut bytes,
        )
        .expect("gzip");
        let profile = proto::Profile::decode(bytes.as_slice()).expect("profile.proto");
        let text = |id: i64| profile.string_table[id as usize].as_str();
        assert_eq!(profile.string_table[0], "");
        let types: Vec<(&str, &str)> = profile
            .sample_type
            .iter()
            .map(|value| (text(value.r#type), text(value.unit)))
            .collect();
        assert_eq!(
            types,
            [("inuse_objects", "count"), ("inuse_space", "bytes")]
        );
        assert_eq!(profile.period, 64);
        let period = profile.period_type.expect("a period type");
        assert_eq!((text(period.r#type), text(period.unit)), ("space", "bytes"));
        assert_eq!(profile.duration_nanos, 2_000_000_000);
        assert_eq!(text(profile.default_sample_type), "inuse_space");
        assert_eq!(profile.sample.len(), 3);
        // Each sample's leaf is its call site, with the entry's kind and cache as labels.
        let function_of = |location_id: u64| {
            let location = &profile.location[location_id as usize - 1];
            assert_eq!(location.id, location_id);
            let function = &profile.function[location.line[0].function_id as usize - 1];
            text(function.name)
        };
        let first = &profile.sample[0];
        let names: Vec<&str> = first
            .location_id
            .iter()
            .map(|&id| function_of(id))
            .collect();
        assert_eq!(names, ["alloc_site", "caller"]);
        // Scaled by the sample rate: 256 objects and 16 KiB, two thirds of them.
        assert_eq!(first.value, [256 - 85, 16384 - 5461]);
        let labels: Vec<(&str, &str)> = first
            .label
            .iter()
            .map(|label| (text(label.key), text(label.str)))
            .collect();
        assert_eq!(labels, [("kind", "kmalloc"), ("cache", "kmalloc-64")]);
        // alloc_site is one location and one function, shared by both of its stacks.
        assert_eq!(profile.location.len(), 4);
        assert_eq!(profile.function.len(), 4);
    }
}
