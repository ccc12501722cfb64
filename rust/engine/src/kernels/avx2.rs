//! AVX2 + FMA + F16C kernels (x86-64).

use super::I8_BLOCK;
use half::f16;
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn hsum256_epi32_i64(v: __m256i) -> i64 {
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v);
    lanes.iter().map(|&l| l as i64).sum()
}

/// # Safety
/// The CPU must support AVX2 and FMA; `a` and `b` must have the same length.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 8 * j;
            *acc_j = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(off)),
                _mm256_loadu_ps(pb.add(off)),
                *acc_j,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut total = hsum256(sum);
    while i < n {
        total += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    total
}

/// # Safety
/// The CPU must support AVX2 and FMA; `a` and `b` must have the same length.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn l2_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 8 * j;
            let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(off)), _mm256_loadu_ps(pb.add(off)));
            *acc_j = _mm256_fmadd_ps(d, d, *acc_j);
        }
        i += 32;
    }
    while i + 8 <= n {
        let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
        acc[0] = _mm256_fmadd_ps(d, d, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut total = hsum256(sum);
    while i < n {
        let d = *pa.add(i) - *pb.add(i);
        total += d * d;
        i += 1;
    }
    total
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `q` and `x` must have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(q: &[f32], x: &[f16]) -> f32 {
    let n = q.len();
    let (pq, px) = (q.as_ptr(), x.as_ptr() as *const u16);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 8 * j;
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(off) as *const __m128i));
            *acc_j = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(off)), xv, *acc_j);
        }
        i += 32;
    }
    while i + 8 <= n {
        let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i));
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), xv, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut total = hsum256(sum);
    while i < n {
        total += *pq.add(i) * x[i].to_f32();
        i += 1;
    }
    total
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `q` and `x` must have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn l2_f16(q: &[f32], x: &[f16]) -> f32 {
    let n = q.len();
    let (pq, px) = (q.as_ptr(), x.as_ptr() as *const u16);
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 8 * j;
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(off) as *const __m128i));
            let d = _mm256_sub_ps(_mm256_loadu_ps(pq.add(off)), xv);
            *acc_j = _mm256_fmadd_ps(d, d, *acc_j);
        }
        i += 16;
    }
    while i + 8 <= n {
        let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i));
        let d = _mm256_sub_ps(_mm256_loadu_ps(pq.add(i)), xv);
        acc[0] = _mm256_fmadd_ps(d, d, acc[0]);
        i += 8;
    }
    let mut total = hsum256(_mm256_add_ps(acc[0], acc[1]));
    while i < n {
        let d = *pq.add(i) - x[i].to_f32();
        total += d * d;
        i += 1;
    }
    total
}

/// # Safety
/// The CPU must support AVX2; `q` and `x` must have the same length.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_i8(q: &[i16], x: &[i8]) -> i64 {
    let n = q.len();
    let (pq, px) = (q.as_ptr(), x.as_ptr());
    let mut total: i64 = 0;
    let mut start = 0;
    while start < n {
        let end = (start + I8_BLOCK).min(n);
        let mut acc0 = _mm256_setzero_si256();
        let mut acc1 = _mm256_setzero_si256();
        let mut i = start;
        while i + 32 <= end {
            let x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(px.add(i) as *const __m128i));
            let x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(px.add(i + 16) as *const __m128i));
            let q0 = _mm256_loadu_si256(pq.add(i) as *const __m256i);
            let q1 = _mm256_loadu_si256(pq.add(i + 16) as *const __m256i);
            acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(x0, q0));
            acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(x1, q1));
            i += 32;
        }
        while i + 16 <= end {
            let x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(px.add(i) as *const __m128i));
            let q0 = _mm256_loadu_si256(pq.add(i) as *const __m256i);
            acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(x0, q0));
            i += 16;
        }
        total += hsum256_epi32_i64(acc0) + hsum256_epi32_i64(acc1);
        while i < end {
            total += *pq.add(i) as i64 * *px.add(i) as i64;
            i += 1;
        }
        start = end;
    }
    total
}

/// # Safety
/// The CPU must support AVX2; `scores.len()` < 2^32.
#[target_feature(enable = "avx2")]
pub unsafe fn at_least(scores: &[f32], t: f32, out: &mut Vec<u32>) {
    let n = scores.len();
    let p = scores.as_ptr();
    let tv = _mm256_set1_ps(t);
    let mut i = 0;
    while i + 8 <= n {
        let mut m =
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_loadu_ps(p.add(i)), tv)) as u32;
        while m != 0 {
            out.push(i as u32 + m.trailing_zeros());
            m &= m - 1;
        }
        i += 8;
    }
    let start = out.len();
    super::scalar::at_least(&scores[i..], t, out);
    out[start..].iter_mut().for_each(|j| *j += i as u32);
}

