//! [`PackedRows`]: stored rows packed once for a whole scan.

use super::{aligned, read_bf16, Product, Shape, Src, I8_MAX_K};
use crate::kernels::{self, Level};

/// Stored rows packed once, for the whole scan, into the panels a low-precision product reads
/// (i8 rows quantized per row, or bf16), so that a scan running many query blocks over the
/// same rows (mining) packs each row once instead of once per block.
///
/// Layout: panel-major (`NR` rows per panel, the last one zero-padded), within a panel the
/// `k` slices one after the other, each as [`pack`] writes it.
pub struct PackedRows {
    pub(super) product: Product,
    pub(super) shape: Shape,
    pub(super) n: usize,
    pub(super) k: usize,
    /// Padded values of `k` a panel holds per row (all slices).
    kp: usize,
    buf: Vec<u8>,
    /// i8: each row's scale, and `128 * sum(row)` (removes the queries' u8 offset exactly).
    pub(super) scales: Vec<f32>,
    pub(super) corr: Vec<i32>,
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
        let Shape { nr, gb, kc, .. } = self.shape;
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
                for (step, v) in vals[p0..p0 + kcur].chunks(gb).enumerate() {
                    let d = (step * nr + lane) * gb;
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
    pub(super) fn panel<T: bytemuck::Pod>(&self, panel: usize, p0: usize) -> *const T {
        let off = self.buf.as_ptr().align_offset(64);
        let all: &[T] = bytemuck::cast_slice(&self.buf[off..]);
        all[panel * self.shape.nr * self.kp + self.shape.nr * p0..].as_ptr()
    }
}
