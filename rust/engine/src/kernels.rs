//! Distance kernels: one query against a run of stored rows, for f32, f16 and i8 storage.
//!
//! Every kernel has a portable scalar version (the reference the tests compare against) and
//! SIMD versions chosen once at run time: AVX-512 (F + BW) and AVX2 + FMA + F16C on x86-64,
//! NEON on aarch64. The public functions dispatch on [`level()`]; the `*_with` variants take an
//! explicit level so that tests can compare every compiled path with the scalar one.

use half::f16;
use std::sync::OnceLock;

/// The instruction set a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => "avx512",
            #[cfg(target_arch = "aarch64")]
            Level::Neon => "neon",
        }
    }
}

/// Every level this CPU can run, best last (always starts with `Scalar`).
pub fn available_levels() -> Vec<Level> {
    #[allow(unused_mut)]
    let mut levels = vec![Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            levels.push(Level::Avx2);
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                levels.push(Level::Avx512);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            levels.push(Level::Neon);
        }
    }
    levels
}

/// The level the kernels run at, chosen once: the best this CPU has, or the one
/// `LEANCLIP_SIMD=scalar|avx2|avx512|neon` asks for (for tests and for measuring what each
/// path is worth). A request above what the CPU has runs at the best level below it; an
/// unknown name runs at the best level. Both print a warning to stderr.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let requested = std::env::var("LEANCLIP_SIMD").ok();
        let (level, warning) = choose_level(&available_levels(), requested.as_deref());
        if let Some(w) = warning {
            eprintln!("leanclip: {w}");
        }
        level
    })
}

/// Every level name `LEANCLIP_SIMD` accepts on some CPU, lowest first.
pub const LEVEL_NAMES: [&str; 4] = ["scalar", "neon", "avx2", "avx512"];

/// The level for a `LEANCLIP_SIMD` value, given the levels this CPU has (best last), and a
/// warning where the request cannot be met as asked.
pub fn choose_level(levels: &[Level], requested: Option<&str>) -> (Level, Option<String>) {
    let best = *levels.last().expect("scalar is always available");
    let Some(name) = requested.map(str::trim).filter(|n| !n.is_empty()) else {
        return (best, None);
    };
    let name = name.to_ascii_lowercase();
    if let Some(l) = levels.iter().find(|l| l.name() == name) {
        return (*l, None);
    }
    let have: Vec<&str> = levels.iter().map(|l| l.name()).collect();
    match LEVEL_NAMES.iter().position(|n| *n == name) {
        Some(rank) => {
            // Not on this CPU: the best level ranked below the request.
            let below = levels
                .iter()
                .rev()
                .find(|l| LEVEL_NAMES.iter().position(|n| *n == l.name()) < Some(rank))
                .copied()
                .unwrap_or(Level::Scalar);
            (
                below,
                Some(format!(
                    "LEANCLIP_SIMD={name} is not supported by this CPU (it has {}); using {}",
                    have.join(", "),
                    below.name()
                )),
            )
        }
        None => (
            best,
            Some(format!(
                "unknown LEANCLIP_SIMD={name:?}: expected one of {}; using {}",
                have.join(", "),
                best.name()
            )),
        ),
    }
}

/// AVX512-VNNI (`vpdpbusd`), for the batched i8 product at the AVX-512 level.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512vnni"))
}

/// AVX512-BF16 (`vdpbf16ps`), for the batched bf16 product at the AVX-512 level.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512bf16"))
}

/// Largest magnitude of a query quantized for the i8 kernels. Products with stored values
/// (|x| <= 127) summed in 32-bit lanes stay exact for [`I8_BLOCK`] elements at a time.
pub const I16_QUERY_MAX: f32 = 16383.0;
/// Elements accumulated in 32-bit lanes before spilling to 64 bits (see [`I16_QUERY_MAX`]).
const I8_BLOCK: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Public dispatching kernels. `rows` holds `out.len()` rows of `q.len()` values each.

/// `out[r] = dot(q, rows[r])`.
pub fn dot_f32_rows(q: &[f32], rows: &[f32], out: &mut [f32]) {
    dot_f32_rows_with(level(), q, rows, out)
}

/// `|v|^2`.
pub fn sqnorm_f32(v: &[f32]) -> f32 {
    dot_f32_with(level(), v, v)
}

