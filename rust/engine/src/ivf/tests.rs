use super::*;
use crate::Index;

fn data(seed: u64, n: usize, dim: usize) -> Vec<f32> {
    let mut rng = kmeans::Rng::new(seed);
    (0..n * dim)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

fn params(nlist: usize) -> IvfParams {
    IvfParams {
        train_threshold: 0,
        ..IvfParams::with_nlist(nlist)
    }
}

/// A trained IVF index of `nlist` lists holding `keys` -> `v`, and its exact twin.
fn twins(
    metric: Metric,
    dtype: DType,
    dim: usize,
    nlist: usize,
    keys: &[u64],
    v: &[f32],
) -> (IvfIndex, Index) {
    let mut ivf = IvfIndex::new(dim, metric, dtype, params(nlist)).unwrap();
    ivf.add(keys, v).unwrap();
    ivf.train(v).unwrap();
    let mut flat = Index::new(dim, metric, dtype).unwrap();
    flat.add(keys, v).unwrap();
    (ivf, flat)
}

fn pair(metric: Metric, dtype: DType, n: usize, dim: usize) -> (IvfIndex, Index, Vec<u64>) {
    let v = data(1, n, dim);
    let keys: Vec<u64> = (0..n as u64).map(|k| k * 7 + 3).collect();
    let (ivf, flat) = twins(metric, dtype, dim, 8, &keys, &v);
    (ivf, flat, keys)
}

#[test]
fn all_lists_probed_equals_exact_index() {
    for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let (mut ivf, flat, _) = pair(metric, dtype, 600, 16);
            ivf.set_nprobe(8).unwrap();
            assert!(ivf.is_trained());
            assert_eq!(ivf.list_sizes().iter().sum::<usize>(), 600);
            for nq in [1, 3, 20] {
                let q = data(9, nq, 16);
                let (a_ids, a_s, ka) = ivf.search(&q, 10, None).unwrap();
                let (b_ids, b_s, kb) = flat.search(&q, 10, None).unwrap();
                assert_eq!(ka, kb);
                assert_eq!(a_ids, b_ids, "{metric:?} {dtype:?} nq={nq}");
                for (x, y) in a_s.iter().zip(&b_s) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
}

#[test]
fn few_probes_still_fill_k_and_are_close_to_exact() {
    let (mut ivf, flat, _) = pair(Metric::Cos, DType::F32, 800, 16);
    ivf.set_nprobe(2).unwrap();
    let q = data(5, 50, 16);
    let (ids, _, kp) = ivf.search(&q, 10, None).unwrap();
    assert_eq!(kp, 10);
    assert_eq!(ids.len(), 500);
    let (exact, _, _) = flat.search(&q, 10, None).unwrap();
    let hit = ids.iter().filter(|i| exact.contains(i)).count();
    assert!(hit > 150, "recall too low: {hit}/500");
}

#[test]
fn exclude_and_remove_and_upsert_follow_the_exact_index() {
    let (mut ivf, mut flat, keys) = pair(Metric::L2, DType::I8, 400, 8);
    ivf.set_nprobe(8).unwrap();
    let gone: Vec<u64> = keys.iter().step_by(3).copied().collect();
    assert_eq!(ivf.remove(&gone).unwrap(), gone.len());
    assert_eq!(ivf.remove(&gone).unwrap(), 0);
    flat.remove(&gone).unwrap();
    let upd_keys = vec![keys[1], 999_999];
    let upd = data(77, 2, 8);
    ivf.upsert(&upd_keys, &upd).unwrap();
    flat.upsert(&upd_keys, &upd).unwrap();
    assert_eq!(ivf.len(), flat.len());
    let mut a = ivf.keys().unwrap();
    let mut b = flat.keys().to_vec();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(ivf.get(&[keys[1]]).unwrap(), flat.get(&[keys[1]]).unwrap());
    let q = data(3, 4, 8);
    let ex = vec![keys[2], keys[4], 123456789];
    let (ai, _, ka) = ivf.search(&q, 5, Some(&ex)).unwrap();
    let (bi, _, kb) = flat.search(&q, 5, Some(&ex)).unwrap();
    assert_eq!((ai, ka), (bi, kb));
    assert!(matches!(ivf.get(&[gone[0]]), Err(Error::MissingKey(_))));
    assert!(matches!(
        ivf.add(&[keys[1]], &upd[..8]),
        Err(Error::DuplicateKey(_))
    ));
}

#[test]
fn auto_trains_at_threshold_and_training_is_seeded() {
    let v = data(2, 300, 8);
    let keys: Vec<u64> = (0..300).collect();
    let p = IvfParams {
        train_threshold: 200,
        ..IvfParams::with_nlist(4)
    };
    let mut a = IvfIndex::new(8, Metric::Cos, DType::F32, p).unwrap();
    a.add(&keys[..150], &v[..150 * 8]).unwrap();
    assert!(!a.is_trained());
    assert_eq!(a.list_sizes(), vec![150]);
    a.add(&keys[150..], &v[150 * 8..]).unwrap();
    assert!(a.is_trained());
    assert_eq!(a.list_sizes().len(), 4);
    let mut b = IvfIndex::new(8, Metric::Cos, DType::F32, p).unwrap();
    b.add(&keys[..150], &v[..150 * 8]).unwrap();
    b.add(&keys[150..], &v[150 * 8..]).unwrap();
    assert_eq!(a.centroids(), b.centroids());
    assert_eq!(a.list_sizes(), b.list_sizes());
    a.retrain().unwrap();
    assert_eq!(a.len(), 300);
    assert_eq!(a.list_sizes().iter().sum::<usize>(), 300);
}

#[test]
fn rerank_restores_exact_order_within_candidates() {
    let (mut ivf_plain, flat32, _) = pair(Metric::Ip, DType::F32, 500, 32);
    let v = data(1, 500, 32);
    let keys: Vec<u64> = (0..500u64).map(|k| k * 7 + 3).collect();
    let p = IvfParams {
        rerank: 50,
        ..params(8)
    };
    let mut ivf = IvfIndex::new(32, Metric::Ip, DType::I8, p).unwrap();
    ivf.add(&keys, &v).unwrap();
    ivf.train(&v).unwrap();
    ivf.set_nprobe(8).unwrap();
    ivf_plain.set_nprobe(8).unwrap();
    let q = data(4, 10, 32);
    let (ids, scores, _) = ivf.search(&q, 5, None).unwrap();
    let (eids, escores, _) = flat32.search(&q, 5, None).unwrap();
    assert_eq!(ids, eids);
    for (a, b) in scores.iter().zip(&escores) {
        assert!((a - b).abs() < 1e-4);
    }
    assert!(IvfIndex::new(4, Metric::Ip, DType::F32, p).is_err());
    assert!(ivf_plain.set_rerank(5).is_err());
}

#[test]
fn save_load_roundtrip_and_corruption_is_refused() {
    // Every dtype, and with 4-bit codes (pq = 4) for f32 and i8 + copies.
    let cases = [
        (DType::F32, 0),
        (DType::F16, 0),
        (DType::I8, 0),
        (DType::F32, 4),
        (DType::I8, 4),
    ];
    for (dtype, pq) in cases {
        let p = IvfParams {
            rerank: if dtype == DType::F32 { 0 } else { 7 },
            // (a shortlist is only kept with codes)
            ..pq_params(4, pq, if pq > 0 { 12 } else { DEFAULT_SHORTLIST })
        };
        let v = data(8, 120, 8);
        let keys: Vec<u64> = (0..120).map(|k| k * 3).collect();
        let mut ivf = IvfIndex::new(8, Metric::Cos, dtype, p).unwrap();
        ivf.add(&keys, &v).unwrap();
        assert_eq!(IvfIndex::from_bytes(&ivf.to_bytes()).unwrap().params(), p);
        ivf.train(&v).unwrap();
        ivf.remove(&[0, 3]).unwrap();
        let bytes = ivf.to_bytes();
        let back = IvfIndex::from_bytes(&bytes).unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.params(), ivf.params());
        assert_eq!(
            (back.has_codes(), &back.codebooks),
            (pq > 0, &ivf.codebooks)
        );
        let q = data(1, 3, 8);
        assert_eq!(
            back.search(&q, 5, None).unwrap().0,
            ivf.search(&q, 5, None).unwrap().0
        );
        for at in (0..bytes.len()).step_by(bytes.len() / 97 + 1) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                matches!(IvfIndex::from_bytes(&bad), Err(Error::File { .. })),
                "flipped byte {at} accepted"
            );
        }
        for cut in [0, 1, 127, 128, bytes.len() - 1] {
            assert!(matches!(
                IvfIndex::from_bytes(&bytes[..cut]),
                Err(Error::File { .. })
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.ivf");
        ivf.save(&path).unwrap();
        let m = IvfIndex::load(&path, true, false).unwrap();
        assert!(m.is_read_only());
        m.verify().unwrap();
        assert_eq!(
            m.search(&q, 5, None).unwrap().0,
            ivf.search(&q, 5, None).unwrap().0
        );
        let mut m = m;
        assert!(matches!(m.remove(&[6]), Err(Error::ReadOnly)));
    }
}

/// An index of `n` clustered rows (so that lists hold queries' neighbours) and its exact twin.
fn clustered_pair(
    metric: Metric,
    dtype: DType,
    n: usize,
    dim: usize,
    nlist: usize,
) -> (IvfIndex, Index, Vec<f32>) {
    let centres = data(11, 16, dim);
    let noise = data(12, n, dim);
    let v: Vec<f32> = (0..n * dim)
        .map(|i| centres[(i / dim % 16) * dim + i % dim] + 0.3 * noise[i])
        .collect();
    let keys: Vec<u64> = (0..n as u64).map(|k| k * 5 + 1).collect();
    let (ivf, flat) = twins(metric, dtype, dim, nlist, &keys, &v);
    (ivf, flat, v)
}

/// Batches (Q >= 8) probing every list give the exact index's ranking; on f16 / i8 lists the
/// batch re-scores its candidates with the single-query kernels, so the scores are the exact
/// index's (and a single query's) bit for bit; f32 batches report the product's scores.
#[test]
fn batched_search_with_every_list_probed_equals_the_exact_index() {
    for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let (mut ivf, flat, _) = clustered_pair(metric, dtype, 3000, 48, 16);
            ivf.set_nprobe(16).unwrap();
            let q = data(21, 64, 48);
            for k in [1, 10, 40] {
                let (a_ids, a_s, _) = ivf.search(&q, k, None).unwrap();
                // f16 / i8: the exact index's single-query results (its batches rank by the
                // product's scores where the CPU lacks the low-precision products)
                let (b_ids, b_s) = if dtype == DType::F32 {
                    let (i, s, _) = flat.search(&q, k, None).unwrap();
                    (i, s)
                } else {
                    let mut ids = Vec::new();
                    let mut scores = Vec::new();
                    for qv in q.chunks_exact(48) {
                        let (i, s, _) = flat.search(qv, k, None).unwrap();
                        ids.extend(i);
                        scores.extend(s);
                    }
                    (ids, scores)
                };
                assert_eq!(a_ids, b_ids, "{metric:?} {dtype:?} k={k}");
                for (x, y) in a_s.iter().zip(&b_s) {
                    if dtype == DType::F32 {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
                    } else {
                        assert_eq!(x.to_bits(), y.to_bits(), "{metric:?} {dtype:?}: {x} vs {y}");
                    }
                }
            }
        }
    }
}

