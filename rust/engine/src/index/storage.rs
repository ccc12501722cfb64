//! Where an index's data lives: owned buffers or read-only views into a mapped file, and the
//! helpers that grow owned buffers without touching their pages twice.

use crate::error::{Error, Result};
use crate::search::Rows;
use crate::types::DType;
use bytemuck::Pod;
use half::f16;
use memmap2::Mmap;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// A buffer that is either owned or a read-only view into a memory-mapped file (the index's
/// sections, and the IVF index's, where it is called `Seg`).
pub(crate) enum Buf<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: Pod> Buf<T> {
    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, offset, len } => {
                // The file layout puts every section at an offset aligned for its type and the
                // map itself is page-aligned, so this cast cannot fail (format.rs and
                // ivf/file.rs check it).
                bytemuck::cast_slice(&map[*offset..*offset + *len * std::mem::size_of::<T>()])
            }
        }
    }

    pub(crate) fn owned_mut(&mut self) -> Result<&mut Vec<T>> {
        match self {
            Buf::Owned(v) => Ok(v),
            Buf::Mapped { .. } => Err(Error::ReadOnly),
        }
    }
}

/// Removes row `row` of rows `width` values wide by moving row `last` (the last one) into it.
pub(crate) fn swap_remove_rows<T: Pod>(v: &mut Vec<T>, row: usize, last: usize, width: usize) {
    if row != last {
        v.copy_within(last * width..(last + 1) * width, row * width);
    }
    v.truncate(last * width);
}

/// The stored vectors.
pub(crate) enum Store {
    F32(Buf<f32>),
    F16(Buf<f16>),
    /// Row r is `scales[r] * data[r]`, |data| <= 127.
    I8 {
        data: Buf<i8>,
        scales: Buf<f32>,
    },
}

impl Store {
    pub(crate) fn empty(dtype: DType) -> Store {
        match dtype {
            DType::F32 => Store::F32(Buf::Owned(Vec::new())),
            DType::F16 => Store::F16(Buf::Owned(Vec::new())),
            DType::I8 => Store::I8 {
                data: Buf::Owned(Vec::new()),
                scales: Buf::Owned(Vec::new()),
            },
        }
    }

    pub(crate) fn rows(&self) -> Rows<'_> {
        match self {
            Store::F32(b) => Rows::F32(b.as_slice()),
            Store::F16(b) => Rows::F16(b.as_slice()),
            Store::I8 { data, scales } => Rows::I8 {
                data: data.as_slice(),
                scales: scales.as_slice(),
            },
        }
    }
}

/// Reserves room for `extra` more elements in `v` and returns that spare capacity, not yet
/// initialized (so not yet touched: the encoding pass that fills it also faults its pages in,
/// spread over the threads). Commit it with `commit` once every element is written.
pub(crate) fn spare<T>(v: &mut Vec<T>, extra: usize) -> &mut [MaybeUninit<T>] {
    v.reserve(extra);
    let tail = &mut v.spare_capacity_mut()[..extra];
    advise_huge_pages(tail);
    tail
}

/// Marks the `extra` elements after `v.len()` as part of `v`.
///
/// # Safety
/// Every one of those elements (`v.spare_capacity_mut()[..extra]`) must have been initialized.
pub(crate) unsafe fn commit<T>(v: &mut Vec<T>, extra: usize) {
    debug_assert!(v.capacity() - v.len() >= extra);
    // SAFETY: the caller guarantees the `extra` elements past the length are initialized, and
    // they lie within the capacity (they came from `spare`).
    unsafe { v.set_len(v.len() + extra) };
}

/// Asks Linux to back a large, not yet touched buffer with transparent huge pages: a batch of
/// 100k x 512 f32 would otherwise take 50,000 page faults, most of the cost of `add`.
fn advise_huge_pages<T>(buf: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < 4 * HUGE {
            return;
        }
        let start = (buf.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside `buf`, memory this Vec owns; MADV_HUGEPAGE only
            // changes how the kernel backs the pages, never their contents. Errors (e.g. THP
            // disabled) are ignored: the advice is optional.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Vectors validated and converted to the stored type, not yet part of an index.
pub(crate) enum Encoded {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I8(Vec<i8>, Vec<f32>),
}
