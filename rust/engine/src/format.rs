//! The index file format (version 1), little-endian:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "LEANCLIP"
//!      8     4  format version (u32) = 1
//!     12     4  reserved, zero
//!     16     4  dim (u32)
//!     20     1  dtype code (0 f32, 1 f16, 2 i8)
//!     21     1  metric code (0 cos, 1 ip, 2 l2)
//!     22     2  reserved, zero
//!     24     8  count (u64), at most 2^32 - 1
//!     32    16  reserved, zero
//!     48     8  xxh3-64 of the vectors section
//!     56     8  xxh3-64 of bytes 0..56 and of every byte from 64 up to the vectors section
//!     64   8*n  keys (u64)
//!      .   4*n  scales (f32), i8 only
//!      .     .  zero padding up to a multiple of 64
//!      .  n*dim*size  vectors, row-major
//! ```
//! The file ends exactly where the vectors end; every section offset follows from dim, dtype
//! and count, so nothing else in the header can disagree with them.
//!
//! [`parse`] checks everything but the vectors' checksum; [`verify_vectors`] checks that.

use crate::error::{Error, Result};
use crate::index::{check_dim, Buf, Index, MappedVectors, Store, MAX_ROWS};
use crate::key_map::key_map;
use crate::types::{DType, Metric};
use half::f16;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

#[cfg(target_endian = "big")]
compile_error!("the index file format and its memory maps assume a little-endian target");

pub const MAGIC: [u8; 8] = *b"LEANCLIP";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
const SECTION_ALIGN: usize = 64;

/// Where everything is, after [`parse`] checked it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dim: usize,
    pub dtype: DType,
    pub metric: Metric,
    pub count: usize,
    pub keys: Range<usize>,
    pub scales: Option<Range<usize>>,
    pub vectors: Range<usize>,
    pub vectors_checksum: u64,
}

/// Byte ranges of the keys, the i8 scales (if any) and the vectors.
type Sections = (Range<usize>, Option<Range<usize>>, Range<usize>);

fn bad<T>(reason: impl Into<String>) -> std::result::Result<T, String> {
    Err(reason.into())
}