/// A query alone (single-query kernels) and the same query in a batch (list-major products)
/// agree: the same keys at nprobe = nlist, nearly the same below, and on f16 / i8 lists the
/// same score for every key both return.
#[test]
fn single_queries_and_batches_agree() {
    for dtype in [DType::F32, DType::F16, DType::I8] {
        let (mut ivf, _, _) = clustered_pair(Metric::Cos, dtype, 4000, 32, 32);
        let q = data(31, 40, 32);
        for nprobe in [4, 32] {
            ivf.set_nprobe(nprobe).unwrap();
            let (b_ids, b_s, kb) = ivf.search(&q, 10, None).unwrap();
            let mut same = 0;
            for i in 0..40 {
                let (ids, s, k1) = ivf.search(&q[i * 32..(i + 1) * 32], 10, None).unwrap();
                assert_eq!(k1, kb);
                let row = &b_ids[i * 10..(i + 1) * 10];
                for (j, key) in ids.iter().enumerate() {
                    if let Some(p) = row.iter().position(|x| x == key) {
                        same += 1;
                        let (x, y) = (s[j], b_s[i * 10 + p]);
                        if dtype == DType::F32 {
                            assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
                        } else {
                            assert_eq!(x.to_bits(), y.to_bits(), "{dtype:?}: {x} vs {y}");
                        }
                    }
                }
                if nprobe == 32 {
                    assert_eq!(ids, row, "{dtype:?} query {i}");
                }
            }
            assert!(
                same >= 390,
                "{dtype:?} nprobe={nprobe}: {same}/400 keys shared"
            );
        }
    }
}

