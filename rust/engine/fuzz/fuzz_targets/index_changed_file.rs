//! Files that change under a memory-mapped index, and paths that are not regular files.
//! The input is written to a file and opened with mmap (verified and not); then the file is
//! changed as the input's hash chooses: truncated (to any length), extended, rewritten in place
//! (same size, other bytes) or replaced by rename. Every call on the open index must then answer
//! or fail with `Error::File`, never crash (a SIGBUS is a finding) or panic; a size change must
//! be reported. Once per process: a device and a FIFO are refused with `Error::File`.
#![no_main]

#[path = "common.rs"]
mod common;

use leanclip_engine::{DType, Error, Index};
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let d = base.join(format!("leanclip-fuzz-changed-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        // The refusal paths that do not depend on the input, checked once.
        for special in [Path::new("/dev/null"), Path::new("/dev/zero")] {
            for mmap in [false, true] {
                assert!(matches!(Index::load(special, mmap, true), Err(Error::File { .. })), "{special:?}");
            }
        }
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc_mkfifo(c.as_ptr(), 0o600) } == 0 {
            for mmap in [false, true] {
                assert!(matches!(Index::load(&fifo, mmap, true), Err(Error::File { .. })), "fifo");
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
    let d = dir();
    let path = d.join("index.lcx");
    let h = xxhash_rust::xxh3::xxh3_64(data);
    for verify in [true, false] {
        write(&path, data);
        let Ok(index) = Index::load(&path, true, verify) else { continue };
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
                // in place, same size: detected by mtime unless within one clock tick; either
                // way it must not crash
                let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let other: Vec<u8> = data.iter().rev().map(|b| b ^ (h as u8)).collect();
                f.write_all(&other).unwrap();
                false
            }
            _ => {
                let tmp = d.join("new.lcx");
                write(&tmp, &data[..data.len() / 2]);
                std::fs::rename(&tmp, &path).unwrap();
                false // the mapped inode is intact
            }
        };
        use_it(&index, must_fail);
    }
});
