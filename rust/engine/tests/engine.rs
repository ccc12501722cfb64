//! Integration tests of the pure-Rust engine: search paths against brute force, the file
//! format under corruption, mining with groups.

use half::f16;
use leanclip_engine::testutil::values;
use leanclip_engine::{
    mine_hard_negatives, DType, Error, Index, Metric, Mining, Queries, Rows, ScanPrecision,
    VectorFault,
};

/// Reference top-k in f64: (id, score) best first, ties by ascending id.
fn brute_force(
    metric: Metric,
    ids: &[u64],
    data: &[f32],
    query: &[f32],
    k: usize,
) -> Vec<(u64, f64)> {
    let dim = query.len();
    let unit = |v: &[f32]| -> Vec<f64> {
        let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter()
            .map(|x| *x as f64 / if metric == Metric::Cos { n } else { 1.0 })
            .collect()
    };
    let q = unit(query);
    let mut scored: Vec<(u64, f64)> = data
        .chunks_exact(dim)
        .zip(ids)
        .map(|(row, &id)| {
            let x = unit(row);
            let s = match metric {
                Metric::L2 => x.iter().zip(&q).map(|(a, b)| (a - b).powi(2)).sum(),
                _ => x.iter().zip(&q).map(|(a, b)| a * b).sum(),
            };
            (id, s)
        })
        .collect();
    scored.sort_by(|a, b| {
        let primary = match metric {
            Metric::L2 => a.1.total_cmp(&b.1),
            _ => b.1.total_cmp(&a.1),
        };
        primary.then(a.0.cmp(&b.0))
    });
    scored.truncate(k);
    scored
}

