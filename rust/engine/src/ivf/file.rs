//! The IVF index file (format version 1), little-endian, its own magic:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "LCIVF\0\0\x01"
//!      8     4  format version (u32) = 1
//!     12     4  reserved, zero
//!     16     4  dim (u32)
//!     20     1  dtype code (0 f32, 1 f16, 2 i8)
//!     21     1  metric code (0 cos, 1 ip, 2 l2)
//!     22     1  flags: bit 0 trained, bit 1 float32 copies kept, bit 2 principal
//!               directions stored; other bits zero
//!     23     1  reserved, zero
//!     24     8  count (u64): vectors stored
//!     32     4  lists stored (u32): 1 before training, nlist after
//!     36     4  nlist (u32)
//!     40     4  nprobe (u32)
//!     44     4  rerank (u32)
//!     48     8  seed (u64)
//!     56     8  train_threshold (u64)
//!     64     4  pq (u32): 4-bit product-quantization sub-quantizers, 0 = none
//!     68     4  shortlist (u32); 0 when pq = 0
//!     72     4  scan_dims (u32): principal directions batches rank by, 0 = all
//!     76     4  nprobe of single queries (u32), 0 = nprobe (set by `tune`)
//!     80     4  target recall of the last `tune`, in millionths (u32), 0 = never tuned
//!     84     4  k of the last `tune` (u32), 0 when never tuned
//!     88     1  knobs the index chooses at training (auto.rs): bit 0 nlist, 1 nprobe, 2 pq,
//!               3 scan_dims; other bits zero
//!     89     1  how single queries scan (set by `tune`): 0 their rows (or codes), 1 as a
//!               batch does, by the product over the lists' packed copies
//!     90    22  reserved, zero
//!    112     8  xxh3-64 of the data sections (vectors, float32 copies, codes)
//!    120     8  xxh3-64 of bytes 0..120 and of every byte from 128 up to the vectors
//!    128  8*L   list sizes (u64), L = lists stored
//!      .  8*n   keys (u64), list by list in slot order
//!      .  4*L*dim  centroids (f32), trained only
//!      .  4*16*dim  codebooks (f32, pq x 16 x dim/pq), trained with pq > 0 only
//!      .  4*dim*dim  principal directions (f32, dim x dim, by decreasing variance; flag
//!               bit 2 only: trained with the index, see `project.rs`)
//!      .  4*n   scales (f32), i8 only
//!      .     .  zero padding up to a multiple of 64
//!      .  n*dim*size  vectors, list by list (each list contiguous)
//!      .     .  zero padding up to a multiple of 64 (copies kept only)
//!      .  4*n*dim  float32 copies, same order (copies kept only)
//!      .     .  zero padding up to a multiple of 64 (codes only)
//!      .     .  codes, list by list: ceil(size / 32) blocks of 16*pq bytes (trained with pq
//!               > 0 only; the layout of `pq.rs`, unused rows of a last block zero)
//! ```
//! Files without codes and with scan_dims 0 are byte for byte what builds before `pq` wrote
//! (pq, shortlist and scan_dims 0); files of indexes never tuned and with no automatic knobs,
//! what builds before `tune` wrote (bytes 76..90 zero); files without trained directions
//! (flag bit 2 clear), what builds before they were stored wrote.
//! The file ends exactly where the last section ends. Every section offset follows from the
//! header, so nothing else can disagree with it; `parse` checks all of it but the data
//! checksum, which `verify` (or a load with verify=true) checks.

use super::pq::{self, Pq, CENTROIDS};
use super::project::Directions;
use super::{
    Data, IvfIndex, IvfParams, List, Seg, DEFAULT_SHORTLIST, MAX_DIM, MAX_LISTS, MAX_VECTORS,
};
use crate::error::Result;
use crate::file_io::{
    atomic_write, bad, changed_while_opening, file_error, io_error, meta_checksum, open_regular,
    read_at, u32_at, u64_at, FileStamp, MappedFile,
};
use crate::kernels::PQ_BLOCK;
use crate::types::{DType, Metric};
use memmap2::Mmap;
use rustc_hash::FxHashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3;

#[cfg(target_endian = "big")]
compile_error!("the IVF file format and its memory maps assume a little-endian target");

pub const IVF_MAGIC: [u8; 8] = *b"LCIVF\0\0\x01";
pub const IVF_FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 128;
const ALIGN: usize = 64;
const FLAG_TRAINED: u8 = 1;
const FLAG_EXACT: u8 = 2;
const FLAG_DIRECTIONS: u8 = 4;