/// `out[r] = |q - rows[r]|^2`.
pub fn l2_f32_rows(q: &[f32], rows: &[f32], out: &mut [f32]) {
    l2_f32_rows_with(level(), q, rows, out)
}

/// `out[r] = dot(q, rows[r])` with f16 rows.
pub fn dot_f16_rows(q: &[f32], rows: &[f16], out: &mut [f32]) {
    dot_f16_rows_with(level(), q, rows, out)
}

/// `out[r] = |q - rows[r]|^2` with f16 rows.
pub fn l2_f16_rows(q: &[f32], rows: &[f16], out: &mut [f32]) {
    l2_f16_rows_with(level(), q, rows, out)
}

/// `out[r] = dot(q, rows[r])` exactly, for an i16-quantized query and i8 rows.
pub fn dot_i8_rows(q: &[i16], rows: &[i8], out: &mut [i64]) {
    dot_i8_rows_with(level(), q, rows, out)
}

pub fn dot_f32_rows_with(level: Level, q: &[f32], rows: &[f32], out: &mut [f32]) {
    for_rows(q.len(), rows, out, |row| dot_f32_with(level, q, row))
}

pub fn l2_f32_rows_with(level: Level, q: &[f32], rows: &[f32], out: &mut [f32]) {
    for_rows(q.len(), rows, out, |row| l2_f32_with(level, q, row))
}

pub fn dot_f16_rows_with(level: Level, q: &[f32], rows: &[f16], out: &mut [f32]) {
    for_rows(q.len(), rows, out, |row| dot_f16_with(level, q, row))
}

pub fn l2_f16_rows_with(level: Level, q: &[f32], rows: &[f16], out: &mut [f32]) {
    for_rows(q.len(), rows, out, |row| l2_f16_with(level, q, row))
}

pub fn dot_i8_rows_with(level: Level, q: &[i16], rows: &[i8], out: &mut [i64]) {
    for_rows(q.len(), rows, out, |row| dot_i8_with(level, q, row))
}

#[inline(always)]
fn for_rows<T, O>(dim: usize, rows: &[T], out: &mut [O], mut f: impl FnMut(&[T]) -> O) {
    assert_eq!(
        rows.len(),
        dim * out.len(),
        "rows must hold out.len() rows of dim values"
    );
    if dim == 0 {
        return;
    }
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(dim)) {
        *o = f(row);
    }
}

// ---------------------------------------------------------------------------------------------
// Single-pair kernels with an explicit level.

pub fn dot_f32_with(level: Level, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    match level {
        Level::Scalar => scalar::dot_f32(a, b),
        // SAFETY: a level other than Scalar is only produced by `available_levels`, which
        // checked that the CPU supports the features the function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::dot_f32_avx2(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::dot_f32_avx512(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { neon::dot_f32(a, b) },
    }
}

pub fn l2_f32_with(level: Level, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    match level {
        Level::Scalar => scalar::l2_f32(a, b),
        // SAFETY: the level was checked against the CPU by `available_levels`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::l2_f32_avx2(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::l2_f32_avx512(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { neon::l2_f32(a, b) },
    }
}

pub fn dot_f16_with(level: Level, q: &[f32], x: &[f16]) -> f32 {
    assert_eq!(q.len(), x.len());
    match level {
        Level::Scalar => scalar::dot_f16(q, x),
        // SAFETY: the level was checked against the CPU by `available_levels`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::dot_f16_avx2(q, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::dot_f16_avx512(q, x) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => scalar::dot_f16(q, x),
    }
}

pub fn l2_f16_with(level: Level, q: &[f32], x: &[f16]) -> f32 {
    assert_eq!(q.len(), x.len());
    match level {
        Level::Scalar => scalar::l2_f16(q, x),
        // SAFETY: the level was checked against the CPU by `available_levels`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::l2_f16_avx2(q, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::l2_f16_avx512(q, x) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => scalar::l2_f16(q, x),
    }
}

pub fn dot_i8_with(level: Level, q: &[i16], x: &[i8]) -> i64 {
    assert_eq!(q.len(), x.len());
    match level {
        Level::Scalar => scalar::dot_i8(q, x),
        // SAFETY: the level was checked against the CPU by `available_levels`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::dot_i8_avx2(q, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::dot_i8_avx512(q, x) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => scalar::dot_i8(q, x),
    }
}

