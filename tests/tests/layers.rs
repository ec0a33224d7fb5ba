//! memleak/src keeps its layers: every `use` and path points down, and no files import each
//! other in a circle. The layers and what each may import are in LAYERS; lib.rs explains them.
//!
//! It reads the sources as text: comments and string literals are dropped, `use` trees are
//! expanded, and every `crate::`, `super::`, `self::` and `memleak::` path is resolved to the
//! module file it names.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// Each layer and the layers below it that it may import. `main`, `cli` and `commands` are
/// the binary; the rest is the library.
const LAYERS: &[(&str, &[&str])] = &[
    ("main", &["cli", "commands"]),
    (
        "commands",
        &[
            "cli", "output", "vm", "watch", "trace", "scan", "classify", "kmemleak", "bpf",
            "kernel", "symbols", "kinds", "util",
        ],
    ),
    (
        "cli",
        &[
            "output", "watch", "trace", "scan", "classify", "kmemleak", "bpf", "kernel", "symbols",
            "kinds", "util",
        ],
    ),
    (
        "vm",
        &["trace", "scan", "bpf", "kernel", "symbols", "kinds", "util"],
    ),
    (
        "output",
        &[
            "watch", "trace", "scan", "classify", "kmemleak", "symbols", "kinds", "util",
        ],
    ),
    (
        "watch",
        &["trace", "scan", "bpf", "kernel", "symbols", "kinds", "util"],
    ),
    (
        "trace",
        &["scan", "bpf", "kernel", "symbols", "kinds", "util"],
    ),
    ("scan", &["bpf", "kernel", "symbols", "util"]),
    ("classify", &["kernel", "symbols", "kinds", "util"]),
    ("kmemleak", &["kernel", "symbols", "util"]),
    ("bpf", &["kernel", "kinds", "util"]),
    ("symbols", &["kernel", "kinds", "util"]),
    ("kernel", &["util"]),
    ("kinds", &[]),
    ("util", &[]),
    // lib.rs only declares the modules.
    ("lib", &[]),
];

/// The binary's own modules; everything else is the library's.
const BINARY: &[&str] = &["main", "cli", "commands"];

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../memleak/src")
}

/// A source file as the module it is: its crate (`lib` or `bin`) and its path in the crate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Module {
    binary: bool,
    path: Vec<String>,
}

impl Module {
    fn of(relative: &Path) -> Self {
        let mut path: Vec<String> = relative
            .with_extension("")
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if path.last().is_some_and(|last| last == "mod") {
            path.pop();
        }
        let root = path.first().map(String::as_str);
        let binary = root.is_some_and(|root| BINARY.contains(&root));
        if matches!(root, Some("main" | "lib")) {
            path.clear();
        }
        Self { binary, path }
    }

    /// Its layer: the first component of its path, or `main` or `lib` for the crate roots.
    fn layer(&self) -> &str {
        match self.path.first() {
            Some(first) => first,
            None if self.binary => "main",
            None => "lib",
        }
    }

    fn name(&self) -> String {
        let root = if self.binary { "bin" } else { "lib" };
        std::iter::once(root)
            .chain(self.path.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("::")
    }
}

/// The text without comments, string literals and character literals, which mention paths
/// that are not imports.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    while index < bytes.len() {
        let rest = &text[index..];
        if rest.starts_with("//") {
            index += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            index += rest.find("*/").map_or(rest.len(), |end| end + 2);
        } else if let Some(raw) = raw_string_length(rest) {
            index += raw;
            out.push_str("\"\"");
        } else if rest.starts_with('"') {
            let mut end = 1;
            while end < rest.len() {
                match rest.as_bytes()[end] {
                    b'\\' => end += 2,
                    b'"' => break,
                    _ => end += 1,
                }
            }
            index += end + 1;
            out.push_str("\"\"");
        } else if let Some(length) = char_literal_length(rest) {
            index += length;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            index += c.len_utf8();
        }
    }
    out
}

/// The length of a raw string literal (`r"..."`, `r#"..."#`) starting `text`, if one does.
fn raw_string_length(text: &str) -> Option<usize> {
    let after_r = text.strip_prefix('r')?;
    let hashes = after_r.len() - after_r.trim_start_matches('#').len();
    let body = after_r[hashes..].strip_prefix('"')?;
    let closing = format!("\"{}", "#".repeat(hashes));
    Some(1 + hashes + 1 + body.find(&closing)? + closing.len())
}

