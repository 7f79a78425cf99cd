//! Per-layer, per-rank transfer planning for EPLB expert rebalancing.
//!
//! Given the old and new placements (`old[L, P]`, `new[L, P]`, flattened
//! row-major; value = logical expert id, `-1` = empty slot) this module works
//! out, for every layer and every rank, which rows stay put, which are filled
//! by a local copy, which are received from a peer (and from which peer), which
//! are filled from an already received row, and what the rank must serve to
//! its peers.
//!
//! Data always lands in a one-layer buffer first and changed rows are then
//! committed buffer -> weights, so local copies may read rows that are
//! themselves overwritten in the same layer.
//!
//! The planner is deterministic: every rank computing the plan from the same
//! inputs gets the same result.

use std::fmt;

/// Logical expert id (`-1` means an empty slot in the placement arrays).
pub type ExpertId = i64;

/// Copy of an expert the rank already holds (old weights) into another row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalCopy {
    pub expert: ExpertId,
    pub src_row: u32,
    pub dst_row: u32,
}

/// Receive one expert from a peer's old weights into the primary row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Recv {
    pub expert: ExpertId,
    pub src_rank: u32,
    pub src_row: u32,
    pub dst_row: u32,
}

/// Fill a row from the (buffer) row where the same expert was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DupFill {
    pub expert: ExpertId,
    pub src_row: u32,
    pub dst_row: u32,
}

/// One expert row of this rank's old weights read by `readers` (ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub expert: ExpertId,
    pub src_row: u32,
    pub readers: Vec<u32>,
}

/// What one rank does for one layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankLayerPlan {
    /// Rows that keep their content (or become / stay empty), ascending.
    pub unchanged: Vec<u32>,
    /// Ascending `dst_row`.
    pub local_copies: Vec<LocalCopy>,
    /// Sorted by `(src_rank, dst_row)`.
    pub recvs: Vec<Recv>,
    /// Ascending `dst_row`.
    pub dup_fills: Vec<DupFill>,
    /// Sorted by `(src_row, expert)`.
    pub sends: Vec<Send>,
}

impl RankLayerPlan {
    /// Rows whose content changes (local copy, recv, dup fill destinations), ascending.
    pub fn changed_rows(&self) -> Vec<u32> {
        let mut rows =
            Vec::with_capacity(self.local_copies.len() + self.recvs.len() + self.dup_fills.len());
        rows.extend(self.local_copies.iter().map(|c| c.dst_row));
        rows.extend(self.recvs.iter().map(|r| r.dst_row));
        rows.extend(self.dup_fills.iter().map(|f| f.dst_row));
        rows.sort_unstable();
        rows.dedup();
        rows
    }

    /// `changed_rows` merged into maximal contiguous runs `(start, len)`.
    pub fn changed_runs(&self) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for row in self.changed_rows() {
            match runs.last_mut() {
                Some((start, len)) if start.checked_add(*len) == Some(row) => *len += 1,
                _ => runs.push((row, 1)),
            }
        }
        runs
    }
}

/// Plan of one layer; `ranks[r]` is rank `r`'s part (len `ep_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    pub ranks: Vec<RankLayerPlan>,
}

/// Plan of a whole rebalance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferPlan {
    pub num_layers: usize,
    pub num_slots: usize,
    pub ep_size: usize,
    pub n_local: usize,
    pub layers: Vec<LayerPlan>,
    /// Hash of everything the plan was computed from (placements, ranks,
    /// nodes): ranks that exchange it before moving bytes catch any
    /// disagreement about what to move.
    pub fingerprint: u64,
}

impl TransferPlan {
    /// The plan of `rank` for `layer`; `Err(PlanError::OutOfRange)` if either is out of range.
    pub fn rank_layer(&self, layer: usize, rank: usize) -> Result<&RankLayerPlan, PlanError> {
        let lp = self.layers.get(layer).ok_or(PlanError::OutOfRange {
            what: "layer",
            value: layer,
            limit: self.layers.len(),
        })?;
        lp.ranks.get(rank).ok_or(PlanError::OutOfRange {
            what: "rank",
            value: rank,
            limit: lp.ranks.len(),
        })
    }

