#![no_std]
// The library target lets memleak declare a build-dependency on this crate, so cargo rebuilds
// memleak when the eBPF sources change. The programs are in the `memleak` binary target.
