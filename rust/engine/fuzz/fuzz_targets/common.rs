//! Shared checks for the fuzz targets: whatever a loader accepts must be a usable, self-consistent
//! index; whatever it refuses must be refused with `Error::File` (never a panic or an abort).

#![allow(dead_code)]

use leanclip_engine::{Error, Index, Metric};
use std::collections::HashSet;

/// The loader may only fail with a file-format error (or, for real files, an I/O error).
pub fn expect_file_error(err: &Error) {
    match err {
        Error::File { reason, .. } => assert!(!reason.is_empty(), "empty IndexFileError reason"),
        Error::Io { .. } => {}
        other => panic!("loader failed with a non-file error: {other:?}"),
    }
}

fn check_results(index: &Index, keys: &[u64], scores: &[f32], nq: usize, kp: usize, excluded: &HashSet<u64>) {
    assert_eq!(keys.len(), nq * kp);
    assert_eq!(scores.len(), nq * kp);
    for q in 0..nq {
        let row_keys = &keys[q * kp..(q + 1) * kp];
        let row_scores = &scores[q * kp..(q + 1) * kp];
        let distinct: HashSet<u64> = row_keys.iter().copied().collect();
        assert_eq!(distinct.len(), kp, "a search returned the same key twice");
        for k in row_keys {
            assert!(index.contains(*k).expect("key map"), "a search returned key {k}, which is not in the index");
            assert!(!excluded.contains(k), "a search returned excluded key {k}");
        }
        if row_scores.iter().all(|s| s.is_finite()) {
            for w in row_scores.windows(2) {
                match index.metric() {
                    Metric::L2 => assert!(w[0] <= w[1], "l2 scores not ascending: {row_scores:?}"),
                    _ => assert!(w[0] >= w[1], "similarity scores not descending: {row_scores:?}"),
                }
            }
        }
    }
}

/// Every read-only call on an accepted index works and agrees with itself. `image` is the file
/// the index was loaded from: the format is canonical, so saving it again gives the same bytes.
pub fn exercise(index: &Index, image: Option<&[u8]>) {
    exercise_inner(index, image);
}

/// For an index opened with mmap and `verify = false`: the key map (and its duplicate check) is
/// deferred. If `verify()` passes it must behave like a verified index; if not, key lookups may
/// fail with a file error (never panic), and a search without `exclude` must still work.
pub fn exercise_lazy(index: &Index, image: Option<&[u8]>) {
    match index.verify() {
        Ok(()) => exercise_inner(index, image),
        Err(e) => {
            expect_file_error(&e);
            let dim = index.dim();
            let q: Vec<f32> = (0..dim).map(|i| 1.0 + (i % 5) as f32).collect();
            let (_, _, kp) = index.search(&q, 3, None).expect("search without exclude needs no key map");
            assert_eq!(kp, 3.min(index.len()));
            let q8: Vec<f32> = q.iter().cycle().take(8 * dim).copied().collect();
            index.search(&q8, 2, None).expect("batch search without exclude");
            for r in [index.contains(1).map(|_| ()), index.get(&index.keys()[..1.min(index.len())]).map(|_| ()),
                      index.search(&q, 1, Some(&[1])).map(|_| ())] {
                if let Err(e) = r {
                    expect_file_error(&e);
                }
            }
        }
    }
}

fn exercise_inner(index: &Index, image: Option<&[u8]>) {
    let dim = index.dim();
    let n = index.len();
    let keys = index.keys().to_vec();
    assert_eq!(keys.len(), n);
    assert_eq!(keys.iter().copied().collect::<HashSet<_>>().len(), n, "loaded index has duplicate keys");
    for k in keys.iter().take(64) {
        assert!(index.contains(*k).expect("key map of a verified index"));
    }
    if n > 0 {
        let some: Vec<u64> = keys.iter().rev().take(16).copied().collect();
        let got = index.get(&some).expect("get of present keys");
        assert_eq!(got.len(), some.len() * dim);
    }
    let absent = (0..).map(|i: u64| u64::MAX - i).find(|k| !index.contains(*k).unwrap()).unwrap();
    assert!(index.get(&[absent]).is_err());

    // One query runs the per-row SIMD kernels; eight or more run the matrix-product path.
    let q1: Vec<f32> = (0..dim).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
    let (k1, s1, kp) = index.search(&q1, 5, None).expect("search with a finite query");
    assert_eq!(kp, 5.min(n));
    check_results(index, &k1, &s1, 1, kp, &HashSet::new());

    let q8: Vec<f32> = (0..8 * dim).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1 + 0.05).collect();
    let exclude: Vec<u64> = keys.iter().take(2).copied().chain([absent]).collect();
    let excluded: HashSet<u64> = keys.iter().take(2).copied().collect();
    let (k8, s8, kp8) = index.search(&q8, 3, Some(&exclude)).expect("batch search");
    assert_eq!(kp8, 3.min(n - excluded.len()));
    check_results(index, &k8, &s8, 8, kp8, &excluded);

    if let Some(image) = image {
        assert!(index.to_bytes() == image, "re-encoding an accepted file gave different bytes");
    }
}
