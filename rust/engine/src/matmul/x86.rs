//! The x86-64 vector micro-kernels (f32 12x32 / 6x16, i8 VNNI 12x32, bf16 12x32), the
//! stores of their sums (shared with the tile kernels in `amx`), and the packing and
//! conversion intrinsics they read from.

use super::{Block, F32Value, Tile};
use half::f16;
use std::arch::x86_64::*;

/// [`super::bf16_bits`] of 16 lanes.
#[inline(always)]
unsafe fn bf16_bits16(v: __m512) -> __m256i {
    let b = _mm512_castps_si512(v);
    let hi = _mm512_srli_epi32::<16>(b);
    let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    let round = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
    let bits = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32::<16>(round), quiet);
    _mm512_cvtepi32_epi16(bits)
}

/// `dst[i] = bf16_bits(src[i])`, 16 lanes at a time (the bf16 product's packing).
///
/// # Safety
/// AVX-512F/BW/VL; `dst` at least as long as `src`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    let n = src.len();
    assert!(dst.len() >= n);
    let mut i = 0;
    while i < n {
        let m = mask16(n - i);
        let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(i));
        _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut _, m, bf16_bits16(v));
        i += 16;
    }
}

/// f16 values to bf16 bits through f32 (exact), 16 lanes at a time.
///
/// # Safety
/// AVX-512F/BW/VL (F16C's 512-bit form is part of F); `dst` at least as long as `src`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn f16_to_bf16(src: &[f16], dst: &mut [u16]) {
    let n = src.len();
    assert!(dst.len() >= n);
    let mut i = 0;
    while i < n {
        let m = mask16(n - i);
        let h = _mm256_maskz_loadu_epi16(m, src.as_ptr().add(i) as *const _);
        let v = _mm512_cvtph_ps(h);
        _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut _, m, bf16_bits16(v));
        i += 16;
    }
}

/// The sum of `x`, 64 values per VNNI step (a product with ones).
///
/// # Safety
/// AVX-512F/BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn sum_i8(x: &[i8]) -> i32 {
    let ones = _mm512_set1_epi8(1);
    let mut acc = _mm512_setzero_si512();
    let mut i = 0;
    while i < x.len() {
        let m = if x.len() - i >= 64 {
            u64::MAX
        } else {
            (1u64 << (x.len() - i)) - 1
        };
        let v = _mm512_maskz_loadu_epi8(m, x.as_ptr().add(i));
        acc = _mm512_dpbusd_epi32(acc, ones, v);
        i += 64;
    }
    _mm512_reduce_add_epi32(acc)
}

/// One i8 query against one packed panel of 12 rows (`steps` lane steps of 12 x 4 u8, the
/// rows offset by +128 as packed for [`i8_12x32`]): the 12 integer dot products with the
/// query's 4-byte words `q` (i8, zero beyond the values), before the offset's correction,
/// added to the first 12 of `acc`.
///
/// # Safety
/// AVX-512F/BW and VNNI; `a` holds `12 * 4 * steps` bytes and `q` `steps` words.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn i8_gemv_12(a: *const u8, q: *const i32, steps: usize, acc_out: &mut [i32; 16]) {
    // 48 bytes a step in 12 lanes of 16; four chains hide the instruction's latency.
    const LANES: __mmask16 = 0x0FFF;
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut s = 0;
    while s + 4 <= steps {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let rows = _mm512_maskz_loadu_epi32(LANES, a.add(48 * (s + j)) as *const i32);
            let w = _mm512_set1_epi32(q.add(s + j).read_unaligned());
            *acc_j = _mm512_dpbusd_epi32(*acc_j, rows, w);
        }
        s += 4;
    }
    while s < steps {
        let rows = _mm512_maskz_loadu_epi32(LANES, a.add(48 * s) as *const i32);
        let w = _mm512_set1_epi32(q.add(s).read_unaligned());
        acc[0] = _mm512_dpbusd_epi32(acc[0], rows, w);
        s += 1;
    }
    let sum = _mm512_add_epi32(
        _mm512_add_epi32(acc[0], acc[1]),
        _mm512_add_epi32(acc[2], acc[3]),
    );
    let p = acc_out.as_mut_ptr() as *mut __m512i;
    _mm512_storeu_si512(p, _mm512_add_epi32(sum, _mm512_loadu_si512(p)));
}