    fn count(&self, f: impl Fn(&RankLayerPlan) -> usize) -> usize {
        self.layers.iter().flat_map(|l| l.ranks.iter()).map(f).sum()
    }

    /// Total experts received by all ranks over all layers.
    pub fn total_recvs(&self) -> usize {
        self.count(|r| r.recvs.len())
    }

    /// Total local copies over all ranks and layers.
    pub fn total_local_copies(&self) -> usize {
        self.count(|r| r.local_copies.len())
    }

    /// Total dup fills over all ranks and layers.
    pub fn total_dup_fills(&self) -> usize {
        self.count(|r| r.dup_fills.len())
    }
}

/// Why a plan could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    ZeroEpSize,
    ZeroSlots,
    ShapeMismatch {
        num_layers: usize,
        num_slots: usize,
        old_len: usize,
        new_len: usize,
    },
    SlotsNotDivisible {
        num_slots: usize,
        ep_size: usize,
    },
    InvalidExpert {
        array: &'static str,
        layer: usize,
        slot: usize,
        value: i64,
    },
    MissingSource {
        layer: usize,
        expert: i64,
        slot: usize,
    },
    NodeOfRankLen {
        len: usize,
        ep_size: usize,
    },
    OutOfRange {
        what: &'static str,
        value: usize,
        limit: usize,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::ZeroEpSize => write!(f, "ep_size must be > 0, got 0"),
            PlanError::ZeroSlots => write!(f, "num_slots must be > 0, got 0"),
            PlanError::ShapeMismatch {
                num_layers,
                num_slots,
                old_len,
                new_len,
            } => {
                match num_layers.checked_mul(*num_slots) {
                    Some(n) => write!(
                        f,
                        "shape mismatch: num_layers ({num_layers}) * num_slots ({num_slots}) = {n}"
                    )?,
                    None => write!(
                        f,
                        "shape mismatch: num_layers ({num_layers}) * num_slots ({num_slots}) overflows"
                    )?,
                }
                write!(
                    f,
                    ", but old_indices has length {old_len} and new_indices has length {new_len}"
                )
            }
            PlanError::SlotsNotDivisible { num_slots, ep_size } => write!(
                f,
                "num_slots ({num_slots}) is not divisible by ep_size ({ep_size})"
            ),
            PlanError::InvalidExpert {
                array,
                layer,
                slot,
                value,
            } => write!(
                f,
                "{array}[layer {layer}, slot {slot}] = {value} is invalid: \
                 expert ids must be >= 0, or -1 for an empty slot"
            ),
            PlanError::MissingSource {
                layer,
                expert,
                slot,
            } => write!(
                f,
                "new_indices[layer {layer}, slot {slot}] needs expert {expert}, \
                 but no slot of old_indices[layer {layer}] holds it"
            ),
            PlanError::NodeOfRankLen { len, ep_size } => {
                write!(f, "node_of_rank has length {len}, but ep_size is {ep_size}")
            }
            PlanError::OutOfRange { what, value, limit } => {
                write!(f, "{what} = {value} is out of range (limit {limit})")
            }
        }
    }
}

impl std::error::Error for PlanError {}