/// Where everything is, after `parse` checked it.
struct Layout {
    dim: usize,
    dtype: DType,
    metric: Metric,
    params: IvfParams,
    auto: super::auto::AutoState,
    exact: bool,
    count: usize,
    sizes: Vec<usize>,
    at: Sections,
    codes: Range<usize>,
    data_checksum: u64,
}

/// Section ranges after the list sizes, up to the codes (whose size needs the list sizes).
#[derive(Clone)]
struct Sections {
    keys: Range<usize>,
    centroids: Range<usize>,
    codebooks: Range<usize>,
    directions: Range<usize>,
    scales: Range<usize>,
    vectors: Range<usize>,
    copies: Range<usize>,
}

/// What the header says is stored, which fixes every section's size.
struct Shape {
    dim: usize,
    dtype: DType,
    count: usize,
    lists: usize,
    trained: bool,
    exact: bool,
    /// Sub-quantizers of the codes (0: none).
    m: usize,
    directions: bool,
}

/// The codes section: after the copies, aligned, `sizes` lists of `m`-sub-quantizer codes.
fn codes_section(copies_end: usize, sizes: &[usize], m: usize) -> Option<Range<usize>> {
    if m == 0 {
        return Some(copies_end..copies_end);
    }
    let c0 = copies_end.checked_next_multiple_of(ALIGN)?;
    let len = sizes.iter().try_fold(0usize, |a, &s| {
        a.checked_add(s.div_ceil(PQ_BLOCK).checked_mul(16 * m)?)
    })?;
    Some(c0..c0.checked_add(len)?)
}

fn sections(shape: &Shape) -> Option<Sections> {
    let &Shape {
        dim,
        dtype,
        count,
        lists,
        trained,
        exact,
        m,
        directions,
    } = shape;
    let sizes_end = HEADER_LEN.checked_add(lists.checked_mul(8)?)?;
    let keys = sizes_end..sizes_end.checked_add(count.checked_mul(8)?)?;
    let f32_len = |on: bool, n: usize| if on { n.checked_mul(4) } else { Some(0) };
    let cen_len = f32_len(trained, lists.checked_mul(dim)?)?;
    let centroids = keys.end..keys.end.checked_add(cen_len)?;
    let book_len = f32_len(trained && m > 0, CENTROIDS.checked_mul(dim)?)?;
    let codebooks = centroids.end..centroids.end.checked_add(book_len)?;
    let dir_len = f32_len(directions, dim.checked_mul(dim)?)?;
    let directions = codebooks.end..codebooks.end.checked_add(dir_len)?;
    let sc_len = f32_len(dtype == DType::I8, count)?;
    let scales = directions.end..directions.end.checked_add(sc_len)?;
    let v0 = scales.end.checked_next_multiple_of(ALIGN)?;
    let vlen = count.checked_mul(dim)?.checked_mul(dtype.element_size())?;
    let vectors = v0..v0.checked_add(vlen)?;
    let copies = if exact {
        let c0 = vectors.end.checked_next_multiple_of(ALIGN)?;
        c0..c0.checked_add(count.checked_mul(dim)?.checked_mul(4)?)?
    } else {
        vectors.end..vectors.end
    };
    Some(Sections {
        keys,
        centroids,
        codebooks,
        directions,
        scales,
        vectors,
        copies,
    })
}

/// A file image in parts, as `save` writes them.
struct Image<'a> {
    /// Header and metadata.
    head: Vec<u8>,
    /// Each list's vectors; with float32 copies, the padding, then each list's copies.
    data: Vec<&'a [u8]>,
}

impl Image<'_> {
    fn parts(&self) -> Vec<&[u8]> {
        std::iter::once(self.head.as_slice())
            .chain(self.data.iter().copied())
            .collect()
    }
}

/// Zero bytes for the padding before the float32 copies (under one alignment unit).
static ZEROS: [u8; ALIGN] = [0; ALIGN];

fn data_checksum(vectors: &[u8], copies: &[u8], codes: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(vectors);
    h.update(copies);
    h.update(codes);
    h.digest()
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
}

