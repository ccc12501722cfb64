//! What the index file and the IVF file share: little-endian field reads, the metadata
//! checksum, error constructors, the atomic write, and a file opened with mmap (its stamp, its
//! SIGBUS guard and the check that it did not change). Each format keeps its own layout.

use crate::error::{Error, Result};
use crate::fault_guard::Guard;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3;

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn bad<T>(reason: impl Into<String>) -> std::result::Result<T, String> {
    Err(reason.into())
}

/// xxh3-64 of the header fields before the metadata checksum, then of the metadata sections
/// (from the end of the header up to the vectors).
pub(crate) fn meta_checksum(fields: &[u8], meta: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(fields);
    h.update(meta);
    h.digest()
}

pub(crate) fn file_error(path: Option<&Path>, reason: String) -> Error {
    Error::File {
        path: path.map(Path::to_path_buf),
        reason,
    }
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `parts`, one after the other, to `path` atomically: a temporary file in the same
/// directory (mode 0644), fsync, rename over `path`, fsync of the directory. A crash leaves
/// either the old file or the new one. `written` runs once every part is written, before the
/// rename: an error from it leaves `path` as it was (a mapped source checks there that what
/// was written is what it held).
pub(crate) fn atomic_write(
    path: &Path,
    parts: &[&[u8]],
    written: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| io_error(path, e))?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        for part in parts {
            w.write_all(part).map_err(|e| io_error(path, e))?;
        }
        w.flush().map_err(|e| io_error(path, e))?;
    }
    written()?;
    tmp.as_file().sync_all().map_err(|e| io_error(path, e))?;
    tmp.persist(path).map_err(|e| io_error(path, e.error))?;
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))?;
    Ok(())
}

/// Opens `path` for reading if it is a regular file (a FIFO, socket, device or directory is
/// refused before anything is read from it: a FIFO would block, /dev/zero never ends), and
/// returns it with its stamp.
pub(crate) fn open_regular(path: &Path) -> Result<(File, FileStamp)> {
    let not_regular = |kind: &str| {
        file_error(
            Some(path),
            format!("not a regular file ({kind}); an index is a regular file"),
        )
    };
    let kind_of = |t: std::fs::FileType| -> Option<&'static str> {
        if t.is_file() {
            return None;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if t.is_fifo() {
                return Some("a FIFO");
            }
            if t.is_char_device() || t.is_block_device() {
                return Some("a device");
            }
            if t.is_socket() {
                return Some("a socket");
            }
        }
        Some("not a file")
    };
    // stat first, so that a device or FIFO is not even opened
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if meta.is_dir() {
        return Err(io_error(
            path,
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        ));
    }
    if let Some(kind) = kind_of(meta.file_type()) {
        return Err(not_regular(kind));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // Non-blocking, in case the path was swapped for a FIFO after the stat.
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| io_error(path, e))?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if let Some(kind) = kind_of(meta.file_type()) {
        return Err(not_regular(kind));
    }
    let stamp = FileStamp::of(&file).map_err(|e| io_error(path, e))?;
    Ok((file, stamp))
}

pub(crate) fn changed_while_opening(path: &Path) -> Error {
    file_error(
        Some(path),
        "the file changed while it was being opened (truncated or rewritten by another \
         program); try again once it is complete"
            .into(),
    )
}

/// Reads up to `buf.len()` bytes at `offset` (fewer only at the end of the file).
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        #[cfg(unix)]
        let n = {
            use std::os::unix::fs::FileExt;
            file.read_at(&mut buf[done..], offset + done as u64)
        };
        #[cfg(windows)]
        let n = {
            use std::os::windows::fs::FileExt;
            file.seek_read(&mut buf[done..], offset + done as u64)
        };
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// xxh3-64 of the bytes `ranges` of the file, one after the other, read through the
/// descriptor; `None` if the file ends first (it was truncated).
pub(crate) fn hash_ranges(file: &File, ranges: &[Range<usize>]) -> std::io::Result<Option<u64>> {
    let mut h = Xxh3::new();
    let longest = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut buf = vec![0u8; (4 << 20).min(longest)];
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(buf.len());
            if read_at(file, &mut buf[..n], at as u64)? != n {
                return Ok(None);
            }
            h.update(&buf[..n]);
            at += n;
        }
    }
    Ok(Some(h.digest()))
}