/// Equal vectors under different keys rank by ascending key, alone and in a batch, and the
/// smallest keys are the ones kept when the tie straddles k.
#[test]
fn ties_rank_by_key_in_batches_and_single_queries() {
    for dtype in [DType::F32, DType::F16, DType::I8] {
        let dim = 16;
        let base = data(41, 64, dim);
        // every vector 4 times, under keys in scrambled order
        let mut keys = Vec::new();
        let mut v = Vec::new();
        for copy in 0..4u64 {
            for r in 0..64u64 {
                keys.push((r * 4 + (3 - copy)) * 1000 + 7 * copy);
                v.extend_from_slice(&base[r as usize * dim..(r as usize + 1) * dim]);
            }
        }
        let mut ivf = IvfIndex::new(dim, Metric::Ip, dtype, params(4)).unwrap();
        ivf.add(&keys, &v).unwrap();
        ivf.train(&v).unwrap();
        ivf.set_nprobe(4).unwrap();
        let q = base[..16 * dim].to_vec();
        let (b_ids, b_s, _) = ivf.search(&q, 6, None).unwrap();
        for i in 0..16 {
            let (ids, s, _) = ivf.search(&q[i * dim..(i + 1) * dim], 6, None).unwrap();
            assert_eq!(ids, &b_ids[i * 6..(i + 1) * 6], "{dtype:?} query {i}");
            for w in 0..5 {
                if s[w] == s[w + 1] {
                    assert!(ids[w] < ids[w + 1], "{dtype:?}: tie not by key");
                }
            }
            // the 4 copies of the best row come first (equal scores), then 2 of the next 4
            assert_eq!(s[0], s[3]);
            assert_eq!(b_s[i * 6], b_s[i * 6 + 3]);
            if dtype != DType::F32 {
                assert_eq!(&b_s[i * 6..(i + 1) * 6], &s[..], "{dtype:?}");
            }
        }
    }
}

/// The packed rows a batch caches per list are dropped by every change: batches after add,
/// remove, upsert and retrain still equal the exact index.
#[test]
fn batches_after_changes_see_the_changes() {
    for dtype in [DType::F16, DType::I8] {
        let (mut ivf, mut flat, v) = clustered_pair(Metric::Ip, dtype, 2000, 32, 8);
        ivf.set_nprobe(8).unwrap();
        let q = data(51, 24, 32);
        let check = |ivf: &IvfIndex, flat: &Index| {
            let (a, _, _) = ivf.search(&q, 10, None).unwrap();
            let (b, _, _) = flat.search(&q, 10, None).unwrap();
            assert_eq!(a, b, "{dtype:?}");
        };
        check(&ivf, &flat);
        let gone: Vec<u64> = (0..2000u64).step_by(3).map(|k| k * 5 + 1).collect();
        ivf.remove(&gone).unwrap();
        flat.remove(&gone).unwrap();
        check(&ivf, &flat);
        let extra = data(52, 100, 32);
        let extra_keys: Vec<u64> = (0..100u64).map(|k| 1_000_000 + k).collect();
        ivf.add(&extra_keys, &extra).unwrap();
        flat.add(&extra_keys, &extra).unwrap();
        check(&ivf, &flat);
        let moved = vec![6u64, 11, 1_000_003];
        let to = &v[..3 * 32];
        ivf.upsert(&moved, to).unwrap();
        flat.upsert(&moved, to).unwrap();
        check(&ivf, &flat);
        ivf.retrain().unwrap();
        check(&ivf, &flat);
    }
}

fn pq_params(nlist: usize, pq: usize, shortlist: usize) -> IvfParams {
    IvfParams {
        pq,
        shortlist,
        ..params(nlist)
    }
}

