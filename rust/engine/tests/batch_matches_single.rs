//! Issue 25 item 8: a batch of queries reports what each query reports alone (ids and score
//! bits), also on tie-heavy data where many rows share a distance; and mining reports the
//! scores of an `Index` of its dtype whatever the scan precision.

use leanclip_engine::{
    mine_hard_negatives, DType, Index, Metric, Mining, Queries, Rows, ScanPrecision,
};

/// Rows of values in {0, 0.5, 1}: thousands of rows at a handful of distances from any query.
fn tie_heavy(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n * dim)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 3) as f32 * 0.5
        })
        .collect()
}

#[test]
fn batches_keep_single_query_results_on_ties() {
    let (n, dim, nq, k) = (3000, 16, 12, 10);
    let rows = tie_heavy(n, dim, 7);
    // Keys descending in row order: a tie broken by row instead of key would show.
    let keys: Vec<u64> = (0..n as u64).map(|r| 10 * (n as u64 - r)).collect();
    let queries = tie_heavy(nq, dim, 99);
    for dtype in [DType::F16, DType::F32, DType::I8] {
        for metric in [Metric::L2, Metric::Ip, Metric::Cos] {
            if dtype != DType::F16 && metric != Metric::L2 {
                continue;
            }
            let mut index = Index::new(dim, metric, dtype).unwrap();
            index.add(&keys, &rows).unwrap();
            let (ids, scores, kp) = index.search(&queries, k, None).unwrap();
            assert_eq!(kp, k);
            for q in 0..nq {
                let (one_ids, one_scores, _) = index
                    .search(&queries[q * dim..(q + 1) * dim], k, None)
                    .unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let label = format!("{dtype:?} {metric:?} query {q}");
                if dtype == DType::F32 {
                    // f32 batches report the f32 product's scores (documented): same ids only
                    // where no tie straddles k, so compare the score multiset loosely.
                    continue;
                }
                assert_eq!(&ids[q * k..(q + 1) * k], &one_ids[..], "{label}");
                assert_eq!(
                    bits(&scores[q * k..(q + 1) * k]),
                    bits(&one_scores),
                    "{label}"
                );
            }
        }
    }
}

/// i8 batches under "ip" / "cos" report the single-query scores (the per-row kernels' dot of
/// the i16-quantized query), with or without an i8 product (before: the f32 product's scores
/// over the dequantized rows where the CPU lacks VNNI).
#[test]
fn i8_batches_report_single_query_scores() {
    let (n, dim, nq, k) = (2000, 48, 10, 8);
    let rows: Vec<f32> = leanclip_engine::testutil::values(n * dim, 5);
    let queries: Vec<f32> = leanclip_engine::testutil::values(nq * dim, 6);
    for metric in [Metric::Ip, Metric::Cos] {
        let mut index = Index::new(dim, metric, DType::I8).unwrap();
        index
            .add(&(0..n as u64).collect::<Vec<_>>(), &rows)
            .unwrap();
        let (ids, scores, _) = index.search(&queries, k, None).unwrap();
        for q in 0..nq {
            let (one_ids, one_scores, _) = index
                .search(&queries[q * dim..(q + 1) * dim], k, None)
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let label = format!("{metric:?} query {q}");
            assert_eq!(&ids[q * k..(q + 1) * k], &one_ids[..], "{label}");
            assert_eq!(
                bits(&scores[q * k..(q + 1) * k]),
                bits(&one_scores),
                "{label}"
            );
        }
    }
}

/// The tests above again in a child process per SIMD level (`LEANCLIP_SIMD` is read once per
/// process): each level has its own batch scan (bf16 or i8 products, or f32 ones where the
/// CPU lacks them) and its own per-row kernels. At AVX2 f16 "cos" batches reported the f32
/// product's scores and order of tied rows. A level this CPU lacks runs at the best one below.
#[cfg(target_arch = "x86_64")]
#[test]
fn batches_match_single_queries_at_every_level() {
    let tests = [
        "batches_keep_single_query_results_on_ties",
        "i8_batches_report_single_query_scores",
    ];
    for level in ["scalar", "avx2", "avx512", "amx"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(tests)
            .args(["--exact", "--test-threads=1"])
            .env("LEANCLIP_SIMD", level)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "LEANCLIP_SIMD={level}:\n{stdout}\n{stderr}"
        );
        let ran = format!("{} passed", tests.len());
        assert!(
            stdout.contains(&ran),
            "LEANCLIP_SIMD={level}: not {ran}:\n{stdout}"
        );
    }
}

#[test]
fn mining_reports_the_scores_of_an_index_of_its_dtype_at_every_precision() {
    let (n, dim, nq, k) = (1500, 32, 9, 8);
    let corpus: Vec<f32> = leanclip_engine::testutil::values(n * dim, 3);
    let queries: Vec<f32> = leanclip_engine::testutil::values(nq * dim, 4);
    for dtype in [DType::I8, DType::F16] {
        for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
            let mut index = Index::new(dim, metric, dtype).unwrap();
            index
                .add(&(0..n as u64).collect::<Vec<_>>(), &corpus)
                .unwrap();
            let mut want_ids = Vec::new();
            let mut want_scores = Vec::new();
            for q in 0..nq {
                let (i, s, _) = index
                    .search(&queries[q * dim..(q + 1) * dim], k, None)
                    .unwrap();
                want_ids.extend(i.into_iter().map(|x| x as i64));
                want_scores.extend(s.into_iter().map(f32::to_bits));
            }
            for precision in [ScanPrecision::F32, ScanPrecision::Bf16, ScanPrecision::I8] {
                let (ids, scores) = mine_hard_negatives(Mining {
                    queries: Queries::F32(&queries),
                    corpus: Rows::F32(&corpus),
                    dim,
                    k,
                    query_groups: None,
                    corpus_groups: None,
                    metric,
                    dtype,
                    precision,
                })
                .unwrap();
                let label = format!("{dtype:?} {metric:?} {precision:?}");
                assert_eq!(ids, want_ids, "{label}");
                let got: Vec<u32> = scores.iter().map(|s| s.to_bits()).collect();
                assert_eq!(got, want_scores, "{label}");
            }
        }
    }
}