/// One i8 query against one packed panel of 32 rows in the AMX tiles' layout (`steps` steps
/// of 32 rows x 64 u8, each row's 64 values contiguous, offset by +128): the 32 integer dot
/// products with the query's `64 * steps` values `q` (zero beyond its values), added to
/// `acc_out`, before the offset's correction.
///
/// # Safety
/// AVX-512F/BW and VNNI; `a` holds `32 * 64 * steps` bytes and `q` `64 * steps`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn i8_gemv_32x64(a: *const u8, q: *const i8, steps: usize, acc_out: &mut [i32; 32]) {
    for r0 in (0..32).step_by(4) {
        let mut acc = [_mm512_setzero_si512(); 4];
        for s in 0..steps {
            let qv = _mm512_loadu_si512(q.add(64 * s) as *const __m512i);
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let row = _mm512_loadu_si512(a.add((32 * s + r0 + j) * 64) as *const __m512i);
                *acc_j = _mm512_dpbusd_epi32(*acc_j, row, qv);
            }
        }
        for (j, acc_j) in acc.iter().enumerate() {
            acc_out[r0 + j] += _mm512_reduce_add_epi32(*acc_j);
        }
    }
}

/// The scores of 12 rows from their integer dot products (as [`i8_12x32`] turns them into
/// scores: `(dot - corr) * (row scale * query scale)`), the first `valid` stored at `out`.
///
/// # Safety
/// AVX-512F; `scales` and `out` hold `valid` (at most 12) values.
#[target_feature(enable = "avx512f")]
pub unsafe fn i8_gemv_scores(
    dots: &[i32; 16],
    corr: i32,
    scales: *const f32,
    qscale: f32,
    valid: usize,
    out: *mut f32,
) {
    let m = mask16(valid);
    let dots = _mm512_loadu_si512(dots.as_ptr() as *const __m512i);
    let f = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots, _mm512_set1_epi32(corr)));
    let sc = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, scales), _mm512_set1_ps(qscale));
    _mm512_mask_storeu_ps(out, m, _mm512_mul_ps(f, sc));
}

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// 8 f32 values from `p`.
///
/// # Safety
/// AVX; `p` points at 8 readable values.
#[inline(always)]
pub unsafe fn load8_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