#[test]
fn codes_with_every_list_probed_and_a_full_shortlist_equal_the_exact_index() {
    let (n, dim) = (500, 16);
    for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let v = data(1, n, dim);
            let keys: Vec<u64> = (0..n as u64).map(|k| k * 7 + 3).collect();
            let mut ivf = IvfIndex::new(dim, metric, dtype, pq_params(8, 8, n)).unwrap();
            ivf.add(&keys, &v).unwrap();
            assert!(!ivf.has_codes(), "no codes before training");
            ivf.train(&v).unwrap();
            assert!(ivf.has_codes());
            ivf.set_nprobe(8).unwrap();
            let mut flat = Index::new(dim, metric, dtype).unwrap();
            flat.add(&keys, &v).unwrap();
            for nq in [1, 3, 20] {
                let q = data(9, nq, dim);
                let (a_ids, a_s, _) = ivf.search(&q, 10, None).unwrap();
                let (b_ids, b_s, _) = flat.search(&q, 10, None).unwrap();
                assert_eq!(a_ids, b_ids, "{metric:?} {dtype:?} nq={nq}");
                // The codes only choose candidates: scores are the stored rows' (within the
                // tolerance of a product's rounding against the single-query kernels, as in
                // `all_lists_probed_equals_exact_index`: every kernel level runs this).
                for (x, y) in a_s.iter().zip(&b_s) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
}

#[test]
fn codes_rank_candidates_well_and_follow_adds_removals_and_upserts() {
    let (metric, dtype) = (Metric::Cos, DType::I8);
    let (n, dim) = (3000, 32);
    let (_, mut flat, v) = clustered_pair(metric, dtype, n, dim, 16);
    let keys: Vec<u64> = (0..n as u64).map(|k| k * 5 + 1).collect();
    let mut coded = IvfIndex::new(dim, metric, dtype, pq_params(16, 32, 40)).unwrap();
    coded.add(&keys, &v).unwrap();
    coded.train(&v).unwrap();
    coded.set_nprobe(16).unwrap();
    let noise = data(4, 40, dim);
    let q: Vec<f32> = noise.iter().zip(&v).map(|(e, x)| x + 0.2 * e).collect();
    let recall = |coded: &IvfIndex, flat: &Index| {
        let (a, _, _) = coded.search(&q, 10, None).unwrap();
        let (b, _, _) = flat.search(&q, 10, None).unwrap();
        a.iter().filter(|x| b.contains(x)).count() as f64 / b.len() as f64
    };
    // 32 sub-quantizers of 1 dim and a shortlist of 40 find nearly all of the top 10.
    assert!(recall(&coded, &flat) >= 0.9, "{}", recall(&coded, &flat));
    // Removals move the last row's codes into the hole; upserts and adds encode theirs.
    let gone: Vec<u64> = keys.iter().copied().step_by(3).collect();
    coded.remove(&gone).unwrap();
    flat.remove(&gone).unwrap();
    let fresh = data(77, 200, dim);
    let new_keys: Vec<u64> = (0..200).map(|k| 1_000_000 + k).collect();
    coded.add(&new_keys, &fresh).unwrap();
    flat.add(&new_keys, &fresh).unwrap();
    let moved: Vec<u64> = keys.iter().copied().skip(1).step_by(5).take(100).collect();
    let moved_v = data(78, moved.len(), dim);
    coded.upsert(&moved, &moved_v).unwrap();
    flat.upsert(&moved, &moved_v).unwrap();
    // Every list's codes are what encoding its stored rows gives.
    let book = coded.codebooks.clone().unwrap();
    let mut row = vec![0f32; dim];
    let (mut want, mut got) = (vec![0u8; 32], vec![0u8; 32]);
    for (l, list) in coded.lists.iter().enumerate() {
        let codes = list.codes.as_ref().unwrap().as_slice();
        assert_eq!(codes.len(), pq::code_bytes(list.len(), 32));
        for slot in 0..list.len() {
            let mut conv = Vec::new();
            row.copy_from_slice(
                list.rows()
                    .range(slot, slot + 1, dim)
                    .to_f32(dim, &mut conv),
            );
            book.encode(&row, &mut want);
            pq::get_row(codes, slot, &mut got);
            assert_eq!(got, want, "list {l} slot {slot}");
        }
    }
    assert!(recall(&coded, &flat) >= 0.9, "{}", recall(&coded, &flat));
    coded.set_shortlist(coded.len()).unwrap();
    coded.set_nprobe(16).unwrap();
    let (a, _, _) = coded.search(&q, 10, Some(&keys[..50])).unwrap();
    let (b, _, _) = flat.search(&q, 10, Some(&keys[..50])).unwrap();
    assert_eq!(a, b, "a full shortlist is exact, exclusions included");
}

#[test]
fn bad_pq_settings_are_refused_with_reasons() {
    let err = |p: IvfParams| {
        IvfIndex::new(12, Metric::Ip, DType::F32, p)
            .unwrap_err()
            .to_string()
    };
    assert!(err(pq_params(4, 5, 10)).contains("even number"));
    assert!(err(pq_params(4, 8, 10)).contains("divides dim = 12"));
    assert!(err(pq_params(4, 4, 0)).contains("shortlist"));
    let mut ivf = IvfIndex::new(12, Metric::Ip, DType::F32, pq_params(4, 4, 10)).unwrap();
    assert!(ivf.set_shortlist(0).is_err());
    ivf.set_shortlist(3).unwrap();
    assert_eq!(ivf.params().shortlist, 3);
}

/// The constructor's rules are the setters' rules: what one refuses, the other refuses too
/// (the shortlist of an index without codes was once refused by the binding's constructor
/// only, and the setter took it).
#[test]
fn setters_refuse_what_the_constructor_refuses() {
    let mut plain = IvfIndex::new(12, Metric::Ip, DType::F16, params(4)).unwrap();
    let before = plain.params();
    let err = plain.set_shortlist(10).unwrap_err().to_string();
    assert!(err.contains("shortlist needs pq > 0"), "{err}");
    let mut p = params(4);
    assert!(p
        .set_shortlist(10)
        .unwrap_err()
        .to_string()
        .contains("needs pq > 0"));
    assert!(plain.set_nprobe(0).is_err());
    assert!(IvfIndex::new(
        12,
        Metric::Ip,
        DType::F16,
        IvfParams {
            nprobe: 0,
            ..params(4)
        }
    )
    .is_err());
    assert!(plain.set_scan_dims(12).is_err());
    let scan_dims_12 = IvfParams {
        scan_dims: 12,
        ..params(4)
    };
    assert!(IvfIndex::new(12, Metric::Ip, DType::F16, scan_dims_12).is_err());
    // rerank needs copies kept from the start (f16 / i8 created with rerank > 0).
    assert!(plain.set_rerank(5).is_err());
    let mut f32_index = IvfIndex::new(12, Metric::Ip, DType::F32, params(4)).unwrap();
    assert!(f32_index.set_rerank(5).is_err());
    let f32_rerank = IvfParams {
        rerank: 5,
        ..params(4)
    };
    assert!(IvfIndex::new(12, Metric::Ip, DType::F32, f32_rerank).is_err());
    assert_eq!(plain.params(), before, "a refused setting changes nothing");
    // With codes the same setter takes it.
    let mut coded = IvfIndex::new(12, Metric::Ip, DType::F16, pq_params(4, 4, 10)).unwrap();
    coded.set_shortlist(7).unwrap();
    assert_eq!(coded.params().shortlist, 7);
}

/// A batch of more (query, list) pairs than one batch holds runs in chunks of queries and
/// returns what its parts searched as batches of their own return, exclusions included.
#[test]
fn a_batch_beyond_the_pair_limit_runs_in_chunks_with_the_same_results() {
    for dtype in [DType::F32, DType::F16, DType::I8] {
        let (dim, nlist) = (8, 64);
        let (mut ivf, _, _) = clustered_pair(Metric::Ip, dtype, 2000, dim, nlist);
        ivf.set_nprobe(nlist).unwrap();
        let nq = super::search::MAX_BATCH_PAIRS / nlist + 100;
        let q = data(41, nq, dim);
        let exclude: Vec<u64> = (0..40u64).map(|k| k * 5 + 1).collect();
        let (ids, scores, k) = ivf.search(&q, 10, Some(&exclude)).unwrap();
        assert_eq!((k, ids.len()), (10, nq * 10));
        for (p, part) in q.chunks(100 * dim).enumerate() {
            let (i, s, _) = ivf.search(part, 10, Some(&exclude)).unwrap();
            let at = p * 100 * 10;
            assert_eq!(&ids[at..at + i.len()], &i[..], "{dtype:?} part {p}");
            assert_eq!(&scores[at..at + s.len()], &s[..], "{dtype:?} part {p}");
        }
        assert!(ids.iter().all(|key| !exclude.contains(key)));
    }
}

/// `n` rows of `dim` values lying in a `rank`-dimensional subspace (random directions), and
/// their exact twin: projected onto `rank` principal directions they keep every inner product.
fn low_rank_pair(
    metric: Metric,
    dtype: DType,
    n: usize,
    dim: usize,
    rank: usize,
) -> (IvfIndex, Index, Vec<f32>) {
    let basis = data(31, rank, dim);
    let w = data(32, n, rank);
    let v: Vec<f32> = (0..n * dim)
        .map(|i| {
            (0..rank)
                .map(|b| w[(i / dim) * rank + b] * basis[b * dim + i % dim])
                .sum()
        })
        .collect();
    let keys: Vec<u64> = (0..n as u64).map(|k| k * 3 + 2).collect();
    let (ivf, flat) = twins(metric, dtype, dim, 16, &keys, &v);
    (ivf, flat, v)
}

/// A batch ranking by `scan_dims` principal directions re-scores its candidates from the rows:
/// on data of that rank, with every list probed, it returns the exact index's keys and its
/// single-query scores bit for bit; alone, a query does not use the directions at all.
#[test]
fn a_batch_ranking_by_principal_directions_re_scores_to_the_exact_results() {
    for metric in [Metric::Cos, Metric::Ip] {
        for dtype in [DType::F16, DType::I8] {
            let (dim, rank) = (48, 12);
            let (mut ivf, flat, v) = low_rank_pair(metric, dtype, 3000, dim, rank);
            ivf.set_nprobe(16).unwrap();
            ivf.set_scan_dims(rank).unwrap();
            // queries: stored rows, slightly moved within the subspace
            let q: Vec<f32> = v[..40 * dim]
                .iter()
                .zip(&v[dim..41 * dim])
                .map(|(a, b)| a + 0.1 * b)
                .collect();
            for k in [1, 10, 40] {
                let (a_ids, a_s, _) = ivf.search(&q, k, None).unwrap();
                let mut b_ids = Vec::new();
                let mut b_s = Vec::new();
                for qv in q.chunks_exact(dim) {
                    let (i, s, _) = flat.search(qv, k, None).unwrap();
                    b_ids.extend(i);
                    b_s.extend(s);
                }
                assert_eq!(a_ids, b_ids, "{metric:?} {dtype:?} k={k}");
                let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a_s), bits(&b_s), "{metric:?} {dtype:?} k={k}");
            }
            assert!(
                ivf.directions.get().is_some(),
                "the batch computed the directions"
            );
            // Changing scan_dims repacks the lists: still exact with all dims but one.
            ivf.set_scan_dims(dim - 1).unwrap();
            let (a_ids, _, _) = ivf.search(&q, 10, None).unwrap();
            let (b_ids, _, _) = ivf.search(&q[..dim], 10, None).unwrap();
            assert_eq!(&a_ids[..10], &b_ids[..], "{metric:?} {dtype:?}");
            // Training again (scan_dims > 0) trains them from its sample, to be saved.
            assert!(ivf.trained_directions().is_none(), "computed, not trained");
            ivf.retrain().unwrap();
            assert!(ivf.trained_directions().is_some());
        }
    }
}

