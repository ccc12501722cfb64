//! Levels, the `LEANCLIP_SIMD` switch, and the public kernels that dispatch on the level.

#[cfg(target_arch = "aarch64")]
use super::neon;
use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::sync::OnceLock;

/// The instruction set a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 with the AMX tile unit: the batched bf16 / i8 products run on tiles
    /// (`matmul::amx`); every other kernel runs as at `Avx512`.
    #[cfg(target_arch = "x86_64")]
    Amx,
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
            #[cfg(target_arch = "x86_64")]
            Level::Amx => "amx",
            #[cfg(target_arch = "aarch64")]
            Level::Neon => "neon",
        }
    }

    /// Whether the AVX-512 kernels run at this level (`Avx512` and `Amx`).
    pub fn is_avx512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self, Level::Avx512 | Level::Amx)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
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
                if has_amx() {
                    levels.push(Level::Amx);
                }
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
/// `LEANCLIP_SIMD=scalar|avx2|avx512|amx|neon` asks for (for tests and for measuring what each
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
pub const LEVEL_NAMES: [&str; 5] = ["scalar", "neon", "avx2", "avx512", "amx"];

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

/// The AMX tile unit with bf16 and int8 products (CPUID leaf 7: AMX-BF16, AMX-TILE,
/// AMX-INT8), its state enabled by the OS (XCR0 bits 17 and 18), and this process allowed to
/// use it: Linux hands out the 8 KiB of tile state only on request (`arch_prctl`), asked here
/// once per process. False where any step fails (an older CPU or kernel, or valgrind, whose
/// emulated CPU reports none of these).
#[cfg(target_arch = "x86_64")]
pub fn has_amx() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // Leaf 7 is read only where leaf 0 lists it.
        let leaf7 = __cpuid(0).eax >= 7 && __cpuid_count(7, 0).edx & AMX_BITS == AMX_BITS;
        // XGETBV needs OSXSAVE (leaf 1 ECX bit 27), without which the OS enables no tile state.
        let osxsave = __cpuid(1).ecx >> 27 & 1 == 1;
        if !(leaf7 && osxsave && xcr0() & XTILE_STATE == XTILE_STATE) {
            return false;
        }
        request_tile_state()
    })
}

/// CPUID.(7, 0).EDX: AMX-BF16 (bit 22), AMX-TILE (24), AMX-INT8 (25).
#[cfg(target_arch = "x86_64")]
const AMX_BITS: u32 = 1 << 22 | 1 << 24 | 1 << 25;
/// XCR0: XTILECFG (bit 17) and XTILEDATA (bit 18).
#[cfg(target_arch = "x86_64")]
const XTILE_STATE: u64 = 1 << 17 | 1 << 18;

#[cfg(target_arch = "x86_64")]
fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: called only where CPUID reports OSXSAVE, which makes XGETBV valid; it reads
    // XCR0 into edx:eax and touches nothing else.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                        options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// Ask Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`):
/// granted for the whole process, its threads included; refused (or unknown, off Linux), the
/// tile instructions would fault, so the AMX level is not offered.
#[cfg(target_arch = "x86_64")]
fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it changes only this process's
        // permission to use the tile state.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Largest magnitude of a query quantized for the i8 kernels. Products with stored values