/// The length of a character literal (`'a'`, `'\n'`, `'\''`) starting `text`; `None` for a
/// lifetime.
fn char_literal_length(text: &str) -> Option<usize> {
    let body = text.strip_prefix('\'')?;
    if let Some(escaped) = body.strip_prefix('\\') {
        return Some(2 + escaped.find('\'')? + 1);
    }
    let c = body.chars().next()?;
    body[c.len_utf8()..]
        .starts_with('\'')
        .then_some(1 + c.len_utf8() + 1)
}

/// Every path a file names: the leaves of its `use` trees and the paths in its code that start
/// at `crate`, `super`, `self` or `memleak`.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(start) = rest.find("use ") {
        let before = rest[..start].chars().next_back();
        let after = &rest[start + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = after.find(';') else { break };
        expand(&after[..end], &mut Vec::new(), &mut found);
    }
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .collect();
    for word in words {
        let segments: Vec<String> = word
            .split("::")
            .filter(|segment| !segment.is_empty())
            .map(str::to_owned)
            .collect();
        if segments.len() > 1 && matches!(segments[0].as_str(), "crate" | "super" | "memleak") {
            found.push(segments);
        }
    }
    found
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its leaf paths.
fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|segment| !segment.is_empty())
            .map(str::to_owned)
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let depth = prefix.len();
        prefix.extend(head);
        for part in split_top_level(inner) {
            expand(part, prefix, out);
        }
        prefix.truncate(depth);
    } else {
        let leaf = tree.split(" as ").next().unwrap_or(tree);
        let mut path = prefix.clone();
        path.extend(
            leaf.split("::")
                .map(str::trim)
                .filter(|segment| !segment.is_empty())
                .map(str::to_owned),
        );
        if !path.is_empty() {
            out.push(path);
        }
    }
}

/// Splits `a, b::{c, d}, e` at the commas outside braces.
fn split_top_level(list: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (index, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&list[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts
}

/// The module file a path from `from` names: the longest prefix of it that is a module.
/// (`super` inside an inline `mod tests` is taken as the file's: its imports are the file's.)
fn resolve(from: &Module, path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    let (binary, mut base, rest) = match path.first()?.as_str() {
        "crate" => (from.binary, Vec::new(), &path[1..]),
        "memleak" => (false, Vec::new(), &path[1..]),
        "self" => (from.binary, from.path.clone(), &path[1..]),
        "super" => {
            let mut base = from.path.clone();
            let mut rest = path;
            while rest.first().is_some_and(|segment| segment == "super") {
                base.pop();
                rest = &rest[1..];
            }
            (from.binary, base, rest)
        }
        _ => return None,
    };
    let mut best = Module {
        binary,
        path: base.clone(),
    };
    for segment in rest {
        base.push(segment.clone());
        let candidate = Module {
            binary,
            path: base.clone(),
        };
        if !modules.contains(&candidate) {
            break;
        }
        best = candidate;
    }
    modules.contains(&best).then_some(best)
}

struct Sources {
    modules: BTreeSet<Module>,
    /// Each file's module and code.
    files: Vec<(Module, String)>,
}

fn read_sources(root: &Path) -> Result<Sources> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory)
            .with_context(|| format!("listing {}", directory.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                let relative = path.strip_prefix(root)?.to_path_buf();
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                files.push((Module::of(&relative), code_only(&text)));
            }
        }
    }
    let modules = files.iter().map(|(module, _)| module.clone()).collect();
    Ok(Sources { modules, files })
}

/// Every import between two different files: from → to.
fn edges(sources: &Sources) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, code) in &sources.files {
        let targets = edges.entry(module.clone()).or_default();
        for path in paths(code) {
            if let Some(target) = resolve(module, &path, &sources.modules)
                && &target != module
                && !target.path.is_empty()
            {
                targets.insert(target);
            }
        }
    }
    edges
}

fn allowed(layer: &str) -> Option<&'static [&'static str]> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == layer)
        .map(|(_, below)| *below)
}