/// Too few dimensions drop true neighbours from the ranking (the margin is finite), yet every
/// reported score is the exact score of its key and the order is by score, then key.
#[test]
fn a_reduced_scan_reports_exact_scores_even_where_it_loses_neighbours() {
    let (dim, n) = (32, 2000);
    let v = data(41, n, dim);
    let keys: Vec<u64> = (0..n as u64).collect();
    let mut ivf = IvfIndex::new(dim, Metric::Ip, DType::F16, params(8)).unwrap();
    ivf.add(&keys, &v).unwrap();
    ivf.train(&v).unwrap();
    ivf.set_nprobe(8).unwrap();
    ivf.set_scan_dims(2).unwrap();
    let q = data(42, 16, dim);
    let (ids, scores, kp) = ivf.search(&q, 10, None).unwrap();
    assert_eq!(kp, 10);
    let mut flat = Index::new(dim, Metric::Ip, DType::F16).unwrap();
    flat.add(&keys, &v).unwrap();
    let (exact, _, _) = flat.search(&q, 10, None).unwrap();
    let found = ids.iter().zip(&exact).filter(|(a, b)| a == b).count();
    assert!(
        found < 160,
        "2 of 32 random dimensions should not rank like all 32"
    );
    for (qi, qv) in q.chunks_exact(dim).enumerate() {
        let row = &ids[qi * 10..(qi + 1) * 10];
        let got = &scores[qi * 10..(qi + 1) * 10];
        let want = ivf.get(row).unwrap();
        for (j, (&s, r)) in got.iter().zip(want.chunks_exact(dim)).enumerate() {
            let dot: f32 = qv.iter().zip(r).map(|(a, b)| a * b).sum();
            assert!(
                (s - dot).abs() <= 1e-4 * (1.0 + dot.abs()),
                "query {qi} rank {j}: {s} vs {dot}"
            );
            if j > 0 {
                assert!(got[j - 1] > s || (got[j - 1] == s && row[j - 1] < row[j]));
            }
        }
    }
}

