// The modules and items of both eBPF objects (`main.rs`, `plain_claims.rs`), which differ only
// in how the object table claims its slots.
mod classic;
mod free_paths;
mod maps;
mod page;
mod percpu;
mod scan;
mod slab;
mod tracker;
mod user;
mod vmalloc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