/// Quantize a query for the i8 kernels: `q ~= scale * out`, |out| <= [`I16_QUERY_MAX`].
pub fn quantize_query_i16(q: &[f32], out: &mut Vec<i16>) -> f32 {
    let max_abs = q.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    out.clear();
    if max_abs == 0.0 {
        out.resize(q.len(), 0);
        return 0.0;
    }
    let inv = I16_QUERY_MAX / max_abs;
    out.extend(q.iter().map(|v| round_small(v * inv) as i16));
    max_abs / I16_QUERY_MAX
}

/// Round to nearest (ties to even) for |x| < 2^22, in plain adds that vectorize on every
/// x86-64 (f32::round is a libm call without SSE4.1).
#[inline(always)]
fn round_small(x: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it leaves no fraction bits
    ((x + MAGIC) - MAGIC) as i32
}

/// Quantize one stored row to i8 with its own scale: `x ~= scale * out`, |out| <= 127.
pub fn quantize_row_i8(x: &[f32], out: &mut [i8]) -> f32 {
    let max_abs = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max_abs == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let inv = 127.0 / max_abs;
    for (o, v) in out.iter_mut().zip(x) {
        *o = round_small((v * inv).clamp(-127.0, 127.0)) as i8;
    }
    max_abs / 127.0
}

/// The plain loops every SIMD path must agree with.
pub mod scalar {
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
}

