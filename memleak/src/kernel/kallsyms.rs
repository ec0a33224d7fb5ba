//! /proc/kallsyms: one `address type name` line per symbol, a module's followed by
//! `\t[module]`. Addresses read as zero without CAP_SYSLOG, and for absolute symbols.
pub const PATH: &str = "/proc/kallsyms";

/// One line of a kallsyms text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symbol<'a> {
    pub address: u64,
    /// `T`/`t` for text, `D`/`d` for data, and so on.
    pub kind: char,
    pub name: &'a str,
    /// The module's name, without brackets; `None` for the core kernel.
    pub module: Option<&'a str>,
}

/// The symbols of a kallsyms text, in its order; lines that do not parse are skipped.
pub fn symbols(text: &str) -> impl Iterator<Item = Symbol<'_>> {
    text.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let address = u64::from_str_radix(fields.next()?, 16).ok()?;
        let kind = fields.next()?.chars().next()?;
        let name = fields.next()?;
        let module = fields
            .next()
            .map(|module| module.trim_start_matches('[').trim_end_matches(']'));
        Some(Symbol {
            address,
            kind,
            name,
            module,
        })
    })
}

/// The nonzero start addresses of `symbols`, sorted and deduplicated: kallsyms has no sizes,
/// so a function ends where the next symbol starts.
pub fn starts<'a>(symbols: impl IntoIterator<Item = Symbol<'a>>) -> Vec<u64> {
    let mut starts: Vec<u64> = symbols
        .into_iter()
        .map(|symbol| symbol.address)
        .filter(|&address| address != 0)
        .collect();
    starts.sort_unstable();
    starts.dedup();
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_core_and_module_lines() {
        let text = "ffffffff81000000 T _stext\n\
                    0000000000000000 A fixed_percpu_data\n\
                    ffffffffc0a00000 t leaky_alloc\t[leaky]\n\
                    not a line\n";
        assert_eq!(
            symbols(text).collect::<Vec<_>>(),
            vec![
                Symbol {
                    address: 0xffff_ffff_8100_0000,
                    kind: 'T',
                    name: "_stext",
                    module: None
                },
                Symbol {
                    address: 0,
                    kind: 'A',
                    name: "fixed_percpu_data",
                    module: None
                },
                Symbol {
                    address: 0xffff_ffff_c0a0_0000,
                    kind: 't',
                    name: "leaky_alloc",
                    module: Some("leaky")
                },
            ]
        );
    }

    #[test]
    fn starts_are_sorted_unique_and_nonzero() {
        let text = "ffffffff81000040 t helper\n\
                    ffffffff81000000 T _stext\n\
                    0000000000000000 A fixed_percpu_data\n\
                    ffffffffc0a00000 t leaky_alloc\t[leaky]\n\
                    ffffffff81000040 T alias\n";
        assert_eq!(
            starts(symbols(text)),
            vec![
                0xffff_ffff_8100_0000,
                0xffff_ffff_8100_0040,
                0xffff_ffff_c0a0_0000
            ]
        );
    }
}