/// The header's fixed fields up to the section sizes (magic, version, dim, dtype, metric,
/// flags, count, lists, pq), each checked on what the ones before it established.
fn read_header(bytes: &[u8]) -> std::result::Result<(Shape, Metric, usize), String> {
    if bytes.len() < HEADER_LEN {
        return bad(format!(
            "truncated or not an IVF index file: {} bytes, shorter than the {HEADER_LEN}-byte \
             header",
            bytes.len()
        ));
    }
    if bytes[..8] != IVF_MAGIC {
        return bad("not a leanclip IVF index file (bad magic bytes)");
    }
    let version = u32_at(bytes, 8);
    if version != IVF_FORMAT_VERSION {
        return bad(format!(
            "unsupported IVF format version {version}; this build reads version \
             {IVF_FORMAT_VERSION}"
        ));
    }
    let dim = u32_at(bytes, 16) as usize;
    if dim == 0 || dim > MAX_DIM {
        return bad(format!("corrupt header: dim {dim}"));
    }
    let dtype = DType::from_code(bytes[20])
        .ok_or_else(|| format!("corrupt header: unknown dtype code {}", bytes[20]))?;
    let metric = Metric::from_code(bytes[21])
        .ok_or_else(|| format!("corrupt header: unknown metric code {}", bytes[21]))?;
    let flags = bytes[22];
    if flags & !(FLAG_TRAINED | FLAG_EXACT | FLAG_DIRECTIONS) != 0 {
        return bad(format!("corrupt header: unknown flags {flags:#x}"));
    }
    let trained = flags & FLAG_TRAINED != 0;
    let count = u64_at(bytes, 24);
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= MAX_VECTORS)
        .ok_or_else(|| format!("corrupt header: count {count}"))?;
    let lists = u32_at(bytes, 32) as usize;
    let nlist = u32_at(bytes, 36) as usize;
    if nlist == 0 || nlist > MAX_LISTS || lists != if trained { nlist } else { 1 } {
        return bad(format!(
            "corrupt header: {lists} lists stored for nlist {nlist} (trained: {trained})"
        ));
    }
    let m = u32_at(bytes, 64) as usize;
    if pq::check_m(m, dim).is_some() {
        return bad(format!("corrupt header: pq {m} for dim {dim}"));
    }
    let shape = Shape {
        dim,
        dtype,
        count,
        lists,
        trained,
        exact: flags & FLAG_EXACT != 0,
        m,
        directions: flags & FLAG_DIRECTIONS != 0,
    };
    Ok((shape, metric, nlist))
}

/// Checks a whole file image except the data checksum. Never panics on any input. The checks
/// run in file order, each on what the ones before it established.
fn parse(bytes: &[u8]) -> std::result::Result<Layout, String> {
    let (shape, metric, nlist) = read_header(bytes)?;
    let Shape {
        dim,
        dtype,
        count,
        trained,
        exact,
        m,
        ..
    } = shape;
    let at = sections(&shape).ok_or_else(|| "corrupt header: sizes overflow".to_string())?;
    let (keys, vectors, copies) = (at.keys.clone(), at.vectors.clone(), at.copies.clone());
    let truncated = |want: usize| {
        format!(
            "truncated or corrupt: the header describes {want} bytes, the file has {}",
            bytes.len()
        )
    };
    if bytes.len() < copies.end {
        return Err(truncated(copies.end));
    }
    if meta_checksum(&bytes[..120], &bytes[HEADER_LEN..vectors.start]) != u64_at(bytes, 120) {
        return bad("corrupt file: header/keys checksum mismatch");
    }
    if bytes[12..16]
        .iter()
        .chain(&bytes[23..24])
        .chain(&bytes[90..112])
        .any(|&b| b != 0)
    {
        return bad("corrupt header: reserved bytes are not zero");
    }
    let params = read_params(bytes, nlist, m, (dim, dtype, metric), exact)?;
    let sizes: Vec<usize> = bytes[HEADER_LEN..keys.start]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .map(|s| usize::try_from(s).unwrap_or(usize::MAX))
        .collect();
    let total = sizes
        .iter()
        .try_fold(0usize, |a, &s| a.checked_add(s))
        .unwrap_or(usize::MAX);
    if total != count {
        return bad(format!(
            "corrupt file: list sizes sum to {total}, the header says {count} vectors"
        ));
    }
    let codes = codes_section(copies.end, &sizes, if trained { m } else { 0 })
        .ok_or_else(|| "corrupt header: sizes overflow".to_string())?;
    if bytes.len() != codes.end {
        return Err(truncated(codes.end));
    }
    check_fill(bytes, &at, &codes)?;
    Ok(Layout {
        dim,
        dtype,
        metric,
        params,
        auto: read_auto(bytes)?,
        exact,
        count,
        sizes,
        at,
        codes,
        data_checksum: u64_at(bytes, 112),
    })
}