#[test]
fn scan_dims_is_checked_and_survives_save_and_load() {
    let dim = 16;
    let bad = |metric, dtype, d| {
        let p = IvfParams {
            scan_dims: d,
            ..params(4)
        };
        IvfIndex::new(dim, metric, dtype, p)
            .unwrap_err()
            .to_string()
    };
    assert!(bad(Metric::Cos, DType::F16, 16).contains("below dim = 16, got 16"));
    assert!(bad(Metric::Cos, DType::F32, 8).contains("needs dtype \"f16\" or \"i8\""));
    assert!(bad(Metric::L2, DType::I8, 8).contains("needs metric \"cos\" or \"ip\""));
    let mut ivf = IvfIndex::new(dim, Metric::Cos, DType::F32, params(4)).unwrap();
    assert!(ivf
        .set_scan_dims(4)
        .unwrap_err()
        .to_string()
        .contains("needs dtype"));
    ivf.set_scan_dims(0).unwrap();

    let (mut ivf, _, v) = low_rank_pair(Metric::Cos, DType::I8, 1500, dim, 6);
    ivf.set_nprobe(3).unwrap();
    ivf.set_scan_dims(5).unwrap();
    let q = data(43, 30, dim);
    let before = ivf.search(&q, 10, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.lcivf");
    ivf.save(&path).unwrap();
    for mmap in [false, true] {
        let loaded = IvfIndex::load(&path, mmap, true).unwrap();
        assert_eq!(loaded.params().scan_dims, 5);
        // The directions come again from the same contents: the same results.
        assert_eq!(loaded.search(&q, 10, None).unwrap(), before, "mmap={mmap}");
    }
    drop(v);
}

/// Lists grown by many small adds keep at most an eighth of their buffers unused (`grow`);
/// `Vec::reserve` doubled them: 1.6x the data on a 1M x 512 i8 index built by `add`.
#[test]
fn lists_grown_by_many_adds_keep_little_unused_capacity() {
    let dim = 16;
    let p = IvfParams {
        train_threshold: 0,
        ..IvfParams::with_nlist(4)
    };
    let mut ivf = IvfIndex::new(dim, Metric::Ip, DType::I8, p).unwrap();
    let v = data(5, 4000, dim);
    ivf.train(&v[..400 * dim]).unwrap();
    for (b, chunk) in v.chunks(40 * dim).enumerate() {
        let first = (b * 40) as u64;
        ivf.add(&(first..first + 40).collect::<Vec<_>>(), chunk)
            .unwrap();
    }
    let (mut len, mut cap) = (0usize, 0usize);
    for list in &ivf.lists {
        let (
            Data::I8 {
                data: Seg::Owned(d),
                ..
            },
            Seg::Owned(k),
        ) = (&list.data, &list.keys)
        else {
            panic!("an index in memory owns its lists");
        };
        len += d.len() + 8 * k.len();
        cap += d.capacity() + 8 * k.capacity();
    }
    assert!(
        cap as f64 <= 1.13 * len as f64,
        "capacity {cap} for {len} bytes of rows and keys"
    );
}

/// The rows tune holds out as queries are known again from their stored bytes (whatever the
/// dtype and metric), and no training sample holds them: from given vectors or the contents.
#[test]
fn rows_tune_holds_out_are_never_trained_on() {
    let (n, dim) = (3000, 24);
    let v = data(5, n, dim);
    let keys: Vec<u64> = (0..n as u64).collect();
    for metric in [Metric::Cos, Metric::L2] {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let mut ivf = IvfIndex::new(dim, metric, dtype, params(16)).unwrap();
            ivf.train(&v).unwrap();
            ivf.add(&keys, &v).unwrap();
            let rows = ivf.normalized(&v).into_owned();
            let mut marked = 0;
            for (key, row) in keys.iter().zip(rows.chunks_exact(dim)) {
                let (l, slot) = ivf.map[key];
                let stored = ivf.lists[l as usize].row_bytes(slot as usize, dim);
                let held = tune::held_out(stored);
                assert_eq!(held, tune::held_out(&tune::stored_bytes(dtype, row)));
                marked += held as usize;
            }
            // One row in 32 (3000 / 32 = 94).
            assert!(
                (40..200).contains(&marked),
                "{metric:?} {dtype:?}: {marked}"
            );
            let trained = ivf.sample_rows(
                n,
                n,
                |i, o| o.copy_from_slice(&v[i * dim..(i + 1) * dim]),
                |_, r| tune::held_out(&tune::stored_bytes(dtype, r)),
            );
            assert_eq!(trained.len() / dim, n - marked, "{metric:?} {dtype:?}");
            let contents = ivf.sample_contents(n);
            assert_eq!(contents.len() / dim, n - marked, "{metric:?} {dtype:?}");
        }
    }
}

