//! Files that change under a memory-mapped index, and paths that are not regular files.
//! The input is written to a file and opened with mmap (verified and not); then the file is
//! changed as the input's hash chooses: truncated (to any length), extended, rewritten in place
//! (same size, other bytes) or replaced by rename. Every call on the open index must then answer
//! or fail with `Error::File`, never crash (a SIGBUS is a finding) or panic; a size change must
//! be reported. Once per process: a device and a FIFO are refused with `Error::File`.
#![no_main]

#[path = "common.rs"]
mod common;

#[path = "changed_file.rs"]
mod changed_file;

use changed_file::Change;
use leanclip_engine::{DType, Error, Index};
use libfuzzer_sys::fuzz_target;

/// Every read-only call answers or fails with a file error.
fn use_it(index: &Index, must_fail: bool) {
    let dim = index.dim();
    let q: Vec<f32> = (0..dim).map(|i| 1.0 + (i % 5) as f32).collect();
    let q9: Vec<f32> = q.iter().cycle().take(9 * dim).copied().collect();
    let first = index.keys().first().copied();
    let results: Vec<Result<(), Error>> = vec![
        index.search(&q, 3, None).map(|_| ()),
        index.search(&q9, 2, None).map(|_| ()),
        index.get(&first.into_iter().collect::<Vec<_>>()).map(|_| ()),
        index.astype(DType::F16).map(|_| ()),
        index.verify(),
    ];
    for r in results {
        match r {
            Ok(()) => assert!(!must_fail || index.is_empty(), "a changed file went unnoticed"),
            Err(Error::File { .. }) => {}
            // astype may refuse a stored value that does not fit f16; get may miss a key of a
            // file whose keys repeat (unverified load)
            Err(Error::Invalid(_)) | Err(Error::MissingKey(_)) => {}
            Err(e) => panic!("unexpected error on a changed file: {e:?}"),
        }
    }
    let _ = index.keys().len(); // read at load: always there
}

fuzz_target!(|data: &[u8]| {
    let refuses = |p: &std::path::Path, mmap| matches!(Index::load(p, mmap, true), Err(Error::File { .. }));
    let d = changed_file::scratch_dir("changed", refuses);
    let path = d.join("index.lcx");
    let h = xxhash_rust::xxh3::xxh3_64(data);
    for verify in [true, false] {
        changed_file::write(&path, data);
        let Ok(index) = Index::load(&path, true, verify) else { continue };
        let must_fail = match changed_file::change(&path, data, h) {
            // in place, same size: detected by mtime unless within one clock tick; either way
            // it must not crash
            Change::Rewritten => false,
            change => change.resized(),
        };
        use_it(&index, must_fail);
    }
});