#[cfg(target_arch = "x86_64")]
mod x86 {
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
    pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
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
    pub unsafe fn l2_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
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
    pub unsafe fn dot_f16_avx2(q: &[f32], x: &[f16]) -> f32 {
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
    pub unsafe fn l2_f16_avx2(q: &[f32], x: &[f16]) -> f32 {
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
    pub unsafe fn dot_i8_avx2(q: &[i16], x: &[i8]) -> i64 {
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
    /// The CPU must support AVX-512F; `a` and `b` must have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
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
    pub unsafe fn l2_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
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
    pub unsafe fn dot_f16_avx512(q: &[f32], x: &[f16]) -> f32 {
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
    pub unsafe fn l2_f16_avx512(q: &[f32], x: &[f16]) -> f32 {
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
    pub unsafe fn dot_i8_avx512(q: &[i16], x: &[i8]) -> i64 {
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
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    /// # Safety
    /// The CPU must support NEON; `a` and `b` must have the same length.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let off = i + 4 * j;
                *acc_j = vfmaq_f32(*acc_j, vld1q_f32(pa.add(off)), vld1q_f32(pb.add(off)));
            }
            i += 16;
        }
        let mut total = vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ));
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    /// # Safety
    /// The CPU must support NEON; `a` and `b` must have the same length.
    #[target_feature(enable = "neon")]
    pub unsafe fn l2_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut i = 0;
        while i + 8 <= n {
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let off = i + 4 * j;
                let d = vsubq_f32(vld1q_f32(pa.add(off)), vld1q_f32(pb.add(off)));
                *acc_j = vfmaq_f32(*acc_j, d, d);
            }
            i += 8;
        }
        let mut total = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
        while i < n {
            let d = *pa.add(i) - *pb.add(i);
            total += d * d;
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: [usize; 13] = [1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 511, 513, 4100 * 2];

    fn values(n: usize, seed: u64) -> Vec<f32> {
        // xorshift: deterministic, no extra dev-dependency
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: f32, b: f32, dim: usize) -> bool {
        (a - b).abs() <= 1e-5 * (dim as f32).sqrt() * (1.0 + b.abs())
    }

    #[test]
    fn simd_f32_matches_scalar_on_odd_dims_and_unaligned_slices() {
        for level in available_levels() {
            for &dim in &DIMS {
                for offset in 0..3 {
                    let a = values(dim + offset, dim as u64);
                    let b = values(dim + offset, dim as u64 + 99);
                    let (a, b) = (&a[offset..], &b[offset..]);
                    let want = scalar::dot_f32(a, b);
                    let got = dot_f32_with(level, a, b);
                    assert!(
                        close(got, want, dim),
                        "{level:?} dot dim {dim}: {got} vs {want}"
                    );
                    let want = scalar::l2_f32(a, b);
                    let got = l2_f32_with(level, a, b);
                    assert!(
                        close(got, want, dim),
                        "{level:?} l2 dim {dim}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_f16_matches_scalar_on_odd_dims_and_unaligned_slices() {
        for level in available_levels() {
            for &dim in &DIMS {
                for offset in 0..3 {
                    let q = values(dim + offset, dim as u64 + 1);
                    let x: Vec<f16> = values(dim + offset, dim as u64 + 2)
                        .iter()
                        .map(|&v| f16::from_f32(v))
                        .collect();
                    let (q, x) = (&q[offset..], &x[offset..]);
                    let want = scalar::dot_f16(q, x);
                    let got = dot_f16_with(level, q, x);
                    assert!(
                        close(got, want, dim),
                        "{level:?} f16 dot dim {dim}: {got} vs {want}"
                    );
                    let want = scalar::l2_f16(q, x);
                    let got = l2_f16_with(level, q, x);
                    assert!(
                        close(got, want, dim),
                        "{level:?} f16 l2 dim {dim}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_i8_is_exact_on_odd_dims_unaligned_slices_and_extremes() {
        for level in available_levels() {
            for &dim in &DIMS {
                for offset in 0..3 {
                    let mut q = Vec::new();
                    quantize_query_i16(&values(dim + offset, dim as u64 + 3), &mut q);
                    let mut x = vec![0i8; dim + offset];
                    quantize_row_i8(&values(dim + offset, dim as u64 + 4), &mut x);
                    let (q, x) = (&q[offset..], &x[offset..]);
                    assert_eq!(
                        dot_i8_with(level, q, x),
                        scalar::dot_i8(q, x),
                        "{level:?} dim {dim}"
                    );
                }
                // Worst case for the 32-bit lanes: every product at its maximum.
                let q = vec![I16_QUERY_MAX as i16; dim];
                let x = vec![-127i8; dim];
                assert_eq!(
                    dot_i8_with(level, &q, &x),
                    scalar::dot_i8(&q, &x),
                    "{level:?} extreme {dim}"
                );
            }
        }
    }

    #[test]
    fn simd_switch_caps_at_the_cpu_and_warns_on_unknown_names() {
        let levels = available_levels();
        let best = *levels.last().unwrap();
        assert_eq!(choose_level(&levels, None), (best, None));
        assert_eq!(choose_level(&levels, Some("scalar")), (Level::Scalar, None));
        for l in &levels {
            assert_eq!(choose_level(&levels, Some(l.name())), (*l, None));
        }
        let (l, w) = choose_level(&levels, Some("sse9"));
        assert_eq!(l, best);
        assert!(w.unwrap().contains("unknown LEANCLIP_SIMD"));
        // A request above this CPU runs below it, with a warning.
        let (l, w) = choose_level(&[Level::Scalar], Some("avx512"));
        assert_eq!(l, Level::Scalar);
        assert!(w.unwrap().contains("not supported"));
        #[cfg(target_arch = "x86_64")]
        if levels.contains(&Level::Avx2) {
            let (l, w) = choose_level(&[Level::Scalar, Level::Avx2], Some("avx512"));
            assert_eq!((l, w.is_some()), (Level::Avx2, true));
        }
    }

    #[test]
    fn row_kernels_fill_every_output() {
        let dim = 33;
        let q = values(dim, 5);
        let rows = values(dim * 7, 6);
        let mut out = vec![f32::NAN; 7];
        dot_f32_rows(&q, &rows, &mut out);
        for (r, o) in out.iter().enumerate() {
            assert!(close(
                *o,
                scalar::dot_f32(&q, &rows[r * dim..(r + 1) * dim]),
                dim
            ));
        }
    }

    #[test]
    fn quantizers_bound_their_outputs() {
        let v = values(100, 9);
        let mut q = Vec::new();
        let s = quantize_query_i16(&v, &mut q);
        assert!(q.iter().all(|&x| (x as f32).abs() <= I16_QUERY_MAX));
        for (a, b) in v.iter().zip(&q) {
            assert!((a - s * *b as f32).abs() <= s * 0.5 + 1e-7);
        }
        let mut x = vec![0i8; 100];
        let s = quantize_row_i8(&v, &mut x);
        assert!(x.iter().all(|&b| b != i8::MIN));
        for (a, b) in v.iter().zip(&x) {
            assert!((a - s * *b as f32).abs() <= s * 0.5 + 1e-7);
        }
        assert_eq!(quantize_row_i8(&[0.0; 4], &mut [1i8; 4]), 0.0);
    }
}
