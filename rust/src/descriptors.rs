//! Descriptor construction and selection.
//!
//! At set-up every rank prepares, once per peer, a list of *all* rows that peer
//! could ever serve, plus one local list of its own buffer rows. A rebalance
//! then only computes indices into those lists; NIXL merges contiguous runs.
//!
//! Index spaces (T = tensors per layer, N = rows per rank):
//! - remote, zero-copy: `(layer * N + row) * T + t` over the peer's weight rows;
//! - remote, staged: `row * T + t` over the peer's packed send layer;
//! - local: `row * T + t` over this rank's buffer rows.

use crate::layout::RankLayout;
use crate::plan::RankLayerPlan;

/// Where receivers read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Straight from the source's weight rows (no staging).
    ZeroCopy,
    /// From the source's packed send layer (one local layer of staging).
    Staged,
}

/// Shape of the descriptor index spaces shared by all ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorSpace {
    pub mode: Mode,
    pub n_layers: usize,
    pub n_local: usize,
    pub n_tensors: usize,
}

/// The descriptors of one READ request: all rows one rank reads from one
/// source in one layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerRead {
    pub src_rank: u32,
    pub local: Vec<i32>,
    pub remote: Vec<i32>,
    /// Expert rows read (each is `T` descriptors).
    pub rows: usize,
}

/// Too many descriptors to index with NIXL's `int` indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyDescriptors(pub usize);

impl std::fmt::Display for TooManyDescriptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} descriptors exceed NIXL's int index range", self.0)
    }
}
impl std::error::Error for TooManyDescriptors {}

impl DescriptorSpace {
    /// Checks that every index fits an `i32`.
    pub fn new(
        mode: Mode,
        n_layers: usize,
        n_local: usize,
        n_tensors: usize,
    ) -> Result<Self, TooManyDescriptors> {
        let remote = match mode {
            Mode::ZeroCopy => n_layers.saturating_mul(n_local).saturating_mul(n_tensors),
            Mode::Staged => n_local.saturating_mul(n_tensors),
        };
        if remote > i32::MAX as usize {
            return Err(TooManyDescriptors(remote));
        }
        Ok(DescriptorSpace {
            mode,
            n_layers,
            n_local,
            n_tensors,
        })
    }

    #[inline]
    pub fn remote_index(&self, layer: usize, row: usize, t: usize) -> i32 {
        let slot = match self.mode {
            Mode::ZeroCopy => layer * self.n_local + row,
            Mode::Staged => row,
        };
        (slot * self.n_tensors + t) as i32
    }

    #[inline]
    pub fn local_index(&self, row: usize, t: usize) -> i32 {
        (row * self.n_tensors + t) as i32
    }

    /// `(addr, len)` of every row a peer with `layout` serves, in remote index order.
    pub fn remote_descs(&self, layout: &RankLayout) -> Vec<(u64, u64)> {
        match (self.mode, &layout.packed) {
            (Mode::Staged, Some(p)) => {
                let offs = layout.packed_offsets();
                let mut v = Vec::with_capacity(self.n_local * self.n_tensors);
                for row in 0..self.n_local {
                    for (t, b) in layout.buffer.iter().enumerate() {
                        v.push((p.base + p.slot_bytes * row as u64 + offs[t], b.row_bytes));
                    }
                }
                v
            }
            _ => {
                let mut v = Vec::with_capacity(self.n_layers * self.n_local * self.n_tensors);
                for layer in &layout.weights {
                    for row in 0..self.n_local {
                        for t in layer {
                            v.push((t.row_addr(row), t.row_bytes));
                        }
                    }
                }
                v
            }
        }
    }

    /// `(addr, len)` of this rank's buffer rows, in local index order.
    pub fn local_descs(&self, layout: &RankLayout) -> Vec<(u64, u64)> {
        let mut v = Vec::with_capacity(self.n_local * self.n_tensors);
        for row in 0..self.n_local {
            for t in &layout.buffer {
                v.push((t.row_addr(row), t.row_bytes));
            }
        }
        v
    }

    /// Appends the descriptor indices of one expert row (one per tensor):
    /// row `src_row` of `layer` in the serving rank's list to `src`, buffer
    /// row `dst_row` in the receiving rank's list to `dst`. The transport
    /// builds every READ and WRITE request with this.
    #[inline]
    pub fn push_row(
        &self,
        layer: usize,
        src_row: u32,
        dst_row: u32,
        src: &mut Vec<i32>,
        dst: &mut Vec<i32>,
    ) {
        for t in 0..self.n_tensors {
            src.push(self.remote_index(layer, src_row as usize, t));
            dst.push(self.local_index(dst_row as usize, t));
        }
    }

    /// Groups `(src_rank, src_row, dst_row)` reads into one request per source.
    /// Callers pass them sorted by source; unsorted input stays correct but
    /// makes one request per run of equal sources.
    pub fn select<I>(&self, layer: usize, reads: I) -> Vec<PeerRead>
    where
        I: IntoIterator<Item = (u32, u32, u32)>,
    {
        let mut out: Vec<PeerRead> = Vec::new();
        for (src, src_row, dst_row) in reads {
            // Sorted input: a source's reads are adjacent, so only the last
            // request can be this source's (O(1) per read on the hot path).
            if out.last().map(|p| p.src_rank) != Some(src) {
                out.push(PeerRead {
                    src_rank: src,
                    ..Default::default()
                });
            }
            let Some(pr) = out.last_mut() else { continue };
            self.push_row(layer, src_row, dst_row, &mut pr.remote, &mut pr.local);
            pr.rows += 1;
        }
        out
    }

    /// The READ requests one rank posts for one layer of a plan.
    pub fn select_for_plan(&self, layer: usize, plan: &RankLayerPlan) -> Vec<PeerRead> {
        self.select(
            layer,
            plan.recvs
                .iter()
                .map(|r| (r.src_rank, r.src_row, r.dst_row)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_cover_the_space_once() {
        let s = DescriptorSpace::new(Mode::ZeroCopy, 3, 4, 2).unwrap();
        let mut seen = std::collections::HashSet::new();
        for l in 0..3 {
            for r in 0..4 {
                for t in 0..2 {
                    assert!(seen.insert(s.remote_index(l, r, t)));
                }
            }
        }
        assert_eq!(seen.len(), 24);
        assert_eq!(*seen.iter().max().unwrap(), 23);
    }

    #[test]
    fn reads_group_per_source() {
        let s = DescriptorSpace::new(Mode::Staged, 2, 4, 2).unwrap();
        let reads = s.select(1, [(1, 0, 2), (1, 3, 3), (2, 1, 0)]);
        assert_eq!(reads.len(), 2);
        assert_eq!(reads[0].src_rank, 1);
        assert_eq!(reads[0].local, vec![4, 5, 6, 7]);
        assert_eq!(reads[0].remote, vec![0, 1, 6, 7]);
        assert_eq!(reads[1].rows, 1);
    }

    #[test]
    fn too_many_descriptors_is_an_error() {
        assert!(DescriptorSpace::new(Mode::ZeroCopy, 1 << 20, 1 << 10, 1 << 4).is_err());
    }
}