/// Mining f16 rows at precision f32 over several query blocks and corpus parts (the rows'
/// norms computed once per call, the candidates re-scored in row order) reports, query for
/// query, what mining that query alone reports: ids and score bits, on tie-heavy and on
/// random rows, ragged shapes (no multiple of a block or a panel), with groups.
#[test]
fn mining_f16_rows_in_blocks_matches_each_query_alone() {
    // 600 queries: two blocks; 8,201 rows: two corpus parts, the last panel ragged.
    let (n, dim, nq, k) = (8201, 8, 600, 7);
    let qg: Vec<i64> = (0..nq as i64).map(|q| q / 3).collect();
    let cg: Vec<i64> = (0..n as i64).map(|r| r / 5).collect();
    // Values in {0.5, 1, 1.5} (no zero rows for "cos"), exact in f16.
    let ties = |n: usize, seed: u64| -> Vec<f32> {
        tie_heavy(n, dim, seed).iter().map(|v| v + 0.5).collect()
    };
    let data = [
        ("ties", ties(n, 11), ties(nq, 12)),
        (
            "random",
            leanclip_engine::testutil::values(n * dim, 13),
            leanclip_engine::testutil::values(nq * dim, 14),
        ),
    ];
    for (name, corpus, queries) in &data {
        let corpus: Vec<half::f16> = corpus.iter().map(|&v| half::f16::from_f32(v)).collect();
        let queries: Vec<half::f16> = queries.iter().map(|&v| half::f16::from_f32(v)).collect();
        for dtype in [DType::F32, DType::F16] {
            for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
                let mine = |queries: &[half::f16], qg: &[i64]| {
                    mine_hard_negatives(Mining {
                        queries: Queries::F16(queries),
                        corpus: Rows::F16(&corpus),
                        dim,
                        k,
                        query_groups: Some(qg),
                        corpus_groups: Some(&cg),
                        metric,
                        dtype,
                        precision: ScanPrecision::F32,
                    })
                    .unwrap()
                };
                let (ids, scores) = mine(&queries, &qg);
                // Every 4th query, the last one of the first block and the first of the second.
                for q in (0..nq).step_by(4).chain([299, 301]) {
                    let (one_ids, one_scores) =
                        mine(&queries[q * dim..(q + 1) * dim], &qg[q..q + 1]);
                    let label = format!("{name} {dtype:?} {metric:?} query {q}");
                    assert_eq!(&ids[q * k..(q + 1) * k], &one_ids[..], "{label}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&scores[q * k..(q + 1) * k]),
                        bits(&one_scores),
                        "{label}"
                    );
                }
            }
        }
    }
}

/// Mining f32 rows over several query blocks and corpus parts reports the f32 products'
/// scores, finished with the rows' norms ("l2", and "cos" over rows not stored normalized):
/// each score is the returned row's own (within rounding), and no row left out scores better.
#[test]
fn mining_f32_rows_in_blocks_scores_each_row_with_its_own_norm() {
    let (n, dim, nq, k) = (8201, 8, 600, 7);
    let corpus = leanclip_engine::testutil::values(n * dim, 15);
    let queries = leanclip_engine::testutil::values(nq * dim, 16);
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (queries64, corpus64) = (wide(&queries), wide(&corpus));
    let row = |v: &[f64], r: usize| -> Vec<f64> { v[r * dim..(r + 1) * dim].to_vec() };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
        let (ids, scores) = mine_hard_negatives(Mining {
            queries: Queries::F32(&queries),
            corpus: Rows::F32(&corpus),
            dim,
            k,
            query_groups: None,
            corpus_groups: None,
            metric,
            dtype: DType::F32,
            precision: ScanPrecision::F32,
        })
        .unwrap();
        // Higher is better for every metric here.
        let score = |q: &[f64], x: &[f64]| match metric {
            Metric::Ip => dot(q, x),
            Metric::Cos => dot(q, x) / (dot(q, q) * dot(x, x)).sqrt(),
            Metric::L2 => -q.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum::<f64>(),
        };
        for q in 0..nq {
            let qv = row(&queries64, q);
            let all: Vec<f64> = (0..n).map(|r| score(&qv, &row(&corpus64, r))).collect();
            let got = &ids[q * k..(q + 1) * k];
            let label = format!("{metric:?} query {q}");
            for (j, &id) in got.iter().enumerate() {
                let want = all[id as usize];
                let reported = if metric == Metric::L2 {
                    -scores[q * k + j]
                } else {
                    scores[q * k + j]
                } as f64;
                assert!(
                    (reported - want).abs() < 1e-5,
                    "{label}: row {id} {reported} vs {want}"
                );
            }
            let kth = got
                .iter()
                .map(|&id| all[id as usize])
                .fold(f64::INFINITY, f64::min);
            let best_left_out = (0..n)
                .filter(|r| !got.contains(&(*r as i64)))
                .map(|r| all[r])
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                best_left_out <= kth + 1e-5,
                "{label}: {best_left_out} left out, kth {kth}"
            );
        }
    }
}
