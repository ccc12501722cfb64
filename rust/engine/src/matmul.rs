//! Register-blocked matrix products for batched scoring: `c[i][j] = a_i . b_j` for `m` query
//! rows `a` against `n` stored rows `b`, `k` values each (both row-major, `k` contiguous).
//!
//! The products run on packed panels (BLIS-style): the queries are packed once per batch into
//! panels of `MR` rows ([`PackedQueries`]), each block of stored rows is packed `k`-major into
//! panels of `NR` rows, and a micro-kernel keeps an `MR x NR` tile of scores in registers while
//! it walks `k`. Stored f16 rows are converted and i8 rows dequantized while packing, so no f32
//! copy of a block is kept.
//!
//! Three products ([`Product`]):
//! - f32: AVX-512 12x32, AVX2 6x16 (FMA), any other level one dot product per pair.
//! - i8 (AVX512-VNNI `vpdpbusd`): queries are quantized per row to i8 and offset by +128 to u8
//!   (the instruction multiplies u8 by i8); the offset is removed exactly with a per-row
//!   correction `128 * sum(b_j)`. The integer dot products are exact.
//! - bf16 (AVX512-BF16 `vdpbf16ps`): both sides rounded to bf16 (nearest even) while packing,
//!   products summed in f32.
//!
//! The low-precision products are scans: callers re-score their candidates exactly (see
//! `search`). Each product has a portable reference with the same arithmetic, which is the
//! path where the instructions are absent and what the tests compare every compiled path with.

// The micro-kernels are x86-64 only: elsewhere every product runs its reference loop.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use crate::kernels::{self, Level};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Stored rows a product reads.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    /// Converted to f32 (or bf16) while packing.
    F16(&'a [f16]),
    /// Row `r` is `scales[r] * data[r]`; the f32 and bf16 products dequantize while packing.
    I8 {
        data: &'a [i8],
        scales: &'a [f32],
    },
}

impl Src<'_> {
    fn rows(&self, k: usize) -> usize {
        match self {
            Src::F32(v) => v.len() / k.max(1),
            Src::F16(v) => v.len() / k.max(1),
            Src::I8 { scales, .. } => scales.len(),
        }
    }

    /// Values `[p0, p0 + out.len())` of row `r` as f32.
    #[inline]
    fn read(&self, r: usize, k: usize, p0: usize, out: &mut [f32]) {
        let s = r * k + p0;
        match self {
            Src::F32(v) => out.copy_from_slice(&v[s..s + out.len()]),
            Src::F16(v) => v[s..s + out.len()].convert_to_f32_slice(out),
            Src::I8 { data, scales } => {
                let (sc, len) = (scales[r], out.len());
                for (o, &x) in out.iter_mut().zip(&data[s..s + len]) {
                    *o = x as f32 * sc;
                }
            }
        }
    }
}

/// Which product a batch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Product {
    F32,
    Bf16,
    I8,
}

/// Packing buffers for stored rows, reused across calls (one per task).
#[derive(Default)]
pub struct Workspace {
    b: Vec<u8>,
    ints: Vec<i32>,
    row: Vec<f32>,
    corr: Vec<i32>,
    /// Rows padded to the lane step, on their way into the panels.
    stage: Vec<u8>,
}

/// A 64-byte aligned `&mut [T]` of `len` elements inside `buf` (contents unspecified).
fn aligned<T: bytemuck::Pod>(buf: &mut Vec<u8>, len: usize) -> &mut [T] {
    let bytes = len * std::mem::size_of::<T>();
    if buf.len() < bytes + 64 {
        buf.resize(bytes + 64, 0);
    }
    let off = buf.as_ptr().align_offset(64);
    bytemuck::cast_slice_mut(&mut buf[off..off + bytes])
}

/// Set bit `j % 32` of `masks[i * n.div_ceil(32) + j / 32]` where `c[i * ldc + j] >= thr[j]`
/// (the marks the i8 micro-kernel makes as it stores).
fn mark_above(c: &[f32], ldc: usize, m: usize, n: usize, above: Option<(&[f32], &mut [u32])>) {
    let Some((thr, masks)) = above else {
        return;
    };
    let words = n.div_ceil(32);
    for i in 0..m {
        for (j, (&v, &t)) in c[i * ldc..i * ldc + n].iter().zip(thr).enumerate() {
            if v >= t {
                masks[i * words + j / 32] |= 1 << (j % 32);
            }
        }
    }
}

