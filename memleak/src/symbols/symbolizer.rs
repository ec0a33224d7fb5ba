//! Kernel address symbolization with blazesym: one long-lived symbolizer, each address once.
use std::fs;

use anyhow::{Context as _, Result};
use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Kernel, Source},
};
use hashbrown::HashMap;

use crate::{
    kernel::{self, Module, kallsyms},
    symbols::{frame::Frame, modules::ModuleSymbols},
};

pub struct KernelSymbolizer {
    symbolizer: Symbolizer,
    source: Source<'static>,
    /// Read once the trace window has ended, so modules loaded during it are known.
    modules: Vec<Module>,
    /// Sorted start addresses of all kallsyms symbols: kallsyms has no sizes, and `%pS`
    /// prints one, so a symbol's size is taken to run up to the next symbol.
    symbol_starts: Vec<u64>,
    /// Symbols of modules recorded while loaded, for addresses of modules unloaded since.
    recorded_modules: ModuleSymbols,
    frames: HashMap<u64, Frame>,
}

impl Default for KernelSymbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl KernelSymbolizer {
    /// Uses /proc/kallsyms, and a vmlinux image when blazesym finds one for the running kernel
    /// (it searches /boot and /usr/lib/debug), which adds symbol sizes and local symbols.
    pub fn new() -> Self {
        Self {
            symbolizer: Symbolizer::new(),
            source: Source::Kernel(Kernel::default()),
            modules: kernel::loaded_modules(),
            symbol_starts: fs::read_to_string(kallsyms::PATH)
                .map(|text| kallsyms::starts(kallsyms::symbols(&text)))
                .unwrap_or_default(),
            recorded_modules: ModuleSymbols::default(),
            frames: HashMap::new(),
        }
    }

    /// Names addresses in modules unloaded since `recorded` saw them loaded.
    pub fn with_recorded_modules(mut self, recorded: ModuleSymbols) -> Self {
        self.recorded_modules = recorded;
        self
    }

    /// The recorded modules no longer loaded when this symbolizer read /proc/modules.
    pub fn unloaded_modules(&self) -> Vec<&str> {
        self.recorded_modules.unloaded(&self.modules)
    }

    /// The frame of an address no loaded module holds but a module recorded before its
    /// unload did (kallsyms would name it after whatever symbol precedes it now).
    fn unloaded_module_frame(&self, addr: u64) -> Option<Frame> {
        if self.module_of(addr).is_some() {
            return None;
        }
        self.recorded_modules.frame(addr)
    }

    /// Symbolizes every address not seen before, in one batch.
    pub fn resolve(&mut self, addrs: impl IntoIterator<Item = u64>) -> Result<()> {
        let mut pending: Vec<u64> = addrs
            .into_iter()
            .filter(|addr| !self.frames.contains_key(addr))
            .collect();
        pending.sort_unstable();
        pending.dedup();
        if pending.is_empty() {
            return Ok(());
        }
        let results = self
            .symbolizer
            .symbolize(&self.source, Input::AbsAddr(&pending))
            .context("symbolizing kernel addresses (blazesym, /proc/kallsyms)")?;
        for (&addr, symbolized) in pending.iter().zip(results) {
            if let Some(frame) = self.unloaded_module_frame(addr) {
                self.frames.insert(addr, frame);
                continue;
            }
            let frame = match symbolized {
                Symbolized::Sym(sym) => Frame {
                    addr: Some(addr),
                    symbol: Some(sym.name.into_owned()),
                    offset: Some(sym.offset as u64),
                    size: sym
                        .size
                        .map(|size| size as u64)
                        .or_else(|| self.size_from_next_symbol(sym.addr)),
                    module: sym
                        .module
                        .map(|module| module.to_string_lossy().into_owned())
                        .filter(|module| !module.starts_with('/') && !module.is_empty())
                        .or_else(|| self.module_of(addr)),
                    source: None,
                },
                Symbolized::Unknown(_) => Frame {
                    module: self.module_of(addr),
                    ..Frame::unknown(addr)
                },
            };
            self.frames.insert(addr, frame);
        }
        Ok(())
    }

    fn size_from_next_symbol(&self, start: u64) -> Option<u64> {
        let next = self.symbol_starts.partition_point(|&addr| addr <= start);
        self.symbol_starts.get(next).map(|&end| end - start)
    }

    fn module_of(&self, addr: u64) -> Option<String> {
        self.modules
            .iter()
            .find(|module| (module.base..module.base + module.size).contains(&addr))
            .map(|module| module.name.clone())
    }

    /// The frame for an address passed to [`Self::resolve`] (or a bare address otherwise).
    pub fn frame(&self, addr: u64) -> Frame {
        self.frames
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| Frame::unknown(addr))
    }
}
