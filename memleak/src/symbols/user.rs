//! User-space address symbolization: addresses become file offsets through a snapshot of the
//! process's mappings (taken while it was alive), then functions, files and lines from each
//! file's ELF symbols and DWARF. One long-lived symbolizer, each address once.
use std::path::{Path, PathBuf};

use anyhow::Result;
use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};
use hashbrown::HashMap;

use crate::{kernel::process::ProcessMaps, symbols::frame::Frame};

pub struct UserSymbolizer {
    symbolizer: Symbolizer,
    /// Mappings by process: one, under [`ONLY_PROCESS`], for a `--user` trace; each process
    /// whose user stacks a kernel trace shows (`--user-stacks`).
    processes: HashMap<u32, ProcessMaps>,
    frames: HashMap<(u32, u64), Frame>,
}

/// Where [`UserSymbolizer::new`] keeps its one process.
const ONLY_PROCESS: u32 = 0;

impl UserSymbolizer {
    /// A symbolizer for one process's addresses ([`Self::resolve`], [`Self::frame`]).
    pub fn new(maps: ProcessMaps) -> Self {
        let mut symbolizer = Self::for_processes();
        symbolizer.processes.insert(ONLY_PROCESS, maps);
        symbolizer
    }

    /// A symbolizer for the addresses of any process added with [`Self::add_process`].
    pub fn for_processes() -> Self {
        Self {
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .build(),
            processes: HashMap::new(),
            frames: HashMap::new(),
        }
    }

    pub fn add_process(&mut self, pid: u32, maps: ProcessMaps) {
        self.processes.insert(pid, maps);
    }

    /// [`Self::resolve_in`] the one process of [`Self::new`].
    pub fn resolve(&mut self, addrs: impl IntoIterator<Item = u64>) -> Result<()> {
        self.resolve_in(ONLY_PROCESS, addrs)
    }

    /// Symbolizes every address of process `pid` not seen before, one batch per mapped file.
    /// Every address is a return address: the call before it is what is symbolized, so the
    /// line is the call's. Addresses of a process never added stay bare.
    pub fn resolve_in(&mut self, pid: u32, addrs: impl IntoIterator<Item = u64>) -> Result<()> {
        let mut by_file: HashMap<PathBuf, Vec<(u64, u64)>> = HashMap::new();
        for addr in addrs {
            if self.frames.contains_key(&(pid, addr)) {
                continue;
            }
            let mapped = self
                .processes
                .get(&pid)
                .and_then(|maps| maps.file_offset(addr.saturating_sub(1)));
            match mapped {
                Some((path, offset)) => by_file
                    .entry(path.to_owned())
                    .or_default()
                    .push((addr, offset)),
                None => {
                    self.frames.insert((pid, addr), Frame::unknown(addr));
                }
            }
        }
        for (path, mut addrs) in by_file {
            addrs.sort_unstable();
            addrs.dedup();
            let offsets: Vec<u64> = addrs.iter().map(|&(_, offset)| offset).collect();
            let module = file_name(&path);
            let source = Source::Elf(Elf::new(&path));
            // A file that cannot be read (removed since, no permission) leaves bare addresses
            // with the file's name.
            let results = self
                .symbolizer
                .symbolize(&source, Input::FileOffset(&offsets))
                .unwrap_or_default();
            let mut results = results.into_iter();
            for &(addr, _) in &addrs {
                let frame = match results.next() {
                    Some(Symbolized::Sym(sym)) => Frame {
                        addr: Some(addr),
                        symbol: Some(sym.name.into_owned()),
                        // The offset of the return address, as a kernel `%pS` would print it.
                        offset: Some(sym.offset as u64 + 1),
                        size: sym.size.map(|size| size as u64),
                        module: Some(module.clone()),
                        source: sym.code_info.map(|code| {
                            let file = Path::new(&code.file).display().to_string();
                            match code.line {
                                Some(line) => format!("{file}:{line}"),
                                None => file,
                            }
                        }),
                    },
                    _ => Frame {
                        module: Some(module.clone()),
                        ..Frame::unknown(addr)
                    },
                };
                self.frames.insert((pid, addr), frame);
            }
        }
        Ok(())
    }

    /// The frame for an address passed to [`Self::resolve`] (or a bare address otherwise).
    pub fn frame(&self, addr: u64) -> Frame {
        self.frame_in(ONLY_PROCESS, addr)
    }

    /// The frame for an address of `pid` passed to [`Self::resolve_in`] (or a bare address).
    pub fn frame_in(&self, pid: u32, addr: u64) -> Frame {
        self.frames
            .get(&(pid, addr))
            .cloned()
            .unwrap_or_else(|| Frame::unknown(addr))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