/// Whether the i8 product runs on VNNI at this level (else it runs the reference loop).
pub fn has_i8_product(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level == Level::Avx512 && kernels::has_avx512_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

/// Whether the bf16 product runs on AVX512-BF16 at this level.
pub fn has_bf16_product(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level == Level::Avx512 && kernels::has_avx512_bf16()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

/// Largest `k` for which the i8 product's 32-bit sums cannot overflow (|u8 * i8| <= 32,640).
pub const I8_MAX_K: usize = 65_536;

// ---------------------------------------------------------------------------------------------
// Blocking.

/// Shape of one micro-kernel: an `MR x NR` tile, `G` values of `k` per lane step, `KC` values
/// of `k` per packed slice, `NC` stored rows per packed block.
#[derive(Clone, Copy, Debug)]
struct Shape {
    mr: usize,
    nr: usize,
    g: usize,
    kc: usize,
    nc: usize,
}

impl Shape {
    /// The micro-kernel for a product at a level, or None for the reference loop.
    fn of(product: Product, level: Level) -> Option<Shape> {
        let s = |mr, nr, g, kc| Shape {
            mr,
            nr,
            g,
            kc,
            nc: 512,
        };
        match (product, level) {
            #[cfg(target_arch = "x86_64")]
            (Product::F32, Level::Avx512) => Some(s(12, 32, 1, 256)),
            #[cfg(target_arch = "x86_64")]
            (Product::F32, Level::Avx2) => Some(s(6, 16, 1, 256)),
            (Product::Bf16, l) if has_bf16_product(l) => Some(s(12, 32, 2, 512)),
            (Product::I8, l) if has_i8_product(l) => Some(s(12, 32, 4, 1024)),
            _ => None,
        }
    }

    /// Values of `k` a packed slice starting at `p0` holds (its length rounded up to `g`).
    fn padded(&self, k: usize, p0: usize) -> usize {
        self.kc.min(k - p0).div_ceil(self.g) * self.g
    }
}

/// One micro-kernel call: for queries `i0..i0 + mr_valid` and rows `j0..j0 + nr_valid`, the
/// packed panels of one `k` slice start at `a` and `b`.
struct Tile<TA, TB> {
    a: *const TA,
    b: *const TB,
    /// Lane steps in the slice.
    steps: usize,
    i0: usize,
    j0: usize,
    mr_valid: usize,
    nr_valid: usize,
    first: bool,
    last: bool,
}

/// Pack rows `r0..r0 + count` (missing ones are zero) into panels of `w` rows: panel-major,
/// then lane step, then row within the panel, then `g` values. `read_row` fills the row's
/// values of the slice (`kc` of them); the padding up to `steps * g` stays zero.
#[allow(clippy::too_many_arguments)]
fn pack<T: Copy + Default>(
    dst: &mut [T],
    r0: usize,
    count: usize,
    w: usize,
    g: usize,
    steps: usize,
    mut read_row: impl FnMut(usize, &mut [T]),
    tmp: &mut Vec<T>,
) {
    let kcp = steps * g;
    tmp.clear();
    tmp.resize(kcp, T::default());
    for panel in 0..count.div_ceil(w) {
        let base = &mut dst[panel * w * kcp..(panel + 1) * w * kcp];
        for lane in 0..w {
            if panel * w + lane < count {
                read_row(r0 + panel * w + lane, tmp);
            } else {
                tmp.iter_mut().for_each(|v| *v = T::default());
            }
            match g {
                1 => scatter::<T, 1>(base, tmp, w, lane),
                2 => scatter::<T, 2>(base, tmp, w, lane),
                4 => scatter::<T, 4>(base, tmp, w, lane),
                _ => unreachable!("lane steps hold 1, 2 or 4 values"),
            }
        }
    }
}

/// Write one row's lane steps (`G` values each) into its lane of a panel `w` rows wide.
#[inline(always)]
fn scatter<T: Copy, const G: usize>(panel: &mut [T], row: &[T], w: usize, lane: usize) {
    for (s, v) in row.chunks_exact(G).enumerate() {
        let d = (s * w + lane) * G;
        panel[d..d + G].copy_from_slice(v);
    }
}

/// Pack f32 rows `r0..r0 + count` of `src` (row stride `k`), values `[p0, p0 + kc)`, into
/// panels of `w` rows (g = 1), transposing 8 x 8 blocks with AVX where the CPU has it.
#[allow(clippy::too_many_arguments)]
fn pack_f32_rows(
    level: Level,
    dst: &mut [f32],
    src: &[f32],
    k: usize,
    r0: usize,
    count: usize,
    w: usize,
    p0: usize,
    kc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if level != Level::Scalar && w.is_multiple_of(8) {
        assert!(dst.len() >= count.div_ceil(w) * w * kc && src.len() >= (r0 + count) * k);
        // SAFETY: AVX2 is implied by any non-scalar x86 level (checked by available_levels);
        // the assert above bounds every read (rows r0..r0+count, values p0..p0+kc <= k) and
        // every write (count.div_ceil(w) panels of w * kc values).
        unsafe { x86::pack_f32_avx(dst.as_mut_ptr(), src.as_ptr(), k, r0, count, w, p0, kc) };
        return;
    }
    let _ = level;
    for panel in 0..count.div_ceil(w) {
        let base = &mut dst[panel * w * kc..(panel + 1) * w * kc];
        for lane in 0..w {
            let i = panel * w + lane;
            if i < count {
                let row = &src[(r0 + i) * k + p0..(r0 + i) * k + p0 + kc];
                scatter::<f32, 1>(base, row, w, lane);
            } else {
                (0..kc).for_each(|s| base[s * w + lane] = 0.0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packed queries.

/// Queries packed once for every product of a batch (all `k` slices), with their i8 scales.
pub struct PackedQueries {
    product: Product,
    level: Level,
    shape: Option<Shape>,
    m: usize,
    k: usize,
    buf: Vec<u8>,
    /// The queries as given, or quantized to i8 (`Product::I8`): kept only for the reference
    /// loop (no micro-kernel at this level).
    raw: Vec<f32>,
    qa: Vec<i8>,
    /// Per-query scales of the i8 quantization.
    scales: Vec<f32>,
}

impl PackedQueries {
    /// Pack `m` queries of `k` values (`a`, row-major) for `product` at `level`.
    pub fn new(product: Product, level: Level, m: usize, k: usize, a: &[f32]) -> PackedQueries {
        assert!(a.len() >= m * k, "queries shorter than m x k");
        if product == Product::I8 {
            assert!(
                k <= I8_MAX_K,
                "the i8 product takes at most {I8_MAX_K} values per row"
            );
        }
        let shape = if k == 0 {
            None
        } else {
            Shape::of(product, level)
        };
        let mut p = PackedQueries {
            product,
            level,
            shape,
            m,
            k,
            buf: Vec::new(),
            raw: Vec::new(),
            qa: Vec::new(),
            scales: Vec::new(),
        };
        if product == Product::I8 {
            p.qa.resize(m * k, 0);
            p.scales = (0..m)
                .map(|i| quantize_query_i8(&a[i * k..(i + 1) * k], &mut p.qa[i * k..(i + 1) * k]))
                .collect();
        }
        let Some(shape) = shape else {
            p.raw = a[..m * k].to_vec();
            return p;
        };
        let panels = m.div_ceil(shape.mr);
        // Slice p0 starts at panels * mr * p0; the last one holds its values rounded up to g.
        let last = (k - 1) / shape.kc * shape.kc;
        let total = panels * shape.mr * (last + shape.padded(k, last));
        match product {
            Product::F32 => {
                let dst: &mut [f32] = aligned(&mut p.buf, total);
                let mut p0 = 0;
                while p0 < k {
                    let kc = shape.kc.min(k - p0);
                    let off = panels * shape.mr * p0;
                    pack_f32_rows(level, &mut dst[off..], a, k, 0, m, shape.mr, p0, kc);
                    p0 += kc;
                }
            }
            Product::Bf16 => {
                let dst: &mut [u16] = aligned(&mut p.buf, total);
                pack_slices(shape, m, k, dst, |r, p0, out| {
                    for (o, &v) in out.iter_mut().zip(&a[r * k + p0..]) {
                        *o = bf16::from_f32(v).to_bits();
                    }
                });
            }
            Product::I8 => {
                let qa = &p.qa;
                let dst: &mut [u8] = aligned(&mut p.buf, total);
                pack_slices(shape, m, k, dst, |r, p0, out| {
                    for (o, &v) in out.iter_mut().zip(&qa[r * k + p0..]) {
                        *o = (v as i16 + 128) as u8;
                    }
                });
                // Only the reference loop reads the unpacked copy: free it (IVF keeps its
                // packed lists, and this copy would double them).
                p.qa = Vec::new();
            }
        }
        p
    }

    pub fn len(&self) -> usize {
        self.m
    }

    pub fn is_empty(&self) -> bool {
        self.m == 0
    }

    /// Bytes held on the heap (IVF keeps one per packed list).
    pub fn heap_bytes(&self) -> usize {
        self.buf.capacity()
            + 4 * self.raw.capacity()
            + self.qa.capacity()
            + 4 * self.scales.capacity()
    }

    /// The packed slice starting at `p0`.
    fn slice<T: bytemuck::Pod>(&self, p0: usize) -> *const T {
        let shape = self.shape.expect("packed");
        let off = self.buf.as_ptr().align_offset(64);
        let all: &[T] = bytemuck::cast_slice(&self.buf[off..]);
        all[self.m.div_ceil(shape.mr) * shape.mr * p0..].as_ptr()
    }

    /// `c[i * ldc + j] = a_i . b_j` for every packed query `i` and stored row `j < n`.
    pub fn scores(&self, b: Src<'_>, n: usize, c: &mut [f32], ldc: usize, ws: &mut Workspace) {
        self.product(b, n, c, ldc, None, ws);
    }

    /// [`Self::scores`], keeping only the scores at or above their row's threshold: bit
    /// `j % 32` of `masks[i * n.div_ceil(32) + j / 32]` is set iff `a_i . b_j >= thr[j]`, and
    /// `c[i * ldc + j]` holds the score where it is (elsewhere it is unspecified). The i8
    /// micro-kernel compares as it stores, so a caller looking for the few scores above a
    /// floor reads a bit per score, not the whole matrix.
    #[allow(clippy::too_many_arguments)]
    pub fn scores_above(
        &self,
        b: Src<'_>,
        n: usize,
        thr: &[f32],
        c: &mut [f32],
        ldc: usize,
        masks: &mut [u32],
        ws: &mut Workspace,
    ) {
        let words = n.div_ceil(32);
        assert!(thr.len() >= n, "fewer thresholds than rows");
        assert!(masks.len() >= self.m * words, "masks too short");
        masks[..self.m * words].fill(0);
        self.product(b, n, c, ldc, Some((thr, masks)), ws);
    }

    /// The product behind [`Self::scores`] and [`Self::scores_above`]: the i8 micro-kernel
    /// marks the scores reaching `above`'s thresholds itself; every other path marks them
    /// after computing the scores.
    fn product(
        &self,
        b: Src<'_>,
        n: usize,
        c: &mut [f32],
        ldc: usize,
        above: Option<(&[f32], &mut [u32])>,
        ws: &mut Workspace,
    ) {
        let (m, k) = (self.m, self.k);
        assert!(b.rows(k) >= n || k == 0, "fewer than n stored rows");
        assert!(
            ldc >= n && (m == 0 || c.len() >= (m - 1) * ldc + n),
            "c too short"
        );
        if m == 0 || n == 0 {
            return;
        }
        let Some(shape) = self.shape else {
            self.reference(b, n, c, ldc, ws);
            return mark_above(c, ldc, m, n, above);
        };
        match self.product {
            Product::F32 => self.run_f32(shape, b, n, c, ldc, ws),
            Product::Bf16 => self.run_bf16(shape, b, n, c, ldc, ws),
            Product::I8 => return self.run_i8(shape, b, n, c, ldc, above, ws),
        }
        mark_above(c, ldc, m, n, above);
    }

    /// `c[i * ldc + j] = a_i . b_(j0 + j)` for rows `j0..j0 + n` of rows packed once (`j0` a
    /// multiple of 32, the panel width); the product must be the one both were packed for.
    pub fn scores_packed(
        &self,
        b: &PackedRows,
        j0: usize,
        n: usize,
        c: &mut [f32],
        ldc: usize,
        ws: &mut Workspace,
    ) {
        let (m, k) = (self.m, self.k);
        assert!(
            self.product == b.product && k == b.k,
            "rows packed for another product"
        );
        assert!(
            j0.is_multiple_of(b.shape.nr) && j0 + n <= b.n,
            "rows out of the packed range"
        );
        assert!(
            ldc >= n && (m == 0 || c.len() >= (m - 1) * ldc + n),
            "c too short"
        );
        if m == 0 || n == 0 {
            return;
        }
        let shape = self.shape.expect("a packed product has a micro-kernel");
        #[cfg(target_arch = "x86_64")]
        {
            let cp = c.as_mut_ptr();
            match self.product {
                Product::Bf16 => self.drive_packed::<u16, u16>(shape, b, j0, n, |t| {
                    // SAFETY: as in `run_bf16`; the panel pointers lie inside `b`'s buffer.
                    unsafe { x86::bf16_12x32(t, cp, ldc) }
                }),
                Product::I8 => {
                    let multi = k > shape.kc;
                    if multi {
                        ws.ints.resize(m * n, 0);
                    }
                    let out = x86::I8Out {
                        c: cp,
                        ldc,
                        ints: ws.ints.as_mut_ptr(),
                        ldi: n,
                        qscale: self.scales.as_ptr(),
                        // SAFETY: j0 + n <= b.n (asserted), inside both arrays.
                        bscale: unsafe { b.scales.as_ptr().add(j0) },
                        corr: unsafe { b.corr.as_ptr().add(j0) },
                        thr: std::ptr::null(),
                        mask: std::ptr::null_mut(),
                        ldm: 0,
                    };
                    self.drive_packed::<u8, i8>(shape, b, j0, n, |t| {
                        // SAFETY: as in `run_i8`; tile columns are relative to j0, as are
                        // `out`'s scale and correction pointers.
                        unsafe { x86::i8_12x32(t, &out, multi) }
                    })
                }
                Product::F32 => unreachable!("f32 rows are packed per block"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, c, ws);
            unreachable!("no packed product on this architecture");
        }
    }

    /// [`Self::drive`] over rows packed once: no packing, the same blocking.
    fn drive_packed<TA: bytemuck::Pod, TB: bytemuck::Pod>(
        &self,
        shape: Shape,
        b: &PackedRows,
        j0: usize,
        n: usize,
        mut kernel: impl FnMut(&Tile<TA, TB>),
    ) {
        let (m, k) = (self.m, self.k);
        let Shape { mr, nr, kc, nc, .. } = shape;
        let a_panels = m.div_ceil(mr);
        let mut p0 = 0;
        while p0 < k {
            let kcur = kc.min(k - p0);
            let kcp = shape.padded(k, p0);
            let apack: *const TA = self.slice(p0);
            let mut jb = 0;
            while jb < n {
                let ncur = nc.min(n - jb);
                for ip in 0..a_panels {
                    // SAFETY: the packed queries hold a_panels panels of mr * kcp values.
                    let a = unsafe { apack.add(ip * mr * kcp) };
                    for jp in 0..ncur.div_ceil(nr) {
                        let col = jb + jp * nr;
                        kernel(&Tile {
                            a,
                            b: b.panel::<TB>((j0 + col) / nr, p0),
                            steps: kcp / shape.g,
                            i0: ip * mr,
                            j0: col,
                            mr_valid: mr.min(m - ip * mr),
                            nr_valid: nr.min(n - col),
                            first: p0 == 0,
                            last: p0 + kcur == k,
                        });
                    }
                }
                jb += ncur;
            }
            p0 += kcur;
        }
    }

    /// The portable path and the tests' reference: the same arithmetic, one pair at a time.
    fn reference(&self, b: Src<'_>, n: usize, c: &mut [f32], ldc: usize, ws: &mut Workspace) {
        let (m, k) = (self.m, self.k);
        ws.row.resize(k, 0.0);
        match self.product {
            Product::F32 => {
                for j in 0..n {
                    b.read(j, k, 0, &mut ws.row);
                    for i in 0..m {
                        let q = &self.raw[i * k..(i + 1) * k];
                        c[i * ldc + j] = kernels::dot_f32_with(self.level, q, &ws.row);
                    }
                }
            }
            Product::Bf16 => {
                let round = |v: f32| bf16::from_f32(v).to_f32();
                for j in 0..n {
                    b.read(j, k, 0, &mut ws.row);
                    ws.row.iter_mut().for_each(|v| *v = round(*v));
                    for i in 0..m {
                        let q = &self.raw[i * k..(i + 1) * k];
                        c[i * ldc + j] = q.iter().zip(&ws.row).map(|(&x, &y)| round(x) * y).sum();
                    }
                }
            }
            Product::I8 => {
                let Src::I8 { data, scales } = b else {
                    panic!("the i8 product reads i8 rows");
                };
                for i in 0..m {
                    let q = &self.qa[i * k..(i + 1) * k];
                    for j in 0..n {
                        let x = &data[j * k..(j + 1) * k];
                        let dot: i32 = q.iter().zip(x).map(|(&p, &v)| p as i32 * v as i32).sum();
                        c[i * ldc + j] = dot as f32 * (self.scales[i] * scales[j]);
                    }
                }
            }
        }
    }

    /// Walk the blocks: for each `k` slice and each block of stored rows, pack the rows, then
    /// run the micro-kernel over every (query panel, row panel) pair.
    fn drive<TA: bytemuck::Pod, TB: bytemuck::Pod + Default>(
        &self,
        shape: Shape,
        n: usize,
        bbuf: &mut Vec<u8>,
        mut pack_b: impl FnMut(&mut [TB], usize, usize, usize, usize, usize),
        mut kernel: impl FnMut(&Tile<TA, TB>),
    ) {
        let (m, k) = (self.m, self.k);
        let Shape { mr, nr, g, kc, nc } = shape;
        let a_panels = m.div_ceil(mr);
        let mut p0 = 0;
        while p0 < k {
            let kcur = kc.min(k - p0);
            let kcp = shape.padded(k, p0);
            let apack: *const TA = self.slice(p0);
            let mut j0 = 0;
            while j0 < n {
                let ncur = nc.min(n - j0);
                let b_panels = ncur.div_ceil(nr);
                let bpack: &mut [TB] = aligned(bbuf, b_panels * nr * kcp);
                pack_b(bpack, j0, ncur, p0, kcur, kcp);
                for ip in 0..a_panels {
                    // SAFETY (pointer arithmetic): the packed queries hold a_panels panels of
                    // mr * kcp values for this slice.
                    let a = unsafe { apack.add(ip * mr * kcp) };
                    for jp in 0..b_panels {
                        kernel(&Tile {
                            a,
                            b: bpack[jp * nr * kcp..].as_ptr(),
                            steps: kcp / g,
                            i0: ip * mr,
                            j0: j0 + jp * nr,
                            mr_valid: mr.min(m - ip * mr),
                            nr_valid: nr.min(ncur - jp * nr),
                            first: p0 == 0,
                            last: p0 + kcur == k,
                        });
                    }
                }
                j0 += ncur;
            }
            p0 += kcur;
        }
    }

    fn run_f32(
        &self,
        shape: Shape,
        b: Src<'_>,
        n: usize,
        c: &mut [f32],
        ldc: usize,
        ws: &mut Workspace,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let (k, level) = (self.k, self.level);
            let kern: F32Kernel = if shape.mr == 12 {
                x86::f32_12x32
            } else {
                x86::f32_6x16
            };
            let cp = c.as_mut_ptr();
            let Workspace { b: bbuf, row, .. } = ws;
            let mut stage = std::mem::take(row);
            self.drive::<f32, f32>(
                shape,
                n,
                bbuf,
                |dst, j0, count, p0, kc, _kcp| match b {
                    Src::F32(v) => pack_f32_rows(level, dst, v, k, j0, count, shape.nr, p0, kc),
                    // f16 / i8 rows: converted to f32 rows first, then the same transposition.
                    _ => {
                        stage.resize(count * kc, 0.0);
                        for (i, out) in stage.chunks_exact_mut(kc).enumerate() {
                            b.read(j0 + i, k, p0, out);
                        }
                        pack_f32_rows(level, dst, &stage, kc, 0, count, shape.nr, 0, kc)
                    }
                },
                |t| {
                    // SAFETY: `kern` was chosen for a level that `available_levels` checked against
                    // the CPU. The panels hold `t.steps` lane steps of MR / NR values; the tile's
                    // rows i0..i0 + mr_valid and columns j0..j0 + nr_valid lie inside `c` (asserted
                    // in `scores`), and the kernel touches only those.
                    unsafe {
                        kern(
                            t.steps,
                            t.a,
                            t.b,
                            cp.add(t.i0 * ldc + t.j0),
                            ldc,
                            t.mr_valid,
                            t.nr_valid,
                            !t.first,
                        )
                    }
                },
            );
            *row = stage;
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, b, n, c, ldc, ws);
            unreachable!("no f32 micro-kernel on this architecture");
        }
    }

    fn run_bf16(
        &self,
        shape: Shape,
        b: Src<'_>,
        n: usize,
        c: &mut [f32],
        ldc: usize,
        ws: &mut Workspace,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let (k, level) = (self.k, self.level);
            let cp = c.as_mut_ptr();
            let Workspace {
                b: bbuf,
                row,
                stage,
                ..
            } = ws;
            self.drive::<u16, u16>(
                shape,
                n,
                bbuf,
                |dst, j0, count, p0, kc, kcp| {
                    let staged: &mut [u16] = aligned(stage, count * kcp);
                    for (i, out) in staged.chunks_exact_mut(kcp).enumerate() {
                        read_bf16(b, level, j0 + i, k, p0, &mut out[..kc], row);
                        out[kc..].fill(0);
                    }
                    pack_words(level, dst, staged, count, shape.nr, kcp / 2);
                },
                |t| {
                    // SAFETY: AVX512-BF16 was checked by `Shape::of`; the panels hold `t.steps`
                    // steps of 12 x 2 / 32 x 2 values and the kernel writes only the valid rows
                    // and columns of its tile inside c (asserted in `scores`).
                    unsafe { x86::bf16_12x32(t, cp, ldc) }
                },
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, b, n, c, ldc, ws);
            unreachable!("no bf16 micro-kernel on this architecture");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_i8(
        &self,
        shape: Shape,
        b: Src<'_>,
        n: usize,
        c: &mut [f32],
        ldc: usize,
        above: Option<(&[f32], &mut [u32])>,
        ws: &mut Workspace,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let Src::I8 { data, scales } = b else {
                panic!("the i8 product reads i8 rows");
            };
            let (m, k) = (self.m, self.k);
            ws.corr.clear();
            // The queries are offset by 128 (u8): each row's correction is 128 x its sum.
            ws.corr.extend(
                data.chunks_exact(k)
                    .take(n)
                    // SAFETY: VNNI was checked by `Shape::of` (this is its only caller).
                    .map(|x| 128 * unsafe { x86::sum_i8(x) }),
            );
            let multi = k > shape.kc;
            if multi {
                ws.ints.resize(m * n, 0);
            }
            let Workspace {
                b: bbuf,
                ints,
                corr,
                stage,
                ..
            } = ws;
            let (thr, mask) = match above {
                Some((thr, mask)) => (thr.as_ptr(), mask.as_mut_ptr()),
                None => (std::ptr::null(), std::ptr::null_mut()),
            };
            let out = x86::I8Out {
                c: c.as_mut_ptr(),
                ldc,
                ints: ints.as_mut_ptr(),
                ldi: n,
                qscale: self.scales.as_ptr(),
                bscale: scales.as_ptr(),
                corr: corr.as_ptr(),
                thr,
                mask,
                ldm: n.div_ceil(32),
            };
            let level = self.level;
            // Rows whose slices fill whole lane steps pack straight from `data` (as 4-byte
            // words), without a staged copy.
            let words: Option<&[f32]> = (k % 4 == 0)
                .then(|| bytemuck::try_cast_slice(&data[..n * k]).ok())
                .flatten();
            self.drive::<u8, i8>(
                shape,
                n,
                bbuf,
                |dst, j0, count, p0, kc, kcp| {
                    if let (Some(src), true) = (words, kc == kcp) {
                        let dst: &mut [f32] = bytemuck::cast_slice_mut(dst);
                        let (stride, w) = (k / 4, shape.nr);
                        pack_f32_rows(level, dst, src, stride, j0, count, w, p0 / 4, kc / 4);
                        return;
                    }
                    let staged: &mut [i8] = aligned(stage, count * kcp);
                    for (i, out) in staged.chunks_exact_mut(kcp).enumerate() {
                        let r = j0 + i;
                        out[..kc].copy_from_slice(&data[r * k + p0..r * k + p0 + kc]);
                        out[kc..].fill(0);
                    }
                    pack_words(level, dst, staged, count, shape.nr, kcp / 4);
                },
                |t| {
                    // SAFETY: VNNI was checked by `Shape::of`; the panels hold `t.steps` steps
                    // of 12 x 4 / 32 x 4 bytes; the kernel forms pointers only for the tile's
                    // valid rows and columns, inside c (m x ldc, asserted in `scores`), ints
                    // (m x n, allocated when k spans several slices), qscale (m) and bscale /
                    // corr (n).
                    unsafe { x86::i8_12x32(t, &out, multi) }
                },
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, b, n, c, ldc, above, ws);
            unreachable!("no i8 micro-kernel on this architecture");
        }
    }
}

/// Values `[p0, p0 + out.len())` of row `r` of `src` as bf16 bits (rounded to nearest even):
/// 16 lanes at a time where the bf16 product runs, a plain loop elsewhere.
fn read_bf16(
    src: Src<'_>,
    level: Level,
    r: usize,
    k: usize,
    p0: usize,
    out: &mut [u16],
    tmp: &mut Vec<f32>,
) {
    let s = r * k + p0;
    #[cfg(target_arch = "x86_64")]
    if has_bf16_product(level) {
        // SAFETY: the bf16 product needs AVX-512F, checked by `has_bf16_product`; the slices
        // have out.len() values.
        match src {
            Src::F32(v) => return unsafe { x86::f32_to_bf16(&v[s..s + out.len()], out) },
            Src::F16(v) => return unsafe { x86::f16_to_bf16(&v[s..s + out.len()], out) },
            Src::I8 { .. } => {
                tmp.resize(out.len(), 0.0);
                src.read(r, k, p0, tmp);
                return unsafe { x86::f32_to_bf16(tmp, out) };
            }
        }
    }
    let _ = level;
    tmp.resize(out.len(), 0.0);
    src.read(r, k, p0, tmp);
    for (o, &v) in out.iter_mut().zip(tmp.iter()) {
        *o = bf16_bits(v);
    }
}

/// bf16 bits of `v`, rounded to nearest even (NaN stays NaN); a plain loop of these vectorizes.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// Pack staged rows (`count` rows of `words` 4-byte lane steps each, contiguous) into panels of
/// `w` rows: a transposition of 4-byte words, the f32 one on their bits.
fn pack_words<T: bytemuck::Pod>(
    level: Level,
    dst: &mut [T],
    staged: &[T],
    count: usize,
    w: usize,
    words: usize,
) {
    let dst: &mut [f32] = bytemuck::cast_slice_mut(dst);
    let src: &[f32] = bytemuck::cast_slice(staged);
    pack_f32_rows(level, dst, src, words, 0, count, w, 0, words);
}

/// Pack every `k` slice of `m` rows into `dst` (queries: one `pack` per slice).
fn pack_slices<T: Copy + Default>(
    shape: Shape,
    m: usize,
    k: usize,
    dst: &mut [T],
    mut read: impl FnMut(usize, usize, &mut [T]),
) {
    let panels = m.div_ceil(shape.mr);
    let mut tmp = Vec::new();
    let mut p0 = 0;
    while p0 < k {
        let kc = shape.kc.min(k - p0);
        let kcp = shape.padded(k, p0);
        let off = panels * shape.mr * p0;
        pack(
            &mut dst[off..],
            0,
            m,
            shape.mr,
            shape.g,
            kcp / shape.g,
            |r, out| read(r, p0, &mut out[..kc]),
            &mut tmp,
        );
        p0 += kc;
    }
}

// ---------------------------------------------------------------------------------------------
// Stored rows packed once.

/// Stored rows packed once, for the whole scan, into the panels a low-precision product reads
/// (i8 rows quantized per row, or bf16), so that a scan running many query blocks over the
/// same rows (mining) packs each row once instead of once per block.
///
/// Layout: panel-major (`NR` rows per panel, the last one zero-padded), within a panel the
/// `k` slices one after the other, each as [`pack`] writes it.
pub struct PackedRows {
    product: Product,
    shape: Shape,
    n: usize,
    k: usize,
    /// Padded values of `k` a panel holds per row (all slices).
    kp: usize,
    buf: Vec<u8>,
    /// i8: each row's scale, and `128 * sum(row)` (removes the queries' u8 offset exactly).
    scales: Vec<f32>,
    corr: Vec<i32>,
}

impl PackedRows {
    /// The `n` rows of `src` (`k` values each) for `product` at `level`; None where the level
    /// has no micro-kernel for it (or for f32, whose per-block packing costs little).
    pub fn new(product: Product, level: Level, src: Src<'_>, n: usize, k: usize) -> Option<Self> {
        use rayon::prelude::*;
        if product == Product::F32 || k == 0 || (product == Product::I8 && k > I8_MAX_K) {
            return None;
        }
        let shape = Shape::of(product, level)?;
        assert!(src.rows(k) >= n, "fewer than n stored rows");
        let full = k / shape.kc * shape.kc;
        let kp = full + (k - full).div_ceil(shape.g) * shape.g;
        let panel_len = shape.nr * kp;
        let panels = n.div_ceil(shape.nr);
        let mut p = PackedRows {
            product,
            shape,
            n,
            k,
            kp,
            buf: Vec::new(),
            scales: Vec::new(),
            corr: Vec::new(),
        };
        let mut buf = std::mem::take(&mut p.buf);
        match product {
            Product::Bf16 => {
                let dst: &mut [u16] = aligned(&mut buf, panels * panel_len);
                dst.par_chunks_mut(panel_len).enumerate().for_each_init(
                    Vec::new,
                    |row, (panel, out)| {
                        p.pack_panel(out, panel, |r, vals: &mut [u16]| {
                            read_bf16(src, level, r, k, 0, vals, row);
                        });
                    },
                );
            }
            Product::I8 => {
                let mut scales = vec![0f32; panels * shape.nr];
                let mut corr = vec![0i32; panels * shape.nr];
                let dst: &mut [i8] = aligned(&mut buf, panels * panel_len);
                dst.par_chunks_mut(panel_len)
                    .zip(scales.par_chunks_mut(shape.nr))
                    .zip(corr.par_chunks_mut(shape.nr))
                    .enumerate()
                    .for_each_init(
                        || (Vec::new(), Vec::new()),
                        |(row, quant), (panel, ((out, sc), co))| {
                            p.pack_panel(out, panel, |r, vals: &mut [i8]| {
                                let lane = r - panel * shape.nr;
                                sc[lane] = match src {
                                    Src::I8 { data, scales } => {
                                        vals.copy_from_slice(&data[r * k..(r + 1) * k]);
                                        scales[r]
                                    }
                                    _ => {
                                        row.resize(k, 0.0);
                                        quant.resize(k, 0i8);
                                        src.read(r, k, 0, row);
                                        let scale = kernels::quantize_row_i8(row, quant);
                                        vals.copy_from_slice(quant);
                                        scale
                                    }
                                };
                                co[lane] = 128 * vals.iter().map(|&v| v as i32).sum::<i32>();
                            });
                        },
                    );
                p.scales = scales;
                p.corr = corr;
            }
            Product::F32 => unreachable!("f32 rows are packed per block"),
        }
        p.buf = buf;
        Some(p)
    }

    /// Pack panel `panel` (rows `panel * NR..`) into `out`: `row(r, values)` fills row `r`'s
    /// `k` values; rows past `n` and the padding stay zero.
    fn pack_panel<T: Copy + Default>(
        &self,
        out: &mut [T],
        panel: usize,
        mut row: impl FnMut(usize, &mut [T]),
    ) {
        let Shape { nr, g, kc, .. } = self.shape;
        let k = self.k;
        out.fill(T::default());
        let mut vals = vec![T::default(); k];
        for lane in 0..nr.min(self.n - panel * nr) {
            row(panel * nr + lane, &mut vals);
            let mut p0 = 0;
            while p0 < k {
                let kcur = kc.min(k - p0);
                let kcp = self.shape.padded(k, p0);
                let slice = &mut out[nr * p0..nr * p0 + nr * kcp];
                for (step, v) in vals[p0..p0 + kcur].chunks(g).enumerate() {
                    let d = (step * nr + lane) * g;
                    slice[d..d + v.len()].copy_from_slice(v);
                }
                p0 += kcur;
            }
        }
    }

    pub fn product(&self) -> Product {
        self.product
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes held (the packed rows and their per-row values).
    pub fn bytes(&self) -> usize {
        self.buf.len() + 4 * (self.scales.len() + self.corr.len())
    }

    /// Panel `panel`'s slice starting at `p0`.
    fn panel<T: bytemuck::Pod>(&self, panel: usize, p0: usize) -> *const T {
        let off = self.buf.as_ptr().align_offset(64);
        let all: &[T] = bytemuck::cast_slice(&self.buf[off..]);
        all[panel * self.shape.nr * self.kp + self.shape.nr * p0..].as_ptr()
    }
}

#[cfg(target_arch = "x86_64")]
type F32Kernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, usize, usize, bool);

/// Quantize a query row to i8 for the i8 product: `q ~= scale * out`, |out| <= 127.
pub fn quantize_query_i8(q: &[f32], out: &mut [i8]) -> f32 {
    kernels::quantize_row_i8(q, out)
}

// ---------------------------------------------------------------------------------------------
// One-call forms (packing the queries each time).

/// `c[i * ldc + j] = a_i . b_j` in f32.
#[allow(clippy::too_many_arguments)]
pub fn scores_f32(
    level: Level,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: Src<'_>,
    c: &mut [f32],
    ldc: usize,
    ws: &mut Workspace,
) {
    PackedQueries::new(Product::F32, level, m, k, a).scores(b, n, c, ldc, ws)
}

/// `c[i * ldc + j] ~= a_i . b_j` with both sides rounded to bf16, products summed in f32.
#[allow(clippy::too_many_arguments)]
pub fn scores_bf16(
    level: Level,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: Src<'_>,
    c: &mut [f32],
    ldc: usize,
    ws: &mut Workspace,
) {
    PackedQueries::new(Product::Bf16, level, m, k, a).scores(b, n, c, ldc, ws)
}

/// `c[i * ldc + j] ~= a_i . (b_scales[j] * b_j)` with the queries quantized per row to i8:
/// `dot as f32 * (query_scale * row_scale)`, the integer dot product exact.
#[allow(clippy::too_many_arguments)]
pub fn scores_i8(
    level: Level,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[i8],
    b_scales: &[f32],
    c: &mut [f32],
    ldc: usize,
    ws: &mut Workspace,
) {
    let src = Src::I8 {
        data: b,
        scales: b_scales,
    };
    PackedQueries::new(Product::I8, level, m, k, a).scores(src, n, c, ldc, ws)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tile;
    use half::f16;
    use std::arch::x86_64::*;

    /// [`super::bf16_bits`] of 16 lanes.
    #[inline(always)]
    unsafe fn bf16_bits16(v: __m512) -> __m256i {
        let b = _mm512_castps_si512(v);
        let hi = _mm512_srli_epi32::<16>(b);
        let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
        let round = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
        let bits = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32::<16>(round), quiet);
        _mm512_cvtepi32_epi16(bits)
    }

    /// `dst[i] = bf16_bits(src[i])`, 16 lanes at a time (the bf16 product's packing).
    ///
    /// # Safety
    /// AVX-512F; `dst` at least as long as `src`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        assert!(dst.len() >= n);
        let mut i = 0;
        while i < n {
            let m = mask16(n - i);
            let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(i));
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut _, m, bf16_bits16(v));
            i += 16;
        }
    }

    /// f16 values to bf16 bits through f32 (exact), 16 lanes at a time.
    ///
    /// # Safety
    /// AVX-512F (F16C's 512-bit form is part of it); `dst` at least as long as `src`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f16_to_bf16(src: &[f16], dst: &mut [u16]) {
        let n = src.len();
        assert!(dst.len() >= n);
        let mut i = 0;
        while i < n {
            let m = mask16(n - i);
            let h = _mm256_maskz_loadu_epi16(m, src.as_ptr().add(i) as *const _);
            let v = _mm512_cvtph_ps(h);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut _, m, bf16_bits16(v));
            i += 16;
        }
    }

    /// The sum of `x`, 64 values per VNNI step (a product with ones).
    ///
    /// # Safety
    /// AVX-512F/BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn sum_i8(x: &[i8]) -> i32 {
        let ones = _mm512_set1_epi8(1);
        let mut acc = _mm512_setzero_si512();
        let mut i = 0;
        while i < x.len() {
            let m = if x.len() - i >= 64 {
                u64::MAX
            } else {
                (1u64 << (x.len() - i)) - 1
            };
            let v = _mm512_maskz_loadu_epi8(m, x.as_ptr().add(i));
            acc = _mm512_dpbusd_epi32(acc, ones, v);
            i += 64;
        }
        _mm512_reduce_add_epi32(acc)
    }

    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// Pack f32 rows into panels of `w` rows (w a multiple of 8): `dst[panel][s][lane] =
    /// src[(r0 + panel * w + lane) * ld + p0 + s]`, zero for rows past `count`.
    ///
    /// # Safety
    /// AVX2. `src` holds rows `r0..r0 + count` of `ld >= p0 + kc` values; `dst` holds
    /// `count.div_ceil(w) * w * kc` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub unsafe fn pack_f32_avx(
        dst: *mut f32,
        src: *const f32,
        ld: usize,
        r0: usize,
        count: usize,
        w: usize,
        p0: usize,
        kc: usize,
    ) {
        let panels = count.div_ceil(w);
        for panel in 0..panels {
            let base = dst.add(panel * w * kc);
            for lane0 in (0..w).step_by(8) {
                let first = panel * w + lane0;
                let full = first + 8 <= count;
                let mut s = 0;
                if full {
                    let rows: [*const f32; 8] =
                        std::array::from_fn(|i| src.add((r0 + first + i) * ld + p0));
                    while s + 8 <= kc {
                        let r: [__m256; 8] =
                            std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(s)));
                        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                        let out = [
                            _mm256_permute2f128_ps::<0x20>(u0, u4),
                            _mm256_permute2f128_ps::<0x20>(u1, u5),
                            _mm256_permute2f128_ps::<0x20>(u2, u6),
                            _mm256_permute2f128_ps::<0x20>(u3, u7),
                            _mm256_permute2f128_ps::<0x31>(u0, u4),
                            _mm256_permute2f128_ps::<0x31>(u1, u5),
                            _mm256_permute2f128_ps::<0x31>(u2, u6),
                            _mm256_permute2f128_ps::<0x31>(u3, u7),
                        ];
                        for (j, v) in out.iter().enumerate() {
                            _mm256_storeu_ps(base.add((s + j) * w + lane0), *v);
                        }
                        s += 8;
                    }
                }
                for lane in lane0..lane0 + 8 {
                    let i = panel * w + lane;
                    for t in s..kc {
                        *base.add(t * w + lane) = if i < count {
                            *src.add((r0 + i) * ld + p0 + t)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F. `a` / `b` hold `steps` lane steps of 12 / 32 floats; `c` rows `0..mr` and
    /// columns `0..nr` (stride `ldc`) are valid for reads and writes.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_12x32(
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        accumulate: bool,
    ) {
        let mut s = [[_mm512_setzero_ps(); 2]; 12];
        let (mut pa, mut pb) = (a, b);
        for _ in 0..steps {
            let b0 = _mm512_loadu_ps(pb);
            let b1 = _mm512_loadu_ps(pb.add(16));
            for (r, sr) in s.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*pa.add(r));
                sr[0] = _mm512_fmadd_ps(av, b0, sr[0]);
                sr[1] = _mm512_fmadd_ps(av, b1, sr[1]);
            }
            pa = pa.add(12);
            pb = pb.add(32);
        }
        let m0 = mask16(nr);
        let m1 = mask16(nr.saturating_sub(16));
        for (r, sr) in s.iter().enumerate() {
            if r < mr {
                let row = c.add(r * ldc);
                let (mut v0, mut v1) = (sr[0], sr[1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA. `a` / `b` hold `steps` lane steps of 6 / 16 floats; `c` rows `0..mr` and
    /// columns `0..nr` (stride `ldc`) are valid for reads and writes.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn f32_6x16(
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        accumulate: bool,
    ) {
        let mut s = [[_mm256_setzero_ps(); 2]; 6];
        let (mut pa, mut pb) = (a, b);
        for _ in 0..steps {
            let b0 = _mm256_loadu_ps(pb);
            let b1 = _mm256_loadu_ps(pb.add(8));
            for (r, sr) in s.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*pa.add(r));
                sr[0] = _mm256_fmadd_ps(av, b0, sr[0]);
                sr[1] = _mm256_fmadd_ps(av, b1, sr[1]);
            }
            pa = pa.add(6);
            pb = pb.add(16);
        }
        if mr == 6 && nr == 16 {
            for (r, sr) in s.iter().enumerate() {
                let row = c.add(r * ldc);
                let (mut v0, mut v1) = (sr[0], sr[1]);
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
                }
                _mm256_storeu_ps(row, v0);
                _mm256_storeu_ps(row.add(8), v1);
            }
        } else {
            let mut tmp = [[0.0f32; 16]; 6];
            for (t, sr) in tmp.iter_mut().zip(&s) {
                _mm256_storeu_ps(t.as_mut_ptr(), sr[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), sr[1]);
            }
            for (r, t) in tmp.iter().enumerate().take(mr) {
                let row = c.add(r * ldc);
                for (j, &v) in t.iter().enumerate().take(nr) {
                    let dst = row.add(j);
                    *dst = if accumulate { *dst + v } else { v };
                }
            }
        }
    }

    /// Where the i8 kernel writes: f32 scores `c` (stride `ldc`) on the last `k` slice, i32
    /// partial sums `ints` (stride `ldi`) on the others; all pointers are the matrices' origins.
    pub struct I8Out {
        pub c: *mut f32,
        pub ldc: usize,
        pub ints: *mut i32,
        pub ldi: usize,
        pub qscale: *const f32,
        pub bscale: *const f32,
        pub corr: *const i32,
        /// Null, or one threshold per column: then only scores at or above their column's
        /// threshold are stored, and `mask[i * ldm + j / 32]` bit `j % 32` says which.
        pub thr: *const f32,
        pub mask: *mut u32,
        pub ldm: usize,
    }

    /// # Safety
    /// AVX-512F/BW and VNNI. The tile's panels hold `steps` lane steps of 12 x 4 u8 / 32 x 4
    /// i8; `out`'s matrices are valid for the tile's rows and columns (`ints` when `multi`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn i8_12x32(t: &Tile<u8, i8>, out: &I8Out, multi: bool) {
        let mut s = [[_mm512_setzero_si512(); 2]; 12];
        let (mut pa, mut pb) = (t.a as *const i32, t.b as *const __m512i);
        for _ in 0..t.steps {
            let b0 = _mm512_loadu_si512(pb);
            let b1 = _mm512_loadu_si512(pb.add(1));
            for (r, sr) in s.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(pa.add(r).read_unaligned());
                sr[0] = _mm512_dpbusd_epi32(sr[0], av, b0);
                sr[1] = _mm512_dpbusd_epi32(sr[1], av, b1);
            }
            pa = pa.add(12);
            pb = pb.add(2);
        }
        let m0 = mask16(t.nr_valid);
        let m1 = mask16(t.nr_valid.saturating_sub(16));
        let j0 = t.j0;
        let corr0 = _mm512_maskz_loadu_epi32(m0, out.corr.add(j0));
        let corr1 = _mm512_maskz_loadu_epi32(m1, out.corr.add(j0 + 16));
        let bs0 = _mm512_maskz_loadu_ps(m0, out.bscale.add(j0));
        let bs1 = _mm512_maskz_loadu_ps(m1, out.bscale.add(j0 + 16));
        let (thr0, thr1) = if out.thr.is_null() {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        } else {
            (
                _mm512_maskz_loadu_ps(m0, out.thr.add(j0)),
                _mm512_maskz_loadu_ps(m1, out.thr.add(j0 + 16)),
            )
        };
        for (r, sr) in s.iter().enumerate() {
            if r < t.mr_valid {
                let i = t.i0 + r;
                let (mut v0, mut v1) = (sr[0], sr[1]);
                if multi {
                    let irow = out.ints.add(i * out.ldi + j0);
                    if !t.first {
                        v0 = _mm512_add_epi32(v0, _mm512_maskz_loadu_epi32(m0, irow));
                        v1 = _mm512_add_epi32(v1, _mm512_maskz_loadu_epi32(m1, irow.add(16)));
                    }
                    if !t.last {
                        _mm512_mask_storeu_epi32(irow, m0, v0);
                        _mm512_mask_storeu_epi32(irow.add(16), m1, v1);
                        continue;
                    }
                }
                let qs = _mm512_set1_ps(*out.qscale.add(i));
                let f0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(v0, corr0));
                let f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(v1, corr1));
                let f0 = _mm512_mul_ps(f0, _mm512_mul_ps(qs, bs0));
                let f1 = _mm512_mul_ps(f1, _mm512_mul_ps(qs, bs1));
                let row = out.c.add(i * out.ldc + j0);
                let (mut s0, mut s1) = (m0, m1);
                if !out.thr.is_null() {
                    s0 = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(m0, f0, thr0);
                    s1 = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(m1, f1, thr1);
                    *out.mask.add(i * out.ldm + j0 / 32) = s0 as u32 | (s1 as u32) << 16;
                }
                _mm512_mask_storeu_ps(row, s0, f0);
                _mm512_mask_storeu_ps(row.add(16), s1, f1);
            }
        }
    }

    /// # Safety
    /// AVX-512F and AVX512-BF16. The tile's panels hold `steps` lane steps of 12 x 2 / 32 x 2
    /// bf16; `c` (the matrix's origin, stride `ldc`) is valid for reads and writes at the
    /// tile's valid rows and columns, the only ones the kernel touches.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn bf16_12x32(t: &Tile<u16, u16>, c: *mut f32, ldc: usize) {
        let (steps, a, b) = (t.steps, t.a, t.b);
        let c = c.add(t.i0 * ldc + t.j0);
        let (mr, nr, accumulate) = (t.mr_valid, t.nr_valid, !t.first);
        let mut s = [[_mm512_setzero_ps(); 2]; 12];
        let (mut pa, mut pb) = (a as *const i32, b as *const __m512i);
        for _ in 0..steps {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(1)));
            for (r, sr) in s.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(pa.add(r).read_unaligned()));
                sr[0] = _mm512_dpbf16_ps(sr[0], av, b0);
                sr[1] = _mm512_dpbf16_ps(sr[1], av, b1);
            }
            pa = pa.add(12);
            pb = pb.add(2);
        }
        let m0 = mask16(nr);
        let m1 = mask16(nr.saturating_sub(16));
        for (r, sr) in s.iter().enumerate() {
            if r < mr {
                let row = c.add(r * ldc);
                let (mut v0, mut v1) = (sr[0], sr[1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::available_levels;
    use crate::testutil::values;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[j * k + p] as f64)
                    .sum();
            }
        }
        c
    }

    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (13, 33, 7),
        (12, 32, 256),
        (25, 70, 257),
        (7, 513, 3),
        (30, 40, 1025),
        (8, 1100, 64),
        (3, 5, 600),
        (40, 17, 31),
    ];

    #[test]
    fn f32_product_matches_reference_on_every_level_and_odd_shape() {
        for level in available_levels() {
            for &(m, n, k) in &SHAPES {
                let a = values(m * k, (m * 31 + k) as u64);
                let b = values(n * k, (n * 17 + k) as u64);
                let want = naive(m, n, k, &a, &b);
                // ldc > n checks the stride; the padding column must stay untouched.
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                let mut ws = Workspace::default();
                scores_f32(level, m, n, k, &a, Src::F32(&b), &mut c, ldc, &mut ws);
                for i in 0..m {
                    for j in 0..n {
                        let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                        assert!(
                            (got - w).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + w.abs()),
                            "{level:?} {m}x{n}x{k} [{i},{j}]: {got} vs {w}"
                        );
                    }
                    assert!(c[i * ldc + n].is_nan(), "{level:?} wrote past n");
                }
                // f16 rows convert while packing: same as converting first.
                let b16: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
                let b16f: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
                let want = naive(m, n, k, &a, &b16f);
                scores_f32(level, m, n, k, &a, Src::F16(&b16), &mut c, ldc, &mut ws);
                for i in 0..m {
                    for j in 0..n {
                        let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                        assert!(
                            (got - w).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + w.abs()),
                            "{level:?} f16 {m}x{n}x{k} [{i},{j}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_queries_hold_their_values_once_without_slice_padding() {
        // IVF caches one per list: a k of 384 once took the i8 slice width (1024) per row,
        // beside an unpacked copy.
        for level in available_levels() {
            for product in [Product::F32, Product::Bf16, Product::I8] {
                for &(m, k) in &[(200, 384), (13, 1025), (1, 1)] {
                    let p = PackedQueries::new(product, level, m, k, &values(m * k, 5));
                    let Some(shape) = p.shape else {
                        continue; // the reference loop keeps the queries as given
                    };
                    let size = match product {
                        Product::F32 => 4,
                        Product::Bf16 => 2,
                        Product::I8 => 1,
                    };
                    let values = m.div_ceil(shape.mr) * shape.mr * k.next_multiple_of(shape.g);
                    let most = values * size + 64 + 4 * m;
                    assert!(
                        p.heap_bytes() <= most,
                        "{level:?} {product:?} {m}x{k}: {} > {most} bytes",
                        p.heap_bytes()
                    );
                }
            }
        }
    }

    #[test]
    fn i8_product_is_exact_on_every_level_with_extremes() {
        for level in available_levels() {
            for &(m, n, k) in &SHAPES {
                let a = values(m * k, (m + k) as u64);
                let mut b: Vec<i8> = values(n * k, (n + 3 * k) as u64)
                    .iter()
                    .map(|&v| (v * 127.9) as i8)
                    .collect();
                // int8 extremes: a row of -128 and a row of 127.
                b[..k].fill(-128);
                if n > 1 {
                    b[k..2 * k].fill(127);
                }
                let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
                let mut got = vec![0.0f32; m * n];
                let mut want = vec![0.0f32; m * n];
                let mut ws = Workspace::default();
                scores_i8(level, m, n, k, &a, &b, &scales, &mut got, n, &mut ws);
                scores_i8(
                    Level::Scalar,
                    m,
                    n,
                    k,
                    &a,
                    &b,
                    &scales,
                    &mut want,
                    n,
                    &mut ws,
                );
                assert_eq!(got, want, "{level:?} {m}x{n}x{k}");
                // And the reference is the quantized query's exact dot product.
                let mut q = vec![0i8; k];
                let s = quantize_query_i8(&a[..k], &mut q);
                let dot: i64 = q
                    .iter()
                    .zip(&b[..k])
                    .map(|(&x, &y)| x as i64 * y as i64)
                    .sum();
                assert_eq!(want[0], dot as f32 * (s * scales[0]));
            }
        }
    }

    #[test]
    fn scores_above_mark_exactly_the_scores_reaching_each_threshold() {
        for level in available_levels() {
            for product in [Product::I8, Product::Bf16, Product::F32] {
                for &(m, n, k) in &SHAPES {
                    let a = values(m * k, (m + 11 * k) as u64);
                    let data: Vec<i8> = values(n * k, (n + 13 * k) as u64)
                        .iter()
                        .map(|&v| (v * 127.9) as i8)
                        .collect();
                    let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
                    let src = Src::I8 {
                        data: &data,
                        scales: &scales,
                    };
                    let packed = PackedQueries::new(product, level, m, k, &a);
                    let mut ws = Workspace::default();
                    let mut want = vec![0.0f32; m * n];
                    packed.scores(src, n, &mut want, n, &mut ws);
                    // Thresholds: the column's median score, and unreachable / everything.
                    let thr: Vec<f32> = (0..n)
                        .map(|j| match j % 5 {
                            3 => f32::INFINITY,
                            4 => f32::NEG_INFINITY,
                            _ => {
                                let mut col: Vec<f32> = (0..m).map(|i| want[i * n + j]).collect();
                                col.sort_by(f32::total_cmp);
                                col[m / 2]
                            }
                        })
                        .collect();
                    let words = n.div_ceil(32);
                    let mut got = vec![f32::NAN; m * n];
                    let mut masks = vec![u32::MAX; m * words];
                    packed.scores_above(src, n, &thr, &mut got, n, &mut masks, &mut ws);
                    for i in 0..m {
                        for j in 0..n {
                            let marked = masks[i * words + j / 32] >> (j % 32) & 1 == 1;
                            let v = want[i * n + j];
                            assert_eq!(marked, v >= thr[j], "{level:?} {product:?} {m}x{n}x{k}");
                            if marked {
                                assert_eq!(got[i * n + j], v, "{level:?} {product:?}");
                            }
                        }
                        // No bit beyond the last column.
                        if n % 32 != 0 {
                            assert_eq!(masks[i * words + words - 1] >> (n % 32), 0);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_product_matches_reference_on_every_level() {
        for level in available_levels() {
            for &(m, n, k) in &SHAPES {
                let a = values(m * k, (m + 5 * k) as u64);
                let b = values(n * k, (n + 7 * k) as u64);
                let mut got = vec![0.0f32; m * n];
                let mut want = vec![0.0f32; m * n];
                let mut ws = Workspace::default();
                scores_bf16(level, m, n, k, &a, Src::F32(&b), &mut got, n, &mut ws);
                scores_bf16(
                    Level::Scalar,
                    m,
                    n,
                    k,
                    &a,
                    Src::F32(&b),
                    &mut want,
                    n,
                    &mut ws,
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + w.abs()),
                        "{level:?} {m}x{n}x{k}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Rows packed once give what per-block packing gives (bit for bit: the same kernels on
    /// the same values), from any panel-aligned start, for float and i8 sources.
    #[test]
    fn rows_packed_once_score_as_rows_packed_per_block() {
        for level in available_levels() {
            for product in [Product::I8, Product::Bf16] {
                for &(m, n, k) in &SHAPES {
                    let a = values(m * k, (m + 11 * k) as u64);
                    let b = values(n * k, (n + 13 * k) as u64);
                    let Some(rows) = PackedRows::new(product, level, Src::F32(&b), n, k) else {
                        continue;
                    };
                    assert_eq!(rows.len(), n);
                    // The per-block reference: i8 rows quantized the same way first.
                    let mut quant = vec![0i8; n * k];
                    let scales: Vec<f32> = (0..n)
                        .map(|r| {
                            let dst = &mut quant[r * k..(r + 1) * k];
                            kernels::quantize_row_i8(&b[r * k..(r + 1) * k], dst)
                        })
                        .collect();
                    let queries = PackedQueries::new(product, level, m, k, &a);
                    let mut ws = Workspace::default();
                    for j0 in (0..n).step_by(32).take(3) {
                        let len = n - j0;
                        let mut want = vec![0.0f32; m * len];
                        let mut got = vec![f32::NAN; m * len];
                        let src = match product {
                            Product::I8 => Src::I8 {
                                data: &quant[j0 * k..],
                                scales: &scales[j0..],
                            },
                            _ => Src::F32(&b[j0 * k..]),
                        };
                        queries.scores(src, len, &mut want, len, &mut ws);
                        queries.scores_packed(&rows, j0, len, &mut got, len, &mut ws);
                        assert_eq!(got, want, "{level:?} {product:?} {m}x{n}x{k} from {j0}");
                    }
                    // An i8 source is packed as it is (no second quantization).
                    if product == Product::I8 {
                        let src = Src::I8 {
                            data: &quant,
                            scales: &scales,
                        };
                        let again = PackedRows::new(product, level, src, n, k).unwrap();
                        let mut want = vec![0.0f32; m * n];
                        let mut got = vec![0.0f32; m * n];
                        queries.scores_packed(&rows, 0, n, &mut want, n, &mut ws);
                        queries.scores_packed(&again, 0, n, &mut got, n, &mut ws);
                        assert_eq!(got, want, "{level:?} i8 source {m}x{n}x{k}");
                    }
                }
            }
        }
    }

    /// The 16-lane conversion rounds exactly as `bf16_bits` on every kind of value: ties,
    /// NaN, infinities, subnormals, and the f16 source through f32.
    #[test]
    fn bf16_conversion_matches_the_scalar_rounding_on_every_level() {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 3.0,
            -1e-40,
            f32::MAX,
            f32::MIN,
            f32::from_bits(0x3F80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3F81_8000), // a tie, rounds to even (up)
            f32::from_bits(0x7F7F_FFFF), // rounds up to infinity
        ];
        vals.extend(values(1000, 5));
        let h: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
        for level in available_levels() {
            for len in [0, 1, 15, 16, 17, vals.len()] {
                let mut got = vec![0u16; len];
                let mut tmp = Vec::new();
                read_bf16(Src::F32(&vals), level, 0, vals.len(), 0, &mut got, &mut tmp);
                let want: Vec<u16> = vals[..len].iter().map(|&v| bf16_bits(v)).collect();
                assert_eq!(got, want, "{level:?} f32 len {len}");
                read_bf16(Src::F16(&h), level, 0, h.len(), 0, &mut got, &mut tmp);
                let want: Vec<u16> = h[..len].iter().map(|v| bf16_bits(v.to_f32())).collect();
                assert_eq!(got, want, "{level:?} f16 len {len}");
            }
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties round to even (1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: rounds up to 1 + 2^-6.
        for level in available_levels() {
            let a = [1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
            let b = [1.0f32, 0.0, 0.0, 1.0];
            let mut c = [0.0f32; 2];
            scores_bf16(
                level,
                1,
                2,
                2,
                &a,
                Src::F32(&b),
                &mut c,
                2,
                &mut Workspace::default(),
            );
            assert_eq!(c[0], 1.0, "{level:?}");
            assert_eq!(c[1], 1.0 + 1.0 / 64.0, "{level:?}");
        }
    }
}
