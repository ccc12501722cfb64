//! AVX-512 (F, BW, VL) kernels (x86-64).

use super::I8_BLOCK;
use half::f16;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX-512F; `a` and `b` must have the same length.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 16 * j;
            *acc_j = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(off)),
                _mm512_loadu_ps(pb.add(off)),
                *acc_j,
            );
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(
            _mm512_loadu_ps(pa.add(i)),
            _mm512_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 16;
    }
    if i < n {
        // A masked load reads only the `n - i` valid lanes, so the tail never leaves the slices.
        let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let av = _mm512_maskz_loadu_ps(mask, pa.add(i));
        let bv = _mm512_maskz_loadu_ps(mask, pb.add(i));
        acc[1] = _mm512_fmadd_ps(av, bv, acc[1]);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

/// # Safety
/// The CPU must support AVX-512F; `a` and `b` must have the same length.
#[target_feature(enable = "avx512f")]
pub unsafe fn l2_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 16 * j;
            let d = _mm512_sub_ps(_mm512_loadu_ps(pa.add(off)), _mm512_loadu_ps(pb.add(off)));
            *acc_j = _mm512_fmadd_ps(d, d, *acc_j);
        }
        i += 64;
    }
    while i + 16 <= n {
        let d = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
        acc[0] = _mm512_fmadd_ps(d, d, acc[0]);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let d = _mm512_sub_ps(
            _mm512_maskz_loadu_ps(mask, pa.add(i)),
            _mm512_maskz_loadu_ps(mask, pb.add(i)),
        );
        acc[1] = _mm512_fmadd_ps(d, d, acc[1]);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

/// # Safety
/// The CPU must support AVX-512F, BW and VL; `q` and `x` must have the same length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dot_f16(q: &[f32], x: &[f16]) -> f32 {
    let n = q.len();
    let (pq, px) = (q.as_ptr(), x.as_ptr() as *const u16);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 16 * j;
            let xv = _mm512_cvtph_ps(_mm256_loadu_si256(px.add(off) as *const __m256i));
            *acc_j = _mm512_fmadd_ps(_mm512_loadu_ps(pq.add(off)), xv, *acc_j);
        }
        i += 64;
    }
    while i + 16 <= n {
        let xv = _mm512_cvtph_ps(_mm256_loadu_si256(px.add(i) as *const __m256i));
        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(pq.add(i)), xv, acc[0]);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, px.add(i) as *const i16));
        let qv = _mm512_maskz_loadu_ps(mask, pq.add(i));
        acc[1] = _mm512_fmadd_ps(qv, xv, acc[1]);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

/// # Safety
/// The CPU must support AVX-512F, BW and VL; `q` and `x` must have the same length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn l2_f16(q: &[f32], x: &[f16]) -> f32 {
    let n = q.len();
    let (pq, px) = (q.as_ptr(), x.as_ptr() as *const u16);
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 16 * j;
            let xv = _mm512_cvtph_ps(_mm256_loadu_si256(px.add(off) as *const __m256i));
            let d = _mm512_sub_ps(_mm512_loadu_ps(pq.add(off)), xv);
            *acc_j = _mm512_fmadd_ps(d, d, *acc_j);
        }
        i += 32;
    }
    while i < n {
        let take = (n - i).min(16);
        let mask: __mmask16 = ((1u32 << take) - 1) as u16;
        let xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, px.add(i) as *const i16));
        let d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, pq.add(i)), xv);
        acc[0] = _mm512_fmadd_ps(d, d, acc[0]);
        i += take;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// # Safety
