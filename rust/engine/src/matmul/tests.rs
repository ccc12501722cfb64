use super::*;
use crate::kernels::available_levels;
use crate::testutil::values;
use half::f16;

/// `m` queries `a` against `n` rows `b` (`k` values each) by `product` at `level`, the queries
/// packed for this call alone: `c[i * ldc + j]`, the rest of `c` left NaN.
fn scores(
    product: Product,
    level: Level,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: Src<'_>,
    ldc: usize,
) -> Vec<f32> {
    let mut c = vec![f32::NAN; m * ldc];
    let packed = PackedQueries::new(product, level, m, k, a);
    packed.scores(b, n, &mut c, ldc, &mut Workspace::default());
    c
}

fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|p| a[i * k + p] as f64 * b[j * k + p] as f64)
                .sum();
        }
    }
    c
}

const SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (13, 33, 7),
    (12, 32, 256),
    (25, 70, 257),
    (7, 513, 3),
    (30, 40, 1025),
    (8, 1100, 64),
    (3, 5, 600),
    (40, 17, 31),
];

#[test]
fn f32_product_matches_reference_on_every_level_and_odd_shape() {
    for level in available_levels() {
        for &(m, n, k) in &SHAPES {
            let a = values(m * k, (m * 31 + k) as u64);
            let b = values(n * k, (n * 17 + k) as u64);
            let want = naive(m, n, k, &a, &b);
            // ldc > n checks the stride; the padding column must stay untouched.
            let ldc = n + 3;
            let c = scores(Product::F32, level, (m, n, k), &a, Src::F32(&b), ldc);
            for i in 0..m {
                for j in 0..n {
                    let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                    assert!(
                        (got - w).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + w.abs()),
                        "{level:?} {m}x{n}x{k} [{i},{j}]: {got} vs {w}"
                    );
                }
                assert!(c[i * ldc + n].is_nan(), "{level:?} wrote past n");
            }
            // f16 rows convert while packing: same as converting first.
            let b16: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
            let b16f: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
            let want = naive(m, n, k, &a, &b16f);
            let c = scores(Product::F32, level, (m, n, k), &a, Src::F16(&b16), ldc);
            // The conversion is exact, so the f16 rows score bit for bit as their f32 copy.
            let c32 = scores(Product::F32, level, (m, n, k), &a, Src::F32(&b16f), ldc);
            for i in 0..m {
                for j in 0..n {
                    let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                    assert!(
                        (got - w).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + w.abs()),
                        "{level:?} f16 {m}x{n}x{k} [{i},{j}]: {got} vs {w}"
                    );
                    let (got, f32_copy) = (c[i * ldc + j], c32[i * ldc + j]);
                    assert_eq!(
                        got.to_bits(),
                        f32_copy.to_bits(),
                        "{level:?} f16 {m}x{n}x{k} [{i},{j}]: {got} vs its f32 copy {f32_copy}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_queries_hold_their_values_once_without_slice_padding() {
    // IVF caches one per list: a k of 384 once took the i8 slice width (1024) per row,
    // beside an unpacked copy.
    for level in available_levels() {
        for product in [Product::F32, Product::Bf16, Product::I8] {
            for &(m, k) in &[(200, 384), (13, 1025), (1, 1)] {
                let p = PackedQueries::new(product, level, m, k, &values(m * k, 5));
                let Some(shape) = p.shape else {
                    continue; // the reference loop keeps the queries as given
                };
                let size = match product {
                    Product::F32 => 4,
                    Product::Bf16 => 2,
                    Product::I8 => 1,
                };
                let values = m.div_ceil(shape.mr) * shape.mr * k.next_multiple_of(shape.g);
                let most = values * size + 64 + 4 * m;
                assert!(
                    p.heap_bytes() <= most,
                    "{level:?} {product:?} {m}x{k}: {} > {most} bytes",
                    p.heap_bytes()
                );
            }
        }
    }
}

#[test]
fn i8_product_is_exact_on_every_level_with_extremes() {
    for level in available_levels() {
        for &(m, n, k) in &SHAPES {
            let a = values(m * k, (m + k) as u64);
            let mut b: Vec<i8> = values(n * k, (n + 3 * k) as u64)
                .iter()
                .map(|&v| (v * 127.9) as i8)
                .collect();
            // int8 extremes: a row of -128 and a row of 127.
            b[..k].fill(-128);
            if n > 1 {
                b[k..2 * k].fill(127);
            }
            let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
            let src = Src::I8 {
                data: &b,
                scales: &scales,
            };
            let got = scores(Product::I8, level, (m, n, k), &a, src, n);
            let want = scores(Product::I8, Level::Scalar, (m, n, k), &a, src, n);
            assert_eq!(got, want, "{level:?} {m}x{n}x{k}");
            // And the reference is the quantized query's exact dot product.
            let mut q = vec![0i8; k];
            let s = quantize_query_i8(&a[..k], &mut q);
            let dot: i64 = q
                .iter()
                .zip(&b[..k])
                .map(|(&x, &y)| x as i64 * y as i64)
                .sum();
            assert_eq!(want[0], dot as f32 * (s * scales[0]));
        }
    }
}

#[test]
fn scores_above_mark_exactly_the_scores_reaching_each_threshold() {
    for level in available_levels() {
        for product in [Product::I8, Product::Bf16, Product::F32] {
            for &(m, n, k) in &SHAPES {
                let a = values(m * k, (m + 11 * k) as u64);
                let data: Vec<i8> = values(n * k, (n + 13 * k) as u64)
                    .iter()
                    .map(|&v| (v * 127.9) as i8)
                    .collect();
                let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
                let src = Src::I8 {
                    data: &data,
                    scales: &scales,
                };
                let packed = PackedQueries::new(product, level, m, k, &a);
                let mut ws = Workspace::default();
                let mut want = vec![0.0f32; m * n];
                packed.scores(src, n, &mut want, n, &mut ws);
                // Thresholds: the column's median score, and unreachable / everything.
                let thr: Vec<f32> = (0..n)
                    .map(|j| match j % 5 {
                        3 => f32::INFINITY,
                        4 => f32::NEG_INFINITY,
                        _ => {
                            let mut col: Vec<f32> = (0..m).map(|i| want[i * n + j]).collect();
                            col.sort_by(f32::total_cmp);
                            col[m / 2]
                        }
                    })
                    .collect();
                let words = n.div_ceil(32);
                let mut got = vec![f32::NAN; m * n];
                let mut masks = vec![u32::MAX; m * words];
                let marks = Marks {
                    thr: &thr,
                    masks: &mut masks,
                };
                packed.scores_above(src, n, &mut got, n, marks, &mut ws);
                for i in 0..m {
                    for j in 0..n {
                        let marked = masks[i * words + j / 32] >> (j % 32) & 1 == 1;
                        let v = want[i * n + j];
                        assert_eq!(marked, v >= thr[j], "{level:?} {product:?} {m}x{n}x{k}");
                        if marked {
                            assert_eq!(got[i * n + j], v, "{level:?} {product:?}");
                        }
                    }
                    // No bit beyond the last column.
                    if n % 32 != 0 {
                        assert_eq!(masks[i * words + words - 1] >> (n % 32), 0);
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_product_matches_reference_on_every_level() {
    for level in available_levels() {
        for &(m, n, k) in &SHAPES {
            let a = values(m * k, (m + 5 * k) as u64);
            let b = values(n * k, (n + 7 * k) as u64);
            let got = scores(Product::Bf16, level, (m, n, k), &a, Src::F32(&b), n);
            let want = scores(Product::Bf16, Level::Scalar, (m, n, k), &a, Src::F32(&b), n);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + w.abs()),
                    "{level:?} {m}x{n}x{k}: {g} vs {w}"
                );
            }
        }
    }
}

/// Rows packed once give what per-block packing gives (bit for bit: the same kernels on
/// the same values), from any panel-aligned start, for float and i8 sources.
#[test]
fn rows_packed_once_score_as_rows_packed_per_block() {
    for level in available_levels() {
        for product in [Product::I8, Product::Bf16] {
            for &(m, n, k) in &SHAPES {
                let a = values(m * k, (m + 11 * k) as u64);
                let b = values(n * k, (n + 13 * k) as u64);
                let Some(rows) = PackedRows::new(product, level, Src::F32(&b), n, k) else {
                    continue;
                };
                assert_eq!(rows.len(), n);
                // The per-block reference: i8 rows quantized the same way first.
                let mut quant = vec![0i8; n * k];
                let scales: Vec<f32> = (0..n)
                    .map(|r| {
                        let dst = &mut quant[r * k..(r + 1) * k];
                        kernels::quantize_row_i8(&b[r * k..(r + 1) * k], dst)
                    })
                    .collect();
                let queries = PackedQueries::new(product, level, m, k, &a);
                let mut ws = Workspace::default();
                for j0 in (0..n).step_by(32).take(3) {
                    let len = n - j0;
                    let mut want = vec![0.0f32; m * len];
                    let mut got = vec![f32::NAN; m * len];
                    let src = match product {
                        Product::I8 => Src::I8 {
                            data: &quant[j0 * k..],
                            scales: &scales[j0..],
                        },
                        _ => Src::F32(&b[j0 * k..]),
                    };
                    queries.scores(src, len, &mut want, len, &mut ws);
                    queries.scores_packed(&rows, j0, len, &mut got, len, &mut ws);
                    assert_eq!(got, want, "{level:?} {product:?} {m}x{n}x{k} from {j0}");
                }
                // An i8 source is packed as it is (no second quantization).
                if product == Product::I8 {
                    let src = Src::I8 {
                        data: &quant,
                        scales: &scales,
                    };
                    let again = PackedRows::new(product, level, src, n, k).unwrap();
                    let mut want = vec![0.0f32; m * n];
                    let mut got = vec![0.0f32; m * n];
                    queries.scores_packed(&rows, 0, n, &mut want, n, &mut ws);
                    queries.scores_packed(&again, 0, n, &mut got, n, &mut ws);
                    assert_eq!(got, want, "{level:?} i8 source {m}x{n}x{k}");
                }
            }
        }
    }
}

/// The 16-lane conversion rounds exactly as `bf16_bits` on every kind of value: ties,
/// NaN, infinities, subnormals, and the f16 source through f32.
#[test]
fn bf16_conversion_matches_the_scalar_rounding_on_every_level() {
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MIN_POSITIVE,
        f32::MIN_POSITIVE / 3.0,
        -1e-40,
        f32::MAX,
        f32::MIN,
        f32::from_bits(0x3F80_8000), // a tie, rounds to even (down)
        f32::from_bits(0x3F81_8000), // a tie, rounds to even (up)
        f32::from_bits(0x7F7F_FFFF), // rounds up to infinity
    ];
    vals.extend(values(1000, 5));
    let h: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    for level in available_levels() {
        for len in [0, 1, 15, 16, 17, vals.len()] {
            let mut got = vec![0u16; len];
            let mut tmp = Vec::new();
            read_bf16(Src::F32(&vals), level, 0, vals.len(), 0, &mut got, &mut tmp);
            let want: Vec<u16> = vals[..len].iter().map(|&v| bf16_bits(v)).collect();
            assert_eq!(got, want, "{level:?} f32 len {len}");
            read_bf16(Src::F16(&h), level, 0, h.len(), 0, &mut got, &mut tmp);
            let want: Vec<u16> = h[..len].iter().map(|v| bf16_bits(v.to_f32())).collect();
            assert_eq!(got, want, "{level:?} f16 len {len}");
        }
    }
}

#[test]
fn bf16_rounding_is_nearest_even() {
    // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties round to even (1.0);
    // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: rounds up to 1 + 2^-6.
    for level in available_levels() {
        let a = [1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
        let b = [1.0f32, 0.0, 0.0, 1.0];
        let c = scores(Product::Bf16, level, (1, 2, 2), &a, Src::F32(&b), 2);
        assert_eq!(c[0], 1.0, "{level:?}");
        assert_eq!(c[1], 1.0 + 1.0 / 64.0, "{level:?}");
    }
}

/// The AMX level where this CPU has it, else None with the reason printed (the tile tests
/// then have nothing to run).
fn amx_level() -> Option<Level> {
    #[cfg(target_arch = "x86_64")]
    if available_levels().contains(&Level::Amx) {
        return Some(Level::Amx);
    }
    println!(
        "skipped: this CPU (or the OS, or valgrind) offers no AMX tiles; levels here: {:?}",
        available_levels()
    );
    None
}

/// Shapes around the tiles' sizes (16 / 32 rows and queries, 32 bf16 / 64 i8 values per
/// step, slices of 512 / 1024 values): one short, exact, one over, several slices.
const TILE_SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (16, 16, 32),
    (17, 15, 33),
    (31, 33, 63),
    (32, 32, 64),
    (33, 65, 65),
    (70, 47, 511),
    (5, 100, 513),
    (40, 33, 1025),
    (33, 70, 2049),
];

#[test]
fn tile_products_match_the_reference_on_ragged_shapes() {
    let Some(level) = amx_level() else {
        return;
    };
    for &(m, n, k) in TILE_SHAPES.iter().chain(&SHAPES) {
        let a = values(m * k, (m + 3 * k) as u64);
        let b = values(n * k, (n + 5 * k) as u64);
        // bf16: the reference's sums in another order, within rounding.
        let b16: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
        for src in [Src::F32(&b), Src::F16(&b16)] {
            let got = scores(Product::Bf16, level, (m, n, k), &a, src, n + 1);
            let want = scores(Product::Bf16, Level::Scalar, (m, n, k), &a, src, n + 1);
            for i in 0..m {
                for j in 0..n {
                    let (g, w) = (got[i * (n + 1) + j], want[i * (n + 1) + j]);
                    assert!(
                        (g - w).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + w.abs()),
                        "bf16 {m}x{n}x{k} [{i},{j}]: {g} vs {w}"
                    );
                }
                assert!(
                    got[i * (n + 1) + n].is_nan(),
                    "bf16 {m}x{n}x{k} wrote past n"
                );
            }
        }
        // i8: exact, the extremes included (|u8 x i8| at its largest in every lane).
        let mut data: Vec<i8> = b.iter().map(|&v| (v * 127.9) as i8).collect();
        data[..k].fill(-128);
        if n > 1 {
            data[k..2 * k].fill(127);
        }
        let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
        let src = Src::I8 {
            data: &data,
            scales: &scales,
        };
        let got = scores(Product::I8, level, (m, n, k), &a, src, n);
        let want = scores(Product::I8, Level::Scalar, (m, n, k), &a, src, n);
        assert_eq!(got, want, "i8 {m}x{n}x{k}");
    }
}

/// Equal rows score equally wherever they sit in a tile (either half, another panel), and
/// equal queries get equal rows of scores: ties stay ties for the re-score to order.
#[test]
fn equal_rows_and_queries_score_bit_for_bit_alike_on_every_level() {
    let (m, n, k) = (40, 70, 300);
    let mut a = values(m * k, 21);
    let mut b = values(n * k, 22);
    for i in [17, 33] {
        a.copy_within(..k, i * k);
    }
    for j in [15, 16, 40, 69] {
        b.copy_within(3 * k..4 * k, j * k);
    }
    let data: Vec<i8> = b.iter().map(|&v| (v * 127.9) as i8).collect();
    let scales = vec![0.01f32; n];
    for level in available_levels() {
        for product in [Product::F32, Product::Bf16, Product::I8] {
            let src = match product {
                Product::I8 => Src::I8 {
                    data: &data,
                    scales: &scales,
                },
                _ => Src::F32(&b),
            };
            let c = scores(product, level, (m, n, k), &a, src, n);
            for i in 0..m {
                for j in [15, 16, 40, 69] {
                    assert_eq!(
                        c[i * n + j],
                        c[i * n + 3],
                        "{level:?} {product:?} [{i},{j}]"
                    );
                }
            }
            for i in [17, 33] {
                assert_eq!(
                    c[i * n..(i + 1) * n],
                    c[..n],
                    "{level:?} {product:?} query {i}"
                );
            }
        }
    }
}

#[test]
fn one_i8_query_scores_packed_rows_as_the_product_does() {
    // A single query against rows packed once (an IVF list): the product's scores bit for
    // bit, on every level, every shape (partial panels, several k slices, k not a multiple
    // of 4), extremes included.
    for level in available_levels() {
        for &(m, _, k) in &SHAPES {
            let rows = values(m * k, (m + 5 * k) as u64);
            let packed = PackedQueries::new(Product::I8, level, m, k, &rows);
            for seed in 0..3u64 {
                let mut q: Vec<i8> = values(k, seed + k as u64)
                    .iter()
                    .map(|&v| (v * 127.9) as i8)
                    .collect();
                if seed == 1 {
                    q.fill(-128);
                }
                if seed == 2 {
                    q.fill(127);
                }
                let scale = 0.013 + seed as f32 * 1e-3;
                let src = Src::I8 {
                    data: &q,
                    scales: &[scale],
                };
                let mut want = vec![f32::NAN; m];
                let mut ws = Workspace::default();
                packed.scores(src, 1, &mut want, 1, &mut ws);
                let mut got = vec![f32::NAN; m + 3];
                packed.scores_one_i8(&q, scale, &mut got, &mut ws);
                assert_eq!(&got[..m], &want[..], "{level:?} m={m} k={k} seed={seed}");
                assert!(got[m..].iter().all(|v| v.is_nan()), "wrote past m");
            }
        }
    }
}

/// Rows packed from their f16 or i8 storage (`of_rows`, a row at a time) score bit for bit
/// as the same rows converted to f32 first and packed by `new`, for every product and level.
#[test]
fn rows_packed_from_f16_and_i8_storage_score_as_their_f32_values() {
    for level in available_levels() {
        for product in [Product::F32, Product::Bf16, Product::I8] {
            for &(m, n, k) in &SHAPES {
                if product == Product::I8 && k > I8_MAX_K {
                    continue;
                }
                let a = values(m * k, (3 * m + k) as u64);
                let b = values(n * k, (5 * n + k) as u64);
                let halves: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
                let mut ints = vec![0i8; m * k];
                let scales: Vec<f32> = (0..m)
                    .map(|r| {
                        kernels::quantize_row_i8(
                            &a[r * k..(r + 1) * k],
                            &mut ints[r * k..(r + 1) * k],
                        )
                    })
                    .collect();
                let as_i8 = Src::I8 {
                    data: &ints,
                    scales: &scales,
                };
                for stored in [Src::F16(&halves), as_i8] {
                    let mut f32s = vec![0f32; m * k];
                    for r in 0..m {
                        stored.read(r, k, 0, &mut f32s[r * k..(r + 1) * k]);
                    }
                    let want = PackedQueries::new(product, level, m, k, &f32s);
                    let got = PackedQueries::of_rows(product, level, m, k, stored);
                    // The right operand: i8 rows for the i8 product, else f32.
                    let mut bq = vec![0i8; n * k];
                    let bs: Vec<f32> = (0..n)
                        .map(|r| {
                            kernels::quantize_row_i8(
                                &b[r * k..(r + 1) * k],
                                &mut bq[r * k..(r + 1) * k],
                            )
                        })
                        .collect();
                    let src = match product {
                        Product::I8 => Src::I8 {
                            data: &bq,
                            scales: &bs,
                        },
                        _ => Src::F32(&b),
                    };
                    let mut ws = Workspace::default();
                    let (mut cw, mut cg) = (vec![0f32; m * n], vec![f32::NAN; m * n]);
                    want.scores(src, n, &mut cw, n, &mut ws);
                    got.scores(src, n, &mut cg, n, &mut ws);
                    let what = if matches!(stored, Src::F16(_)) {
                        "f16"
                    } else {
                        "i8"
                    };
                    assert_eq!(
                        cg.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        cw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{level:?} {product:?} {what} rows {m}x{n}x{k}"
                    );
                    if product == Product::I8 {
                        let (mut ow, mut og) = (vec![0f32; m], vec![f32::NAN; m]);
                        want.scores_one_i8(&bq[..k], bs[0], &mut ow, &mut ws);
                        got.scores_one_i8(&bq[..k], bs[0], &mut og, &mut ws);
                        assert_eq!(og, ow, "{level:?} one query, {what} rows {m}x{k}");
                    }
                }
            }
        }
    }
}
