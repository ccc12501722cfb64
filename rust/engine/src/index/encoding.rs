//! Validation and encoding of input vectors into the stored type (f32, f16 or i8), fused into
//! one parallel pass: every row is checked (finite, non-zero under cos, within the float16
//! range where it matters) while it is converted.

use super::storage::{commit, spare};
use crate::error::{invalid_vector, Result, VectorFault, MAX_SQNORM, MIN_COS_SQNORM};
use crate::kernels;
use crate::types::{DType, Metric};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Largest finite value a float16 can hold.
pub(crate) const F16_MAX: f32 = 65504.0;
/// Rows per parallel encoding / validation chunk.
const ENCODE_CHUNK: usize = 512;

/// Where `encode_into` writes: not yet initialized storage (spare capacity of a Vec).
enum EncodeTarget<'a> {
    F32(&'a mut [MaybeUninit<f32>]),
    F16(&'a mut [MaybeUninit<f16>]),
    I8(&'a mut [MaybeUninit<i8>], &'a mut [MaybeUninit<f32>]),
}

/// Copies `src` into the not yet initialized `dst` (same length).
#[inline(always)]
fn write_copy<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: both slices hold `src.len()` elements (checked above), `MaybeUninit<T>` has the
    // layout of `T`, and a `&mut` slice cannot overlap a `&` slice.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<T>(), src.len());
    }
}