/// What `tune` set and which knobs the index chooses itself (bytes 76..90).
fn read_auto(bytes: &[u8]) -> std::result::Result<super::auto::AutoState, String> {
    let (target, tune_k) = (u32_at(bytes, 80), u32_at(bytes, 84) as usize);
    if target > 1_000_000 || (target == 0) != (tune_k == 0) {
        return bad(format!(
            "corrupt header: tuned for recall {target} ppm at k {tune_k}"
        ));
    }
    Ok(super::auto::AutoState {
        knobs: super::auto::AutoKnobs::from_bits(bytes[88])
            .ok_or_else(|| format!("corrupt header: automatic knobs {:#x}", bytes[88]))?,
        nprobe_single: u32_at(bytes, 76) as usize,
        single_product: match bytes[89] {
            0 => false,
            1 => true,
            b => return bad(format!("corrupt header: single-query scan {b}")),
        },
        tuned: (target > 0).then_some((target as f32 / 1e6, tune_k)),
        why: Vec::new(),
    })
}

/// The parameters the header stores, checked as the constructor checks them, and against the
/// sections the flags say are there.
fn read_params(
    bytes: &[u8],
    nlist: usize,
    m: usize,
    (dim, dtype, metric): (usize, DType, Metric),
    exact: bool,
) -> std::result::Result<IvfParams, String> {
    let shortlist = u32_at(bytes, 68) as usize;
    if (m == 0) != (shortlist == 0) {
        return bad(format!("corrupt header: shortlist {shortlist} with pq {m}"));
    }
    let params = IvfParams {
        nlist,
        nprobe: u32_at(bytes, 40) as usize,
        rerank: u32_at(bytes, 44) as usize,
        seed: u64_at(bytes, 48),
        train_threshold: usize::try_from(u64_at(bytes, 56))
            .map_err(|_| "corrupt header: train_threshold".to_string())?,
        pq: m,
        shortlist: if m == 0 { DEFAULT_SHORTLIST } else { shortlist },
        scan_dims: u32_at(bytes, 72) as usize,
    };
    if let Err(e) = params.check(dim, dtype, metric) {
        return bad(format!("corrupt header or unsupported parameters: {e}"));
    }
    if params.rerank > 0 && !exact {
        return bad("corrupt header: rerank without float32 copies");
    }
    if exact && dtype == DType::F32 {
        return bad("corrupt header: float32 copies flag on a float32 index");
    }
    Ok(params)
}

/// The padding between sections is zero, and the float sections a search reads without
/// checking (codebooks, centroids, directions, scales) hold finite values.
fn check_fill(
    bytes: &[u8],
    at: &Sections,
    codes: &Range<usize>,
) -> std::result::Result<(), String> {
    let Sections {
        centroids,
        codebooks,
        directions,
        scales,
        vectors,
        copies,
        ..
    } = at;
    if bytes[scales.end..vectors.start]
        .iter()
        .chain(&bytes[vectors.end..copies.start])
        .chain(&bytes[copies.end..codes.start])
        .any(|&b| b != 0)
    {
        return bad("corrupt file: padding is not zero");
    }
    if f32s(&bytes[codebooks.clone()]).any(|v| !v.is_finite()) {
        return bad("corrupt file: a codebook entry is not finite");
    }
    if f32s(&bytes[centroids.clone()]).any(|v| !v.is_finite()) {
        return bad("corrupt file: a centroid is not finite");
    }
    if f32s(&bytes[directions.clone()]).any(|v| !v.is_finite()) {
        return bad("corrupt file: a principal direction is not finite");
    }
    if f32s(&bytes[scales.clone()]).any(|v| !v.is_finite()) {
        return bad("corrupt file: a quantization scale is not finite");
    }
    Ok(())
}

fn verify_data(bytes: &[u8], l: &Layout) -> std::result::Result<(), String> {
    let (v, c, k) = (l.at.vectors.clone(), l.at.copies.clone(), l.codes.clone());
    if data_checksum(&bytes[v], &bytes[c], &bytes[k]) != l.data_checksum {
        return bad("corrupt file: vectors checksum mismatch");
    }
    Ok(())
}

