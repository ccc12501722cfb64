//! The file loaders: the bytes are written to a file and opened with `Index::load` read into
//! memory and memory-mapped (vectors verified at load, and not verified). All must agree:
//! the verified loaders accept exactly what `from_bytes` accepts; the unverified mmap accepts
//! at least that (its key map and duplicate-key check are deferred), whatever it accepts must
//! still be safe to search, and `verify()` on it must refuse exactly what the verified load
//! refuses.
#![no_main]

#[path = "common.rs"]
mod common;

use leanclip_engine::Index;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        dir.join(format!("leanclip-fuzz-{}.lcx", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    {
        let mut f = std::fs::File::create(p).expect("create scratch file");
        f.write_all(data).expect("write scratch file");
    }
    let mem = Index::load(p, false, true);
    let map = Index::load(p, true, true);
    let lazy = Index::load(p, true, false);
    let reference = Index::from_bytes(data);
    assert_eq!(mem.is_ok(), reference.is_ok(), "load(mmap=false) disagrees with from_bytes");
    assert_eq!(map.is_ok(), reference.is_ok(), "load(mmap=true) disagrees with from_bytes");
    if reference.is_ok() {
        assert!(lazy.is_ok(), "unverified mmap refused a valid file");
    }
    for r in [&mem, &map] {
        match r {
            Ok(index) => common::exercise(index, Some(data)),
            Err(e) => common::expect_file_error(e),
        }
    }
    match &lazy {
        Ok(index) => {
            assert!(index.is_read_only());
            assert_eq!(index.verify().is_ok(), reference.is_ok(), "verify() disagrees with a verified load");
            // Unverified vectors may be corrupt: then re-encoding gives another checksum.
            common::exercise_lazy(index, reference.is_ok().then_some(data));
        }
        Err(e) => common::expect_file_error(e),
    }
});
