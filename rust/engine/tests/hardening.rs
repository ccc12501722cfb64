//! Issue 14, engine items: mapped files that change, files that are not regular files, vectors
//! whose norms do not fit float32, keys that were never added.

mod common;

use common::{child_done, in_subprocess, is_child, is_file_error, truncate_to_a_third, CHANGED};
use leanclip_engine::testutil::values;
use leanclip_engine::{DType, Error, Index, Metric, VectorFault};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `n` rows of values in [-0.5, 0.5) (the shared test values halved: exact, same bits as
/// before).
fn rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    values(n * dim, seed).into_iter().map(|x| x * 0.5).collect()
}

fn saved(path: &Path, n: usize, dim: usize, first_key: u64) {
    let mut index = Index::new(dim, Metric::Ip, DType::F32).unwrap();
    let keys: Vec<u64> = (first_key..first_key + n as u64).collect();
    index.add(&keys, &rows(n, dim, first_key)).unwrap();
    index.save(path).unwrap();
}

#[test]
fn a_mapped_file_truncated_later_is_an_error_not_a_sigbus() {
    in_subprocess("child_truncated_after_map");
}

#[test]
fn child_truncated_after_map() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lci");
    saved(&path, 4000, 64, 0);
    for verify in [true, false] {
        let index = Index::load(&path, true, verify).unwrap();
        let q = rows(1, 64, 99);
        assert_eq!(index.search(&q, 3, None).unwrap().0.len(), 3);
        truncate_to_a_third(&path);
        is_file_error(index.search(&q, 3, None), "size went from", "search");
        let batch = rows(20, 64, 98); // the batched (GEMM) path too
        is_file_error(index.search(&batch, 3, None), CHANGED, "batch");
        is_file_error(index.get(&[5]), CHANGED, "get");
        is_file_error(index.astype(DType::F16), CHANGED, "astype");
        is_file_error(index.verify(), CHANGED, "verify");
        // the keys were read at load, not mapped: still there, still right
        assert_eq!(index.keys().len(), 4000);
        assert_eq!(index.keys()[17], 17);
        saved(&path, 4000, 64, 0);
    }
    child_done();
}

#[test]
fn a_mapped_file_overwritten_in_place_is_detected() {
    in_subprocess("child_overwritten_in_place");
}

#[test]
fn child_overwritten_in_place() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, other) = (dir.path().join("a.lci"), dir.path().join("b.lci"));
    saved(&path, 1000, 32, 0);
    saved(&other, 1000, 32, 1_000_000); // same size, other keys and vectors
    let index = Index::load(&path, true, false).unwrap();
    std::thread::sleep(Duration::from_millis(50)); // let the mtime clock tick
    let bytes = std::fs::read(&other).unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&bytes).unwrap(); // in place: same inode, same size
    }
    // never the other file's keys (garbage for this index): they were read at load
    assert_eq!(index.keys()[0], 0);
    assert!(index.contains(999).unwrap());
    is_file_error(
        index.search(&rows(1, 32, 5), 3, None),
        "modified in place",
        "search",
    );
    is_file_error(index.get(&[1]), "modified in place", "get");
    child_done();
}

#[test]
fn a_file_replaced_by_rename_keeps_serving_the_old_one() {
    // What `save` does: a new file renamed over the old. The mapped inode is intact.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.lci");
    saved(&path, 500, 16, 0);
    let index = Index::load(&path, true, true).unwrap();
    saved(&path, 700, 16, 10_000);
    let (ids, _, _) = index.search(&rows(1, 16, 3), 5, None).unwrap();
    assert!(ids.iter().all(|&k| k < 500), "{ids:?}");
    index.verify().unwrap();
    assert_eq!(Index::load(&path, true, true).unwrap().len(), 700);
}

#[test]
fn rewriting_a_file_while_it_is_loaded_never_crashes() {
    in_subprocess("child_rewritten_during_load");
}

#[test]
fn child_rewritten_during_load() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.lci");
    saved(&path, 3000, 64, 0);
    let good = std::fs::read(&path).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop, good) = (path.clone(), stop.clone(), good.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len((i * 7919) as u64 % good.len() as u64).unwrap();
                f.write_all(&good[..(i * 104_729) % good.len()]).unwrap();
                i += 1;
            }
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for i in 0..300 {
        match Index::load(&path, true, i % 2 == 0) {
            Ok(index) => {
                // whatever it loaded, using it never crashes: results or Error::File
                match index.search(&rows(1, 64, 1), 3, None) {
                    Ok(_) | Err(Error::File { .. }) => {}
                    Err(e) => panic!("{e:?}"),
                }
                ok += 1;
            }
            Err(Error::File { .. }) => refused += 1,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    println!("loaded {ok}, refused {refused}");
    child_done();
}

#[test]
fn files_that_are_not_regular_files_are_refused_before_reading() {
    is_file_error(
        Index::load(Path::new("/dev/zero"), false, true),
        "a device",
        "read",
    );
    is_file_error(
        Index::load(Path::new("/dev/zero"), true, false),
        "a device",
        "mmap",
    );
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Index::load(dir.path(), false, true),
        Err(Error::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::IsADirectory
    ));
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A FIFO without a writer would block a plain open / read forever: run it on a thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = [false, true].map(|mmap| match Index::load(&fifo, mmap, true) {
            Err(Error::File { reason, .. }) => reason,
            other => format!("unexpected: {other:?}"),
        });
        tx.send(r).unwrap();
    });
    let reasons = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("loading a FIFO hung");
    for r in reasons {
        assert!(r.contains("a FIFO"), "{r}");
    }
}