/// The growable buffers of one dtype that `encode_append` writes to.
pub(crate) enum Buffers<'a> {
    F32(&'a mut Vec<f32>),
    F16(&'a mut Vec<f16>),
    I8(&'a mut Vec<i8>, &'a mut Vec<f32>),
}

/// Validates and converts `vectors` (rows of `dim`) into the spare capacity of `dst`, and makes
/// them part of it only if every row passed: on error `dst` is unchanged.
pub(crate) fn encode_append(
    vectors: &[f32],
    dim: usize,
    metric: Metric,
    dst: Buffers,
) -> Result<()> {
    let (len, n) = (vectors.len(), vectors.len() / dim);
    match dst {
        Buffers::F32(v) => {
            encode_into(vectors, dim, metric, EncodeTarget::F32(spare(v, len)))?;
            // SAFETY: encode_into returned Ok, so it initialized all of the spare elements.
            unsafe { commit(v, len) };
        }
        Buffers::F16(v) => {
            encode_into(vectors, dim, metric, EncodeTarget::F16(spare(v, len)))?;
            // SAFETY: as above.
            unsafe { commit(v, len) };
        }
        Buffers::I8(d, s) => {
            encode_into(
                vectors,
                dim,
                metric,
                EncodeTarget::I8(spare(d, len), spare(s, n)),
            )?;
            // SAFETY: encode_into returned Ok, so it initialized all of the spare elements of
            // both (`n` scales, one per row).
            unsafe {
                commit(d, len);
                commit(s, n);
            }
        }
    }
    Ok(())
}

/// The largest `|x|` of a row as raw bits (sign cleared). For non-negative floats the bit
/// patterns order like the values, so one integer max answers "any NaN or inf?"
/// (`>= INF_BITS`), "all zero?" (`== 0`) and "any value beyond the float16 range?".
#[inline(always)]
fn max_abs_bits(row: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut acc = [0u32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = (*a).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    acc.iter().fold(tail, |m, &a| m.max(a))
}

/// Bits of +inf: `max_abs_bits(row) >= INF_BITS` means the row holds a NaN or an inf.
const INF_BITS: u32 = 0x7f80_0000;

/// The exact squared norm of a row, in f64 (no overflow or underflow for any f32 input).
fn sqnorm_f64(row: &[f32]) -> f64 {
    row.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// What is wrong with a row given its `max_abs_bits`, if anything: NaN / inf, zero under cos,
/// a squared norm beyond [`MAX_SQNORM`], or under cos below [`MIN_COS_SQNORM`]. The squared
/// norm is computed (in f64) only for rows whose largest value puts it in doubt, so the usual
/// row costs two comparisons.
#[inline(always)]
fn row_fault(row: &[f32], bits: u32, metric: Metric) -> Option<VectorFault> {
    if bits >= INF_BITS {
        return Some(VectorFault::NonFinite);
    }
    let cos = metric == Metric::Cos;
    if cos && bits == 0 {
        return Some(VectorFault::Zero);
    }
    let max = f32::from_bits(bits) as f64;
    let bound = max * max;
    if bound * row.len() as f64 > MAX_SQNORM && sqnorm_f64(row) > MAX_SQNORM {
        return Some(VectorFault::TooLarge);
    }
    if cos && bound < MIN_COS_SQNORM && sqnorm_f64(row) < MIN_COS_SQNORM {
        return Some(VectorFault::TooSmall);
    }
    None
}

/// The first failing row of a batch, by kind (the kinds are reported in this order).
#[derive(Clone, Copy, Default)]
struct Faults {
    /// NaN or inf, zero or too small under cos, too large: the row and why.
    bad: Option<(usize, VectorFault)>,
    /// A value beyond the float16 range (f16 storage under ip / l2 only).
    f16_overflow: Option<usize>,
}

impl Faults {
    fn merge(self, other: Faults) -> Faults {
        Faults {
            bad: match (self.bad, other.bad) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            },
            f16_overflow: match (self.f16_overflow, other.f16_overflow) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
    /// Records row `r` (`row`, with its `max_abs_bits`).
    #[inline(always)]
    fn note(&mut self, r: usize, row: &[f32], bits: u32, metric: Metric, f16_range: bool) {
        if self.bad.is_none() {
            if let Some(fault) = row_fault(row, bits, metric) {
                self.bad = Some((r, fault));
            }
        }
        if f16_range && self.f16_overflow.is_none() && bits > F16_MAX.to_bits() {
            self.f16_overflow = Some(r);
        }
    }
    /// The error for the first failing row: NaN / inf / zero / norm anywhere first, then the
    /// float16 range.
    fn check(self, what: &'static str) -> Result<()> {
        if let Some((row, fault)) = self.bad {
            return invalid_vector(what, row, fault);
        }
        if let Some(row) = self.f16_overflow {
            return invalid_vector(what, row, VectorFault::F16Overflow);
        }
        Ok(())
    }
}

/// Checks every row of `vectors` (`dim` values each): finite, squared norm at most
/// [`MAX_SQNORM`], and under cosine non-zero with a squared norm of at least
/// [`MIN_COS_SQNORM`]. The error names the first failing row of `what`.
pub(crate) fn check_rows(
    vectors: &[f32],
    dim: usize,
    metric: Metric,
    what: &'static str,
) -> Result<()> {
    let bad = vectors
        .par_chunks(dim * ENCODE_CHUNK)
        .enumerate()
        .find_map_first(|(chunk, block)| {
            let mut faults = Faults::default();
            for (i, row) in block.chunks_exact(dim).enumerate() {
                faults.note(
                    chunk * ENCODE_CHUNK + i,
                    row,
                    max_abs_bits(row),
                    metric,
                    false,
                );
                if faults.bad.is_some() {
                    return faults.bad;
                }
            }
            None
        });
    Faults {
        bad,
        f16_overflow: None,
    }
    .check(what)
}

/// What `add` accepts into storage of `dtype`: [`check_rows`], and for float16 storage under
/// "ip" / "l2" every value within the float16 range (under "cos" rows are stored unit length).
/// The one check of input vectors that `Index` (fused into its encoding) and `IvfIndex` share.
pub(crate) fn check_stored_rows(
    vectors: &[f32],
    dim: usize,
    metric: Metric,
    dtype: DType,
    what: &'static str,
) -> Result<()> {
    check_rows(vectors, dim, metric, what)?;
    if dtype == DType::F16 && metric != Metric::Cos {
        let over = vectors
            .par_chunks(dim * ENCODE_CHUNK)
            .enumerate()
            .find_map_first(|(chunk, block)| {
                block
                    .chunks_exact(dim)
                    .position(|row| max_abs_bits(row) > F16_MAX.to_bits())
                    .map(|i| chunk * ENCODE_CHUNK + i)
            });
        if let Some(row) = over {
            return invalid_vector(what, row, VectorFault::F16Overflow);
        }
    }
    Ok(())
}

/// `kernels::quantize_row_i8`'s `round_small(x.clamp(-127.0, 127.0)) as i8` (round to nearest,
/// ties to even; NaN -> 0) without a float -> int conversion, which does not vectorize: for
/// |x| <= 127, x + 1.5 * 2^23 lies in a binade where one unit is one ulp, so its bits minus
/// those of 1.5 * 2^23 are the rounded integer.
#[inline(always)]
fn round_clamp_i8(x: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it leaves no fraction bits
    let y = x.clamp(-127.0, 127.0) + MAGIC;
    if y.is_nan() {
        0
    } else {
        (y.to_bits() as i32 - MAGIC.to_bits() as i32) as i8
    }
}

/// `kernels::quantize_row_i8` of the row `x * norm` (`norm` = 1 for no normalization), given
/// `max_abs` = max |x|, writing `out`; returns the scale. Bit for bit the same result:
/// rounding is monotonic, so max |fl(x * norm)| = fl(max |x| * norm).
#[inline(always)]
fn quantize_i8_into(
    x: &[f32],
    norm: Option<f32>,
    max_abs: f32,
    out: &mut [MaybeUninit<i8>],
) -> f32 {
    let max_abs = match norm {
        Some(n) => max_abs * n,
        None => max_abs,
    };
    if max_abs == 0.0 {
        out.iter_mut().for_each(|o| {
            o.write(0);
        });
        return 0.0;
    }
    let inv = 127.0 / max_abs;
    match norm {
        Some(n) => {
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(round_clamp_i8(v * n * inv));
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(round_clamp_i8(v * inv));
            }
        }
    }
    max_abs / 127.0
}

/// Validates and encodes one chunk of rows (`src`, `dim` values each, the first being row
/// `first_row`) into `dst` in one pass: every element of `dst` is written, whatever the input
/// (a failing row is encoded as garbage that the caller never commits). `scratch` holds `dim`
/// values.
#[inline(always)]
fn encode_chunk(
    src: &[f32],
    dst: ChunkTarget<'_>,
    first_row: usize,
    dim: usize,
    metric: Metric,
    scratch: &mut [f16],
) -> Faults {
    let cos = metric == Metric::Cos;
    let mut faults = Faults::default();
    let f16_range = matches!(dst, ChunkTarget::F16(_)) && !cos;
    let mut note = |i: usize, row: &[f32]| {
        let bits = max_abs_bits(row);
        faults.note(first_row + i, row, bits, metric, f16_range);
        bits
    };
    // 1 / |row| under cos (the stored row is `row * inv`).
    let inv_norm = |row: &[f32]| 1.0 / kernels::sqnorm_f32(row).sqrt();
    match dst {
        ChunkTarget::F32(d) => {
            for (i, (dr, sr)) in d
                .chunks_exact_mut(dim)
                .zip(src.chunks_exact(dim))
                .enumerate()
            {
                note(i, sr);
                if cos {
                    let inv = inv_norm(sr);
                    for (o, &v) in dr.iter_mut().zip(sr) {
                        o.write(v * inv);
                    }
                } else {
                    write_copy(dr, sr);
                }
            }
        }
        ChunkTarget::F16(d) => {
            let mut normalized = Vec::new();
            for (i, (dr, sr)) in d
                .chunks_exact_mut(dim)
                .zip(src.chunks_exact(dim))
                .enumerate()
            {
                note(i, sr);
                let row = if cos {
                    let inv = inv_norm(sr);
                    normalized.clear();
                    normalized.extend(sr.iter().map(|v| v * inv));
                    &normalized[..]
                } else {
                    sr
                };
                scratch.convert_from_f32_slice(row);
                write_copy(dr, scratch);
            }
        }
        ChunkTarget::I8(d, scales) => {
            for (i, ((dr, sr), scale)) in d
                .chunks_exact_mut(dim)
                .zip(src.chunks_exact(dim))
                .zip(scales)
                .enumerate()
            {
                let bits = note(i, sr);
                let norm = cos.then(|| inv_norm(sr));
                scale.write(quantize_i8_into(sr, norm, f32::from_bits(bits), dr));
            }
        }
    }
    faults
}

/// One chunk's share of an [`EncodeTarget`].
enum ChunkTarget<'a> {
    F32(&'a mut [MaybeUninit<f32>]),
    F16(&'a mut [MaybeUninit<f16>]),
    I8(&'a mut [MaybeUninit<i8>], &'a mut [MaybeUninit<f32>]),
}

/// `encode_chunk` compiled for AVX2 (same operations, wider vectors: results are identical).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_chunk_avx2(
    src: &[f32],
    dst: ChunkTarget<'_>,
    first_row: usize,
    dim: usize,
    metric: Metric,
    scratch: &mut [f16],
) -> Faults {
    encode_chunk(src, dst, first_row, dim, metric, scratch)
}

/// Validates `vectors` (n x dim: finite, non-zero under cos, within the float16 range for f16
/// storage under ip / l2) and encodes them into `dst` in one parallel pass. On `Ok` every
/// element of `dst` is initialized; on `Err` (the first failing row, NaN / inf / zero before
/// f16 range) its contents are unspecified and must not be committed.
fn encode_into(vectors: &[f32], dim: usize, metric: Metric, dst: EncodeTarget<'_>) -> Result<()> {
    // Callers commit `dst` on Ok, so it must be covered exactly: chunk i of `vectors` pairs
    // with chunk i of `dst`, and `encode_chunk` writes every element of the chunk it gets.
    assert!(vectors.len().is_multiple_of(dim));
    let n = vectors.len() / dim;
    match &dst {
        EncodeTarget::F32(out) => assert_eq!(out.len(), vectors.len()),
        EncodeTarget::F16(out) => assert_eq!(out.len(), vectors.len()),
        EncodeTarget::I8(out, scales) => {
            assert_eq!(out.len(), vectors.len());
            assert_eq!(scales.len(), n);
        }
    }
    let chunk = dim * ENCODE_CHUNK;
    #[cfg(target_arch = "x86_64")]
    let avx2 = kernels::level() != kernels::Level::Scalar;
    let run = |(c, (src, dst)): (usize, (&[f32], ChunkTarget<'_>))| {
        let mut scratch = vec![f16::ZERO; dim];
        let first = c * ENCODE_CHUNK;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: every level above Scalar on x86-64 requires AVX2 (kernels::available_levels).
            return unsafe { encode_chunk_avx2(src, dst, first, dim, metric, &mut scratch) };
        }
        encode_chunk(src, dst, first, dim, metric, &mut scratch)
    };
    let faults = match dst {
        EncodeTarget::F32(out) => vectors
            .par_chunks(chunk)
            .zip(out.par_chunks_mut(chunk).map(ChunkTarget::F32))
            .enumerate()
            .map(run)
            .reduce(Faults::default, Faults::merge),
        EncodeTarget::F16(out) => vectors
            .par_chunks(chunk)
            .zip(out.par_chunks_mut(chunk).map(ChunkTarget::F16))
            .enumerate()
            .map(run)
            .reduce(Faults::default, Faults::merge),
        EncodeTarget::I8(out, scales) => vectors
            .par_chunks(chunk)
            .zip(
                out.par_chunks_mut(chunk)
                    .zip(scales.par_chunks_mut(ENCODE_CHUNK))
                    .map(|(d, s)| ChunkTarget::I8(d, s)),
            )
            .enumerate()
            .map(run)
            .reduce(Faults::default, Faults::merge),
    };
    faults.check("vectors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_the_kernels_for_every_input_kind() {
        let mut values: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.25).collect();
        values.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
        ]);
        values.extend([126.5, -126.5, 127.49, 1e30, -1e30, f32::from_bits(1)]);
        for &v in &values {
            let want = ((v.clamp(-127.0, 127.0) + 12_582_912.0) - 12_582_912.0) as i32 as i8;
            assert_eq!(round_clamp_i8(v), want, "{v}");
        }
    }
}
