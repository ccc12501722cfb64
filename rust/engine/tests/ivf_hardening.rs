//! Issue 25, IVF items: a mapped IVF file truncated or rewritten by another program, scan_dims
//! at large dimensions, and vectors the exact index refuses (one shared check).

mod common;
mod ivf_exercise;

use common::{child_done, in_subprocess, is_child, is_file_error, truncate_to_a_third, CHANGED};
use leanclip_engine::ivf::{IvfIndex, IvfParams, MAX_SCAN_DIMS_DIM};
use leanclip_engine::testutil::values;
use leanclip_engine::{DType, Error, Index, Metric, VectorFault};
use std::path::Path;

const DIM: usize = 16;

/// Small saved indexes of every storage: (dtype, rerank copies, pq codes), trained on 4 lists.
fn variants() -> Vec<(DType, usize, usize)> {
    vec![
        (DType::F32, 0, 0),
        (DType::F32, 0, 4),
        (DType::F16, 0, 0),
        (DType::F16, 5, 4),
        (DType::I8, 0, 0),
        (DType::I8, 5, 0),
        (DType::I8, 0, 4),
    ]
}

fn built(dtype: DType, rerank: usize, pq: usize) -> IvfIndex {
    let p = IvfParams {
        rerank,
        pq,
        train_threshold: 0,
        nprobe: 2,
        ..IvfParams::with_nlist(4)
    };
    let mut ivf = IvfIndex::new(DIM, Metric::Ip, dtype, p).unwrap();
    let n = 300;
    let v = values(n * DIM, 7);
    ivf.add(&(0..n as u64).collect::<Vec<_>>(), &v).unwrap();
    ivf.train(&v).unwrap();
    ivf
}

/// Every call that reads the map fails with `Error::File`; a save leaves its target alone.
fn every_read_fails(index: &IvfIndex, dir: &Path, label: &str) {
    let q = values(DIM, 99);
    let batch = values(20 * DIM, 98); // the batched (product) path too
    is_file_error(
        index.search(&q, 3, None),
        CHANGED,
        &format!("{label} search"),
    );
    is_file_error(
        index.search(&batch, 3, None),
        CHANGED,
        &format!("{label} batch"),
    );
    is_file_error(index.get(&[5]), CHANGED, &format!("{label} get"));
    is_file_error(index.keys(), CHANGED, &format!("{label} keys"));
    is_file_error(index.verify(), CHANGED, &format!("{label} verify"));
    let out = dir.join("copy.ivf");
    is_file_error(index.save(&out), CHANGED, &format!("{label} save"));
    assert!(!out.exists(), "{label}: a failed save wrote its target");
    // What lives in memory still answers.
    assert_eq!(index.len(), 300);
    assert!(index.contains(5));
}

#[test]
fn a_mapped_ivf_file_truncated_later_is_an_error_not_a_sigbus() {
    in_subprocess("child_ivf_truncated_after_map");
}

#[test]
fn child_ivf_truncated_after_map() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.ivf");
    for (dtype, rerank, pq) in variants() {
        for verify in [true, false] {
            built(dtype, rerank, pq).save(&path).unwrap();
            let index = IvfIndex::load(&path, true, verify).unwrap();
            let q = values(DIM, 99);
            assert_eq!(index.search(&q, 3, None).unwrap().0.len(), 3);
            truncate_to_a_third(&path);
            every_read_fails(
                &index,
                dir.path(),
                &format!("{dtype:?} {rerank} {pq} truncated"),
            );
        }
    }
    child_done();
}

#[test]
fn a_mapped_ivf_file_rewritten_in_place_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.ivf");
    for (dtype, rerank, pq) in variants() {
        built(dtype, rerank, pq).save(&path).unwrap();
        let index = IvfIndex::load(&path, true, false).unwrap();
        let before = index.get(&[5]).unwrap();
        // Same size, other bytes (another index's), written through another descriptor; the
        // mtime is set apart explicitly so that a coarse clock cannot hide the write.
        let mut other = built(dtype, rerank, pq).to_bytes();
        let at = other.len() - 64;
        other[at..].iter_mut().for_each(|b| *b ^= 0x5a);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&other, 0).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        drop(f);
        every_read_fails(
            &index,
            dir.path(),
            &format!("{dtype:?} {rerank} {pq} rewritten"),
        );
        assert_eq!(before.len(), DIM);
    }
}

#[test]
fn an_ivf_file_replaced_by_rename_keeps_the_mapped_one_usable() {
    // What `save` does: the mapped inode stays intact and stays valid.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.ivf");
    built(DType::I8, 0, 0).save(&path).unwrap();
    let index = IvfIndex::load(&path, true, true).unwrap();
    let before = index.search(&values(DIM, 3), 4, None).unwrap();
    built(DType::F16, 0, 0).save(&path).unwrap();
    assert_eq!(index.search(&values(DIM, 3), 4, None).unwrap(), before);
    index.verify().unwrap();
    assert_eq!(index.keys().unwrap().len(), 300);
}

