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

use crate::error::Result;
use crate::file_io::{
    atomic_write, bad, changed_while_opening, file_error, hash_ranges, io_error, meta_checksum,
    open_regular, read_at, u32_at, u64_at, FileStamp, MappedFile,
};
use crate::index::{check_dim, Buf, Index, Store, MAX_ROWS};
use crate::key_map::key_map;
use crate::types::{DType, Metric};
use half::f16;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use xxhash_rust::xxh3::xxh3_64;

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

/// Checks a whole file image except the vectors' checksum. Never panics on any input.
pub fn parse(bytes: &[u8]) -> std::result::Result<Layout, String> {
    let layout = parse_header(&bytes[..bytes.len().min(HEADER_LEN)], bytes.len())?;
    check_meta(&bytes[..layout.vectors.start], &layout)?;
    Ok(layout)
}

/// The layout from the header (the first [`HEADER_LEN`] bytes, or all of a shorter file),
/// checked against the length of the whole file. Reads nothing beyond the header, so a loader
/// can refuse a file of the wrong size before reading (or mapping) the rest.
pub fn parse_header(header: &[u8], file_len: usize) -> std::result::Result<Layout, String> {
    if file_len < HEADER_LEN || header.len() < HEADER_LEN {
        return bad(format!(
            "truncated or not an index file: {file_len} bytes, shorter than the {HEADER_LEN}-byte header"
        ));
    }
    let bytes = &header[..HEADER_LEN];
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
    if file_len != vectors.end {
        return bad(format!(
            "truncated or corrupt: the header describes {} bytes, the file has {file_len}",
            vectors.end,
        ));
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

/// Checks everything before the vectors (`meta` = bytes `0..layout.vectors.start`): the
/// header/keys checksum, reserved bytes, padding and the i8 scales.
pub fn check_meta(meta: &[u8], layout: &Layout) -> std::result::Result<(), String> {
    let bytes = meta;
    if bytes.len() < layout.vectors.start {
        return bad("truncated: the file ends before its vectors");
    }
    if meta_checksum(&bytes[..56], &bytes[HEADER_LEN..layout.vectors.start]) != u64_at(bytes, 56) {
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
    let meta_end = layout.scales.as_ref().map_or(layout.keys.end, |s| s.end);
    if bytes[meta_end..layout.vectors.start]
        .iter()
        .any(|&b| b != 0)
    {
        return bad("corrupt file: padding is not zero");
    }
    if let Some(s) = &layout.scales {
        let ok = bytes[s.clone()]
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite());
        if !ok {
            return bad("corrupt file: a quantization scale is not finite");
        }
    }
    Ok(())
}

pub fn verify_vectors(bytes: &[u8], layout: &Layout) -> std::result::Result<(), String> {
    if xxh3_64(&bytes[layout.vectors.clone()]) != layout.vectors_checksum {
        return bad("corrupt file: vectors checksum mismatch");
    }
    Ok(())
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
            mapped: None,
        })
    }

    /// Opens a saved index. `mmap = false` reads it into memory. `mmap = true` maps the
    /// vectors read-only; the header, keys and scales are read (not mapped) and always
    /// checked; the vectors' checksum and the key map (with its repeated-key check) are done at
    /// load only when `verify` is true (reading the vectors through the descriptor, not the
    /// map), else the map is built on the first key lookup and [`Index::verify`] checks the
    /// vectors. Anything but a regular file is refused before it is read. A mapped index
    /// checks before each read of its vectors that the file did not change (`Error::File`).
    pub fn load(path: &Path, mmap: bool, verify: bool) -> Result<Index> {
        let (file, stamp) = open_regular(path)?;
        let size = usize::try_from(stamp.size())
            .map_err(|_| file_error(Some(path), "file too large for this platform".into()))?;
        let mut header = [0u8; HEADER_LEN];
        let got = read_at(&file, &mut header, 0).map_err(|e| io_error(path, e))?;
        let layout = parse_header(&header[..got], size).map_err(|r| file_error(Some(path), r))?;
        if !mmap {
            // The size matches the header: read exactly that much (never a device's endless
            // stream), then check it all.
            let mut bytes = vec![0u8; size];
            let got = read_at(&file, &mut bytes, 0).map_err(|e| io_error(path, e))?;
            if got != size || FileStamp::of(&file).ok() != Some(stamp) {
                return Err(changed_while_opening(path));
            }
            return Self::from_bytes_inner(&bytes, verify).map_err(|r| file_error(Some(path), r));
        }
        // Everything before the vectors is read into memory (keys, scales), never through the
        // map: a later change to the file cannot touch them.
        let mut meta = vec![0u8; layout.vectors.start];
        let got = read_at(&file, &mut meta, 0).map_err(|e| io_error(path, e))?;
        if got != meta.len() {
            return Err(changed_while_opening(path));
        }
        check_meta(&meta, &layout).map_err(|r| file_error(Some(path), r))?;
        if verify {
            let sum = hash_ranges(&file, std::slice::from_ref(&layout.vectors))
                .map_err(|e| io_error(path, e))?;
            if sum != Some(layout.vectors_checksum) {
                return Err(match sum {
                    None => changed_while_opening(path),
                    Some(_) => {
                        file_error(Some(path), "corrupt file: vectors checksum mismatch".into())
                    }
                });
            }
        }
        let keys: Vec<u64> = bytemuck::allocation::pod_collect_to_vec(&meta[layout.keys.clone()]);
        let rows = OnceLock::new();
        if verify {
            let map = key_map(&keys).map_err(|r| file_error(Some(path), r))?;
            let _ = rows.set(map);
        }
        let (map, guard) = MappedFile::map(path, &file, stamp)?;
        let mapped = |size: usize| {
            (
                Arc::clone(&map),
                layout.vectors.start,
                layout.vectors.len() / size,
            )
        };
        let store = match layout.dtype {
            DType::F32 => {
                let (map, offset, len) = mapped(4);
                Store::F32(Buf::Mapped { map, offset, len })
            }
            DType::F16 => {
                let (map, offset, len) = mapped(2);
                Store::F16(Buf::Mapped { map, offset, len })
            }
            DType::I8 => {
                let (map, offset, len) = mapped(1);
                let scales = layout.scales.clone().expect("i8 has scales");
                Store::I8 {
                    data: Buf::Mapped { map, offset, len },
                    scales: Buf::Owned(bytemuck::allocation::pod_collect_to_vec(&meta[scales])),
                }
            }
        };
        Ok(Index {
            dim: layout.dim,
            metric: layout.metric,
            dtype: layout.dtype,
            keys: Buf::Owned(keys),
            store,
            rows,
            mapped: Some(MappedFile {
                path: path.to_path_buf(),
                file,
                stamp,
                checksum: layout.vectors_checksum,
                data: vec![layout.vectors.clone()],
                guard,
                _map: map,
            }),
        })
    }

    /// Checks what `load(mmap=true, verify=false)` deferred: the vectors against their checksum
    /// (read through the file descriptor, not the map) and the keys for repeats (a no-op for an
    /// index in memory: its file was fully checked). `Error::File` if the file changed.
    pub fn verify(&self) -> Result<()> {
        self.key_rows()?;
        match &self.mapped {
            Some(m) => m.verify_data(),
            None => Ok(()),
        }
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
        let checksum = meta_checksum(&header[..56], &meta);
        header[56..64].copy_from_slice(&checksum.to_le_bytes());
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
        self.check_file()?;
        let (header, meta, vectors) = self.header_and_sections();
        // A file changed while it was written out may have given other bytes (zeros past a
        // truncation): then the old file stays.
        atomic_write(path, &[&header, &meta, vectors], || self.check_file())
    }
}