/// tune takes a batch's measurement for single queries scanning by the product where the
/// batch scanned every probed list by the product and the single query chooses the same lists
/// (`product_like_batch`): they return the same results.
#[test]
fn single_queries_by_the_product_rank_as_a_batch_by_the_product() {
    let (n, dim) = (6000, 32);
    let v = data(3, n, dim);
    let keys: Vec<u64> = (0..n as u64).collect();
    for scan_dims in [0, 16] {
        let mut ivf = IvfIndex::new(dim, Metric::Cos, DType::F16, params(32)).unwrap();
        ivf.train(&v).unwrap();
        ivf.add(&keys, &v).unwrap();
        ivf.set_scan_dims(scan_dims).unwrap();
        if !ivf.product_scan_fits() {
            // f16 rows have no reduced batch product at the avx2 and scalar levels (valgrind
            // runs there): only the projected scan packs a smaller copy
            assert_eq!(scan_dims, 0);
            continue;
        }
        ivf.set_single_scan(SingleScan::Product).unwrap();
        ivf.set_nprobe(6).unwrap();
        ivf.set_nprobe_single(6).unwrap();
        // 400 queries x 6 probes over 32 lists: every probed list by at least 8 queries.
        let q = data(9, 400, dim);
        let qn = ivf.normalize(&q, true).into_owned();
        let single_lists = ivf.single_query_lists(&qn, 6);
        let (offsets, flat) = ivf.probes(&qn, 0, &[], (6, false));
        let exclude: Vec<u64> = (0..n as u64).step_by(7).collect();
        let (b, bs, kb) = ivf.search(&q, 10, Some(&exclude)).unwrap();
        let mut same_lists = 0;
        for i in 0..400 {
            let mut a: Vec<u64> = single_lists[i * 6..(i + 1) * 6].to_vec();
            let mut c: Vec<u64> = flat[offsets[i]..offsets[i + 1]]
                .iter()
                .map(|&l| l as u64)
                .collect();
            a.sort_unstable();
            c.sort_unstable();
            if a != c {
                continue;
            }
            same_lists += 1;
            let (s, ss, _) = ivf
                .search(&q[i * dim..(i + 1) * dim], 10, Some(&exclude))
                .unwrap();
            assert_eq!(
                s,
                b[i * kb..(i + 1) * kb],
                "scan_dims={scan_dims} query {i}"
            );
            assert_eq!(ss, bs[i * kb..(i + 1) * kb]);
        }
        assert!(
            same_lists >= 360,
            "scan_dims={scan_dims}: {same_lists} of 400"
        );
    }
}