/// Where list data comes from while building an index out of a file.
enum Source<'a> {
    Bytes(&'a [u8]),
    Map(&'a Arc<Mmap>),
}

impl Source<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Source::Bytes(b) => b,
            Source::Map(m) => m,
        }
    }

    /// Elements `first..first + n` of the section starting at byte `start`.
    fn seg<T: bytemuck::Pod>(&self, start: usize, first: usize, n: usize) -> Seg<T> {
        let size = std::mem::size_of::<T>();
        let offset = start + first * size;
        match self {
            // A Vec<u8> gives no alignment guarantee: copy out with unaligned reads.
            Source::Bytes(b) => Seg::Owned(bytemuck::allocation::pod_collect_to_vec(
                &b[offset..offset + n * size],
            )),
            Source::Map(m) => Seg::Mapped {
                map: Arc::clone(m),
                offset,
                len: n,
            },
        }
    }
}

fn build(src: Source<'_>, l: &Layout) -> std::result::Result<IvfIndex, String> {
    let bytes = src.bytes();
    let dim = l.dim;
    let m = l.params.pq;
    let has_codes = !l.at.codebooks.is_empty();
    let mut lists = Vec::with_capacity(l.sizes.len());
    let mut first = 0usize;
    let mut code_at = l.codes.start;
    for &n in &l.sizes {
        let data = match l.dtype {
            DType::F32 => Data::F32(src.seg(l.at.vectors.start, first * dim, n * dim)),
            DType::F16 => Data::F16(src.seg(l.at.vectors.start, first * dim, n * dim)),
            DType::I8 => Data::I8 {
                data: src.seg(l.at.vectors.start, first * dim, n * dim),
                scales: src.seg(l.at.scales.start, first, n),
            },
        };
        lists.push(List {
            keys: src.seg(l.at.keys.start, first, n),
            data,
            exact: l
                .exact
                .then(|| src.seg(l.at.copies.start, first * dim, n * dim)),
            codes: has_codes.then(|| {
                let len = pq::code_bytes(n, m);
                code_at += len;
                src.seg(code_at - len, 0, len)
            }),
            packed: Default::default(),
        });
        first += n;
    }
    let codebooks =
        has_codes.then(|| Pq::new(m, dim / m, f32s(&bytes[l.at.codebooks.clone()]).collect()));
    let centroids: Vec<f32> = f32s(&bytes[l.at.centroids.clone()]).collect();
    let mut map = FxHashMap::with_capacity_and_hasher(l.count, Default::default());
    for (li, list) in lists.iter().enumerate() {
        for (slot, &key) in list.keys.as_slice().iter().enumerate() {
            if map.insert(key, (li as u32, slot as u32)).is_some() {
                return bad(format!("corrupt file: key {key} appears twice"));
            }
        }
    }
    let mut index = IvfIndex {
        dim,
        metric: l.metric,
        dtype: l.dtype,
        params: l.params,
        centroids: Vec::new(),
        probe_centroids: None,
        lists,
        map,
        codebooks,
        directions: if l.at.directions.is_empty() {
            Default::default()
        } else {
            Directions::trained(f32s(&bytes[l.at.directions.clone()]).collect())
        },
        mapped: None,
        auto: l.auto.clone(),
    };
    index.set_centroids(centroids);
    Ok(index)
}

impl IvfIndex {
    /// Rebuilds an index from a file image, checking all of it (the fuzzing entry point).
    pub fn from_bytes(bytes: &[u8]) -> Result<IvfIndex> {
        let inner = || {
            let layout = parse(bytes)?;
            verify_data(bytes, &layout)?;
            build(Source::Bytes(bytes), &layout)
        };
        inner().map_err(|r| file_error(None, r))
    }