fn sections(dim: usize, dtype: DType, count: usize) -> Option<Sections> {
    let keys = HEADER_LEN..HEADER_LEN.checked_add(count.checked_mul(8)?)?;
    let (scales, meta_end) = if dtype == DType::I8 {
        let end = keys.end.checked_add(count.checked_mul(4)?)?;
        (Some(keys.end..end), end)
    } else {
        (None, keys.end)
    };
    let vectors_start = meta_end.checked_next_multiple_of(SECTION_ALIGN)?;
    let vectors_len = count.checked_mul(dim)?.checked_mul(dtype.element_size())?;
    Some((
        keys,
        scales,
        vectors_start..vectors_start.checked_add(vectors_len)?,
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn meta_checksum(bytes: &[u8], vectors_start: usize) -> u64 {
    let mut h = Xxh3::new();
    h.update(&bytes[..56]);
    h.update(&bytes[HEADER_LEN..vectors_start]);
    h.digest()
}

/// Checks a whole file image except the vectors' checksum. Never panics on any input.
pub fn parse(bytes: &[u8]) -> std::result::Result<Layout, String> {
    if bytes.len() < HEADER_LEN {
        return bad(format!(
            "truncated or not an index file: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    if bytes[..8] != MAGIC {
        return bad("not a leanclip index file (bad magic bytes)");
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return bad(format!(
            "unsupported index format version {version}; this build reads version {FORMAT_VERSION}"
        ));
    }
    let dim = u32_at(bytes, 16) as usize;
    let dtype = DType::from_code(bytes[20])
        .ok_or_else(|| format!("corrupt header: unknown dtype code {}", bytes[20]))?;
    let metric = Metric::from_code(bytes[21])
        .ok_or_else(|| format!("corrupt header: unknown metric code {}", bytes[21]))?;
    let count = u64_at(bytes, 24);
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= MAX_ROWS)
        .ok_or_else(|| format!("corrupt header: count {count}"))?;
    if check_dim(dim).is_err() {
        return bad(format!("corrupt header: dim {dim}"));
    }
    let (keys, scales, vectors) =
        sections(dim, dtype, count).ok_or_else(|| "corrupt header: sizes overflow".to_string())?;
    if bytes.len() != vectors.end {
        return bad(format!(
            "truncated or corrupt: the header describes {} bytes, the file has {}",
            vectors.end,
            bytes.len()
        ));
    }
    if meta_checksum(bytes, vectors.start) != u64_at(bytes, 56) {
        return bad("corrupt file: header/keys checksum mismatch");
    }
    if bytes[12..16]
        .iter()
        .chain(&bytes[22..24])
        .chain(&bytes[32..48])
        .any(|&b| b != 0)
    {
        return bad("corrupt header: reserved bytes are not zero");
    }
    let meta_end = scales.as_ref().map_or(keys.end, |s| s.end);
    if bytes[meta_end..vectors.start].iter().any(|&b| b != 0) {
        return bad("corrupt file: padding is not zero");
    }
    if let Some(s) = &scales {
        let ok = bytes[s.clone()]
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite());
        if !ok {
            return bad("corrupt file: a quantization scale is not finite");
        }
    }
    Ok(Layout {
        dim,
        dtype,
        metric,
        count,
        keys,
        scales,
        vectors,
        vectors_checksum: u64_at(bytes, 48),
    })
}

pub fn verify_vectors(bytes: &[u8], layout: &Layout) -> std::result::Result<(), String> {
    if xxh3_64(&bytes[layout.vectors.clone()]) != layout.vectors_checksum {
        return bad("corrupt file: vectors checksum mismatch");
    }
    Ok(())
}

fn file_error(path: Option<&Path>, reason: String) -> Error {
    Error::File {
        path: path.map(Path::to_path_buf),
        reason,
    }
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Index {
    /// Rebuilds an index from a file image, checking all of it (the fuzzing entry point).
    pub fn from_bytes(bytes: &[u8]) -> Result<Index> {
        Self::from_bytes_inner(bytes, true).map_err(|r| file_error(None, r))
    }

    fn from_bytes_inner(bytes: &[u8], verify: bool) -> std::result::Result<Index, String> {
        let layout = parse(bytes)?;
        if verify {
            verify_vectors(bytes, &layout)?;
        }
        // Vec<u8> gives no alignment guarantee: copy out with unaligned reads.
        let keys: Vec<u64> = bytemuck::allocation::pod_collect_to_vec(&bytes[layout.keys.clone()]);
        let rows = OnceLock::from(key_map(&keys)?);
        let vectors = &bytes[layout.vectors.clone()];
        let store = match layout.dtype {
            DType::F32 => Store::F32(Buf::Owned(bytemuck::allocation::pod_collect_to_vec(
                vectors,
            ))),
            DType::F16 => Store::F16(Buf::Owned(bytemuck::allocation::pod_collect_to_vec::<
                u8,
                f16,
            >(vectors))),
            DType::I8 => Store::I8 {
                data: Buf::Owned(bytemuck::allocation::pod_collect_to_vec(vectors)),
                scales: Buf::Owned(bytemuck::allocation::pod_collect_to_vec(
                    &bytes[layout.scales.clone().expect("i8 has scales")],
                )),
            },
        };
        Ok(Index {
            dim: layout.dim,
            metric: layout.metric,
            dtype: layout.dtype,
            keys: Buf::Owned(keys),
            store,
            rows,
            mapped_vectors: None,
        })
    }

    /// Opens a saved index. `mmap = false` reads it into memory. `mmap = true` maps it
    /// read-only: the header, keys and scales are always checked; the vectors' checksum and the
    /// key map (with its repeated-key check) are done at load only when `verify` is true, else
    /// the map is built on the first key lookup and [`Index::verify`] checks the vectors.
    pub fn load(path: &Path, mmap: bool, verify: bool) -> Result<Index> {
        if !mmap {
            let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
            return Self::from_bytes_inner(&bytes, verify).map_err(|r| file_error(Some(path), r));
        }
        let file = File::open(path).map_err(|e| io_error(path, e))?;
        // SAFETY: the map is read-only and private to this index. If another process truncates
        // or rewrites the file in place while it is mapped, reads may fault or see new bytes;
        // `save` never rewrites in place (it renames a new file over the old one), so files
        // written by leanclip stay intact for existing maps.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_error(path, e))?;
        let layout = parse(&map).map_err(|r| file_error(Some(path), r))?;
        if verify {
            verify_vectors(&map, &layout).map_err(|r| file_error(Some(path), r))?;
        }
        let map = Arc::new(map);
        let mapped =
            |range: &Range<usize>, size: usize| (Arc::clone(&map), range.start, range.len() / size);
        let buf_f32 = |(map, offset, len)| Buf::<f32>::Mapped { map, offset, len };
        let (m, o, l) = mapped(&layout.keys, 8);
        let keys = Buf::<u64>::Mapped {
            map: m,
            offset: o,
            len: l,
        };
        // verify=False defers the key map (and its duplicate check) to the first key lookup;
        // searches without `exclude` never need it.
        let rows = OnceLock::new();
        if verify {
            let map = key_map(keys.as_slice()).map_err(|r| file_error(Some(path), r))?;
            let _ = rows.set(map);
        }
        let store = match layout.dtype {
            DType::F32 => Store::F32(buf_f32(mapped(&layout.vectors, 4))),
            DType::F16 => {
                let (map, offset, len) = mapped(&layout.vectors, 2);
                Store::F16(Buf::Mapped { map, offset, len })
            }
            DType::I8 => {
                let (map, offset, len) = mapped(&layout.vectors, 1);
                let scales = layout.scales.as_ref().expect("i8 has scales");
                Store::I8 {
                    data: Buf::Mapped { map, offset, len },
                    scales: buf_f32(mapped(scales, 4)),
                }
            }
        };
        Ok(Index {
            dim: layout.dim,
            metric: layout.metric,
            dtype: layout.dtype,
            keys,
            store,
            rows,
            mapped_vectors: Some(MappedVectors {
                checksum: layout.vectors_checksum,
                offset: layout.vectors.start,
                len: layout.vectors.len(),
                map,
            }),
        })
    }

    /// Checks what `load(mmap=true, verify=false)` deferred: the vectors against their checksum
    /// and the keys for repeats (a no-op for an index in memory: its file was fully checked).
    pub fn verify(&self) -> Result<()> {
        self.key_rows()?;
        if let Some(m) = &self.mapped_vectors {
            if xxh3_64(&m.map[m.offset..m.offset + m.len]) != m.checksum {
                return Err(file_error(
                    None,
                    "corrupt file: vectors checksum mismatch".into(),
                ));
            }
        }
        Ok(())
    }

    fn header_and_sections(&self) -> ([u8; HEADER_LEN], Vec<u8>, &[u8]) {
        let count = self.len();
        let (_, _, vectors) = sections(self.dim, self.dtype, count).expect("in-memory sizes fit");
        let keys: &[u8] = bytemuck::cast_slice(self.keys.as_slice());
        let mut meta = keys.to_vec();
        let vector_bytes: &[u8] = match &self.store {
            Store::F32(b) => bytemuck::cast_slice(b.as_slice()),
            Store::F16(b) => bytemuck::cast_slice(b.as_slice()),
            Store::I8 { data, scales } => {
                meta.extend_from_slice(bytemuck::cast_slice(scales.as_slice()));
                bytemuck::cast_slice(data.as_slice())
            }
        };
        meta.resize(vectors.start - HEADER_LEN, 0);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[16..20].copy_from_slice(&(self.dim as u32).to_le_bytes());
        header[20] = self.dtype.code();
        header[21] = self.metric.code();
        header[24..32].copy_from_slice(&(count as u64).to_le_bytes());
        header[48..56].copy_from_slice(&xxh3_64(vector_bytes).to_le_bytes());
        let mut h = Xxh3::new();
        h.update(&header[..56]);
        h.update(&meta);
        header[56..64].copy_from_slice(&h.digest().to_le_bytes());
        (header, meta, vector_bytes)
    }

    /// The file image (what `save` writes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let (header, meta, vectors) = self.header_and_sections();
        let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + vectors.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&meta);
        out.extend_from_slice(vectors);
        out
    }

    /// Writes the index atomically: a temporary file in the same directory, fsync, rename over
    /// `path`, fsync of the directory. A crash leaves either the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<()> {
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
        let (header, meta, vectors) = self.header_and_sections();
        {
            let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
            w.write_all(&header).map_err(|e| io_error(path, e))?;
            w.write_all(&meta).map_err(|e| io_error(path, e))?;
            w.write_all(vectors).map_err(|e| io_error(path, e))?;
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
}
