//! The plain loops every SIMD path must agree with.

use half::f16;

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn l2_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

pub fn dot_f16(q: &[f32], x: &[f16]) -> f32 {
    q.iter().zip(x).map(|(a, b)| a * b.to_f32()).sum()
}

pub fn l2_f16(q: &[f32], x: &[f16]) -> f32 {
    q.iter()
        .zip(x)
        .map(|(a, b)| {
            let d = a - b.to_f32();
            d * d
        })
        .sum()
}

pub fn dot_i8(q: &[i16], x: &[i8]) -> i64 {
    q.iter().zip(x).map(|(a, b)| *a as i64 * *b as i64).sum()
}

/// Appends to `out` the index of every score `>= t` (NaN never is), in order.
pub fn at_least(scores: &[f32], t: f32, out: &mut Vec<u32>) {
    out.extend(
        scores
            .iter()
            .enumerate()
            .filter(|(_, &s)| s >= t)
            .map(|(j, _)| j as u32),
    );
}

/// 4-bit product-quantization fast scan (see [`super::pq_scan_with`]).
pub fn pq_scan(lut: &[u8], codes: &[u8], out: &mut [u16]) {
    let pairs = lut.len() / 32;
    for (block, out) in codes.chunks_exact(pairs * 32).zip(out.chunks_exact_mut(32)) {
        for (j, o) in out.iter_mut().enumerate() {
            let mut sum = 0u16;
            for p in 0..pairs {
                let byte = block[p * 32 + j];
                sum += lut[(2 * p) * 16 + (byte & 15) as usize] as u16;
                sum += lut[(2 * p + 1) * 16 + (byte >> 4) as usize] as u16;
            }
            *o = sum;
        }
    }
}

/// [`at_least`] for u16 values (the sums of a product-quantization scan).
pub fn at_least_u16(values: &[u16], t: u16, out: &mut Vec<u32>) {
    out.extend(
        values
            .iter()
            .enumerate()
            .filter(|(_, &v)| v >= t)
            .map(|(j, _)| j as u32),
    );
}
