//! The unsafe SIMD kernels against their scalar reference, at every level this CPU supports
//! (scalar, AVX2, AVX-512 here), on lengths of 0 to ~5000 (not multiples of any vector width,
//! several i8 blocks) and on slices starting at unaligned offsets. Built with AddressSanitizer,
//! so a read past a slice's end is caught even where the sum would come out right.
//! Contract respected: i16 queries within +-I16_QUERY_MAX (what quantize_query_i16 produces);
//! stored i8 may be any value, -128 included (a crafted index file can hold it).
#![no_main]

use half::f16;
use leanclip_engine::kernels::{self, Level};
use libfuzzer_sys::fuzz_target;

fn levels() -> &'static [Level] {
    static L: std::sync::OnceLock<Vec<Level>> = std::sync::OnceLock::new();
    L.get_or_init(kernels::available_levels)
}

/// `len` values cycled from `src` (never empty), placed at element offset `off` of a fresh Vec.
fn cycled<T: Copy + Default>(src: &[T], len: usize, off: usize) -> (Vec<T>, usize) {
    let mut v = vec![T::default(); off + len];
    for i in 0..len {
        v[off + i] = src[i % src.len()];
    }
    (v, off)
}

fn close(simd: f32, reference: f32, scale: f32, n: usize) -> bool {
    (simd - reference).abs() <= 4.0 * (n as f32 + 1.0) * f32::EPSILON * scale + 1e-6
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let len = (u16::from_le_bytes([data[0], data[1]]) as usize) % 5000;
    let (oa, ob) = ((data[2] % 16) as usize, (data[3] % 16) as usize);
    let rows = 1 + (data[4] % 3) as usize;
    let body = &data[5..];
    let half = body.len() / 2;
    let (sa, sb) = (&body[..half.max(1)], &body[half.min(body.len() - 1)..]);
    let fa: Vec<f32> = sa.iter().map(|&b| (b as i8) as f32 / 16.0).collect();
    let fb: Vec<f32> = sb.iter().map(|&b| (b as i8) as f32 / 16.0).collect();
    let hb: Vec<f16> = fb.iter().map(|&v| f16::from_f32(v * 3.0)).collect();
    let qa: Vec<i16> = sa
        .chunks(2)
        .map(|c| {
            let v = i16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as i32;
            (v % (kernels::I16_QUERY_MAX as i32 + 1)) as i16
        })
        .collect();
    let xb: Vec<i8> = sb.iter().map(|&b| b as i8).collect();

    let (a, oa) = cycled(&fa, len, oa);
    let a = &a[oa..];
    let (b, ob) = cycled(&fb, len * rows, ob);
    let b = &b[ob..];
    let (h, oh) = cycled(&hb, len * rows, ob);
    let h = &h[oh..];
    let (q, oq) = cycled(&qa, len, oa);
    let q = &q[oq..];
    let (x, ox) = cycled(&xb, len * rows, ob);
    let x = &x[ox..];

    for r in 0..rows {
        let (br, hr, xr) = (&b[r * len..(r + 1) * len], &h[r * len..(r + 1) * len], &x[r * len..(r + 1) * len]);
        let dot = kernels::scalar::dot_f32(a, br);
        let dot_scale: f32 = a.iter().zip(br).map(|(u, v)| (u * v).abs()).sum();
        let l2 = kernels::scalar::l2_f32(a, br);
        let dot16 = kernels::scalar::dot_f16(a, hr);
        let dot16_scale: f32 = a.iter().zip(hr).map(|(u, v)| (u * v.to_f32()).abs()).sum();
        let l216 = kernels::scalar::l2_f16(a, hr);
        let dot8 = kernels::scalar::dot_i8(q, xr);
        for &level in levels() {
            let name = level.name();
            let got = kernels::dot_f32_with(level, a, br);
            assert!(close(got, dot, dot_scale, len), "{name} dot_f32 len {len}: {got} vs {dot}");
            let got = kernels::l2_f32_with(level, a, br);
            assert!(close(got, l2, l2, len), "{name} l2_f32 len {len}: {got} vs {l2}");
            let got = kernels::dot_f16_with(level, a, hr);
            assert!(close(got, dot16, dot16_scale, len), "{name} dot_f16 len {len}: {got} vs {dot16}");
            let got = kernels::l2_f16_with(level, a, hr);
            assert!(close(got, l216, l216, len), "{name} l2_f16 len {len}: {got} vs {l216}");
            let got = kernels::dot_i8_with(level, q, xr);
            assert_eq!(got, dot8, "{name} dot_i8 len {len}");
        }
    }
    // The row-batched entry points over all rows at once.
    for &level in levels() {
        let mut out = vec![0f32; rows];
        kernels::dot_f32_rows_with(level, a, b, &mut out);
        let mut out16 = vec![0f32; rows];
        kernels::l2_f16_rows_with(level, a, h, &mut out16);
        let mut out8 = vec![0i64; rows];
        kernels::dot_i8_rows_with(level, q, x, &mut out8);
        for r in 0..rows {
            assert_eq!(out8[r], kernels::scalar::dot_i8(q, &x[r * len..(r + 1) * len]));
            assert_eq!(out[r], kernels::dot_f32_with(level, a, &b[r * len..(r + 1) * len]));
            assert_eq!(out16[r], kernels::l2_f16_with(level, a, &h[r * len..(r + 1) * len]));
        }
    }
});