/// 8 f16 values from `p`, converted to f32 (exact).
///
/// # Safety
/// F16C; `p` points at 8 readable values.
#[inline(always)]
pub unsafe fn load8_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Pack rows into f32 panels of `w` rows (w a multiple of 8): `dst[panel][s][lane] =
/// src[(r0 + panel * w + lane) * ld + p0 + s]` as f32, zero for rows past `block.rows`.
/// f16 rows are converted 8 values at a time as they are read, so they cost the
/// transposition no more than f32 rows (no f32 copy of the block is staged).
///
/// # Safety
/// AVX2 and F16C. `src` holds rows `r0..r0 + rows` of `ld >= p0 + kc` values; `dst` holds
/// `rows.div_ceil(w) * w * kc` values.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn pack_f32_avx<T: F32Value>(
    dst: *mut f32,
    src: *const T,
    ld: usize,
    block: Block,
    w: usize,
) {
    let Block {
        r0,
        rows: count,
        p0,
        kc,
    } = block;
    let panels = count.div_ceil(w);
    for panel in 0..panels {
        let base = dst.add(panel * w * kc);
        for lane0 in (0..w).step_by(8) {
            let first = panel * w + lane0;
            let full = first + 8 <= count;
            let mut s = 0;
            if full {
                let rows: [*const T; 8] =
                    std::array::from_fn(|i| src.add((r0 + first + i) * ld + p0));
                while s + 8 <= kc {
                    let r: [__m256; 8] = std::array::from_fn(|i| T::load8(rows[i].add(s)));
                    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let out = [
                        _mm256_permute2f128_ps::<0x20>(u0, u4),
                        _mm256_permute2f128_ps::<0x20>(u1, u5),
                        _mm256_permute2f128_ps::<0x20>(u2, u6),
                        _mm256_permute2f128_ps::<0x20>(u3, u7),
                        _mm256_permute2f128_ps::<0x31>(u0, u4),
                        _mm256_permute2f128_ps::<0x31>(u1, u5),
                        _mm256_permute2f128_ps::<0x31>(u2, u6),
                        _mm256_permute2f128_ps::<0x31>(u3, u7),
                    ];
                    for (j, v) in out.iter().enumerate() {
                        _mm256_storeu_ps(base.add((s + j) * w + lane0), *v);
                    }
                    s += 8;
                }
            }
            for lane in lane0..lane0 + 8 {
                let i = panel * w + lane;
                for t in s..kc {
                    *base.add(t * w + lane) = if i < count {
                        (*src.add((r0 + i) * ld + p0 + t)).to_f32()
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// An f32 micro-kernel: one tile into `c` (the matrix's origin, stride `ldc`).
pub type F32Kernel = unsafe fn(&Tile<f32, f32>, *mut f32, usize);

/// What a 12 x 32 vector kernel does per lane step: `acc + a (x) b`, with `a` one query's 4
/// bytes of the step broadcast and `b` 16 rows' 4 bytes each, summed in `Sum` lanes.
trait Madd {
    type Sum: Copy;
    unsafe fn zero() -> Self::Sum;
    unsafe fn madd(acc: Self::Sum, a: __m512i, b: __m512i) -> Self::Sum;
}

/// f32 values, one per lane step: a fused multiply-add.
struct Fma;

impl Madd for Fma {
    type Sum = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc)
    }
}

/// bf16 pairs: `vdpbf16ps` (AVX512-BF16) adds both products of each pair in f32.
struct Bf16Pairs;

impl Madd for Bf16Pairs {
    type Sum = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        let pairs = |v| std::mem::transmute::<__m512i, __m512bh>(v);
        _mm512_dpbf16_ps(acc, pairs(a), pairs(b))
    }
}

/// u8 x i8 quadruples: `vpdpbusd` (AVX512-VNNI) adds the 4 products of each in exact i32.
struct U8I8Quads;

impl Madd for U8I8Quads {
    type Sum = __m512i;
    #[inline(always)]
    unsafe fn zero() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, a, b)
    }
}

/// The sums of a 12 x 32 vector kernel: each lane step holds 4 bytes per query (12 of them
/// in the query panel) and per stored row (32, two vectors); row `r`'s sums are `s[r]`
/// (columns 0..16, 16..32).
///
/// # Safety
/// The CPU has what `M` runs; the tile's panels hold `steps` lane steps of 12 / 32 x 4 bytes.
#[inline(always)]
unsafe fn sums_12x32<M: Madd, TA, TB>(t: &Tile<TA, TB>) -> [[M::Sum; 2]; 12] {
    let mut s = [[M::zero(); 2]; 12];
    let (mut pa, mut pb) = (t.a as *const i32, t.b as *const __m512i);
    for _ in 0..t.steps {
        let b0 = _mm512_loadu_si512(pb);
        let b1 = _mm512_loadu_si512(pb.add(1));
        for (r, sr) in s.iter_mut().enumerate() {
            let av = _mm512_set1_epi32(pa.add(r).read_unaligned());
            sr[0] = M::madd(sr[0], av, b0);
            sr[1] = M::madd(sr[1], av, b1);
        }
        pa = pa.add(12);
        pb = pb.add(2);
    }
    s
}

/// Store a tile's f32 sums, rows `row(r) = (columns 0..16, 16..32)`, into `c` (the matrix's
/// origin, stride `ldc`): its valid rows and columns only, added to what `c` holds unless
/// this is the tile's first `k` slice.
///
/// # Safety
/// AVX-512F; `c` valid for reads and writes at the tile's valid rows and columns.
#[inline(always)]
pub(super) unsafe fn store_f32_sums<TA, TB>(
    t: &Tile<TA, TB>,
    c: *mut f32,
    ldc: usize,
    row: impl Fn(usize) -> (__m512, __m512),
) {
    let c = c.add(t.i0 * ldc + t.j0);
    let m0 = mask16(t.nr_valid);
    let m1 = mask16(t.nr_valid.saturating_sub(16));
    for r in 0..t.mr_valid {
        let dst = c.add(r * ldc);
        let (mut v0, mut v1) = row(r);
        if !t.first {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, dst));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, dst.add(16)));
        }
        _mm512_mask_storeu_ps(dst, m0, v0);
        _mm512_mask_storeu_ps(dst.add(16), m1, v1);
    }
}

