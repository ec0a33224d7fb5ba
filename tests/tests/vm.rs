//! End-to-end on other kernels: `cargo xtask vm-test` boots Debian's 5.10, 6.1 and 6.12
//! kernels, and a 6.1 built with kmemleak, under qemu with memleak and tests/kmod/leaky inside.
//! It fails unless memleak fails the module's leak check with its exact leaks of each kind it
//! follows there and passes the check of its clean function, reports nothing of workloads that
//! free all they allocate, refuses 5.10 in one line, and kmemleak names the same leaking
//! functions. This test makes the VM runs part of
//! the suite (`./x test`); the runner prints its progress and verdict itself.
use anyhow::Result;
use memleak_tests::require_root;

#[test]
fn the_leak_checks_hold_on_every_debian_kernel_and_kmemleak_agrees() -> Result<()> {
    if memleak_tests::skip_requested() {
        memleak_tests::skip("MEMLEAK_SKIP_E2E=1");
        return Ok(());
    }
    require_root("the VM test installs its tools with apt-get");
    memleak_tests::xtask("vm-test")?;
    Ok(())
}
