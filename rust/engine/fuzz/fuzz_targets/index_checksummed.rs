//! Structure-aware: the input is patched into a plausible file (magic and version set unless the
//! input opts out, both checksums recomputed for whatever the header declares) so the fuzzer gets
//! past the checksums and reaches the checks behind them: sizes, reserved bytes, padding, i8
//! scales, duplicate keys, and the search kernels over crafted (even non-finite) vectors.
#![no_main]

#[path = "common.rs"]
mod common;

use leanclip_engine::{format, Index};
use libfuzzer_sys::fuzz_target;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

fn patch(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    if b.len() < format::HEADER_LEN {
        return b;
    }
    // Byte 12 (reserved) chooses: 0xA5 keeps the input's magic/version as they are.
    if b[12] != 0xA5 {
        b[..8].copy_from_slice(&format::MAGIC);
        b[8..12].copy_from_slice(&format::FORMAT_VERSION.to_le_bytes());
    }
    let dim = u32::from_le_bytes(b[16..20].try_into().unwrap()) as u64;
    let size = match b[20] { 0 => 4, 1 => 2, _ => 1 };
    let count = u64::from_le_bytes(b[24..32].try_into().unwrap());
    let meta_end = 64u64.saturating_add(count.saturating_mul(if b[20] == 2 { 12 } else { 8 }));
    let vectors_start = meta_end.saturating_add(63) / 64 * 64;
    let vectors_len = count.saturating_mul(dim).saturating_mul(size);
    let vs = usize::try_from(vectors_start).unwrap_or(usize::MAX).min(b.len());
    let ve = usize::try_from(vectors_start.saturating_add(vectors_len)).unwrap_or(usize::MAX).min(b.len()).max(vs);
    let vectors_sum = xxh3_64(&b[vs..ve]);
    b[48..56].copy_from_slice(&vectors_sum.to_le_bytes());
    let mut h = Xxh3::new();
    h.update(&b[..56]);
    h.update(&b[64..vs.max(64)]);
    let meta_sum = h.digest();
    b[56..64].copy_from_slice(&meta_sum.to_le_bytes());
    b
}

fuzz_target!(|data: &[u8]| {
    let image = patch(data);
    match Index::from_bytes(&image) {
        Ok(index) => common::exercise(&index, Some(&image)),
        Err(e) => common::expect_file_error(&e),
    }
});