/// The CPU must support AVX-512F, BW and VL; `q` and `x` must have the same length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dot_i8(q: &[i16], x: &[i8]) -> i64 {
    let n = q.len();
    let (pq, px) = (q.as_ptr(), x.as_ptr());
    let mut total: i64 = 0;
    let mut start = 0;
    while start < n {
        let end = (start + I8_BLOCK).min(n);
        let mut acc0 = _mm512_setzero_si512();
        let mut acc1 = _mm512_setzero_si512();
        let mut i = start;
        while i + 64 <= end {
            let x0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(px.add(i) as *const __m256i));
            let x1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(px.add(i + 32) as *const __m256i));
            let q0 = _mm512_loadu_si512(pq.add(i) as *const __m512i);
            let q1 = _mm512_loadu_si512(pq.add(i + 32) as *const __m512i);
            acc0 = _mm512_add_epi32(acc0, _mm512_madd_epi16(x0, q0));
            acc1 = _mm512_add_epi32(acc1, _mm512_madd_epi16(x1, q1));
            i += 64;
        }
        while i < end {
            let take = (end - i).min(32);
            let mask: __mmask32 = ((1u64 << take) - 1) as u32;
            let x0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, px.add(i)));
            let q0 = _mm512_maskz_loadu_epi16(mask, pq.add(i));
            acc0 = _mm512_add_epi32(acc0, _mm512_madd_epi16(x0, q0));
            i += take;
        }
        let sum = _mm512_add_epi32(acc0, acc1);
        // Lanes are far below 2^31 here (see I8_BLOCK); widen before summing the block.
        let lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(sum));
        let hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(sum));
        total += _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
        start = end;
    }
    total
}

/// # Safety
/// The CPU must support AVX-512F; `scores.len()` < 2^32.
#[target_feature(enable = "avx512f")]
pub unsafe fn at_least(scores: &[f32], t: f32, out: &mut Vec<u32>) {
    let n = scores.len();
    let p = scores.as_ptr();
    let tv = _mm512_set1_ps(t);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    out.reserve(n + 16);
    let mut len = out.len();
    let dst = out.as_mut_ptr();
    // The indices of the lanes that pass, packed to the front in a register, then one full
    // store (inside the n + 16 reserved): a compressing store to memory is microcoded and
    // slow on some CPUs (Zen 4).
    let mut emit = |m: __mmask16, base: usize| {
        let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(base as i32));
        _mm512_storeu_si512(dst.add(len) as *mut _, _mm512_maskz_compress_epi32(m, idx));
        len += m.count_ones() as usize;
    };
    let ge = |v: __m512| _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, tv);
    let mut i = 0;
    // Four vectors per test: once a top-k is full, most runs of 64 scores hold no candidate.
    while i + 64 <= n {
        let m = [
            ge(_mm512_loadu_ps(p.add(i))),
            ge(_mm512_loadu_ps(p.add(i + 16))),
            ge(_mm512_loadu_ps(p.add(i + 32))),
            ge(_mm512_loadu_ps(p.add(i + 48))),
        ];
        if (m[0] | m[1] | m[2] | m[3]) != 0 {
            for (j, &mj) in m.iter().enumerate() {
                if mj != 0 {
                    emit(mj, i + 16 * j);
                }
            }
        }
        i += 64;
    }
    while i < n {
        let valid: __mmask16 = if n - i >= 16 {
            0xFFFF
        } else {
            ((1u32 << (n - i)) - 1) as u16
        };
        let v = _mm512_maskz_loadu_ps(valid, p.add(i));
        let m = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(valid, v, tv);
        if m != 0 {
            emit(m, i);
        }
        i += 16;
    }
    out.set_len(len);
}

/// `max |x_i|` (0 for an empty slice; NaNs are skipped as `f32::max` skips them).
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn max_abs_f32(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // max_ps returns its second operand when either is NaN: a NaN element keeps acc.
        acc = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(p.add(i))), acc);
        i += 16;
    }
    let mut m = _mm512_reduce_max_ps(acc);
    for &v in &x[i..] {
        m = m.max(v.abs());
    }
    m
}

/// `out[i] = round_to_nearest_even(clamp(x[i] * inv, -127, 127))`, the arithmetic of
/// `quantize_row_i8` (same operations in the same order, so the same bits).
///
/// # Safety
/// The CPU must support AVX-512F; `out` must be as long as `x`.
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_i8(x: &[f32], inv: f32, out: &mut [i8]) {
    assert_eq!(x.len(), out.len());
    const MAGIC: f32 = 12_582_912.0;
    let n = x.len();
    let (p, o) = (x.as_ptr(), out.as_mut_ptr());
    let vinv = _mm512_set1_ps(inv);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let magic = _mm512_set1_ps(MAGIC);
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), vinv);
        let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        let r = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
        let b = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r));
        _mm_storeu_si128(o.add(i) as *mut __m128i, b);
        i += 16;
    }
    for j in i..n {
        let v = (x[j] * inv).clamp(-127.0, 127.0);
        out[j] = ((v + MAGIC) - MAGIC) as i32 as i8;
    }
}