/// tune measures single queries in searches of many at once (`search_as_single`): each query
/// gets what it gets searched alone, by the product also where few of the queries probe a
/// list (a batch would scan that list by the rows), through codes, and by the rows, with
/// excluded keys.
#[test]
fn single_queries_searched_together_get_what_each_gets_alone() {
    let (n, dim) = (6000, 32);
    let v = data(5, n, dim);
    let keys: Vec<u64> = (0..n as u64).collect();
    let q = data(11, 40, dim);
    let exclude: Vec<u64> = (0..n as u64).step_by(5).collect();
    let mut by_product = 0;
    let cases = [
        (DType::F16, 0, SingleScan::Product),
        (DType::F16, 16, SingleScan::Product),
        (DType::I8, 0, SingleScan::Product),
        (DType::I8, 16, SingleScan::Product),
        (DType::F16, 0, SingleScan::Codes),
        (DType::I8, 0, SingleScan::Rows),
        (DType::F32, 0, SingleScan::Rows),
    ];
    for (dtype, scan_dims, scan) in cases {
        let params = match scan {
            SingleScan::Codes => pq_params(32, 8, 40),
            _ => params(32),
        };
        let mut ivf = IvfIndex::new(dim, Metric::Cos, dtype, params).unwrap();
        ivf.train(&v).unwrap();
        ivf.add(&keys, &v).unwrap();
        ivf.set_scan_dims(scan_dims).unwrap();
        if scan == SingleScan::Product && !ivf.product_scan_fits() {
            // No reduced batch product at the avx2 and scalar levels (valgrind runs there).
            assert_eq!(scan_dims, 0);
            continue;
        }
        ivf.set_single_scan(scan).unwrap();
        assert_eq!(ivf.single_scan(), scan);
        ivf.set_nprobe(2).unwrap();
        ivf.set_nprobe_single(5).unwrap();
        // 40 queries x 5 probes over 32 lists: most lists probed by fewer than 8 of them.
        let qn = ivf.normalize(&q, true).into_owned();
        let mut probed = vec![0usize; 32];
        for &l in &ivf.probes(&qn, 0, &[], (5, true)).1 {
            probed[l as usize] += 1;
        }
        assert!(probed.iter().any(|&c| c > 0 && c < 8), "{probed:?}");
        let (b, bs, kb) = ivf.search_as_single(&q, 10, Some(&exclude)).unwrap();
        assert_eq!(kb, 10);
        for i in 0..40 {
            let (s, ss, _) = ivf
                .search(&q[i * dim..(i + 1) * dim], 10, Some(&exclude))
                .unwrap();
            let case = format!("{dtype:?} scan_dims={scan_dims} {scan:?} query {i}");
            assert_eq!(s, b[i * kb..(i + 1) * kb], "{case}");
            assert_eq!(ss, bs[i * kb..(i + 1) * kb], "{case}");
            assert!(s.iter().all(|key| key % 5 != 0));
        }
        by_product += (scan == SingleScan::Product) as usize;
    }
    // The projected scan has a product at every level.
    assert!(by_product >= 2);
}

/// tune measures every shortlist of single queries through codes from one scan
/// (`codes_ranked`): the first s of each query's ranking, best k by their scores, is what a
/// search at shortlist s returns.
#[test]
fn codes_ranked_once_gives_every_shortlist_a_search_gives() {
    let (n, dim) = (6000, 32);
    let v = data(7, n, dim);
    let keys: Vec<u64> = (0..n as u64).collect();
    let q = data(13, 30, dim);
    let exclude: Vec<u64> = (0..n as u64).step_by(3).collect();
    for dtype in [DType::F16, DType::I8, DType::F32] {
        let mut ivf = IvfIndex::new(dim, Metric::Cos, dtype, pq_params(32, 8, 40)).unwrap();
        ivf.train(&v).unwrap();
        ivf.add(&keys, &v).unwrap();
        ivf.set_single_scan(SingleScan::Codes).unwrap();
        // 9 lists: the nearest 4 per query first, the others list-major.
        ivf.set_nprobe_single(9).unwrap();
        let mut ranked = ivf.codes_ranked(&q, (10, 300), Some(&exclude)).unwrap();
        // Out of order: the rows re-scored for a shortlist serve the shorter ones.
        for s in [17, 10, 64, 300, 40] {
            let found = ivf.codes_found(&mut ranked, s);
            assert_eq!(found.len(), 30);
            ivf.set_shortlist(s).unwrap();
            for (i, want) in found.iter().enumerate() {
                let (got, _, _) = ivf
                    .search(&q[i * dim..(i + 1) * dim], 10, Some(&exclude))
                    .unwrap();
                assert_eq!(&got, want, "{dtype:?} shortlist {s} query {i}");
                assert!(got.iter().all(|key| key % 3 != 0));
            }
        }
    }
}

/// The exact search under `scan_dims` scans the lists a part at a time with packed copies of
/// its own; it finds what the exact search over the lists' own copies finds.
#[test]
fn exact_search_by_parts_of_the_lists_finds_what_one_pass_finds() {
    let (n, dim) = (8000, 32);
    let v = data(17, n, dim);
    let keys: Vec<u64> = (0..n as u64).collect();
    // 2,000 queries: 32 of the 64 lists a part.
    let q = data(19, 2000, dim);
    for dtype in [DType::F16, DType::I8] {
        let mut ivf = IvfIndex::new(dim, Metric::Cos, dtype, params(64)).unwrap();
        ivf.train(&v).unwrap();
        ivf.add(&keys, &v).unwrap();
        let (a, sa, ka) = ivf.search_exact(&q, 20).unwrap();
        ivf.set_scan_dims(16).unwrap();
        let (b, sb, kb) = ivf.search_exact(&q, 20).unwrap();
        assert_eq!((ka, kb), (20, 20));
        assert_eq!(a, b, "{dtype:?}");
        assert_eq!(sa, sb, "{dtype:?}");
        // And it is the exact answer of the stored rows (ties aside).
        ivf.set_scan_dims(0).unwrap();
        ivf.set_nprobe(64).unwrap();
        let (c, _, _) = ivf.search(&q, 20, None).unwrap();
        let same = a.iter().zip(&c).filter(|(x, y)| x == y).count();
        assert!(
            same as f64 >= 0.99 * a.len() as f64,
            "{dtype:?}: {same} of {}",
            a.len()
        );
        // Fewer lists than a part's first round: one part.
        let mut few = IvfIndex::new(dim, Metric::Cos, dtype, params(2)).unwrap();
        few.train(&v).unwrap();
        few.add(&keys, &v).unwrap();
        for scan_dims in [0, 16] {
            few.set_scan_dims(scan_dims).unwrap();
            let (f, _, _) = few.search_exact(&q[..200 * dim], 20).unwrap();
            let (g, _, _) = ivf.search_exact(&q[..200 * dim], 20).unwrap();
            let same = f.iter().zip(&g).filter(|(x, y)| x == y).count();
            assert!(
                same as f64 >= 0.99 * f.len() as f64,
                "{dtype:?} 2 lists: {same}"
            );
        }
    }
}
