//! [`PackedQueries`]: a batch's queries packed once, and the driver of every product over them
//! (the blocking loops, the reference loop, and the per-product packing of stored rows).

use super::rows::PackedRows;
use super::{aligned, pack_f32_rows, read_bf16, scatter, Block, Product, Shape, Src, Tile};
#[cfg(target_arch = "x86_64")]
use super::{amx, x86};
use super::{quantize_query_i8, Workspace, I8_MAX_K};
use crate::kernels::{self, Level};
use half::bf16;

/// Queries packed once for every product of a batch (all `k` slices), with their i8 scales.
pub struct PackedQueries {
    product: Product,
    level: Level,
    pub(super) shape: Option<Shape>,
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
        Self::of_rows(product, level, m, k, Src::F32(a))
    }

    /// [`Self::new`] of `m` rows of `k` values stored as f32, f16 or i8 (`Src`: the values
    /// it reads, exactly as [`Src::read`] converts them). The i8 product quantizes them a row
    /// at a time from a row's f32 copy: packing a whole f16 list for the product (the exact
    /// pass of `tune` packs every list) wrote and read back an f32 copy of it, a fifth of
    /// that pass.
    pub fn of_rows(
        product: Product,
        level: Level,
        m: usize,
        k: usize,
        rows: Src<'_>,
    ) -> PackedQueries {
        assert!(rows.rows(k) >= m || k == 0, "queries shorter than m x k");
        let converted;
        let a: &[f32] = match rows {
            Src::F32(a) => a,
            // The i8 product reads only `qa` (quantized below, a row at a time).
            _ if product == Product::I8 => &[],
            _ => {
                let mut all = vec![0f32; m * k];
                for (r, row) in all.chunks_exact_mut(k.max(1)).enumerate() {
                    read_row(rows, r, k, row);
                }
                converted = all;
                &converted
            }
        };
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
            let mut row = Vec::new();
            p.scales = (0..m)
                .map(|i| {
                    let out = &mut p.qa[i * k..(i + 1) * k];
                    match rows {
                        Src::F32(a) => quantize_query_i8(&a[i * k..(i + 1) * k], out),
                        _ => {
                            row.resize(k, 0.0);
                            read_row(rows, i, k, &mut row);
                            quantize_query_i8(&row, out)
                        }
                    }
                })
                .collect();
        }
        let Some(shape) = shape else {
            // The reference loop of the i8 product reads `qa`.
            if product != Product::I8 {
                p.raw = a[..m * k].to_vec();
            }
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
                    let block = Block {
                        r0: 0,
                        rows: m,
                        p0,
                        kc,
                    };
                    pack_f32_rows(level, &mut dst[off..], a, k, block, shape.mr);
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
        let out = Out {
            c,
            ldc,
            above: None,
        };
        self.product(b, n, out, ws);
    }

    /// [`Self::scores`], keeping only the scores at or above their row's threshold: bit
    /// `j % 32` of `marks.masks[i * n.div_ceil(32) + j / 32]` is set iff `a_i . b_j >=
    /// marks.thr[j]`, and `c[i * ldc + j]` holds the score where it is (elsewhere it is
    /// unspecified). The i8 micro-kernel compares as it stores, so a caller looking for the
    /// few scores above a floor reads a bit per score, not the whole matrix.
    pub fn scores_above(
        &self,
        b: Src<'_>,
        n: usize,
        c: &mut [f32],
        ldc: usize,
        marks: Marks<'_>,
        ws: &mut Workspace,
    ) {
        let words = n.div_ceil(32);
        assert!(marks.thr.len() >= n, "fewer thresholds than rows");
        assert!(marks.masks.len() >= self.m * words, "masks too short");
        marks.masks[..self.m * words].fill(0);
        let above = Some((marks.thr, marks.masks));
        self.product(b, n, Out { c, ldc, above }, ws);
    }

    /// The product behind [`Self::scores`] and [`Self::scores_above`]: the i8 micro-kernel
    /// marks the scores reaching `above`'s thresholds itself; every other path marks them
    /// after computing the scores.
    fn product(&self, b: Src<'_>, n: usize, mut out: Out<'_>, ws: &mut Workspace) {
        let (m, k, ldc) = (self.m, self.k, out.ldc);
        assert!(b.rows(k) >= n || k == 0, "fewer than n stored rows");
        assert!(
            ldc >= n && (m == 0 || out.c.len() >= (m - 1) * ldc + n),
            "c too short"
        );
        if m == 0 || n == 0 {
            return;
        }
        let Some(shape) = self.shape else {
            self.reference(b, n, out.c, ldc, ws);
            return out.mark_above(m, n);
        };
        match self.product {
            Product::F32 => self.run_f32(shape, b, n, out.c, ldc, ws),
            Product::Bf16 => self.run_bf16(shape, b, n, out.c, ldc, ws),
            Product::I8 => return self.run_i8(shape, b, n, out, ws),
        }
        out.mark_above(m, n);
    }

    /// `out[i] = a_i . q` for every packed row `i` and one i8 query `q` (`k` values, scale
    /// `qscale`, quantized as the i8 product quantizes its right operand): the scores
    /// [`Self::scores`] gives a single stored row, bit for bit, without the product's tile
    /// (a tile of one column would leave 31 of its 32 columns idle). For a single query's scan
    /// of rows packed once (an IVF list).
    pub fn scores_one_i8(&self, q: &[i8], qscale: f32, out: &mut [f32], ws: &mut Workspace) {
        let (m, k) = (self.m, self.k);
        assert!(
            self.product == Product::I8,
            "rows packed for another product"
        );
        assert!(
            q.len() == k && out.len() >= m,
            "query or output of the wrong length"
        );
        let corr = 128 * q.iter().map(|&v| v as i32).sum::<i32>();
        let Some(shape) = self.shape else {
            for (i, o) in out[..m].iter_mut().enumerate() {
                let a = &self.qa[i * k..(i + 1) * k];
                let dot: i32 = a.iter().zip(q).map(|(&x, &y)| x as i32 * y as i32).sum();
                *o = dot as f32 * (self.scales[i] * qscale);
            }
            return;
        };
        #[cfg(target_arch = "x86_64")]
        {
            if shape.g == 64 && !kernels::has_avx512_vnni() {
                // AMX tiles without the vector instruction: the product of one column.
                let src = Src::I8 {
                    data: q,
                    scales: &[qscale],
                };
                return self.scores(src, 1, out, 1, ws);
            }
            self.gemv_i8(shape, q, ws);
            let (mr, stride) = (shape.mr, shape.mr.next_multiple_of(16));
            for (ip, acc) in ws.ints.chunks_exact(stride).enumerate() {
                for (c, acc) in acc.chunks_exact(16).enumerate() {
                    let i0 = ip * mr + 16 * c;
                    let valid = 16.min(mr - 16 * c).min(m.saturating_sub(i0));
                    if valid == 0 {
                        break;
                    }
                    let acc: &[i32; 16] = acc.try_into().expect("16 lanes");
                    // SAFETY: AVX-512F (VNNI was checked); rows i0..i0 + valid exist in both.
                    unsafe {
                        let (sc, o) = (self.scales.as_ptr().add(i0), out.as_mut_ptr().add(i0));
                        x86::i8_gemv_scores(acc, corr, sc, qscale, valid, o);
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, ws, corr);
            unreachable!("no i8 micro-kernel on this architecture");
        }
    }

    /// The integer dot products of every packed row with the i8 query `q`, summed over the
    /// `k` slices, into `ws.ints`: `mr` rounded up to 16 values a panel (the 12 x 4-byte
    /// panels of the vector kernels, or the AMX tiles' 32 rows of 64 bytes a step).
    #[cfg(target_arch = "x86_64")]
    fn gemv_i8(&self, shape: Shape, q: &[i8], ws: &mut Workspace) {
        let (m, k, mr) = (self.m, self.k, shape.mr);
        let (panels, stride) = (m.div_ceil(mr), mr.next_multiple_of(16));
        debug_assert!(matches!((mr, shape.g), (12, 4) | (32, 64)), "{shape:?}");
        ws.ints.clear();
        ws.ints.resize(panels * stride, 0);
        let mut qpad: Vec<i8> = Vec::new();
        let mut p0 = 0;
        while p0 < k {
            let kcur = shape.kc.min(k - p0);
            let kcp = shape.padded(k, p0);
            // The query's values of this slice, zero up to the padded length (as the rows).
            qpad.clear();
            qpad.extend_from_slice(&q[p0..p0 + kcur]);
            qpad.resize(kcp.next_multiple_of(4), 0);
            let apack: *const u8 = self.slice(p0);
            for (ip, acc) in ws.ints.chunks_exact_mut(stride).enumerate() {
                // SAFETY: VNNI was checked (by `Shape::of` for the vector kernels, by the
                // caller for the tiles); the slice holds `panels` panels of mr x kcp bytes in
                // the kernel's layout, and `qpad` the kcp values it reads.
                unsafe {
                    let a = apack.add(ip * mr * kcp);
                    if shape.g == 4 {
                        let words = qpad.as_ptr() as *const i32;
                        x86::i8_gemv_12(a, words, kcp / 4, acc.try_into().expect("16"));
                    } else {
                        x86::i8_gemv_32x64(a, qpad.as_ptr(), kcp / 64, acc.try_into().expect("32"));
                    }
                }
            }
            p0 += kcur;
        }
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
            let _tiles = self.tiles();
            match self.product {
                Product::Bf16 => {
                    let kern = self.bf16_kernel();
                    self.drive_packed::<u16, u16>(shape, b, j0, n, |t| {
                        // SAFETY: as in `run_bf16`; the panel pointers lie inside `b`'s buffer.
                        unsafe { kern(t, cp, ldc) }
                    })
                }
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
                    let kern = self.i8_kernel();
                    self.drive_packed::<u8, i8>(shape, b, j0, n, |t| {
                        // SAFETY: as in `run_i8`; tile columns are relative to j0, as are
                        // `out`'s scale and correction pointers.
                        unsafe { kern(t, &out, multi) }
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
        mut pack_b: impl FnMut(&mut [TB], Block, usize),
        mut kernel: impl FnMut(&Tile<TA, TB>),
    ) {
        let (m, k) = (self.m, self.k);
        let Shape {
            mr, nr, g, kc, nc, ..
        } = shape;
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
                let block = Block {
                    r0: j0,
                    rows: ncur,
                    p0,
                    kc: kcur,
                };
                pack_b(bpack, block, kcp);
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

    /// The bf16 micro-kernel of this level: AMX tiles, or AVX512-BF16 vectors.
    #[cfg(target_arch = "x86_64")]
    fn bf16_kernel(&self) -> unsafe fn(&Tile<u16, u16>, *mut f32, usize) {
        if self.level == Level::Amx {
            amx::bf16_32x32
        } else {
            x86::bf16_12x32
        }
    }

    /// The i8 micro-kernel of this level: AMX tiles, or VNNI vectors.
    #[cfg(target_arch = "x86_64")]
    fn i8_kernel(&self) -> unsafe fn(&Tile<u8, i8>, &x86::I8Out, bool) {
        if self.level == Level::Amx {
            amx::i8_32x32
        } else {
            x86::i8_12x32
        }
    }

    /// At the AMX level, the tile unit configured for the tile kernels (on this thread, for
    /// as long as the guard lives).
    #[cfg(target_arch = "x86_64")]
    fn tiles(&self) -> Option<amx::Tiles> {
        // SAFETY: `Level::Amx` comes only from `available_levels`, after `has_amx`.
        (self.level == Level::Amx).then(|| unsafe { amx::Tiles::configure() })
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
            let kern: x86::F32Kernel = if shape.mr == 12 {
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
                |dst, block, _kcp| match b {
                    Src::F32(v) => pack_f32_rows(level, dst, v, k, block, shape.nr),
                    Src::F16(v) => pack_f32_rows(level, dst, v, k, block, shape.nr),
                    // i8 rows: dequantized to f32 rows first, then the same transposition.
                    Src::I8 { .. } => {
                        let Block { r0, rows, p0, kc } = block;
                        stage.resize(rows * kc, 0.0);
                        for (i, out) in stage.chunks_exact_mut(kc).enumerate() {
                            b.read(r0 + i, k, p0, out);
                        }
                        let staged = Block {
                            r0: 0,
                            p0: 0,
                            ..block
                        };
                        pack_f32_rows(level, dst, &stage, kc, staged, shape.nr)
                    }
                },
                |t| {
                    // SAFETY: `kern` was chosen for a level that `available_levels` checked against
                    // the CPU. The panels hold `t.steps` lane steps of MR / NR values; the tile's
                    // rows i0..i0 + mr_valid and columns j0..j0 + nr_valid lie inside `c` (asserted
                    // in `scores`), and the kernel touches only those.
                    unsafe { kern(t, cp, ldc) }
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
            let kern = self.bf16_kernel();
            let _tiles = self.tiles();
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
                |dst, Block { r0, rows, p0, kc }, kcp| {
                    let staged: &mut [u16] = aligned(stage, rows * kcp);
                    for (i, out) in staged.chunks_exact_mut(kcp).enumerate() {
                        read_bf16(b, level, r0 + i, k, p0, &mut out[..kc], row);
                        out[kc..].fill(0);
                    }
                    pack_words(level, dst, staged, rows, shape.nr, kcp / 2);
                },
                |t| {
                    // SAFETY: AVX512-BF16 or AMX (tiles configured above) was checked by
                    // `Shape::of`; the panels hold `t.steps` lane steps of the kernel's shape
                    // and the kernel writes only the valid rows and columns of its tile inside
                    // c (asserted in `scores`).
                    unsafe { kern(t, cp, ldc) }
                },
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, b, n, c, ldc, ws);
            unreachable!("no bf16 micro-kernel on this architecture");
        }
    }

    fn run_i8(&self, shape: Shape, b: Src<'_>, n: usize, out: Out<'_>, ws: &mut Workspace) {
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
            let Out { c, ldc, above } = out;
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
            let kern = self.i8_kernel();
            let _tiles = self.tiles();
            // Rows whose slices fill whole lane steps pack straight from `data` (as 4-byte
            // words), without a staged copy.
            let words: Option<&[f32]> = (k % 4 == 0)
                .then(|| bytemuck::try_cast_slice(&data[..n * k]).ok())
                .flatten();
            self.drive::<u8, i8>(
                shape,
                n,
                bbuf,
                |dst, block, kcp| {
                    let Block { r0, rows, p0, kc } = block;
                    if let (Some(src), true) = (words, kc == kcp) {
                        let dst: &mut [f32] = bytemuck::cast_slice_mut(dst);
                        let in_words = Block {
                            p0: p0 / 4,
                            kc: kc / 4,
                            ..block
                        };
                        pack_f32_rows(level, dst, src, k / 4, in_words, shape.nr);
                        return;
                    }
                    let staged: &mut [i8] = aligned(stage, rows * kcp);
                    for (i, out) in staged.chunks_exact_mut(kcp).enumerate() {
                        let r = r0 + i;
                        out[..kc].copy_from_slice(&data[r * k + p0..r * k + p0 + kc]);
                        out[kc..].fill(0);
                    }
                    pack_words(level, dst, staged, rows, shape.nr, kcp / 4);
                },
                |t| {
                    // SAFETY: VNNI or AMX (tiles configured above) was checked by `Shape::of`;
                    // the panels hold `t.steps` lane steps of the kernel's shape; the kernel
                    // forms pointers only for the tile's valid rows and columns, inside c
                    // (m x ldc, asserted in `scores`), ints (m x n, allocated when k spans
                    // several slices), qscale (m) and bscale / corr (n).
                    unsafe { kern(t, &out, multi) }
                },
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, b, n, out, ws);
            unreachable!("no i8 micro-kernel on this architecture");
        }
    }
}

/// Row `r` of `rows` (`k` values) as f32, as [`Src::read`] gives it (f16 by the F16C
/// conversion).
fn read_row(rows: Src<'_>, r: usize, k: usize, out: &mut [f32]) {
    match rows {
        Src::F16(v) => kernels::f16_to_f32(&v[r * k..(r + 1) * k], out),
        _ => rows.read(r, k, 0, out),
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
    let block = Block {
        r0: 0,
        rows: count,
        p0: 0,
        kc: words,
    };
    pack_f32_rows(level, dst, src, words, block, w);
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

/// The thresholds of [`PackedQueries::scores_above`] (one per stored row) and the masks it
/// marks the scores reaching them in (one bit per score, `n.div_ceil(32)` words per query).
pub struct Marks<'a> {
    pub thr: &'a [f32],
    pub masks: &'a mut [u32],
}

/// Where a product writes: the scores `c[i * ldc + j]` and, with `above`, the marks of the
/// scores reaching their row's threshold (see [`PackedQueries::scores_above`]).
struct Out<'a> {
    c: &'a mut [f32],
    ldc: usize,
    above: Option<(&'a [f32], &'a mut [u32])>,
}

impl Out<'_> {
    /// Set bit `j % 32` of `masks[i * n.div_ceil(32) + j / 32]` where `c[i * ldc + j] >=
    /// thr[j]` (the marks the i8 micro-kernel makes as it stores).
    fn mark_above(&mut self, m: usize, n: usize) {
        let (c, ldc) = (&*self.c, self.ldc);
        let Some((thr, masks)) = &mut self.above else {
            return;
        };
        let words = n.div_ceil(32);
        for i in 0..m {
            for (j, (&v, &t)) in c[i * ldc..i * ldc + n].iter().zip(thr.iter()).enumerate() {
                if v >= t {
                    masks[i * words + j / 32] |= 1 << (j % 32);
                }
            }
        }
    }
}

/// Pack rows `0..count` (missing ones are zero) into panels of `w` rows: panel-major, then
/// lane step, then row within the panel, then `g` values. `read_row` fills the row's values of
/// the slice (`kc` of them); the padding up to `steps * g` stays zero.
fn pack<T: Copy + Default>(
    dst: &mut [T],
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
                read_row(panel * w + lane, tmp);
            } else {
                tmp.iter_mut().for_each(|v| *v = T::default());
            }
            match g {
                1 => scatter::<T, 1>(base, tmp, w, lane),
                2 => scatter::<T, 2>(base, tmp, w, lane),
                4 => scatter::<T, 4>(base, tmp, w, lane),
                // The AMX tiles' query rows: 64 bytes of bf16 or u8.
                32 => scatter::<T, 32>(base, tmp, w, lane),
                64 => scatter::<T, 64>(base, tmp, w, lane),
                _ => unreachable!("lane steps hold 1, 2, 4, 32 or 64 values"),
            }
        }
    }
}