#[test]
fn cosine_refuses_vectors_and_queries_too_small_to_normalize() {
    for dtype in DType::ALL {
        let mut index = Index::new(8, Metric::Cos, dtype).unwrap();
        index.add(&[1], &[1.0; 8]).unwrap();
        let err = index
            .add(&[2, 3], &[[1.0; 8], [1e-30; 8]].concat())
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidVector {
                    what: "vectors",
                    row: 1,
                    fault: VectorFault::TooSmall
                }
            ),
            "{err:?}"
        );
        assert_eq!(index.len(), 1);
        let err = index.search(&[1e-30; 8], 1, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidVector {
                    what: "queries",
                    row: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        // small but fine: one component carries the norm
        let mut v = [1e-30f32; 8];
        v[3] = 1e-10;
        index.add(&[4], &v).unwrap();
        let got = index.get(&[4]).unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "{got:?}");
        assert!((got[3] - 1.0).abs() < 0.02, "{got:?}");
        let (ids, scores, _) = index.search(&v, 2, None).unwrap();
        assert_eq!(ids[0], 4);
        assert!(scores.iter().all(|s| s.is_finite()), "{scores:?}");
    }
}

#[test]
fn huge_vectors_are_refused_so_batch_and_single_searches_agree() {
    let dim = 8;
    for metric in Metric::ALL {
        let mut index = Index::new(dim, metric, DType::F32).unwrap();
        let err = index.add(&[1], &[3e38; 8]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidVector {
                    row: 0,
                    fault: VectorFault::TooLarge,
                    ..
                }
            ),
            "{err:?}"
        );
        // largest accepted magnitude: squared norms just under f32::MAX / 4
        let big = (f32::MAX / 4.0 / dim as f32).sqrt() * 0.999;
        let data: Vec<f32> = rows(40, dim, 7).iter().map(|v| v.signum() * big).collect();
        let keys: Vec<u64> = (0..40).collect();
        index.add(&keys, &data).unwrap();
        let queries: Vec<f32> = data.iter().map(|v| -v).collect();
        let err = index.search(&[3e38; 8], 1, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidVector {
                    what: "queries",
                    ..
                }
            ),
            "{err:?}"
        );
        let (_, bs, _) = index.search(&queries, 3, None).unwrap(); // 40 queries: batched
        for q in 0..40 {
            let (_, ss, _) = index
                .search(&queries[q * dim..(q + 1) * dim], 3, None)
                .unwrap();
            for j in 0..3 {
                let (b, s) = (bs[q * 3 + j], ss[j]);
                assert!(
                    b.is_finite() && s.is_finite(),
                    "{metric:?} q{q}: {b} vs {s}"
                );
                assert!(
                    (b - s).abs() <= 1e-3 * s.abs().max(1.0),
                    "{metric:?} q{q}: {b} vs {s}"
                );
            }
        }
    }
}

/// An index image whose f32 vectors are patched to `value` (checksums recomputed): what a
/// crafted file can hold, though `add` refuses it.
fn crafted(value: f32, metric: Metric) -> Vec<u8> {
    let mut index = Index::new(4, metric, DType::F32).unwrap();
    index.add(&[10, 20, 30, 40], &rows(4, 4, 1)).unwrap();
    let mut b = index.to_bytes();
    let start = 128; // 64 header + 32 keys, padded to 64
    for i in [0usize, 5, 9] {
        b[start + 4 * i..start + 4 * i + 4].copy_from_slice(&value.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&b[start..]);
    b[48..56].copy_from_slice(&sum.to_le_bytes());
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&b[..56]);
    h.update(&b[64..start]);
    b[56..64].copy_from_slice(&h.digest().to_le_bytes());
    b
}

#[test]
fn search_never_returns_a_key_that_was_not_added() {
    for metric in Metric::ALL {
        for value in [f32::NAN, f32::INFINITY] {
            let index = Index::from_bytes(&crafted(value, metric)).unwrap();
            for nq in [1usize, 9] {
                let q = rows(nq, 4, 2);
                let (ids, scores, kp) = index.search(&q, 4, None).unwrap();
                assert_eq!(kp, 4);
                for (id, s) in ids.iter().zip(&scores) {
                    assert!(
                        [10, 20, 30, 40].contains(id),
                        "{metric:?} {value}: key {id} ({s})"
                    );
                }
                for row in ids.chunks(4) {
                    let mut r = row.to_vec();
                    r.sort();
                    assert_eq!(r, [10, 20, 30, 40], "{metric:?} {value}");
                }
                let (ids, _, kp) = index.search(&q, 4, Some(&[20])).unwrap();
                assert_eq!(kp, 3);
                assert!(ids.iter().all(|k| [10, 30, 40].contains(k)), "{ids:?}");
            }
        }
    }
}

#[test]
fn astype_converts_keeping_keys_and_order() {
    let mut index = Index::new(16, Metric::Ip, DType::F32).unwrap();
    let keys: Vec<u64> = (0..300).map(|k| k * 7 + 3).collect();
    index.add(&keys, &rows(300, 16, 4)).unwrap();
    index.remove(&[3, 10]).unwrap();
    for dtype in DType::ALL {
        let c = index.astype(dtype).unwrap();
        assert_eq!((c.dtype(), c.metric(), c.dim()), (dtype, Metric::Ip, 16));
        assert_eq!(c.keys(), index.keys());
        let (a, b) = (index.get(&[17]).unwrap(), c.get(&[17]).unwrap());
        let tol = if dtype == DType::I8 { 0.01 } else { 1e-3 };
        assert!(
            a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol),
            "{dtype:?}"
        );
        assert!(!c.is_read_only());
    }
    index.add(&[1], &[1e5; 16]).unwrap();
    let err = index.astype(DType::F16).unwrap_err().to_string();
    assert!(err.contains("key 1 ") && err.contains("float16"), "{err}");
}
