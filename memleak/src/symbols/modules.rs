//! Symbols of the modules seen loaded while tracing, kept for after they are unloaded. A
//! module's CI loads it, runs its tests and unloads it: what its code allocated and its exit
//! did not free is then the leak to report, but by report time the kernel has dropped its
//! symbols, and its call sites would be bare addresses in no module, outside a `--module`
//! check. The tracer records each module's symbols while it is loaded (when /proc/modules
//! shows it new), and the symbolizer names addresses of unloaded modules from them.
use std::fs;

use crate::{
    kernel::{self, Module, kallsyms},
    symbols::Frame,
};

/// A module as it was loaded: its range and its symbols, sorted by address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recorded {
    module: Module,
    symbols: Vec<(u64, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct ModuleSymbols {
    recorded: Vec<Recorded>,
    /// /proc/modules as last read: unchanged means nothing to record.
    last_listing: String,
}

impl ModuleSymbols {
    /// Records the modules loaded now that are not recorded yet. Reads /proc/modules (small),
    /// and /proc/kallsyms only when a module is new.
    pub fn refresh(&mut self) {
        let Ok(listing) = fs::read_to_string("/proc/modules") else {
            return;
        };
        if listing == self.last_listing {
            return;
        }
        let modules = kernel::parse_modules(&listing);
        self.last_listing = listing;
        if modules.iter().all(|module| self.knows(module)) {
            return;
        }
        if let Ok(text) = fs::read_to_string(kallsyms::PATH) {
            self.record(&modules, &text);
        }
    }

    fn knows(&self, module: &Module) -> bool {
        self.recorded
            .iter()
            .any(|recorded| recorded.module == *module)
    }

    /// Records the symbols of `modules` not recorded yet, from a kallsyms text
    /// (`addr type name\t[module]`).
    pub fn record(&mut self, modules: &[Module], kallsyms_text: &str) {
        for module in modules {
            if self.knows(module) {
                continue;
            }
            let mut symbols: Vec<(u64, String)> = kallsyms::symbols(kallsyms_text)
                .filter(|symbol| {
                    symbol.module == Some(module.name.as_str())
                        && (module.base..module.base + module.size).contains(&symbol.address)
                })
                .map(|symbol| (symbol.address, symbol.name.to_owned()))
                .collect();
            symbols.sort_unstable();
            symbols.dedup_by_key(|(addr, _)| *addr);
            self.recorded.push(Recorded {
                module: module.clone(),
                symbols,
            });
        }
    }

    /// The recorded modules that `loaded` (the modules loaded now) no longer holds at the same
    /// place: unloaded since, or reloaded elsewhere.
    pub fn unloaded(&self, loaded: &[Module]) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .recorded
            .iter()
            .filter(|recorded| !loaded.contains(&recorded.module))
            .map(|recorded| recorded.module.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The frame of `addr` in a recorded module, `function+0xoff/0xsize [module]`, the size
    /// running up to the next symbol or the module's end; `None` outside every recorded module.
    pub fn frame(&self, addr: u64) -> Option<Frame> {
        let recorded = self.recorded.iter().rev().find(|recorded| {
            (recorded.module.base..recorded.module.base + recorded.module.size).contains(&addr)
        })?;
        let module = Some(recorded.module.name.clone());
        let next = recorded
            .symbols
            .partition_point(|(start, _)| *start <= addr);
        let Some(index) = next.checked_sub(1) else {
            return Some(Frame {
                module,
                ..Frame::unknown(addr)
            });
        };
        let (start, name) = &recorded.symbols[index];
        let end = recorded
            .symbols
            .get(next)
            .map_or(recorded.module.base + recorded.module.size, |(end, _)| *end);
        Some(Frame {
            addr: Some(addr),
            symbol: Some(name.clone()),
            offset: Some(addr - start),
            size: Some(end - start),
            module,
            source: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "ffffffff81000000 T _stext\n\
                            ffffffffc0a00000 t leaky_kmalloc\t[leaky]\n\
                            ffffffffc0a00042 t leaky_cache_alloc\t[leaky]\n\
                            ffffffffc0a00100 t leaky_exit\t[leaky]\n\
                            ffffffffc0b00000 t other_fn\t[other]\n\
                            ffffffffc0a00200 d leaky_outside_range\t[leaky]\n";

    fn leaky() -> Module {
        Module {
            name: "leaky".into(),
            base: 0xffff_ffff_c0a0_0000,
            size: 0x180,
        }
    }

    #[test]
    fn names_addresses_of_a_recorded_module_as_percent_ps_does() {
        let mut symbols = ModuleSymbols::default();
        symbols.record(&[leaky()], KALLSYMS);
        let frame = symbols.frame(0xffff_ffff_c0a0_006d).unwrap();
        assert_eq!(frame.symbol.as_deref(), Some("leaky_cache_alloc"));
        assert_eq!(frame.offset, Some(0x2b));
        assert_eq!(frame.size, Some(0xbe));
        assert_eq!(frame.module.as_deref(), Some("leaky"));
        // The last symbol runs to the module's end; the first starts at its base.
        assert_eq!(
            symbols.frame(0xffff_ffff_c0a0_0110).unwrap().size,
            Some(0x80)
        );
        assert_eq!(
            symbols.frame(0xffff_ffff_c0a0_0000).unwrap().offset,
            Some(0)
        );
        // Outside the module, and another module's symbols, are not its own.
        assert!(symbols.frame(0xffff_ffff_c0a0_0180).is_none());
        assert!(symbols.frame(0xffff_ffff_c0b0_0000).is_none());
    }

    #[test]
    fn reports_modules_no_longer_loaded_where_they_were() {
        let mut symbols = ModuleSymbols::default();
        symbols.record(&[leaky()], KALLSYMS);
        assert!(symbols.unloaded(&[leaky()]).is_empty());
        assert_eq!(symbols.unloaded(&[]), ["leaky"]);
        let moved = Module {
            base: 0xffff_ffff_c0c0_0000,
            ..leaky()
        };
        assert_eq!(symbols.unloaded(std::slice::from_ref(&moved)), ["leaky"]);
        // A reload elsewhere is recorded anew; the newest load names its addresses.
        symbols.record(&[moved], "ffffffffc0c00000 t leaky_kmalloc\t[leaky]\n");
        assert_eq!(
            symbols
                .frame(0xffff_ffff_c0c0_0010)
                .unwrap()
                .symbol
                .as_deref(),
            Some("leaky_kmalloc")
        );
    }
}
