//! The inverted lists: each list's keys, rows, optional float32 copies and 4-bit codes, in
//! slot order (faiss's `InvertedLists`). Storage only: the index decides which list a vector
//! goes to, the scanner (`scan.rs`) reads them.

use super::pq;
use crate::error::Result;
use crate::index::swap_remove_rows;
use crate::kernels;
use crate::matmul::PackedQueries;
use crate::search::Rows;
use crate::types::DType;
use half::f16;

/// A buffer that is owned or a read-only view into a memory-mapped file.
pub(crate) use crate::index::Buf as Seg;

/// Stored rows of one list.
pub(crate) enum Data {
    F32(Seg<f32>),
    F16(Seg<f16>),
    /// Row r is `scales[r] * data[r]`.
    I8 {
        data: Seg<i8>,
        scales: Seg<f32>,
    },
}

/// One inverted list: keys, rows, (with re-ranking) float32 copies and (with `pq`, once
/// trained) 4-bit codes, all in slot order.
pub(crate) struct List {
    pub(crate) keys: Seg<u64>,
    pub(crate) data: Data,
    pub(crate) exact: Option<Seg<f32>>,
    /// `pq::code_bytes(len, m)` bytes in the fast-scan block layout.
    pub(crate) codes: Option<Seg<u8>>,
    /// The rows packed for batched low-precision scans (built by the first batch that scans
    /// the list, dropped by every change to it).
    pub(crate) packed: PackCache,
}

/// A list's rows packed as the left operand of the batch product (i8 or bf16), built once and
/// reused by every batch until the list changes. The queries are then the product's right
/// operand: a list costs a copy of its queries per batch, not a quantization and packing.
pub(crate) type PackCache = std::sync::OnceLock<PackedQueries>;

impl List {
    pub(super) fn empty(dtype: DType, exact: bool) -> List {
        List {
            keys: Seg::Owned(Vec::new()),
            data: match dtype {
                DType::F32 => Data::F32(Seg::Owned(Vec::new())),
                DType::F16 => Data::F16(Seg::Owned(Vec::new())),
                DType::I8 => Data::I8 {
                    data: Seg::Owned(Vec::new()),
                    scales: Seg::Owned(Vec::new()),
                },
            },
            exact: exact.then(|| Seg::Owned(Vec::new())),
            codes: None,
            packed: Default::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.as_slice().len()
    }

    /// Room for `n` more rows.
    pub(super) fn reserve(&mut self, n: usize, dim: usize) -> Result<()> {
        grow(self.keys.owned_mut()?, n);
        match &mut self.data {
            Data::F32(s) => grow(s.owned_mut()?, n * dim),
            Data::F16(s) => grow(s.owned_mut()?, n * dim),
            Data::I8 { data, scales } => {
                grow(data.owned_mut()?, n * dim);
                grow(scales.owned_mut()?, n);
            }
        }
        if let Some(e) = &mut self.exact {
            grow(e.owned_mut()?, n * dim);
        }
        Ok(())
    }

    pub(crate) fn rows(&self) -> Rows<'_> {
        match &self.data {
            Data::F32(s) => Rows::F32(s.as_slice()),
            Data::F16(s) => Rows::F16(s.as_slice()),
            Data::I8 { data, scales } => Rows::I8 {
                data: data.as_slice(),
                scales: scales.as_slice(),
            },
        }
    }

    /// Appends row `i` of `enc`.
    pub(super) fn push(&mut self, key: u64, enc: &Encoded, i: usize, dim: usize) -> Result<()> {
        self.packed = Default::default();
        let r = i * dim..(i + 1) * dim;
        match (&mut self.data, &enc.data) {
            (Data::F32(s), EncData::F32(v)) => s.owned_mut()?.extend_from_slice(&v[r.clone()]),
            (Data::F16(s), EncData::F16(v)) => s.owned_mut()?.extend_from_slice(&v[r.clone()]),
            (Data::I8 { data, scales }, EncData::I8(d, sc)) => {
                data.owned_mut()?.extend_from_slice(&d[r.clone()]);
                scales.owned_mut()?.push(sc[i]);
            }
            _ => unreachable!("encoded with the index's own dtype"),
        }
        if let (Some(dst), Some(src)) = (&mut self.exact, &enc.exact) {
            dst.owned_mut()?.extend_from_slice(&src[r]);
        }
        if let (Some(dst), Some((src, m))) = (&mut self.codes, &enc.codes) {
            let m = *m;
            let slot = self.keys.as_slice().len();
            let dst = dst.owned_mut()?;
            dst.resize(pq::code_bytes(slot + 1, m), 0);
            pq::set_row(dst, slot, &src[i * m..(i + 1) * m]);
        }
        self.keys.owned_mut()?.push(key);
        Ok(())
    }

