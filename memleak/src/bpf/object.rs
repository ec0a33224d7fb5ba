//! The eBPF objects memleak/build.rs compiled into the binary, and which one the running
//! kernel loads.
use anyhow::{Result, bail};

use crate::kernel;

/// The eBPF objects memleak/build.rs compiled. Without the `ebpf` feature (the fuzz targets,
/// which link only the parsers) it is empty, and loading it fails with an error saying so.
#[cfg(feature = "ebpf")]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memleak"));
/// The same programs for kernels before Linux 5.12, whose table claims need no compare-and-swap.
#[cfg(feature = "ebpf")]
static EBPF_OBJECT_PLAIN_CLAIMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memleak-plain-claims"));
#[cfg(not(feature = "ebpf"))]
static EBPF_OBJECT: &[u8] = &[];
#[cfg(not(feature = "ebpf"))]
static EBPF_OBJECT_PLAIN_CLAIMS: &[u8] = &[];

/// The eBPF object whose table claims slots with compare-and-swap, or the one with plain
/// claims; an error where this build has none.
pub(crate) fn ebpf_object(plain_claims: bool) -> Result<&'static [u8]> {
    let object = if plain_claims {
        EBPF_OBJECT_PLAIN_CLAIMS
    } else {
        EBPF_OBJECT
    };
    if object.is_empty() {
        bail!("this memleak was built without its eBPF object (cargo feature `ebpf`)");
    }
    Ok(object)
}

/// Whether the running kernel needs the object whose table claims are plain stores.
pub(crate) fn kernel_needs_plain_claims() -> bool {
    kernel::release().is_ok_and(|release| predates_bpf_atomics(&release))
}

/// Whether a kernel release (`5.10.0-32-amd64`) is older than Linux 5.12, the first whose BPF
/// has compare-and-swap. Distribution kernels that backported it still get plain claims:
/// slower by a fence, as exact.
fn predates_bpf_atomics(release: &str) -> bool {
    kernel::release_predates(release, 5, 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_12_lack_bpf_atomics() {
        assert!(predates_bpf_atomics("5.10.0-32-amd64"));
        assert!(predates_bpf_atomics("4.19.0-27-amd64"));
        assert!(predates_bpf_atomics("5.11.22"));
        assert!(!predates_bpf_atomics("5.12.0"));
        assert!(!predates_bpf_atomics("6.1.0-57-amd64"));
        assert!(!predates_bpf_atomics("6.12.95+deb12-amd64"));
        // Unparsable: no claim either way.
        assert!(!predates_bpf_atomics("custom"));
    }
}