/// What is compared to tell that an open file changed: its size and its modification time
/// (nanoseconds). Every write and every truncation through any descriptor updates both or the
/// mtime. The inode change time is not compared: replacing the file by rename (what `save`
/// does) changes the replaced inode's ctime while leaving its bytes intact, and the map of that
/// inode stays valid. The inode number is not compared either: the held descriptor always
/// names the inode that was mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    size: u64,
    mtime: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// The stamp of the open file (one fstat).
    pub(crate) fn of(file: &File) -> std::io::Result<FileStamp> {
        let meta = file.metadata()?;
        Ok(FileStamp {
            size: meta.len(),
            mtime: meta.modified().ok(),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }
}

/// A file opened with mmap (by `Index` and `IvfIndex`): its open descriptor (kept so the
/// mapped inode can be checked and read), what it looked like when it was opened, its map
/// registered with the SIGBUS guard, and the data sections its checksum covers.
///
/// Every read of the map is preceded and followed by [`MappedFile::check_unchanged`]: a
/// truncated or rewritten file is then `Error::File`, not a SIGBUS or other bytes than were
/// checked. A truncation *during* a read reads zeros (the guard) and the check after it fails.
pub(crate) struct MappedFile {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) stamp: FileStamp,
    /// xxh3-64 of the `data` ranges, one after the other.
    pub(crate) checksum: u64,
    pub(crate) data: Vec<Range<usize>>,
    /// The map's registration with the SIGBUS guard (`None` where there is none); declared
    /// before the map so that it is dropped (unregistered) before the map is unmapped.
    pub(crate) guard: Option<Guard>,
    /// Held so the views into the map stay valid (they share it).
    pub(crate) _map: Arc<Mmap>,
}

impl MappedFile {
    /// Maps the open regular file `file` (whose stamp was `stamp` when it was opened),
    /// registered with the SIGBUS guard; `Error::File` if it changed since.
    pub(crate) fn map(
        path: &Path,
        file: &File,
        stamp: FileStamp,
    ) -> Result<(Arc<Mmap>, Option<Guard>)> {
        // SAFETY: the map is read-only and private to its index. Another process may still
        // truncate or rewrite the file: every read of the map is bracketed by
        // `check_unchanged`, and a read cut by a truncation reads zeros (the guard); the
        // window that remains is documented in docs/reliability.md.
        let map = Arc::new(unsafe { Mmap::map(file) }.map_err(|e| io_error(path, e))?);
        let guard = Guard::register(map.as_ptr(), map.len());
        if map.len() as u64 != stamp.size() || FileStamp::of(file).ok() != Some(stamp) {
            return Err(changed_while_opening(path));
        }
        Ok((map, guard))
    }

    /// `Error::File` if the mapped file is no longer what it was when it was opened
    /// (truncated, extended or written in place), or if a read of the map faulted: reading
    /// its pages could then fault (SIGBUS past a truncation) or give other bytes than were
    /// checked.
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let changed = |reason: String| Error::File {
            path: Some(self.path.clone()),
            reason,
        };
        let now = FileStamp::of(&self.file)
            .map_err(|e| changed(format!("cannot stat the mapped file: {e}")))?;
        let poisoned = self.guard.as_ref().is_some_and(|g| g.poisoned());
        if now == self.stamp && !poisoned {
            return Ok(());
        }
        Err(changed(if now.size != self.stamp.size {
            format!(
                "the file changed after it was opened with mmap=True (its size went from {} to {} \
                 bytes); reopen the index",
                self.stamp.size, now.size
            )
        } else {
            "the file changed after it was opened with mmap=True (it was modified in place); \
             reopen the index"
                .to_string()
        }))
    }

    /// Checks the data sections against their checksum, read through the descriptor (not the
    /// map). `Error::File` if they differ or the file changed.
    pub(crate) fn verify_data(&self) -> Result<()> {
        self.check_unchanged()?;
        let sum = hash_ranges(&self.file, &self.data).map_err(|e| io_error(&self.path, e))?;
        self.check_unchanged()?;
        if sum != Some(self.checksum) {
            return Err(file_error(
                Some(&self.path),
                "corrupt file: vectors checksum mismatch".into(),
            ));
        }
        Ok(())
    }
}