/// (|x| <= 127) summed in 32-bit lanes stay exact for [`super::I8_BLOCK`] elements at a time.
pub const I16_QUERY_MAX: f32 = 16383.0;

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
        Level::Avx2 => unsafe { avx2::dot_f32(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::dot_f32(a, b) },
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
        Level::Avx2 => unsafe { avx2::l2_f32(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::l2_f32(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { neon::l2_f32(a, b) },
    }
}

/// `dst = src` as f32 (exact): F16C at every x86 level past scalar.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    f16_to_f32_with(level(), src, dst)
}

pub fn f16_to_f32_with(level: Level, src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    match level {
        // SAFETY: every x86 level past scalar has AVX2 and F16C (checked by
        // `available_levels`); the lengths are equal.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 | Level::Amx => unsafe { avx2::f16_to_f32(src, dst) },
        _ => src.convert_to_f32_slice(dst),
    }
}

pub fn dot_f16_with(level: Level, q: &[f32], x: &[f16]) -> f32 {
    assert_eq!(q.len(), x.len());
    match level {
        Level::Scalar => scalar::dot_f16(q, x),
        // SAFETY: the level was checked against the CPU by `available_levels`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::dot_f16(q, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::dot_f16(q, x) },
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
        Level::Avx2 => unsafe { avx2::l2_f16(q, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::l2_f16(q, x) },
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
        Level::Avx2 => unsafe { avx2::dot_i8(q, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::dot_i8(q, x) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => scalar::dot_i8(q, x),
    }
}

/// Appends to `out` the index of every score `>= t` (NaN never is), in order: the test a
/// top-k scan applies to every score, at the vector width. `scores.len()` must be < 2^32.
pub fn at_least_with(level: Level, scores: &[f32], t: f32, out: &mut Vec<u32>) {
    assert!(scores.len() < u32::MAX as usize);
    match level {
        Level::Scalar => scalar::at_least(scores, t, out),
        // SAFETY: the level was checked against the CPU by `available_levels`; length asserted.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::at_least(scores, t, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::at_least(scores, t, out) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => scalar::at_least(scores, t, out),
    }
}

/// Rows per block of 4-bit product-quantization codes.
pub const PQ_BLOCK: usize = 32;

/// Appends to `out` the index of every value `>= t`, in order ([`at_least_with`] for the u16
/// sums of [`pq_scan_with`]). `values.len()` must be < 2^32.
pub fn at_least_u16_with(level: Level, values: &[u16], t: u16, out: &mut Vec<u32>) {
    assert!(values.len() < u32::MAX as usize);
    match level {
        Level::Scalar => scalar::at_least_u16(values, t, out),
        // SAFETY: the level was checked against the CPU by `available_levels`; length asserted.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::at_least_u16(values, t, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::at_least_u16(values, t, out) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => scalar::at_least_u16(values, t, out),
    }
}

/// Asks the CPU to start loading `bytes` into the cache (a hint: no effect on results).
#[inline]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch reads nothing architecturally; the address lies within `bytes`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// A query's product-quantization lookup table as the kernel of `level` reads it. `lut`
/// holds 16 u8 entries per sub-quantizer (an even number of them, at most 256, so that sums
/// fit u16); built once per query, the tables serve every list it scans.
#[derive(Clone, Debug, Default)]
pub struct PqTables {
    level: Option<Level>,
    pairs: usize,
    bytes: Vec<u8>,
}

impl PqTables {
    /// Rebuilds the tables from `lut` for `level`.
    pub fn set(&mut self, level: Level, lut: &[u8]) {
        let pairs = lut.len() / 32;
        assert!(
            lut.len() == pairs * 32 && (1..=128).contains(&pairs),
            "lut: 16 entries per sub-quantizer, an even number of 2..=256 of them"
        );
        self.level = Some(level);
        self.pairs = pairs;
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Amx => avx512::pq_tables(lut, &mut self.bytes),
            _ => {
                self.bytes.clear();
                self.bytes.extend_from_slice(lut);
            }
        }
    }
}

/// The 4-bit product-quantization "fast scan": `out[r] = sum_s lut[16 s + code(r, s)]` for
/// every row r of `codes`, a run of blocks of [`PQ_BLOCK`] rows, with `tables` built from
/// `lut` for `level`. In a block, the 32 bytes of sub-quantizer pair p hold, at byte r, row
/// r's code of sub-quantizer 2p (low nibble) and of 2p + 1 (high nibble); each pair's lookup
/// is one byte shuffle per 32 rows.
pub fn pq_scan_with(level: Level, tables: &PqTables, codes: &[u8], out: &mut [u16]) {
    assert_eq!(tables.level, Some(level), "tables built for another level");
    let pairs = tables.pairs;
    let blocks = out.len() / PQ_BLOCK;
    assert!(out.len() == blocks * PQ_BLOCK && codes.len() == blocks * pairs * 32);
    let t = &tables.bytes;
    match level {
        Level::Scalar => scalar::pq_scan(t, codes, out),
        // SAFETY: the level was checked against the CPU by `available_levels`; lengths asserted.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::pq_scan(t, codes, out) },
        // SAFETY: as above; the tables were built for this level.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { avx512::pq_scan(t, pairs, codes, out) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon => scalar::pq_scan(t, codes, out),
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
    #[cfg(target_arch = "x86_64")]
    if level().is_avx512() && x.len() == out.len() {
        // SAFETY: the AVX-512 levels were checked against the CPU by `available_levels`.
        let max_abs = unsafe { avx512::max_abs_f32(x) };
        if max_abs == 0.0 {
            out.fill(0);
            return 0.0;
        }
        // SAFETY: as above; the lengths are equal.
        unsafe { avx512::quantize_i8(x, 127.0 / max_abs, out) };
        return max_abs / 127.0;
    }
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
