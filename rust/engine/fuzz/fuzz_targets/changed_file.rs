//! Shared by the `*_changed_file` targets: the scratch directory, the refusal of paths that
//! are not regular files, and the changes made to a file while an index has it mapped.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory (under /dev/shm where there is one), made on the first
/// call. That call also checks the refusals that do not depend on the input: `refuses(path,
/// mmap)` must hold for two devices and a FIFO, read and mapped.
pub fn scratch_dir(name: &str, refuses: impl Fn(&Path, bool) -> bool) -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let d = base.join(format!("leanclip-fuzz-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        for special in [Path::new("/dev/null"), Path::new("/dev/zero")] {
            for mmap in [false, true] {
                assert!(refuses(special, mmap), "{special:?}");
            }
        }
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc_mkfifo(c.as_ptr(), 0o600) } == 0 {
            for mmap in [false, true] {
                assert!(refuses(&fifo, mmap), "fifo");
            }
        }
        d
    })
}

extern "C" {
    #[link_name = "mkfifo"]
    fn libc_mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
}

pub fn write(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create scratch file");
    f.write_all(data).expect("write scratch file");
}

/// What [`change`] did to the file.
pub enum Change {
    /// Cut to a length below its own (`resized`: the length differs).
    Truncated { resized: bool },
    /// Grown by up to 100 bytes (`resized`: it grew).
    Extended { resized: bool },
    /// Rewritten in place: same size, other bytes (seen by the mtime alone).
    Rewritten,
    /// Replaced by rename: the mapped inode is intact.
    Replaced,
}

impl Change {
    /// The file's size changed, which every read of the map must report.
    pub fn resized(&self) -> bool {
        matches!(self, Change::Truncated { resized: true } | Change::Extended { resized: true })
    }
}

/// Changes the file at `path`, which holds `data`, as the input's hash `h` chooses.
pub fn change(path: &Path, data: &[u8], h: u64) -> Change {
    let len = data.len() as u64;
    match h % 4 {
        0 => {
            let to = (h >> 8) % len.max(1);
            std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(to).unwrap();
            Change::Truncated { resized: to != len }
        }
        1 => {
            let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            f.write_all(&data[..data.len().min(100)]).unwrap();
            Change::Extended { resized: !data.is_empty() }
        }
        2 => {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let other: Vec<u8> = data.iter().rev().map(|b| b ^ (h as u8)).collect();
            std::os::unix::fs::FileExt::write_all_at(&f, &other, 0).unwrap();
            Change::Rewritten
        }
        _ => {
            let tmp = path.with_extension("new");
            write(&tmp, &data[..data.len() / 2]);
            std::fs::rename(&tmp, path).unwrap();
            Change::Replaced
        }
    }
}
