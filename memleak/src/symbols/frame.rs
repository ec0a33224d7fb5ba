//! One symbolized kernel stack frame, as every report (trace, kmemleak) prints and serializes it.
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    /// The return address, as a `0x`-prefixed hex string (JSON numbers lose precision past
    /// 2^53). `None` where the source gives no address (newer kmemleak reports).
    #[serde(with = "crate::util::hex::option")]
    pub addr: Option<u64>,
    /// Function name, or `None` when the address could not be symbolized.
    pub symbol: Option<String>,
    /// Offset of `addr` from the start of the function.
    pub offset: Option<u64>,
    /// Size of the function, when known.
    pub size: Option<u64>,
    /// Loadable module holding the function; `None` for the core kernel. For user-space
    /// frames, the file name of the executable or shared library.
    pub module: Option<String>,
    /// `file:line` of the instruction, from debug information (user-space frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Frame {
    pub fn unknown(addr: u64) -> Self {
        Self {
            addr: Some(addr),
            symbol: None,
            offset: None,
            size: None,
            module: None,
            source: None,
        }
    }
}

/// Formats like the kernel's `%pS`: `function+0xoff/0xsize [module]`, or the bare address.
impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.symbol {
            Some(symbol) => {
                write!(f, "{symbol}")?;
                if let Some(offset) = self.offset {
                    write!(f, "+{offset:#x}")?;
                    if let Some(size) = self.size {
                        write!(f, "/{size:#x}")?;
                    }
                }
            }
            None => match self.addr {
                Some(addr) => write!(f, "{addr:#x}")?,
                None => write!(f, "?")?,
            },
        }
        if let Some(source) = &self.source {
            write!(f, " ({source})")?;
        }
        if let Some(module) = &self.module {
            write!(f, " [{module}]")?;
        }
        Ok(())
    }
}

/// A symbolized frame without an address, as newer kmemleak reports print them, for tests.
#[cfg(test)]
pub(crate) fn named(symbol: &str) -> Frame {
    Frame {
        addr: None,
        symbol: Some(symbol.to_owned()),
        offset: Some(0x10),
        size: Some(0x80),
        module: None,
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_percent_ps() {
        let frame = Frame {
            addr: Some(0xffff_ffff_8123_4567),
            symbol: Some("do_eventfd".into()),
            offset: Some(0x4c),
            size: Some(0x150),
            module: None,
            source: None,
        };
        assert_eq!(frame.to_string(), "do_eventfd+0x4c/0x150");
        let in_module = Frame {
            module: Some("bonding".into()),
            ..frame
        };
        assert_eq!(in_module.to_string(), "do_eventfd+0x4c/0x150 [bonding]");
        assert_eq!(
            Frame::unknown(0xffff_ffff_c000_0010).to_string(),
            "0xffffffffc0000010"
        );
    }

    #[test]
    fn serializes_addr_as_hex_string() {
        let json = serde_json::to_value(Frame::unknown(0xffff_ffff_8100_0000)).unwrap();
        assert_eq!(json["addr"], "0xffffffff81000000");
        assert!(json["symbol"].is_null());
        assert!(json["module"].is_null());
    }
}