    /// Appends slot `slot` of `other` (the encoded bytes, no re-encoding).
    pub(super) fn push_from(&mut self, other: &List, slot: usize, dim: usize) -> Result<()> {
        self.packed = Default::default();
        let r = slot * dim..(slot + 1) * dim;
        match (&mut self.data, &other.data) {
            (Data::F32(d), Data::F32(s)) => {
                d.owned_mut()?.extend_from_slice(&s.as_slice()[r.clone()])
            }
            (Data::F16(d), Data::F16(s)) => {
                d.owned_mut()?.extend_from_slice(&s.as_slice()[r.clone()])
            }
            (
                Data::I8 { data, scales },
                Data::I8 {
                    data: sd,
                    scales: ss,
                },
            ) => {
                data.owned_mut()?
                    .extend_from_slice(&sd.as_slice()[r.clone()]);
                scales.owned_mut()?.push(ss.as_slice()[slot]);
            }
            _ => unreachable!("lists of one index share its dtype"),
        }
        if let (Some(dst), Some(src)) = (&mut self.exact, &other.exact) {
            dst.owned_mut()?.extend_from_slice(&src.as_slice()[r]);
        }
        self.keys.owned_mut()?.push(other.keys.as_slice()[slot]);
        Ok(())
    }

    /// Removes `slot` by moving the last row into it; returns the key moved (if any).
    pub(super) fn swap_remove(&mut self, slot: usize, dim: usize) -> Result<Option<u64>> {
        self.packed = Default::default();
        let last = self.len() - 1;
        match &mut self.data {
            Data::F32(s) => swap_remove_rows(s.owned_mut()?, slot, last, dim),
            Data::F16(s) => swap_remove_rows(s.owned_mut()?, slot, last, dim),
            Data::I8 { data, scales } => {
                swap_remove_rows(data.owned_mut()?, slot, last, dim);
                swap_remove_rows(scales.owned_mut()?, slot, last, 1);
            }
        }
        if let Some(e) = &mut self.exact {
            swap_remove_rows(e.owned_mut()?, slot, last, dim);
        }
        if let Some(c) = &mut self.codes {
            let c = c.owned_mut()?;
            let m = c.len() / (last + 1).div_ceil(kernels::PQ_BLOCK) / kernels::PQ_BLOCK * 2;
            let mut row = vec![0u8; m];
            pq::get_row(c, last, &mut row);
            pq::set_row(c, slot, &row);
            row.fill(0);
            pq::set_row(c, last, &row);
            c.truncate(pq::code_bytes(last, m));
        }
        let keys = self.keys.owned_mut()?;
        swap_remove_rows(keys, slot, last, 1);
        Ok((slot != last).then(|| keys[slot]))
    }

    /// The bytes of stored row `slot` (for prefetching).
    pub(super) fn row_bytes(&self, slot: usize, dim: usize) -> &[u8] {
        let r = slot * dim..(slot + 1) * dim;
        match &self.data {
            Data::F32(s) => bytemuck::cast_slice(&s.as_slice()[r]),
            Data::F16(s) => bytemuck::cast_slice(&s.as_slice()[r]),
            Data::I8 { data, .. } => bytemuck::cast_slice(&data.as_slice()[r]),
        }
    }

    /// Row `slot` as float32 (the exact copy when kept, else the stored row dequantized).
    pub(super) fn row_f32(&self, slot: usize, dim: usize, out: &mut [f32]) {
        if let Some(e) = &self.exact {
            out.copy_from_slice(&e.as_slice()[slot * dim..(slot + 1) * dim]);
            return;
        }
        let mut buf = Vec::new();
        out.copy_from_slice(self.rows().range(slot, slot + 1, dim).to_f32(dim, &mut buf));
    }
}

/// Room for `extra` more elements in a list's buffer: exactly what comes, or an eighth of what
/// it holds if that is more. Growth stays amortized (geometric, x1.125) with at most 12.5%
/// unused, where `Vec::reserve` doubles: adds spread over many lists left ~1.7x the data
/// allocated (a 1M x 512 i8 index built by `add` held 799 MiB for 488 MiB of rows).
fn grow<T>(v: &mut Vec<T>, extra: usize) {
    if v.capacity() - v.len() < extra {
        v.reserve_exact(extra.max(v.len() / 8));
    }
}

/// A batch encoded for storage (row-major, `dim` values per row).
pub(super) struct Encoded {
    pub data: EncData,
    pub exact: Option<Vec<f32>>,
    /// With trained codebooks: `m` codes per row, and `m`.
    pub codes: Option<(Vec<u8>, usize)>,
}

pub(super) enum EncData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I8(Vec<i8>, Vec<f32>),
}