/// # Safety
/// AVX-512F. The tile's panels hold `steps` lane steps of 12 / 32 floats; `c` (the matrix's
/// origin, stride `ldc`) is valid for reads and writes at the tile's valid rows and columns,
/// the only ones the kernel touches.
#[target_feature(enable = "avx512f")]
pub unsafe fn f32_12x32(t: &Tile<f32, f32>, c: *mut f32, ldc: usize) {
    let s = sums_12x32::<Fma, _, _>(t);
    store_f32_sums(t, c, ldc, |r| (s[r][0], s[r][1]))
}

/// # Safety
/// AVX2 and FMA. The tile's panels hold `steps` lane steps of 6 / 16 floats; `c` (the
/// matrix's origin, stride `ldc`) is valid for reads and writes at the tile's valid rows and
/// columns, the only ones the kernel touches.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn f32_6x16(t: &Tile<f32, f32>, c: *mut f32, ldc: usize) {
    let (steps, a, b) = (t.steps, t.a, t.b);
    let c = c.add(t.i0 * ldc + t.j0);
    let (mr, nr, accumulate) = (t.mr_valid, t.nr_valid, !t.first);
    let mut s = [[_mm256_setzero_ps(); 2]; 6];
    let (mut pa, mut pb) = (a, b);
    for _ in 0..steps {
        let b0 = _mm256_loadu_ps(pb);
        let b1 = _mm256_loadu_ps(pb.add(8));
        for (r, sr) in s.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*pa.add(r));
            sr[0] = _mm256_fmadd_ps(av, b0, sr[0]);
            sr[1] = _mm256_fmadd_ps(av, b1, sr[1]);
        }
        pa = pa.add(6);
        pb = pb.add(16);
    }
    if mr == 6 && nr == 16 {
        for (r, sr) in s.iter().enumerate() {
            let row = c.add(r * ldc);
            let (mut v0, mut v1) = (sr[0], sr[1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
            }
            _mm256_storeu_ps(row, v0);
            _mm256_storeu_ps(row.add(8), v1);
        }
    } else {
        let mut tmp = [[0.0f32; 16]; 6];
        for (t, sr) in tmp.iter_mut().zip(&s) {
            _mm256_storeu_ps(t.as_mut_ptr(), sr[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), sr[1]);
        }
        for (r, t) in tmp.iter().enumerate().take(mr) {
            let row = c.add(r * ldc);
            for (j, &v) in t.iter().enumerate().take(nr) {
                let dst = row.add(j);
                *dst = if accumulate { *dst + v } else { v };
            }
        }
    }
}

/// Where the i8 kernel writes: f32 scores `c` (stride `ldc`) on the last `k` slice, i32
/// partial sums `ints` (stride `ldi`) on the others; all pointers are the matrices' origins.
pub struct I8Out {
    pub c: *mut f32,
    pub ldc: usize,
    pub ints: *mut i32,
    pub ldi: usize,
    pub qscale: *const f32,
    pub bscale: *const f32,
    pub corr: *const i32,
    /// Null, or one threshold per column: then only scores at or above their column's
    /// threshold are stored, and `mask[i * ldm + j / 32]` bit `j % 32` says which.
    pub thr: *const f32,
    pub mask: *mut u32,
    pub ldm: usize,
}