/// The AVX-512 kernel's tables: per two pairs of sub-quantizers (2j, 2j + 1), 64 bytes of
/// low-nibble tables (sub-quantizers 4j, 4j, 4j + 2, 4j + 2: one per 128-bit lane) and 64 of
/// high-nibble tables (4j + 1, 4j + 1, 4j + 3, 4j + 3); an odd last pair keeps its 32 bytes.
pub fn pq_tables(lut: &[u8], out: &mut Vec<u8>) {
    let pairs = lut.len() / 32;
    out.clear();
    for j in 0..pairs / 2 {
        for nibble in 0..2 {
            for s in [
                4 * j + nibble,
                4 * j + nibble,
                4 * j + 2 + nibble,
                4 * j + 2 + nibble,
            ] {
                out.extend_from_slice(&lut[16 * s..16 * (s + 1)]);
            }
        }
    }
    if pairs % 2 == 1 {
        out.extend_from_slice(&lut[32 * (pairs - 1)..]);
    }
}

/// # Safety
/// The CPU must support AVX-512F and BW (and AVX2); `tables` from [`pq_tables`]; lengths as
/// [`super::pq_scan_with`] asserts.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
pub unsafe fn pq_scan(tables: &[u8], pairs: usize, codes: &[u8], out: &mut [u16]) {
    use super::avx2::{pq_pair, pq_store, pq_table};
    let quads = pairs / 2;
    let t = tables.as_ptr();
    let low = _mm512_set1_epi8(0x0f);
    for (b, o) in out.chunks_exact_mut(32).enumerate() {
        let block = codes.as_ptr().add(b * pairs * 32);
        // As in the AVX2 kernel (`pq_pair`), two pairs per step: 16-bit lanes summed whole
        // (`all`) and by high byte (`odd`).
        let mut all = _mm512_setzero_si512();
        let mut odd = _mm512_setzero_si512();
        for j in 0..quads {
            let c = _mm512_loadu_si512(block.add(j * 64) as *const _);
            let lo_t = _mm512_loadu_si512(t.add(j * 128) as *const _);
            let hi_t = _mm512_loadu_si512(t.add(j * 128 + 64) as *const _);
            let a = _mm512_shuffle_epi8(lo_t, _mm512_and_si512(c, low));
            let h = _mm512_shuffle_epi8(hi_t, _mm512_and_si512(_mm512_srli_epi16::<4>(c), low));
            all = _mm512_add_epi16(all, _mm512_add_epi16(a, h));
            odd = _mm512_add_epi16(
                odd,
                _mm512_add_epi16(_mm512_srli_epi16::<8>(a), _mm512_srli_epi16::<8>(h)),
            );
        }
        let mut all = _mm256_add_epi16(
            _mm512_castsi512_si256(all),
            _mm512_extracti64x4_epi64::<1>(all),
        );
        let mut odd = _mm256_add_epi16(
            _mm512_castsi512_si256(odd),
            _mm512_extracti64x4_epi64::<1>(odd),
        );
        if pairs % 2 == 1 {
            let c = _mm256_loadu_si256(block.add((pairs - 1) * 32) as *const __m256i);
            let odd_t = t.add(quads * 128);
            pq_pair(
                c,
                pq_table(odd_t),
                pq_table(odd_t.add(16)),
                &mut all,
                &mut odd,
            );
        }
        pq_store(all, odd, o);
    }
}

/// # Safety
/// The CPU must support AVX-512F and BW; `values.len()` < 2^32.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn at_least_u16(values: &[u16], t: u16, out: &mut Vec<u32>) {
    let n = values.len();
    let p = values.as_ptr();
    let tv = _mm512_set1_epi16(t as i16);
    let mut i = 0;
    while i < n {
        let valid: __mmask32 = if n - i >= 32 {
            u32::MAX
        } else {
            (1u32 << (n - i)) - 1
        };
        let v = _mm512_maskz_loadu_epi16(valid, p.add(i) as *const i16);
        let mut m = _mm512_mask_cmpge_epu16_mask(valid, v, tv);
        while m != 0 {
            out.push(i as u32 + m.trailing_zeros());
            m &= m - 1;
        }
        i += 32;
    }
}
