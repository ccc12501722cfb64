//! Shared by the `ivf_from_bytes` fuzz target and the `ivf_mutations` test: patching crafted
//! bytes into a file with valid checksums (so that mutations reach the structural checks), and
//! exercising whatever `IvfIndex::from_bytes` accepts.

#![allow(dead_code)]

use leanclip_engine::ivf::IvfIndex;
use leanclip_engine::{Error, Metric};
use std::collections::HashSet;
use xxhash_rust::xxh3::Xxh3;

const HEADER: usize = 128;

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Rewrites both checksums of a file image so that they match its contents, where the header
/// describes sections that fit in `data` (else leaves it alone). Mirrors the format's layout.
pub fn fix_checksums(data: &mut [u8]) {
    if data.len() < HEADER {
        return;
    }
    let dim = u32_at(data, 16);
    let elt = match data[20] {
        0 => 4,
        1 => 2,
        2 => 1,
        _ => return,
    };
    let trained = data[22] & 1 != 0;
    let exact = data[22] & 2 != 0;
    let count = u64_at(data, 24) as usize;
    let lists = u32_at(data, 32);
    let len = data.len();
    let sizes = || -> Option<(usize, usize, usize, usize)> {
        let keys_end = HEADER
            .checked_add(lists.checked_mul(8)?)?
            .checked_add(count.checked_mul(8)?)?;
        let cen = if trained {
            lists.checked_mul(dim)?.checked_mul(4)?
        } else {
            0
        };
        let sc = if data[20] == 2 {
            count.checked_mul(4)?
        } else {
            0
        };
        let meta_end = keys_end.checked_add(cen)?.checked_add(sc)?;
        let v0 = meta_end.checked_next_multiple_of(64)?;
        let v1 = v0.checked_add(count.checked_mul(dim)?.checked_mul(elt)?)?;
        let (c0, c1) = if exact {
            let c0 = v1.checked_next_multiple_of(64)?;
            (c0, c0.checked_add(count.checked_mul(dim)?.checked_mul(4)?)?)
        } else {
            (v1, v1)
        };
        Some((v0, v1, c0, c1))
    };
    let Some((v0, v1, c0, c1)) = sizes() else {
        return;
    };
    if c1 > len {
        return;
    }
    let mut h = Xxh3::new();
    h.update(&data[v0..v1]);
    h.update(&data[c0..c1]);
    let d = h.digest();
    data[112..120].copy_from_slice(&d.to_le_bytes());
    let mut h = Xxh3::new();
    h.update(&data[..120]);
    h.update(&data[HEADER..v0]);
    let m = h.digest();
    data[120..128].copy_from_slice(&m.to_le_bytes());
}

pub fn expect_file_error(err: &Error) {
    match err {
        Error::File { reason, .. } => assert!(!reason.is_empty()),
        other => panic!("from_bytes failed with a non-file error: {other:?}"),
    }
}

/// Every call on an accepted index works and agrees with itself; the format is canonical.
pub fn exercise(index: &IvfIndex, image: &[u8]) {
    assert_eq!(index.to_bytes(), image, "re-encoding changed the bytes");
    let dim = index.dim();
    let keys = index.keys().expect("keys of an accepted index");
    assert_eq!(keys.len(), index.len());
    assert_eq!(index.list_sizes().iter().sum::<usize>(), index.len());
    let distinct: HashSet<u64> = keys.iter().copied().collect();
    assert_eq!(distinct.len(), keys.len());
    let got = index
        .get(&keys[..keys.len().min(4)])
        .expect("get of present keys");
    assert_eq!(got.len(), keys.len().min(4) * dim);
    let q: Vec<f32> = (0..3 * dim).map(|i| 1.0 + (i % 5) as f32).collect();
    let exclude: Vec<u64> = keys.iter().take(2).copied().collect();
    for nq in [1usize, 3] {
        let (ids, scores, kp) = index
            .search(&q[..nq * dim], 4, Some(&exclude))
            .expect("search");
        assert_eq!(kp, 4.min(index.len() - exclude.len()));
        assert_eq!(ids.len(), nq * kp);
        for row in 0..nq {
            let r = &ids[row * kp..(row + 1) * kp];
            let s = &scores[row * kp..(row + 1) * kp];
            let seen: HashSet<u64> = r.iter().copied().collect();
            assert_eq!(seen.len(), kp, "a search returned a key twice");
            for k in r {
                assert!(index.contains(*k) && !exclude.contains(k));
            }
            if s.iter().all(|v| v.is_finite()) {
                for w in s.windows(2) {
                    match index.metric() {
                        Metric::L2 => assert!(w[0] <= w[1]),
                        _ => assert!(w[0] >= w[1]),
                    }
                }
            }
        }
    }
    // A writable copy survives edits.
    let mut copy = IvfIndex::from_bytes(image).expect("accepted once");
    copy.remove(&exclude).expect("remove");
    let v: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32).collect();
    let fresh = (0..u64::MAX).find(|k| !copy.contains(*k)).unwrap();
    copy.add(&[fresh], &v).expect("add");
    assert_eq!(copy.len(), index.len() - exclude.len() + 1);
    IvfIndex::from_bytes(&copy.to_bytes()).expect("a saved edit loads");
}