/// Build the transfer plan for moving from placement `old` to placement `new`.
///
/// `old` and `new` are `[num_layers, num_slots]` row-major. `node_of_rank`
/// (len `ep_size`) makes receivers prefer holders on their own node.
pub fn plan_rebalance(
    old: &[i64],
    new: &[i64],
    num_layers: usize,
    num_slots: usize,
    ep_size: usize,
    node_of_rank: Option<&[usize]>,
) -> Result<TransferPlan, PlanError> {
    if ep_size == 0 {
        return Err(PlanError::ZeroEpSize);
    }
    if num_slots == 0 {
        return Err(PlanError::ZeroSlots);
    }
    let expected = num_layers.checked_mul(num_slots);
    if expected != Some(old.len()) || expected != Some(new.len()) {
        return Err(PlanError::ShapeMismatch {
            num_layers,
            num_slots,
            old_len: old.len(),
            new_len: new.len(),
        });
    }
    if num_slots % ep_size != 0 {
        return Err(PlanError::SlotsNotDivisible { num_slots, ep_size });
    }
    if u32::try_from(num_slots).is_err() {
        return Err(PlanError::OutOfRange {
            what: "num_slots",
            value: num_slots,
            limit: u32::MAX as usize,
        });
    }
    if let Some(nodes) = node_of_rank {
        if nodes.len() != ep_size {
            return Err(PlanError::NodeOfRankLen {
                len: nodes.len(),
                ep_size,
            });
        }
    }
    let max_id = scan_values(old, "old_indices", num_slots)?.max(scan_values(
        new,
        "new_indices",
        num_slots,
    )?);

    let n_local = num_slots / ep_size;
    if num_layers == 0 {
        // Nothing to plan. Empty arrays fit any `num_slots`, so it must not size
        // the scratch buffers here (it could ask for tens of GiB and abort).
        return Ok(TransferPlan {
            num_layers,
            num_slots,
            ep_size,
            n_local,
            layers: Vec::new(),
            fingerprint: plan_fingerprint(old, new, num_slots, ep_size, node_of_rank),
        });
    }
    let mut scratch = Scratch::new(num_slots, ep_size, max_id);
    let mut layers = Vec::with_capacity(num_layers);
    for (layer, (old_l, new_l)) in old
        .chunks_exact(num_slots)
        .zip(new.chunks_exact(num_slots))
        .enumerate()
    {
        layers.push(scratch.plan_layer(layer, old_l, new_l, ep_size, n_local, node_of_rank)?);
    }
    Ok(TransferPlan {
        num_layers,
        num_slots,
        ep_size,
        n_local,
        layers,
        fingerprint: plan_fingerprint(old, new, num_slots, ep_size, node_of_rank),
    })
}

/// The fingerprint of a plan's inputs (see [`TransferPlan::fingerprint`]).
pub fn plan_fingerprint(
    old: &[i64],
    new: &[i64],
    num_slots: usize,
    ep_size: usize,
    node_of_rank: Option<&[usize]>,
) -> u64 {
    use crate::checksum::mix;
    let mut h = mix(0x504C_414E, num_slots as u64);
    h = mix(h, ep_size as u64);
    for &v in old.iter().chain(new) {
        h = mix(h, v as u64);
    }
    for &n in node_of_rank.unwrap_or(&[]) {
        h = mix(h, n as u64 ^ 0x4E4F_4445);
    }
    h
}

/// Fingerprint of one exchange of a plan: the plan's and the layer's.
pub fn layer_fingerprint(plan_fingerprint: u64, layer: usize) -> u64 {
    crate::checksum::mix(plan_fingerprint, layer as u64 ^ 0x4C41_5945_5200_0000)
}

/// Checks that every value is >= -1 and returns the largest one (-1 if none).
fn scan_values(values: &[i64], array: &'static str, num_slots: usize) -> Result<i64, PlanError> {
    let mut max = -1i64;
    for (i, &v) in values.iter().enumerate() {
        if v < -1 {
            return Err(PlanError::InvalidExpert {
                array,
                layer: i / num_slots,
                slot: i % num_slots,
                value: v,
            });
        }
        max = max.max(v);
    }
    Ok(max)
}

/// A receive that still needs a source: expert (table index + id), receiver, primary row.
#[derive(Clone, Copy)]
struct Request {
    idx: u32,
    expert: ExpertId,
    rank: u32,
    row: u32,
}

/// Scratch buffers reused across layers.
///
/// Experts are mapped to a dense table index: the id itself when ids are small
/// (`dense`), else the position in the layer's sorted list of distinct old ids.
/// Both mappings preserve the id order.
struct Scratch {
    dense: bool,
    table_len: usize,
    /// Sorted distinct ids of old[l] (sparse mode only).
    ids: Vec<i64>,
    /// CSR offsets into `holders` (len table_len + 1).
    offsets: Vec<u32>,
    cursor: Vec<u32>,
    /// (rank, lowest local row) of each holder, grouped by expert, ranks ascending.
    holders: Vec<(u32, u32)>,
    /// Generation stamps per table index (never cleared; `epoch` only grows).
    stamp: Vec<u64>,
    prim_row: Vec<u32>,
    epoch: u64,
    /// Experts served per source rank in the current layer.
    load: Vec<u32>,
    requests: Vec<Request>,
    cands: Vec<(u32, u32)>,
}

