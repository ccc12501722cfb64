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
