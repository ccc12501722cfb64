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

use leanclip_engine::ivf::IvfIndex;
use leanclip_engine::Error;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let d = base.join(format!("leanclip-fuzz-ivf-changed-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        for special in [Path::new("/dev/null"), Path::new("/dev/zero")] {
            for mmap in [false, true] {
                assert!(matches!(IvfIndex::load(special, mmap, true), Err(Error::File { .. })), "{special:?}");
            }
        }
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc_mkfifo(c.as_ptr(), 0o600) } == 0 {
            for mmap in [false, true] {
                assert!(matches!(IvfIndex::load(&fifo, mmap, true), Err(Error::File { .. })), "fifo");
            }
        }
        d
    })
}

extern "C" {
    #[link_name = "mkfifo"]
    fn libc_mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
}

fn write(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create scratch file");
    f.write_all(data).expect("write scratch file");
}

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
    let d = dir();
    let path = d.join("index.lcivf");
    let out = d.join("saved.lcivf");
    let mut data = data.to_vec();
    if data.first().is_some_and(|b| b & 1 == 1) {
        ivf_exercise::fix_checksums(&mut data);
    }
    let h = xxhash_rust::xxh3::xxh3_64(&data);
    for verify in [true, false] {
        write(&path, &data);
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
        let len = data.len() as u64;
        let must_fail = match h % 4 {
            0 => {
                let to = (h >> 8) % len.max(1);
                std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(to).unwrap();
                to != len
            }
            1 => {
                let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
                f.write_all(&data[..data.len().min(100)]).unwrap();
                !data.is_empty()
            }
            2 => {
                // In place, same size; the mtime set apart so that the change is always seen.
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let other: Vec<u8> = data.iter().rev().map(|b| b ^ (h as u8)).collect();
                std::os::unix::fs::FileExt::write_all_at(&f, &other, 0).unwrap();
                f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
                true
            }
            _ => {
                let tmp = d.join("new.lcivf");
                write(&tmp, &data[..data.len() / 2]);
                std::fs::rename(&tmp, &path).unwrap();
                false // the mapped inode is intact
            }
        };
        use_it(&index, must_fail, &out);
    }
});
