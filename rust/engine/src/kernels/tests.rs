//! Every compiled level against the scalar reference.

use super::*;
use crate::testutil::values;
use half::f16;

const DIMS: [usize; 13] = [1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 511, 513, 4100 * 2];

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
        // AMX asked of a CPU without it: the AVX-512 level (or the best below), warned.
        let below = [Level::Scalar, Level::Avx2, Level::Avx512];
        let (l, w) = choose_level(&below, Some("amx"));
        assert_eq!((l, w.is_some()), (Level::Avx512, true));
    }
}

/// The AMX level is offered exactly where the CPU has the tiles and Linux granted them, on
/// top of AVX-512; where it is not, the reason is printed.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_level_is_offered_only_with_the_tiles_granted() {
    let levels = available_levels();
    assert_eq!(
        levels.contains(&Level::Amx),
        has_amx() && levels.contains(&Level::Avx512)
    );
    if levels.contains(&Level::Amx) {
        assert_eq!(levels.last(), Some(&Level::Amx));
        assert!(Level::Amx.is_avx512() && Level::Avx512.is_avx512() && !Level::Avx2.is_avx512());
    } else {
        println!("no AMX level here (CPU, OS permission or valgrind): levels {levels:?}");
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

#[test]
fn at_least_matches_scalar_on_every_level_length_and_pattern() {
    let mut state = 0x9E3779B97F4A7C15u64;
    for level in available_levels() {
        for n in [
            0usize, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130, 1000,
        ] {
            for t in [f32::NEG_INFINITY, -0.5, 0.0, 0.9, f32::INFINITY] {
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        match state % 23 {
                            0 => f32::NAN,
                            1 => 0.0, // ties with t = 0 pass
                            _ => (state % 2001) as f32 / 1000.0 - 1.0,
                        }
                    })
                    .collect();
                for off in 0..3.min(n + 1) {
                    let mut want = vec![7u32]; // appends after what is there
                    scalar::at_least(&v[off..], t, &mut want);
                    let naive: Vec<u32> = (off..n)
                        .filter(|&j| v[j] >= t)
                        .map(|j| (j - off) as u32)
                        .collect();
                    assert_eq!(want[1..], naive[..]);
                    let mut got = vec![7u32];
                    at_least_with(level, &v[off..], t, &mut got);
                    assert_eq!(got, want, "{level:?} n {n} t {t} off {off}");
                }
            }
        }
    }
}

/// `quantize_row_i8` as first written (the scalar loop every level must reproduce bit for bit).
fn quantize_row_i8_reference(x: &[f32], out: &mut [i8]) -> f32 {
    let max_abs = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max_abs == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let inv = 127.0 / max_abs;
    for (o, v) in out.iter_mut().zip(x) {
        let v = (v * inv).clamp(-127.0, 127.0);
        *o = ((v + 12_582_912.0) - 12_582_912.0) as i32 as i8;
    }
    max_abs / 127.0
}

#[test]
fn quantize_row_i8_matches_the_scalar_reference_bit_for_bit() {
    let mut cases: Vec<Vec<f32>> = Vec::new();
    for &dim in &DIMS {
        for offset in 0..3 {
            cases.push(values(dim + offset, dim as u64 + 7)[offset..].to_vec());
        }
    }
    // Halfway points (ties to even), exact maxima, signed zeros, tiny values.
    cases.push((0..100).map(|i| (i as f32 - 50.0) * 0.5).collect());
    cases.push(vec![
        -0.0, 0.0, 1e-30, -1e-30, 127.0, -127.0, 63.5, -63.5, 0.5, 1.5, 2.5,
    ]);
    cases.push(vec![0.0; 37]);
    for x in &cases {
        let mut got = vec![0i8; x.len()];
        let mut want = vec![0i8; x.len()];
        let gs = quantize_row_i8(x, &mut got);
        let ws = quantize_row_i8_reference(x, &mut want);
        assert_eq!(gs.to_bits(), ws.to_bits(), "scale, len {}", x.len());
        assert_eq!(got, want, "len {}", x.len());
    }
}

#[test]
fn simd_pq_scan_matches_scalar() {
    let mut state = 7u64;
    let mut byte = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u8
    };
    for level in available_levels() {
        for &(subq, blocks) in &[
            (2usize, 1usize),
            (6, 2),
            (8, 3),
            (96, 5),
            (98, 2),
            (128, 2),
            (256, 2),
        ] {
            let mut lut: Vec<u8> = (0..subq * 16).map(|_| byte()).collect();
            if subq == 256 {
                lut.fill(255); // the largest sums: 255 * 256
            }
            let codes: Vec<u8> = (0..blocks * subq * 16).map(|_| byte()).collect();
            let mut want = vec![0u16; blocks * PQ_BLOCK];
            let mut got = vec![1u16; blocks * PQ_BLOCK];
            scalar::pq_scan(&lut, &codes, &mut want);
            let mut tables = PqTables::default();
            tables.set(level, &lut);
            pq_scan_with(level, &tables, &codes, &mut got);
            assert_eq!(got, want, "{level:?} pq_scan with {subq} sub-quantizers");
            if subq == 256 {
                assert!(want.iter().all(|&s| s == 255 * 256));
            }
        }
    }
}

#[test]
fn simd_at_least_u16_matches_scalar() {
    let values: Vec<u16> = (0..300u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 16) as u16)
        .collect();
    for level in available_levels() {
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 100, 300] {
            for t in [0u16, 1, 20_000, 40_000, 65_535] {
                let (mut want, mut got) = (vec![7u32], vec![7u32]);
                scalar::at_least_u16(&values[..len], t, &mut want);
                at_least_u16_with(level, &values[..len], t, &mut got);
                assert_eq!(got, want, "{level:?} len {len} t {t}");
            }
        }
    }
}

#[test]
fn f16_to_f32_is_exact_for_every_f16_on_every_level() {
    let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let want: Vec<f32> = all.iter().map(|v| v.to_f32()).collect();
    for level in available_levels() {
        // Odd lengths leave a tail past the 8-value steps.
        for len in [0, 1, 7, 8, 9, 23, all.len()] {
            let mut got = vec![f32::NAN; len];
            f16_to_f32_with(level, &all[..len], &mut got);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan(),
                    "{level:?} f16 bits {i:#06x}: {g} vs {w}"
                );
            }
        }
    }
}