    /// Opens a saved index. `mmap = false` reads it into memory; `mmap = true` maps it
    /// read-only (writes fail with `ReadOnly`). Header, list sizes, keys, centroids and scales
    /// are always checked; the data's checksum only when `verify` (else see
    /// [`IvfIndex::verify`]). Anything but a regular file (a FIFO, a device) is refused before
    /// it is read. A mapped index checks around every read of its map that the file did not
    /// change (`Error::File`), as [`crate::Index`] does.
    pub fn load(path: &Path, mmap: bool, verify: bool) -> Result<IvfIndex> {
        let (file, stamp) = open_regular(path)?;
        let size = usize::try_from(stamp.size())
            .map_err(|_| file_error(Some(path), "file too large for this platform".into()))?;
        if !mmap || size < HEADER_LEN {
            // Exactly the size stat gave (never a device's endless stream).
            let mut bytes = vec![0u8; size];
            let got = read_at(&file, &mut bytes, 0).map_err(|e| io_error(path, e))?;
            if got != size || FileStamp::of(&file).ok() != Some(stamp) {
                return Err(changed_while_opening(path));
            }
            let inner = || {
                let layout = parse(&bytes)?;
                if verify {
                    verify_data(&bytes, &layout)?;
                }
                build(Source::Bytes(&bytes), &layout)
            };
            return inner().map_err(|r| file_error(Some(path), r));
        }
        let (map, guard) = MappedFile::map(path, &file, stamp)?;
        // The checks below read the map: a file changed meanwhile (a read past a truncation
        // reads zeros) is reported as changed, not as corrupt.
        let layout = parse(&map);
        let mapped = MappedFile {
            path: path.to_path_buf(),
            file,
            stamp,
            checksum: layout.as_ref().map_or(0, |l| l.data_checksum),
            data: layout.as_ref().map_or(Vec::new(), |l| {
                vec![l.at.vectors.clone(), l.at.copies.clone(), l.codes.clone()]
            }),
            guard,
            _map: Arc::clone(&map),
        };
        let opened = |r: String| match mapped.check_unchanged() {
            Ok(()) => file_error(Some(path), r),
            Err(_) => changed_while_opening(path),
        };
        let layout = layout.map_err(opened)?;
        if verify {
            mapped.verify_data()?;
        }
        let mut index = build(Source::Map(&map), &layout).map_err(opened)?;
        mapped
            .check_unchanged()
            .map_err(|_| changed_while_opening(path))?;
        index.mapped = Some(mapped);
        Ok(index)
    }

    /// Checks the data of an mmap-opened index against its checksum, read through the file
    /// descriptor (a no-op in memory: its file was checked when it was read).
    pub fn verify(&self) -> Result<()> {
        match &self.mapped {
            Some(m) => m.verify_data(),
            None => Ok(()),
        }
    }

    /// What the header says is stored.
    fn shape(&self) -> Shape {
        Shape {
            dim: self.dim,
            dtype: self.dtype,
            count: self.len(),
            lists: self.lists.len(),
            trained: self.is_trained(),
            exact: self.keeps_exact(),
            m: self.params.pq,
            directions: self.directions.saved().is_some(),
        }
    }

