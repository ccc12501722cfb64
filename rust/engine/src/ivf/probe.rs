//! Each query's lists: its `nprobe` nearest centroids (step 3 of the search, `search.rs`),
//! scored with the single-query kernels for a few queries, or for a batch by a product over
//! the centroids.

use super::IvfIndex;
use crate::kernels;
use crate::matmul::{self, PackedQueries, Product, Src, Workspace};
use crate::search::{self, Plan, Queries, Rows, Search, GEMM_MIN_QUERIES};
use crate::topk::{Hit, TopK};
use rayon::prelude::*;
use rustc_hash::FxHashSet;

impl IvfIndex {
    /// The lists each query scans (CSR: offsets into a flat list), nearest first. A query
    /// whose probed lists hold fewer than `needed` vectors (less those of `excluded`, the
    /// excluded keys each list holds, where given) scans every list.
    /// `np` lists each (at most every list). `as_single`: chosen as single queries choose
    /// them, whatever the count ([`Self::single_query_lists`]).
    pub(super) fn probes(
        &self,
        queries: &[f32],
        needed: usize,
        excluded: &[usize],
        (np, as_single): (usize, bool),
    ) -> (Vec<usize>, Vec<u32>) {
        let nq = queries.len() / self.dim;
        let nlist = self.lists.len();
        if !self.is_trained() {
            let offsets = (0..=nq).map(|q| q * nlist).collect();
            let flat = (0..nq).flat_map(|_| 0..nlist as u32).collect();
            return (offsets, flat);
        }
        // Nearest first even when every list is probed: a batch's first round scans the
        // nearest lists, whose scores bound what the others must keep.
        let np = np.clamp(1, nlist);
        let ids = match as_single {
            true => self.single_query_lists(queries, np),
            false => self.nearest_lists(queries, np),
        };
        let mut offsets = Vec::with_capacity(nq + 1);
        let mut flat = Vec::with_capacity(nq * np);
        offsets.push(0);
        for q in 0..nq {
            let mine = &ids[q * np..(q + 1) * np];
            let held: usize = mine
                .iter()
                .map(|&l| {
                    let l = l as usize;
                    self.lists[l].len() - excluded.get(l).copied().unwrap_or(0)
                })
                .sum();
            if held >= needed {
                flat.extend(mine.iter().map(|&l| l as u32));
            } else {
                flat.extend(mine.iter().map(|&l| l as u32));
                let seen: FxHashSet<u64> = mine.iter().copied().collect();
                flat.extend(
                    (0..nlist as u64)
                        .filter(|l| !seen.contains(l))
                        .map(|l| l as u32),
                );
            }
            offsets.push(flat.len());
        }
        (offsets, flat)
    }

    /// The `np` lists nearest each query, nearest first (`nq * np` list numbers).
    fn nearest_lists(&self, queries: &[f32], np: usize) -> Vec<u64> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        let mut ids = vec![0u64; nq * np];
        if nq < GEMM_MIN_QUERIES {
            // Few queries: the same kernels and order as the search core, on this thread
            // (no hand-off to the thread pool for a few microseconds of work).
            self.nearest_lists_few(queries, np, &mut ids);
        } else if let Some((data, scales)) = self
            .probe_centroids
            .as_ref()
            .filter(|_| matmul::has_i8_product(kernels::level()))
        {
            // A batch reuses the centroids across its queries (a product, compute-bound): the
            // i8 copy single queries score, by the VNNI product (a quarter of the float32
            // product's time, which was a tenth of a batch at nprobe ~100). Lists are only
            // chosen by these scores, never reported.
            let src = Src::I8 { data, scales };
            nearest_by_i8_product(src, self.lists.len(), queries, dim, np, &mut ids);
        } else {
            // Float32 product (L2, or no VNNI).
            let mut scores = vec![0f32; nq * np];
            let search = Search {
                plan: self.coarse_plan(),
                rows: Rows::F32(&self.centroids),
                queries: Queries::F32(queries),
                k: np,
                eligible: &|_: usize, _: usize| true,
                row_id: &|r: usize| r as u64,
            };
            search.run(&mut ids, &mut scores);
        }
        ids
    }

    /// How queries score the centroids (unnormalized, by the coarse metric).
    fn coarse_plan(&self) -> Plan {
        Plan {
            dim: self.dim,
            metric: self.coarse_metric(),
            normalize_queries: false,
            normalize_rows: false,
        }
    }

    /// The `np` lists nearest each of `queries` (normalized as the search normalizes them)
    /// as single queries choose them: the single-query kernels, whatever the count (a batch
    /// scores the centroids by another product, which orders near ties otherwise).
    pub(super) fn single_query_lists(&self, queries: &[f32], np: usize) -> Vec<u64> {
        let np = np.clamp(1, self.lists.len());
        let mut ids = vec![0u64; queries.len() / self.dim * np];
        ids.par_chunks_mut(np * 64)
            .zip(queries.par_chunks(self.dim * 64))
            .for_each(|(out, qs)| self.nearest_lists_few(qs, np, out));
        ids
    }

    /// [`Self::nearest_lists`] of a few queries with the single-query kernels.
    fn nearest_lists_few(&self, queries: &[f32], np: usize, ids: &mut [u64]) {
        let (dim, nlist) = (self.dim, self.lists.len());
        let metric = self.coarse_plan().metric;
        let (mut all, mut ints) = (vec![0f32; nlist], vec![0i64; nlist]);
        let mut q16 = Vec::new();
        let mut top = TopK::<Hit>::default();
        let rows = self.probe_rows();
        for (q, qv) in queries.chunks_exact(dim).enumerate() {
            let q16 = matches!(rows, Rows::I8 { .. }).then(|| {
                let scale = kernels::quantize_query_i16(qv, &mut q16);
                (q16.as_slice(), scale)
            });
            search::score_chunk(metric, qv, q16, rows, &[], &mut ints, &mut all);
            top.reset(np, f32::NEG_INFINITY);
            for (l, &s) in all.iter().enumerate() {
                top.push(Hit {
                    score: s,
                    id: l as u64,
                });
            }
            for (j, c) in top.sorted().iter().enumerate() {
                ids[q * np + j] = c.id;
            }
        }
    }
}

/// [`IvfIndex::nearest_lists`] of a batch by the VNNI product over the i8 centroids `src`
/// (`nlist` of them), blocks of queries in parallel.
fn nearest_by_i8_product(
    src: Src<'_>,
    nlist: usize,
    queries: &[f32],
    dim: usize,
    np: usize,
    ids: &mut [u64],
) {
    const BLOCK: usize = 256;
    let level = kernels::level();
    ids.par_chunks_mut(BLOCK * np)
        .zip(queries.par_chunks(BLOCK * dim))
        .for_each_init(
            || (Vec::new(), Workspace::default(), TopK::<Hit>::default()),
            |(tile, ws, top), (chosen, qs)| {
                let m = qs.len() / dim;
                let packed = PackedQueries::new(Product::I8, level, m, dim, qs);
                tile.resize(m * nlist, 0.0);
                packed.scores(src, nlist, tile, nlist, ws);
                for (row, out) in tile.chunks_exact(nlist).zip(chosen.chunks_exact_mut(np)) {
                    top.reset(np, f32::NEG_INFINITY);
                    for (l, &s) in row.iter().enumerate() {
                        top.push(Hit {
                            score: s,
                            id: l as u64,
                        });
                    }
                    for (o, c) in out.iter_mut().zip(top.sorted()) {
                        *o = c.id;
                    }
                }
            },
        );
}
