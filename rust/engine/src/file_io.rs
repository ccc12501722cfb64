//! What the index file and the IVF file share: little-endian field reads, the metadata
//! checksum, error constructors and the atomic write. Each format keeps its own layout.

use crate::error::Error;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
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
/// either the old file or the new one.
pub(crate) fn atomic_write(path: &Path, parts: &[&[u8]]) -> crate::Result<()> {
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
    tmp.as_file().sync_all().map_err(|e| io_error(path, e))?;
    tmp.persist(path).map_err(|e| io_error(path, e.error))?;
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))?;
    Ok(())
}