#[test]
fn kernel_and_gemm_paths_equal_brute_force_for_every_metric() {
    let (n, dim, k) = (5000, 45, 9);
    let data = values(n * dim, 1);
    let ids: Vec<u64> = (0..n as u64).map(|i| i * 7 + 3).collect();
    for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
        let mut index = Index::new(dim, metric, DType::F32).unwrap();
        index.add(&ids, &data).unwrap();
        for nq in [1, 3, 8, 130] {
            let queries = values(nq * dim, 100 + nq as u64);
            let (got_ids, got_scores, kp) = index.search(&queries, k, None).unwrap();
            assert_eq!(kp, k);
            for (i, q) in queries.chunks_exact(dim).enumerate() {
                let want = brute_force(metric, &ids, &data, q, k);
                for (j, (id, score)) in want.iter().enumerate() {
                    assert_eq!(
                        got_ids[i * k + j],
                        *id,
                        "{metric:?} nq {nq} query {i} rank {j}"
                    );
                    let got = got_scores[i * k + j] as f64;
                    assert!(
                        (got - score).abs() <= 1e-4 * (1.0 + score.abs()),
                        "{got} vs {score}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_flipped_bit_and_every_truncation_is_a_file_error() {
    for dtype in [DType::F32, DType::F16, DType::I8] {
        let mut index = Index::new(3, Metric::Ip, dtype).unwrap();
        index.add(&[4, 9, 1], &values(9, 3)).unwrap();
        let bytes = index.to_bytes();
        let back = Index::from_bytes(&bytes).unwrap();
        assert_eq!(back.keys(), index.keys());
        for i in 0..bytes.len() {
            for bit in [0, 3, 7] {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    matches!(Index::from_bytes(&bad), Err(Error::File { .. })),
                    "byte {i} bit {bit}"
                );
            }
        }
        for len in 0..bytes.len() {
            assert!(
                matches!(Index::from_bytes(&bytes[..len]), Err(Error::File { .. })),
                "len {len}"
            );
        }
    }
}

#[test]
fn mining_skips_groups_and_pads_missing_slots() {
    let dim = 6;
    let corpus = values(40 * dim, 5);
    let queries = values(3 * dim, 6);
    let corpus_groups: Vec<i64> = (0..40).map(|r| r / 10).collect();
    let query_groups = [0i64, 1, 9];
    let (idx, scores) = mine_hard_negatives(Mining {
        queries: Queries::F32(&queries),
        corpus: Rows::F32(&corpus),
        dim,
        k: 35,
        query_groups: Some(&query_groups),
        corpus_groups: Some(&corpus_groups),
        metric: Metric::Ip,
        dtype: DType::F32,
        precision: ScanPrecision::F32,
    })
    .unwrap();
    for (q, group) in query_groups.iter().enumerate() {
        let row = &idx[q * 35..(q + 1) * 35];
        let eligible = corpus_groups.iter().filter(|g| *g != group).count();
        assert_eq!(row.iter().filter(|&&r| r >= 0).count(), eligible.min(35));
        assert!(row
            .iter()
            .filter(|&&r| r >= 0)
            .all(|&r| corpus_groups[r as usize] != *group));
        assert!(row[eligible.min(35)..].iter().all(|&r| r == -1));
        assert!(scores[q * 35 + eligible.min(35)..(q + 1) * 35]
            .iter()
            .all(|s| *s == f32::NEG_INFINITY));
        let ids: Vec<u64> = (0..40u64)
            .filter(|&r| corpus_groups[r as usize] != *group)
            .collect();
        let data: Vec<f32> = ids
            .iter()
            .flat_map(|&r| corpus[r as usize * dim..(r as usize + 1) * dim].to_vec())
            .collect();
        let want = brute_force(
            Metric::Ip,
            &ids,
            &data,
            &queries[q * dim..(q + 1) * dim],
            35,
        );
        for (j, (id, _)) in want.iter().enumerate() {
            assert_eq!(row[j], *id as i64);
        }
    }
    // f16 input is read exactly
    let corpus16: Vec<f16> = corpus.iter().map(|&v| f16::from_f32(v)).collect();
    let widened: Vec<f32> = corpus16.iter().map(|v| v.to_f32()).collect();
    let f16_input = Mining {
        queries: Queries::F32(&queries),
        corpus: Rows::F16(&corpus16),
        dim,
        k: 5,
        query_groups: None,
        corpus_groups: None,
        metric: Metric::L2,
        dtype: DType::F32,
        precision: ScanPrecision::F32,
    };
    let a = mine_hard_negatives(f16_input).unwrap();
    let b = mine_hard_negatives(Mining {
        corpus: Rows::F32(&widened),
        ..f16_input
    })
    .unwrap();
    assert_eq!(a.0, b.0);
}

#[test]
fn bad_input_changes_nothing() {
    let mut index = Index::new(2, Metric::Cos, DType::I8).unwrap();
    index.add(&[1], &[1.0, 0.0]).unwrap();
    assert!(matches!(
        index.add(&[1], &[0.0, 1.0]),
        Err(Error::DuplicateKey(1))
    ));
    assert!(matches!(
        index.add(&[2, 3], &[1.0, 1.0, 0.0, 0.0]),
        Err(Error::InvalidVector {
            what: "vectors",
            row: 1,
            fault: VectorFault::Zero
        })
    ));
    assert!(matches!(
        index.add(&[2], &[f32::NAN, 1.0]),
        Err(Error::InvalidVector {
            row: 0,
            fault: VectorFault::NonFinite,
            ..
        })
    ));
    assert!(matches!(
        index.upsert(&[5, 5], &[1.0, 1.0, 1.0, 1.0]),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(index.get(&[7]), Err(Error::MissingKey(7))));
    assert!(matches!(
        index.search(&[1.0, 0.0], 0, None),
        Err(Error::Invalid(_))
    ));
    assert_eq!(index.keys(), &[1]);
}

#[test]
fn a_crafted_file_with_repeated_keys_is_rejected_eagerly_or_on_first_lookup() {
    let mut index = Index::new(2, Metric::Ip, DType::F32).unwrap();
    index.add(&[1, 2], &[1.0, 0.0, 0.0, 1.0]).unwrap();
    let mut bytes = index.to_bytes();
    // key 2 -> 1, then recompute the header/keys checksum so only the repeat is wrong
    bytes[72..80].copy_from_slice(&1u64.to_le_bytes());
    let vectors_start = 128; // 64-byte header + 16 bytes of keys, padded to 64
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&bytes[..56]);
    h.update(&bytes[64..vectors_start]);
    bytes[56..64].copy_from_slice(&h.digest().to_le_bytes());
    let err = Index::from_bytes(&bytes).unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.lcx");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Index::load(&path, true, true),
        Err(Error::File { .. })
    ));
    let lazy = Index::load(&path, true, false).unwrap();
    assert_eq!(lazy.len(), 2);
    assert!(matches!(lazy.contains(1), Err(Error::File { .. })));
    assert!(matches!(lazy.verify(), Err(Error::File { .. })));
    // a search without exclude needs no key map and cannot crash
    assert_eq!(lazy.search(&[1.0, 0.0], 2, None).unwrap().0, vec![1, 1]);
}

#[test]
fn mining_names_the_bad_row_of_the_whole_array_for_f16_input() {
    // f16 input is checked a block of 1024 rows at a time: the row must still be global.
    let dim = 4;
    let mut corpus = vec![f16::from_f32(0.5); 3000 * dim];
    corpus[2500 * dim + 1] = f16::NAN;
    corpus[2700 * dim] = f16::INFINITY;
    let queries = vec![0.5f32; dim];
    let err = mine_hard_negatives(Mining {
        queries: Queries::F32(&queries),
        corpus: Rows::F16(&corpus),
        dim,
        k: 3,
        query_groups: None,
        corpus_groups: None,
        metric: Metric::Ip,
        dtype: DType::F32,
        precision: ScanPrecision::F32,
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidVector {
                what: "corpus",
                row: 2500,
                fault: VectorFault::NonFinite
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "corpus[2500] contains NaN or inf; expected finite values"
    );
}