#[test]
fn scan_dims_at_large_dims_is_refused_before_anything_is_allocated() {
    let p = |scan_dims| IvfParams {
        scan_dims,
        ..IvfParams::with_nlist(4)
    };
    let big = 1 << 16;
    let err = IvfIndex::new(big, Metric::Cos, DType::I8, p(64)).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("scan_dims needs dim <= {MAX_SCAN_DIMS_DIM}")),
        "{err}"
    );
    // scan_dims 0 at that dim is fine, and setting it later is refused the same way.
    let mut ivf = IvfIndex::new(big, Metric::Cos, DType::I8, p(0)).unwrap();
    assert!(ivf.set_scan_dims(64).is_err());
    assert_eq!(ivf.params().scan_dims, 0);
    // At the bound it is allowed.
    IvfIndex::new(MAX_SCAN_DIMS_DIM, Metric::Cos, DType::I8, p(64)).unwrap();
    // A file that asks for it (as an older build wrote) is refused at load, naming why.
    let mut bytes = IvfIndex::new(big, Metric::Cos, DType::I8, p(0))
        .unwrap()
        .to_bytes();
    bytes[72..76].copy_from_slice(&64u32.to_le_bytes());
    ivf_exercise::fix_checksums(&mut bytes);
    match IvfIndex::from_bytes(&bytes) {
        Err(Error::File { reason, .. }) => {
            assert!(reason.contains("scan_dims needs dim <="), "{reason}")
        }
        other => panic!("expected Error::File, got {other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.ivf");
    std::fs::write(&path, &bytes).unwrap();
    for mmap in [false, true] {
        assert!(matches!(
            IvfIndex::load(&path, mmap, true),
            Err(Error::File { .. })
        ));
    }
}

/// What `Index::add` refuses, `IvfIndex` refuses in add, upsert, train and search, with the
/// same error (one shared check), trained or not.
#[test]
fn ivf_refuses_what_the_exact_index_refuses() {
    let dim = 4;
    let tiny = vec![1e-30f32; dim]; // squared norm 4e-60 < 2^-100
    let huge = vec![3e38f32, 0.0, 0.0, 0.0];
    let big = vec![1e38f32; dim];
    let cases: [(&[f32], Metric, VectorFault); 5] = [
        (&tiny, Metric::Cos, VectorFault::TooSmall),
        (&huge, Metric::Cos, VectorFault::TooLarge),
        (&huge, Metric::Ip, VectorFault::TooLarge),
        (&huge, Metric::L2, VectorFault::TooLarge),
        (&big, Metric::Ip, VectorFault::TooLarge),
    ];
    let good = values(40 * dim, 5);
    for (row, metric, fault) in cases {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let mut exact = Index::new(dim, metric, dtype).unwrap();
            let want = exact.add(&[1], row).unwrap_err().to_string();
            assert!(want.contains(&fault.to_string()), "{want}");
            for trained in [false, true] {
                let p = IvfParams {
                    train_threshold: 0,
                    ..IvfParams::with_nlist(4)
                };
                let mut ivf = IvfIndex::new(dim, metric, dtype, p).unwrap();
                ivf.add(&(100..140).collect::<Vec<_>>(), &good).unwrap();
                if trained {
                    ivf.train(&good).unwrap();
                }
                let label = format!("{metric:?} {dtype:?} trained {trained}");
                let same = |r: Result<(), Error>| match r {
                    Err(e @ Error::InvalidVector { .. }) => {
                        assert_eq!(e.to_string(), want, "{label}")
                    }
                    other => panic!("{label}: expected {want}, got {other:?}"),
                };
                same(ivf.add(&[1], row));
                same(ivf.upsert(&[100], row));
                // A training set with the row in it (train's rows are what add would store).
                let mut set = good.clone();
                set[..dim].copy_from_slice(row);
                match ivf.train(&set) {
                    Err(Error::InvalidVector {
                        row: 0, fault: f, ..
                    }) => assert_eq!(f, fault),
                    other => panic!("{label}: train gave {other:?}"),
                }
                if fault != VectorFault::TooSmall || metric == Metric::Cos {
                    let q = ivf.search(row, 3, None).unwrap_err().to_string();
                    assert!(q.starts_with("queries[0]"), "{q}");
                }
                assert_eq!(ivf.len(), 40, "{label}: a refused call changed the index");
                ivf.retrain().unwrap();
            }
        }
    }
}