    /// The file image: header + metadata (sizes, keys, centroids, codebooks, directions,
    /// scales, padding), then the lists' vectors, the padding before the float32 copies, and
    /// the copies. The vectors and copies are borrowed: saving copies none of them.
    fn image(&self) -> Image<'_> {
        let shape = self.shape();
        let m = if self.has_codes() { self.params.pq } else { 0 };
        let Sections {
            keys,
            scales,
            vectors,
            copies,
            ..
        } = sections(&shape).expect("in-memory sizes fit");
        let sizes: Vec<usize> = self.lists.iter().map(List::len).collect();
        let codes = codes_section(copies.end, &sizes, m).expect("in-memory sizes fit");
        let mut meta = Vec::with_capacity(vectors.start - HEADER_LEN);
        for l in &self.lists {
            meta.extend_from_slice(&(l.len() as u64).to_le_bytes());
        }
        debug_assert_eq!(HEADER_LEN + meta.len(), keys.start);
        for l in &self.lists {
            meta.extend_from_slice(bytemuck::cast_slice(l.keys.as_slice()));
        }
        meta.extend_from_slice(bytemuck::cast_slice(&self.centroids));
        if let Some(book) = &self.codebooks {
            meta.extend_from_slice(bytemuck::cast_slice(&book.centroids));
        }
        if let Some(directions) = self.directions.saved() {
            meta.extend_from_slice(bytemuck::cast_slice(directions));
        }
        let mut data: Vec<&[u8]> = Vec::with_capacity(3 * shape.lists + 2);
        for l in &self.lists {
            data.push(match &l.data {
                Data::F32(s) => bytemuck::cast_slice(s.as_slice()),
                Data::F16(s) => bytemuck::cast_slice(s.as_slice()),
                Data::I8 { data: d, scales: s } => {
                    meta.extend_from_slice(bytemuck::cast_slice(s.as_slice()));
                    bytemuck::cast_slice(d.as_slice())
                }
            });
        }
        debug_assert_eq!(HEADER_LEN + meta.len(), scales.end);
        meta.resize(vectors.start - HEADER_LEN, 0);
        // Paddings before the copies and the codes are parts too, but not checksummed.
        let mut h = Xxh3::new();
        data.iter().for_each(|p| h.update(p));
        if shape.exact {
            data.push(&ZEROS[..copies.start - vectors.end]);
            for l in &self.lists {
                let part = bytemuck::cast_slice(l.exact.as_ref().expect("exact copies").as_slice());
                h.update(part);
                data.push(part);
            }
        }
        if m > 0 {
            data.push(&ZEROS[..codes.start - copies.end]);
            for l in &self.lists {
                let part = l.codes.as_ref().expect("codes").as_slice();
                h.update(part);
                data.push(part);
            }
        }
        let mut head = self.header(&shape);
        head[112..120].copy_from_slice(&h.digest().to_le_bytes());
        let checksum = meta_checksum(&head[..120], &meta);
        head[120..128].copy_from_slice(&checksum.to_le_bytes());
        head.extend_from_slice(&meta);
        Image { head, data }
    }

    /// The 128-byte header, checksums (bytes 112..128) left zero.
    fn header(&self, shape: &Shape) -> Vec<u8> {
        let mut head = vec![0u8; HEADER_LEN];
        head[..8].copy_from_slice(&IVF_MAGIC);
        head[8..12].copy_from_slice(&IVF_FORMAT_VERSION.to_le_bytes());
        head[16..20].copy_from_slice(&(self.dim as u32).to_le_bytes());
        head[20] = self.dtype.code();
        head[21] = self.metric.code();
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        head[22] = flag(shape.trained, FLAG_TRAINED)
            | flag(shape.exact, FLAG_EXACT)
            | flag(shape.directions, FLAG_DIRECTIONS);
        head[24..32].copy_from_slice(&(shape.count as u64).to_le_bytes());
        head[32..36].copy_from_slice(&(shape.lists as u32).to_le_bytes());
        let p = &self.params;
        head[36..40].copy_from_slice(&(p.nlist as u32).to_le_bytes());
        head[40..44].copy_from_slice(&(p.nprobe.min(u32::MAX as usize) as u32).to_le_bytes());
        head[44..48].copy_from_slice(&(p.rerank.min(u32::MAX as usize) as u32).to_le_bytes());
        head[48..56].copy_from_slice(&p.seed.to_le_bytes());
        head[56..64].copy_from_slice(&(p.train_threshold as u64).to_le_bytes());
        if p.pq > 0 {
            head[64..68].copy_from_slice(&(p.pq as u32).to_le_bytes());
            let shortlist = p.shortlist.min(u32::MAX as usize) as u32;
            head[68..72].copy_from_slice(&shortlist.to_le_bytes());
        }
        head[72..76].copy_from_slice(&(p.scan_dims as u32).to_le_bytes());
        let a = &self.auto;
        head[76..80]
            .copy_from_slice(&(a.nprobe_single.min(u32::MAX as usize) as u32).to_le_bytes());
        if let Some((target, k)) = a.tuned {
            let ppm = (target as f64 * 1e6).round().clamp(1.0, 1e6) as u32;
            head[80..84].copy_from_slice(&ppm.to_le_bytes());
            head[84..88].copy_from_slice(&(k.clamp(1, u32::MAX as usize) as u32).to_le_bytes());
        }
        head[88] = a.knobs.bits();
        head[89] = a.single_product as u8;
        head
    }

    /// The file image (what `save` writes). For an index in memory (the fuzzing entry point);
    /// a mapped index's image is read from its map unchecked: save it with `save`, which checks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.image().parts().concat()
    }

    /// Writes the index atomically: a temporary file in the same directory, fsync, rename over
    /// `path`, fsync of the directory. A crash leaves either the old file or the new one. A
    /// mapped index whose file changed before or while it was written fails (`Error::File`)
    /// and leaves `path` as it was.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.check_file()?;
        atomic_write(path, &self.image().parts(), || self.check_file())
    }
}

/// The directions section and the end of the checksummed metadata of a valid image (tests).
#[cfg(test)]
pub(crate) fn sections_of(bytes: &[u8]) -> (Range<usize>, usize) {
    let l = parse(bytes).expect("a valid image");
    (l.at.directions, l.at.vectors.start)
}
