//! The Rust fixture of tests/tests/user.rs, leaks known by construction:
//!   leak_boxes   8 boxes of 100 bytes (the first zeroed: through calloc)
//!   leak_vecs    5 vectors of 10 u64 (80 bytes)
//!   leak_grown   1 vector grown by push from 1 to 100 u64: realloc, to 128 u64 (1024 bytes)
//! and churn, every block of which is freed. `black_box` keeps the compiler from removing
//! allocations that nothing reads. Built with frame pointers.
use std::hint::black_box;

#[inline(never)]
fn leak_boxes(count: u8) {
    for i in 0..count {
        std::mem::forget(black_box(Box::new([i; 100])));
    }
}

#[inline(never)]
fn leak_vecs(count: u64) {
    for i in 0..count {
        let mut vector: Vec<u64> = Vec::with_capacity(10);
        vector.push(i);
        std::mem::forget(black_box(vector));
    }
}

#[inline(never)]
fn leak_grown() {
    let mut vector: Vec<u64> = black_box(Vec::with_capacity(1));
    for i in 0..100 {
        vector.push(black_box(i));
    }
    std::mem::forget(black_box(vector));
}

#[inline(never)]
fn churn() {
    for i in 0..1000u64 {
        black_box(vec![i; 50]);
        black_box(format!("{i}"));
    }
}

fn main() {
    churn();
    leak_boxes(8);
    leak_vecs(5);
    leak_grown();
}
