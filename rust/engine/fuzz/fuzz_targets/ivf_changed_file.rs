//! IVF files opened with mmap, then changed under the index. The input (checksums patched to
//! match when its first byte is odd, so that most inputs load) is written to a file and opened
//! with mmap, verified and not. An accepted file must first answer every call as the index read
//! from the same bytes does (`ivf_exercise::exercise`: search alone and in a batch, get, keys,
//! save's image). Then the file is changed as the input's hash chooses: truncated (to any
//! length), extended, rewritten in place (same size, other bytes) or replaced by rename. Every
//! call that reads the map (search, batch search, get, keys, verify, save) must then answer or
//! fail with `Error::File`, never crash (a SIGBUS is a finding) or panic, and a size change or a
//! rewrite must be reported. Once per process: a device and a FIFO are refused.
#![no_main]

#[path = "../../tests/ivf_exercise.rs"]
mod ivf_exercise;

#[path = "changed_file.rs"]
mod changed_file;

use changed_file::Change;
use leanclip_engine::ivf::IvfIndex;
use leanclip_engine::Error;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

/// Every call that reads the map answers or fails with a file error (and must fail when the
/// file changed in a way the stamp shows); a failed save leaves its target alone.
fn use_it(index: &IvfIndex, must_fail: bool, out: &Path) {
    let dim = index.dim();
    let q: Vec<f32> = (0..dim).map(|i| 1.0 + (i % 5) as f32).collect();
    let q9: Vec<f32> = q.iter().cycle().take(9 * dim).copied().collect();
    let _ = std::fs::remove_file(out);
    let results: Vec<Result<(), Error>> = vec![
        index.search(&q, 3, None).map(|_| ()),
        index.search(&q9, 2, None).map(|_| ()),
        index.get(&[0]).map(|_| ()),
        index.keys().map(|_| ()),
        index.verify(),
        index.save(out),
    ];
    for r in results {
        match r {
            Ok(()) => assert!(!must_fail || index.is_empty(), "a changed file went unnoticed"),
            Err(Error::File { .. }) => {}
            Err(Error::MissingKey(_)) => {} // get of a key the file does not hold
            Err(e) => panic!("unexpected error on a changed file: {e:?}"),
        }
    }
    if must_fail && !index.is_empty() {
        assert!(!out.exists(), "a failed save wrote its target");
    }
}

fuzz_target!(|data: &[u8]| {
    let refuses = |p: &Path, mmap| matches!(IvfIndex::load(p, mmap, true), Err(Error::File { .. }));
    let d = changed_file::scratch_dir("ivf-changed", refuses);
    let path = d.join("index.lcivf");
    let out = d.join("saved.lcivf");
    let mut data = data.to_vec();
    if data.first().is_some_and(|b| b & 1 == 1) {
        ivf_exercise::fix_checksums(&mut data);
    }
    let h = xxhash_rust::xxh3::xxh3_64(&data);
    for verify in [true, false] {
        changed_file::write(&path, &data);
        let index = match IvfIndex::load(&path, true, verify) {
            Ok(index) => index,
            Err(e) => {
                ivf_exercise::expect_file_error(&e);
                continue;
            }
        };
        if verify {
            // A mapped file answers as the same bytes read into memory do.
            ivf_exercise::exercise(&index, &data);
        }
        let must_fail = match changed_file::change(&path, &data, h) {
            Change::Rewritten => {
                // The mtime set apart, so that the change is always seen.
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
                true
            }
            change => change.resized(),
        };
        use_it(&index, must_fail, &out);
    }
});