/// Imports that point up or sideways between layers, one line each.
fn upward_imports(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<String> {
    let mut wrong = Vec::new();
    for (from, targets) in edges {
        for to in targets {
            let (from_layer, to_layer) = (from.layer(), to.layer());
            if from_layer == to_layer {
                continue;
            }
            match allowed(from_layer) {
                Some(below) if below.contains(&to_layer) => {}
                Some(_) => wrong.push(format!(
                    "{} imports {}: layer {from_layer} may not import {to_layer}",
                    from.name(),
                    to.name()
                )),
                None => wrong.push(format!("{} is in no layer ({from_layer})", from.name())),
            }
        }
    }
    wrong
}

/// Groups of files that import each other in a circle (strongly connected components). A
/// module and its own submodules may use each other's items, as Rust modules do; circles
/// are looked for between modules neither of which contains the other.
fn circles(all_edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    let contains = |outer: &Module, inner: &Module| {
        outer.binary == inner.binary && inner.path.starts_with(&outer.path)
    };
    let edges: BTreeMap<Module, BTreeSet<Module>> = all_edges
        .iter()
        .map(|(from, targets)| {
            let targets = targets
                .iter()
                .filter(|to| !contains(from, to) && !contains(to, from))
                .cloned()
                .collect();
            (from.clone(), targets)
        })
        .collect();
    let edges = &edges;
    // Kosaraju: order by finishing time, then collect components on the reversed graph.
    fn finish(
        node: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        seen: &mut BTreeSet<Module>,
        order: &mut Vec<Module>,
    ) {
        if !seen.insert(node.clone()) {
            return;
        }
        for next in edges.get(node).into_iter().flatten() {
            finish(next, edges, seen, order);
        }
        order.push(node.clone());
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for node in edges.keys() {
        finish(node, edges, &mut seen, &mut order);
    }
    let mut reversed: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, targets) in edges {
        for to in targets {
            reversed.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut components = Vec::new();
    for node in order.iter().rev() {
        let mut component = Vec::new();
        finish(node, &reversed, &mut assigned, &mut component);
        if component.len() > 1 {
            component.sort();
            components.push(component);
        }
    }
    components
}

#[test]
fn every_import_points_down_and_no_files_form_a_circle() -> Result<()> {
    let sources = read_sources(&source_root())?;
    if sources.files.len() < 40 {
        bail!(
            "found {} source files in {}: the layout moved?",
            sources.files.len(),
            source_root().display()
        );
    }
    let edges = edges(&sources);
    // The check sees the imports it must judge: commands reach the library, output reaches
    // the trace model, trace reaches scan.
    let reaches = |from: &str, to: &str| {
        edges.iter().any(|(module, targets)| {
            module.layer() == from && targets.iter().any(|t| t.layer() == to)
        })
    };
    for (from, to) in [
        ("commands", "trace"),
        ("output", "trace"),
        ("trace", "scan"),
        ("cli", "output"),
    ] {
        if !reaches(from, to) {
            bail!("no import from {from} to {to} found: the source reader misses imports");
        }
    }
    let mut problems = upward_imports(&edges);
    for circle in circles(&edges) {
        let names: Vec<String> = circle.iter().map(Module::name).collect();
        problems.push(format!("a circle of imports: {}", names.join(", ")));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

#[test]
fn the_reader_finds_imports_in_use_trees_and_code_and_not_in_comments() {
    let code = code_only(
        "//! crate::nothing::here\n\
         use crate::{a::b, c::{d, e as f}};\n\
         use super::g;\n\
         fn x() { let s = \"crate::not::this\"; crate::h::i(); let c = '\"'; memleak::j::k(); }\n\
         /* crate::commented::out */",
    );
    let mut found: Vec<String> = paths(&code)
        .into_iter()
        .map(|path| path.join("::"))
        .collect();
    found.sort();
    found.dedup();
    assert_eq!(
        found,
        [
            "crate::a::b",
            "crate::c::d",
            "crate::c::e",
            "crate::h::i",
            "memleak::j::k",
            "super::g"
        ]
    );
}

#[test]
fn an_upward_import_and_a_circle_are_found() {
    let module = |path: &[&str]| Module {
        binary: false,
        path: path.iter().map(|part| (*part).to_owned()).collect(),
    };
    let (kernel, trace, report, check) = (
        module(&["kernel"]),
        module(&["trace"]),
        module(&["trace", "report"]),
        module(&["trace", "check"]),
    );
    let edges: BTreeMap<Module, BTreeSet<Module>> = [
        (kernel.clone(), [trace.clone()].into()),
        (report.clone(), [check.clone()].into()),
        (check.clone(), [report.clone()].into()),
        (trace, [kernel].into()),
    ]
    .into();
    let wrong = upward_imports(&edges);
    assert_eq!(wrong.len(), 1, "{wrong:?}");
    assert!(
        wrong[0].contains("layer kernel may not import trace"),
        "{wrong:?}"
    );
    let found = circles(&edges);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.contains(&vec![check, report]), "{found:?}");
}