impl Scratch {
    fn new(num_slots: usize, ep_size: usize, max_id: i64) -> Self {
        // Dense table when ids are small (max id < 16 * P), else sort per layer.
        let dense_len = usize::try_from(max_id.saturating_add(1)).unwrap_or(0);
        let dense = dense_len <= num_slots.saturating_mul(16);
        let cap = if dense { dense_len } else { num_slots };
        Scratch {
            dense,
            table_len: if dense { dense_len } else { 0 },
            ids: Vec::new(),
            offsets: vec![0; cap + 1],
            cursor: vec![0; cap],
            holders: Vec::with_capacity(num_slots),
            stamp: vec![0; cap],
            prim_row: vec![0; cap],
            epoch: 0,
            load: vec![0; ep_size],
            requests: Vec::with_capacity(num_slots),
            cands: Vec::with_capacity(ep_size),
        }
    }

    #[inline]
    fn index(&self, e: i64) -> Option<usize> {
        if self.dense {
            usize::try_from(e).ok().filter(|&i| i < self.table_len)
        } else {
            self.ids.binary_search(&e).ok()
        }
    }

    fn plan_layer(
        &mut self,
        layer: usize,
        old_l: &[i64],
        new_l: &[i64],
        ep_size: usize,
        n_local: usize,
        node_of_rank: Option<&[usize]>,
    ) -> Result<LayerPlan, PlanError> {
        if !self.dense {
            self.ids.clear();
            self.ids.extend(old_l.iter().copied().filter(|&e| e >= 0));
            self.ids.sort_unstable();
            self.ids.dedup();
            self.table_len = self.ids.len();
        }
        let tl = self.table_len;

        // Holder lists (CSR): count distinct holder ranks per expert...
        self.offsets[..=tl].fill(0);
        for rows in old_l.chunks_exact(n_local) {
            self.epoch += 1;
            for &e in rows {
                if e < 0 {
                    continue;
                }
                if let Some(i) = self.index(e) {
                    if self.stamp[i] != self.epoch {
                        self.stamp[i] = self.epoch;
                        self.offsets[i + 1] += 1;
                    }
                }
            }
        }
        for i in 0..tl {
            self.offsets[i + 1] += self.offsets[i];
        }
        self.cursor[..tl].copy_from_slice(&self.offsets[..tl]);
        self.holders.clear();
        self.holders.resize(self.offsets[tl] as usize, (0, 0));
        // ...then fill them (slots are rank-major, so holders come out rank-ascending
        // and the first row seen on a rank is its lowest).
        for (r, rows) in old_l.chunks_exact(n_local).enumerate() {
            for (d, &e) in rows.iter().enumerate() {
                if e < 0 {
                    continue;
                }
                if let Some(i) = self.index(e) {
                    let c = self.cursor[i] as usize;
                    if c > self.offsets[i] as usize && self.holders[c - 1].0 == r as u32 {
                        continue;
                    }
                    self.holders[c] = (r as u32, d as u32);
                    self.cursor[i] += 1;
                }
            }
        }

        // Per-rank row classification.
        let mut ranks: Vec<RankLayerPlan> = vec![RankLayerPlan::default(); ep_size];
        self.requests.clear();
        for (r, plan) in ranks.iter_mut().enumerate() {
            self.epoch += 1;
            let base = r * n_local;
            for d in 0..n_local {
                let p = base + d;
                let e = new_l[p];
                if e == -1 || e == old_l[p] {
                    plan.unchanged.push(d as u32);
                    continue;
                }
                let i = match self.index(e) {
                    Some(i) if self.offsets[i] < self.offsets[i + 1] => i,
                    _ => {
                        return Err(PlanError::MissingSource {
                            layer,
                            expert: e,
                            slot: p,
                        })
                    }
                };
                let hs = &self.holders[self.offsets[i] as usize..self.offsets[i + 1] as usize];
                if let Ok(k) = hs.binary_search_by_key(&(r as u32), |h| h.0) {
                    plan.local_copies.push(LocalCopy {
                        expert: e,
                        src_row: hs[k].1,
                        dst_row: d as u32,
                    });
                } else if self.stamp[i] == self.epoch {
                    plan.dup_fills.push(DupFill {
                        expert: e,
                        src_row: self.prim_row[i],
                        dst_row: d as u32,
                    });
                } else {
                    self.stamp[i] = self.epoch;
                    self.prim_row[i] = d as u32;
                    self.requests.push(Request {
                        idx: i as u32,
                        expert: e,
                        rank: r as u32,
                        row: d as u32,
                    });
                }
            }
        }

        // Source selection: experts ascending, receivers ascending.
        self.requests.sort_unstable_by_key(|q| (q.idx, q.rank));
        self.load.fill(0);
        let Scratch {
            offsets,
            holders,
            load,
            requests,
            cands,
            ..
        } = self;
        for q in requests.iter() {
            let i = q.idx as usize;
            let hs = &holders[offsets[i] as usize..offsets[i + 1] as usize];
            let pool: &[(u32, u32)] = match node_of_rank {
                Some(nodes) => {
                    let mine = nodes[q.rank as usize];
                    cands.clear();
                    cands.extend(hs.iter().copied().filter(|h| nodes[h.0 as usize] == mine));
                    if cands.is_empty() {
                        hs
                    } else {
                        cands
                    }
                }
                None => hs,
            };
            let k = pool.len();
            if k == 0 {
                // Unreachable: requests only exist for experts with holders.
                continue;
            }
            let start = ((q.rank as u64).wrapping_add(q.expert as u64) % k as u64) as usize;
            let mut best = pool[start];
            let mut best_load = load[best.0 as usize];
            for j in 1..k {
                let c = pool[(start + j) % k];
                let l = load[c.0 as usize];
                if l < best_load {
                    best = c;
                    best_load = l;
                }
            }
            let (src_rank, src_row) = best;
            load[src_rank as usize] += 1;
            ranks[q.rank as usize].recvs.push(Recv {
                expert: q.expert,
                src_rank,
                src_row,
                dst_row: q.row,
            });
            let sends = &mut ranks[src_rank as usize].sends;
            match sends.last_mut() {
                Some(s) if s.expert == q.expert => s.readers.push(q.rank),
                _ => sends.push(Send {
                    expert: q.expert,
                    src_row,
                    readers: vec![q.rank],
                }),
            }
        }
        for plan in ranks.iter_mut() {
            if plan.recvs.len() > 1 {
                plan.recvs.sort_unstable_by_key(|r| (r.src_rank, r.dst_row));
            }
            if plan.sends.len() > 1 {
                plan.sends.sort_unstable_by_key(|s| (s.src_row, s.expert));
            }
        }
        Ok(LayerPlan { ranks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan1(old: &[i64], new: &[i64], ep: usize) -> TransferPlan {
        plan_rebalance(old, new, 1, old.len(), ep, None).expect("valid plan")
    }

    #[test]
    fn two_rank_swap() {
        // rank0: [0, 1], rank1: [2, 3]; swap 1 <-> 2.
        let p = plan1(&[0, 1, 2, 3], &[0, 2, 1, 3], 2);
        let r0 = p.rank_layer(0, 0).unwrap();
        let r1 = p.rank_layer(0, 1).unwrap();
        assert_eq!(r0.unchanged, vec![0]);
        assert_eq!(
            r0.recvs,
            vec![Recv {
                expert: 2,
                src_rank: 1,
                src_row: 0,
                dst_row: 1
            }]
        );
        assert_eq!(
            r0.sends,
            vec![Send {
                expert: 1,
                src_row: 1,
                readers: vec![1]
            }]
        );
        assert_eq!(r1.unchanged, vec![1]);
        assert_eq!(
            r1.recvs,
            vec![Recv {
                expert: 1,
                src_rank: 0,
                src_row: 1,
                dst_row: 0
            }]
        );
        assert_eq!(r0.changed_rows(), vec![1]);
        assert_eq!(p.total_recvs(), 2);
        assert_eq!(p.total_local_copies(), 0);
        assert_eq!(p.total_dup_fills(), 0);
    }

    #[test]
    fn replica_dedup_in_sends() {
        // Expert 0 lives only on rank 0; ranks 1 and 2 both want it.
        let old = [0, 1, 2, 3, 4, 5];
        let new = [0, 1, 0, 3, 0, 5];
        let p = plan1(&old, &new, 3);
        let r0 = p.rank_layer(0, 0).unwrap();
        assert_eq!(
            r0.sends,
            vec![Send {
                expert: 0,
                src_row: 0,
                readers: vec![1, 2]
            }]
        );
        // Expert 2 and 4 are dropped: nobody needs them, no sends.
        assert!(p.rank_layer(0, 1).unwrap().sends.is_empty());
    }

    #[test]
    fn dup_fill_and_local_copy() {
        // rank0 rows [0,1,2,3] -> [5, 5, 5, 0]: 5 received once + 2 dup fills;
        // row 3 gets 0 by local copy from row 0.
        let old = [0, 1, 2, 3, 4, 5, 6, 7];
        let new = [5, 5, 5, 0, 4, 5, 6, 7];
        let p = plan1(&old, &new, 2);
        let r0 = p.rank_layer(0, 0).unwrap();
        assert_eq!(
            r0.recvs,
            vec![Recv {
                expert: 5,
                src_rank: 1,
                src_row: 1,
                dst_row: 0
            }]
        );
        assert_eq!(
            r0.dup_fills,
            vec![
                DupFill {
                    expert: 5,
                    src_row: 0,
                    dst_row: 1
                },
                DupFill {
                    expert: 5,
                    src_row: 0,
                    dst_row: 2
                }
            ]
        );
        assert_eq!(
            r0.local_copies,
            vec![LocalCopy {
                expert: 0,
                src_row: 0,
                dst_row: 3
            }]
        );
        assert!(r0.unchanged.is_empty());
        assert_eq!(r0.changed_rows(), vec![0, 1, 2, 3]);
        assert_eq!(r0.changed_runs(), vec![(0, 4)]);
        let r1 = p.rank_layer(0, 1).unwrap();
        assert_eq!(r1.unchanged, vec![0, 1, 2, 3]);
        assert_eq!(r1.sends.len(), 1);
        assert_eq!(r1.sends[0].readers, vec![0]);
    }

    #[test]
    fn local_copy_uses_lowest_row() {
        let old = [3, 3, 1, 2];
        let new = [3, 3, 3, 2];
        let p = plan1(&old, &new, 1);
        let r0 = p.rank_layer(0, 0).unwrap();
        assert_eq!(
            r0.local_copies,
            vec![LocalCopy {
                expert: 3,
                src_row: 0,
                dst_row: 2
            }]
        );
        assert_eq!(r0.unchanged, vec![0, 1, 3]);
    }

    #[test]
    fn empty_slots() {
        // -1 in new is unchanged; -1 in old is just not a holder.
        let old = [0, -1, 1, 2];
        let new = [-1, 2, 1, -1];
        let p = plan1(&old, &new, 2);
        let r0 = p.rank_layer(0, 0).unwrap();
        assert_eq!(r0.unchanged, vec![0]);
        assert_eq!(r0.recvs.len(), 1);
        assert_eq!(r0.recvs[0].src_rank, 1);
        assert_eq!(r0.recvs[0].src_row, 1);
        assert_eq!(r0.changed_runs(), vec![(1, 1)]);
        assert_eq!(p.rank_layer(0, 1).unwrap().unchanged, vec![0, 1]);
    }

    #[test]
    fn no_change_is_empty_plan() {
        let old = [0, 1, 2, 3, 1, 2, 3, 0];
        let p = plan_rebalance(&old, &old, 2, 4, 2, None).unwrap();
        for l in &p.layers {
            for r in &l.ranks {
                assert_eq!(r.unchanged, vec![0, 1]);
                assert!(r.changed_rows().is_empty());
                assert!(r.sends.is_empty());
            }
        }
        assert_eq!(
            p.total_recvs() + p.total_local_copies() + p.total_dup_fills(),
            0
        );
        let empty = plan_rebalance(&[], &[], 0, 4, 2, None).unwrap();
        assert!(empty.layers.is_empty());
        assert_eq!(empty.n_local, 2);
    }

    #[test]
    fn runs_merge() {
        let rp = RankLayerPlan {
            local_copies: vec![LocalCopy {
                expert: 1,
                src_row: 0,
                dst_row: 5,
            }],
            recvs: vec![
                Recv {
                    expert: 2,
                    src_rank: 0,
                    src_row: 0,
                    dst_row: 1,
                },
                Recv {
                    expert: 3,
                    src_rank: 0,
                    src_row: 0,
                    dst_row: 2,
                },
            ],
            dup_fills: vec![DupFill {
                expert: 2,
                src_row: 1,
                dst_row: 6,
            }],
            ..Default::default()
        };
        assert_eq!(rp.changed_rows(), vec![1, 2, 5, 6]);
        assert_eq!(rp.changed_runs(), vec![(1, 2), (5, 2)]);
    }

    #[test]
    fn node_preference() {
        // 4 ranks, 1 row each; nodes [0, 0, 1, 1]. Expert 7 on ranks 0 and 2.
        // Rank 3 (node 1) must read from rank 2, rank 1 (node 0) from rank 0,
        // even though plain balancing would allow either.
        let old = [7, 1, 7, 3];
        let new = [7, 7, 7, 7];
        let nodes = [0usize, 0, 1, 1];
        let p = plan_rebalance(&old, &new, 1, 4, 4, Some(&nodes)).unwrap();
        assert_eq!(p.rank_layer(0, 1).unwrap().recvs[0].src_rank, 0);
        assert_eq!(p.rank_layer(0, 3).unwrap().recvs[0].src_rank, 2);
        // No same-node holder: falls back to all holders.
        let old = [7, 1, 2, 3];
        let p = plan_rebalance(&old, &new, 1, 4, 4, Some(&nodes)).unwrap();
        assert_eq!(p.rank_layer(0, 3).unwrap().recvs[0].src_rank, 0);
        assert_eq!(p.rank_layer(0, 0).unwrap().sends[0].readers, vec![1, 2, 3]);
    }

    #[test]
    fn balance_two_holders_four_readers() {
        // 6 ranks x 1 row; expert 0 on ranks 0 and 1; ranks 2..6 all want it.
        let old = [0, 0, 1, 2, 3, 4];
        let new = [0, 0, 0, 0, 0, 0];
        let p = plan1(&old, &new, 6);
        let r0 = &p.rank_layer(0, 0).unwrap().sends;
        let r1 = &p.rank_layer(0, 1).unwrap().sends;
        assert_eq!(r0.len(), 1);
        assert_eq!(r1.len(), 1);
        assert_eq!(r0[0].readers.len(), 2);
        assert_eq!(r1[0].readers.len(), 2);
        // Rotation: receiver 2, expert 0, 2 candidates -> start at index 0 (rank 0).
        assert_eq!(p.rank_layer(0, 2).unwrap().recvs[0].src_rank, 0);
        assert_eq!(p.rank_layer(0, 3).unwrap().recvs[0].src_rank, 1);
    }

    #[test]
    fn balance_across_experts() {
        // Expert 0 only on rank 0; expert 1 on ranks 0 and 1; rank 2 wants both.
        // Rank 0 already serves expert 0, so expert 1 comes from rank 1.
        let old = [0, 1, 1, 5, 6, 7];
        let new = [0, 1, 1, 5, 0, 1];
        let p = plan1(&old, &new, 3);
        let r2 = p.rank_layer(0, 2).unwrap();
        assert_eq!(r2.recvs.len(), 2);
        assert_eq!(r2.recvs[0].src_rank, 0);
        assert_eq!(r2.recvs[0].expert, 0);
        assert_eq!(r2.recvs[1].src_rank, 1);
        assert_eq!(r2.recvs[1].expert, 1);
    }

    #[test]
    fn sparse_ids() {
        let big = 1i64 << 40;
        let old = [big, 1, big + 7, 3];
        let new = [big + 7, 1, big, 3];
        let p = plan1(&old, &new, 2);
        assert_eq!(p.rank_layer(0, 0).unwrap().recvs[0].expert, big + 7);
        assert_eq!(p.rank_layer(0, 1).unwrap().recvs[0].expert, big);
        assert_eq!(p.rank_layer(0, 0).unwrap().sends[0].expert, big);
        assert_eq!(plan1(&[i64::MAX, 0], &[0, i64::MAX], 2).total_recvs(), 2);
        let err = plan_rebalance(&[big, 1], &[big + 1, 1], 1, 2, 1, None).unwrap_err();
        assert_eq!(
            err,
            PlanError::MissingSource {
                layer: 0,
                expert: big + 1,
                slot: 0
            }
        );
    }

    #[test]
    fn errors() {
        let ok = [0i64, 1, 2, 3];
        assert_eq!(
            plan_rebalance(&ok, &ok, 1, 4, 0, None),
            Err(PlanError::ZeroEpSize)
        );
        assert_eq!(
            plan_rebalance(&[], &[], 0, 0, 1, None),
            Err(PlanError::ZeroSlots)
        );
        let e = plan_rebalance(&ok, &ok[..3], 1, 4, 2, None).unwrap_err();
        assert_eq!(
            e,
            PlanError::ShapeMismatch {
                num_layers: 1,
                num_slots: 4,
                old_len: 4,
                new_len: 3
            }
        );
        assert!(e.to_string().contains("new_indices has length 3"));
        assert!(matches!(
            plan_rebalance(&ok, &ok, usize::MAX, 4, 2, None),
            Err(PlanError::ShapeMismatch { .. })
        ));
        let e = plan_rebalance(&ok, &ok, 1, 4, 3, None).unwrap_err();
        assert_eq!(
            e,
            PlanError::SlotsNotDivisible {
                num_slots: 4,
                ep_size: 3
            }
        );
        assert!(e.to_string().contains("(4)") && e.to_string().contains("(3)"));
        let e = plan_rebalance(&ok, &[0, 1, 2, 3, 0, -2, 1, 2], 2, 4, 2, None);
        // old is too short for 2 layers: shape first.
        assert!(matches!(e, Err(PlanError::ShapeMismatch { .. })));
        let old2 = [0i64, 1, 2, 3, 0, 1, 2, 3];
        let e = plan_rebalance(&old2, &[0, 1, 2, 3, 0, -2, 1, 2], 2, 4, 2, None).unwrap_err();
        assert_eq!(
            e,
            PlanError::InvalidExpert {
                array: "new_indices",
                layer: 1,
                slot: 1,
                value: -2
            }
        );
        assert!(e.to_string().contains("new_indices") && e.to_string().contains("-2"));
        let e = plan_rebalance(&[0, -5, 2, 3], &ok, 1, 4, 2, None).unwrap_err();
        assert!(matches!(
            e,
            PlanError::InvalidExpert {
                array: "old_indices",
                slot: 1,
                ..
            }
        ));
        let e = plan_rebalance(&old2, &[0, 1, 2, 3, 0, 1, 9, 9], 2, 4, 2, None).unwrap_err();
        assert_eq!(
            e,
            PlanError::MissingSource {
                layer: 1,
                expert: 9,
                slot: 2
            }
        );
        assert!(e.to_string().contains("expert 9"));
        let e = plan_rebalance(&ok, &ok, 1, 4, 2, Some(&[0])).unwrap_err();
        assert_eq!(e, PlanError::NodeOfRankLen { len: 1, ep_size: 2 });
        let p = plan1(&ok, &ok, 2);
        assert_eq!(
            p.rank_layer(1, 0),
            Err(PlanError::OutOfRange {
                what: "layer",
                value: 1,
                limit: 1
            })
        );
        assert_eq!(
            p.rank_layer(0, 2),
            Err(PlanError::OutOfRange {
                what: "rank",
                value: 2,
                limit: 2
            })
        );
        let _: &dyn std::error::Error = &e;
    }
}