/// # Safety
/// AVX-512F/BW and VNNI. The tile's panels hold `steps` lane steps of 12 x 4 u8 / 32 x 4
/// i8; `out`'s matrices are valid for the tile's rows and columns (`ints` when `multi`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn i8_12x32(t: &Tile<u8, i8>, out: &I8Out, multi: bool) {
    let s = sums_12x32::<U8I8Quads, _, _>(t);
    store_i8_sums(t, out, multi, |r| (s[r][0], s[r][1]))
}

/// Store a tile's i32 sums (u8 queries by i8 rows), rows `row(r) = (columns 0..16,
/// 16..32)`: partial sums into `ints` on all but the last `k` slice (when `multi`), else the
/// scores `(sum - corr) * qscale * bscale` into `c`, or only those reaching their column's
/// threshold, with their marks.
///
/// # Safety
/// AVX-512F/BW; `out`'s matrices are valid for the tile's rows and columns (`ints` when
/// `multi`).
#[inline(always)]
pub(super) unsafe fn store_i8_sums<TA, TB>(
    t: &Tile<TA, TB>,
    out: &I8Out,
    multi: bool,
    row: impl Fn(usize) -> (__m512i, __m512i),
) {
    let m0 = mask16(t.nr_valid);
    let m1 = mask16(t.nr_valid.saturating_sub(16));
    let j0 = t.j0;
    let corr0 = _mm512_maskz_loadu_epi32(m0, out.corr.add(j0));
    let corr1 = _mm512_maskz_loadu_epi32(m1, out.corr.add(j0 + 16));
    let bs0 = _mm512_maskz_loadu_ps(m0, out.bscale.add(j0));
    let bs1 = _mm512_maskz_loadu_ps(m1, out.bscale.add(j0 + 16));
    let (thr0, thr1) = if out.thr.is_null() {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    } else {
        (
            _mm512_maskz_loadu_ps(m0, out.thr.add(j0)),
            _mm512_maskz_loadu_ps(m1, out.thr.add(j0 + 16)),
        )
    };
    for r in 0..t.mr_valid {
        let i = t.i0 + r;
        let (mut v0, mut v1) = row(r);
        if multi {
            let irow = out.ints.add(i * out.ldi + j0);
            if !t.first {
                v0 = _mm512_add_epi32(v0, _mm512_maskz_loadu_epi32(m0, irow));
                v1 = _mm512_add_epi32(v1, _mm512_maskz_loadu_epi32(m1, irow.add(16)));
            }
            if !t.last {
                _mm512_mask_storeu_epi32(irow, m0, v0);
                _mm512_mask_storeu_epi32(irow.add(16), m1, v1);
                continue;
            }
        }
        let qs = _mm512_set1_ps(*out.qscale.add(i));
        let f0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(v0, corr0));
        let f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(v1, corr1));
        let f0 = _mm512_mul_ps(f0, _mm512_mul_ps(qs, bs0));
        let f1 = _mm512_mul_ps(f1, _mm512_mul_ps(qs, bs1));
        let row = out.c.add(i * out.ldc + j0);
        let (mut s0, mut s1) = (m0, m1);
        if !out.thr.is_null() {
            s0 = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(m0, f0, thr0);
            s1 = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(m1, f1, thr1);
            *out.mask.add(i * out.ldm + j0 / 32) = s0 as u32 | (s1 as u32) << 16;
        }
        _mm512_mask_storeu_ps(row, s0, f0);
        _mm512_mask_storeu_ps(row.add(16), s1, f1);
    }
}

/// # Safety
/// AVX-512F/BW and AVX512-BF16. The tile's panels hold `steps` lane steps of 12 x 2 / 32 x 2
/// bf16; `c` as for [`f32_12x32`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn bf16_12x32(t: &Tile<u16, u16>, c: *mut f32, ldc: usize) {
    let s = sums_12x32::<Bf16Pairs, _, _>(t);
    store_f32_sums(t, c, ldc, |r| (s[r][0], s[r][1]))
}