/// Adds one sub-quantizer pair's lookups for a block's 32 rows to the 16-bit sums: `c` holds
/// the pair's codes (low nibble: table `t0`, high: `t1`). Each 16-bit lane i of the sums covers
/// rows 2i (low byte) and 2i + 1 (high byte): `all` sums the lane as a whole (wrapping), `odd`
/// the high bytes alone; `all - odd * 256` is then the low bytes' sum. Sums stay below 2^16
/// (at most 255 per sub-quantizer, <= 256 of them).
#[inline(always)]
pub(super) unsafe fn pq_pair(
    c: __m256i,
    t0: __m256i,
    t1: __m256i,
    all: &mut __m256i,
    odd: &mut __m256i,
) {
    let low = _mm256_set1_epi8(0x0f);
    let a = _mm256_shuffle_epi8(t0, _mm256_and_si256(c, low));
    let h = _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16::<4>(c), low));
    *all = _mm256_add_epi16(*all, _mm256_add_epi16(a, h));
    *odd = _mm256_add_epi16(
        *odd,
        _mm256_add_epi16(_mm256_srli_epi16::<8>(a), _mm256_srli_epi16::<8>(h)),
    );
}

/// Writes a block's 32 sums, in row order, from the accumulators of [`pq_pair`].
#[inline(always)]
pub(super) unsafe fn pq_store(all: __m256i, odd: __m256i, out: &mut [u16]) {
    let even = _mm256_sub_epi16(all, _mm256_slli_epi16::<8>(odd));
    // Per 128-bit half: unpacklo gives rows 0-7 (16-23), unpackhi rows 8-15 (24-31).
    let lo = _mm256_unpacklo_epi16(even, odd);
    let hi = _mm256_unpackhi_epi16(even, odd);
    let p = out.as_mut_ptr() as *mut __m256i;
    _mm256_storeu_si256(p, _mm256_permute2x128_si256::<0x20>(lo, hi));
    _mm256_storeu_si256(p.add(1), _mm256_permute2x128_si256::<0x31>(lo, hi));
}

/// A 16-byte table repeated in both 128-bit lanes (the byte shuffle looks up within a lane).
#[inline(always)]
pub(super) unsafe fn pq_table(t: *const u8) -> __m256i {
    _mm256_broadcastsi128_si256(_mm_loadu_si128(t as *const __m128i))
}

/// # Safety
/// The CPU must support AVX2; the lengths are as [`super::pq_scan_with`] asserts.
#[target_feature(enable = "avx2")]
pub unsafe fn pq_scan(lut: &[u8], codes: &[u8], out: &mut [u16]) {
    let pairs = lut.len() / 32;
    for (b, o) in out.chunks_exact_mut(32).enumerate() {
        let block = codes.as_ptr().add(b * pairs * 32);
        let mut all = _mm256_setzero_si256();
        let mut odd = _mm256_setzero_si256();
        for p in 0..pairs {
            let c = _mm256_loadu_si256(block.add(p * 32) as *const __m256i);
            let t = lut.as_ptr().add(p * 32);
            pq_pair(c, pq_table(t), pq_table(t.add(16)), &mut all, &mut odd);
        }
        pq_store(all, odd, o);
    }
}

/// # Safety
/// The CPU must support AVX2; `values.len()` < 2^32.
#[target_feature(enable = "avx2")]
pub unsafe fn at_least_u16(values: &[u16], t: u16, out: &mut Vec<u32>) {
    let n = values.len();
    let p = values.as_ptr();
    let tv = _mm256_set1_epi16(t as i16);
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm256_loadu_si256(p.add(i) as *const __m256i);
        // v >= t (unsigned) exactly when max(v, t) == v; two mask bits per lane.
        let ge = _mm256_cmpeq_epi16(_mm256_max_epu16(v, tv), v);
        let mut m = _mm256_movemask_epi8(ge) as u32 & 0x5555_5555;
        while m != 0 {
            out.push(i as u32 + m.trailing_zeros() / 2);
            m &= m - 1;
        }
        i += 16;
    }
    let start = out.len();
    super::scalar::at_least_u16(&values[i..], t, out);
    out[start..].iter_mut().for_each(|j| *j += i as u32);
}

/// `dst[i] = src[i]` as f32 (exact), 8 values per F16C conversion, inline (half's slice
/// conversion calls a function per 8 values).
///
/// # Safety
/// The CPU must support AVX2 and F16C; `dst` must be as long as `src`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    let n = src.len();
    let (ps, pd) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(ps.add(i) as *const __m128i));
        _mm256_storeu_ps(pd.add(i), v);
        i += 8;
    }
    for (j, v) in src.iter().enumerate().skip(i) {
        *pd.add(j) = v.to_f32();
    }
}
