//! Relabeling: rename a placement's nodes, and its ranks inside each node, so
//! that it overlaps an old placement as much as possible.
//!
//! Balance depends only on which multiset of experts each rank (and node)
//! holds, not on which rank id holds it, so relabeling keeps every rank load
//! (hence the sorted loads) exactly. The cost of giving new rank `i`'s set to
//! physical rank `j` is the number of distinct experts in the set that `j` did
//! not hold; for every pair of (new node, old node) an exact assignment of the
//! node's ranks gives the pair's cost, and an exact assignment of nodes on
//! those costs gives the optimum over both levels.

use super::hungarian::Assigner;
use super::Topology;

/// Which ranks held which expert in a placement: a bit set per rank.
pub(crate) struct Presence {
    words: usize,
    bits: Vec<u64>,
}

impl Presence {
    /// Presence of `placement` (`-1` / out-of-range entries ignored).
    pub(crate) fn of<T: Copy + TryInto<usize>>(topo: &Topology, placement: &[T]) -> Self {
        let words = topo.experts.div_ceil(64);
        let mut bits = vec![0u64; words * topo.ranks];
        let spr = topo.slots_per_rank();
        for (p, &v) in placement.iter().enumerate() {
            if let Ok(e) = v.try_into() {
                if e < topo.experts {
                    bits[(p / spr) * words + e / 64] |= 1u64 << (e % 64);
                }
            }
        }
        Presence { words, bits }
    }

    /// No ranks (a stand-in where no presence is needed).
    pub(crate) fn empty() -> Self {
        Presence {
            words: 0,
            bits: Vec::new(),
        }
    }

    /// Whether `rank` holds `expert`.
    #[inline]
    pub(crate) fn has(&self, rank: usize, expert: usize) -> bool {
        self.bits[rank * self.words + expert / 64] >> (expert % 64) & 1 == 1
    }

    /// Presence of every group of `per` consecutive ranks (a node) as one rank.
    pub(crate) fn unions(&self, per: usize) -> Presence {
        let groups = self.bits.len() / self.words.max(1) / per.max(1);
        let mut bits = vec![0u64; groups * self.words];
        for (r, chunk) in self.bits.chunks(self.words.max(1)).enumerate() {
            let g = r / per.max(1);
            if g < groups {
                for (d, &s) in bits[g * self.words..(g + 1) * self.words]
                    .iter_mut()
                    .zip(chunk)
                {
                    *d |= s;
                }
            }
        }
        Presence {
            words: self.words,
            bits,
        }
    }

    /// Experts `rank` holds that `other`'s rank `other_rank` does not.
    pub(crate) fn missing_from(&self, rank: usize, other: &Presence, other_rank: usize) -> u32 {
        let a = &self.bits[rank * self.words..(rank + 1) * self.words];
        let b = &other.bits[other_rank * other.words..(other_rank + 1) * other.words];
        a.iter().zip(b).map(|(x, y)| (x & !y).count_ones()).sum()
    }
}

/// Ranks per node (or nodes) above which assignment is greedy instead of
/// exact (the exact method is cubic).
const EXACT_MAX: usize = 128;
/// Ranks per node (or nodes) above which stock's names are kept (the greedy
/// assignment is quadratic in memory).
const RENAME_MAX: usize = 2048;

/// Whether `relabel` renames (and needs the old placement's presence).
pub(crate) fn renames(topo: &Topology) -> bool {
    topo.ranks_per_node() <= RENAME_MAX && topo.nodes <= RENAME_MAX
}

/// Writes the relabeled `placement` into `out` and returns the experts it makes
/// ranks receive from `old`.
///
/// Exact over both levels when nodes have at most `EXACT_MAX` ranks: the pair
/// costs of (new node, old node) are computed exactly only where the node
/// assignment needs them; elsewhere a lower bound (row or column minima)
/// stands in, and an assignment that uses only exact costs is optimal.
pub(crate) fn relabel(
    topo: &Topology,
    placement: &[usize],
    old: &[i64],
    old_has: &Presence,
    out: &mut [usize],
) -> usize {
    let g = topo.ranks_per_node();
    let nodes = topo.nodes;
    let spr = topo.slots_per_rank();
    if !renames(topo) {
        // Far past real deployments: keep stock's names.
        out.copy_from_slice(placement);
        return super::metrics::experts_received_of(old, placement, topo);
    }
    let new_has = Presence::of(topo, placement);
    let old_nodes = old_has.unions(g);
    let mut sub = Vec::with_capacity(g * g);
    let sub_of = |a: usize, b: usize, sub: &mut Vec<i64>| {
        sub.clear();
        for ii in 0..g {
            for jj in 0..g {
                sub.push(new_has.missing_from(a * g + ii, old_has, b * g + jj) as i64);
            }
        }
    };
    let mut assigner = Assigner::default();
    // Lower bounds of the node-pair costs: an expert of new rank i that no
    // rank of old node b held is received wherever i goes in b.
    let mut pair_cost = vec![0i64; nodes * nodes];
    let mut exact = vec![false; nodes * nodes];
    for a in 0..nodes {
        for b in 0..nodes {
            pair_cost[a * nodes + b] = (0..g)
                .map(|ii| new_has.missing_from(a * g + ii, &old_nodes, b) as i64)
                .sum();
        }
    }
    let mut pair_perm = vec![0usize; nodes * nodes * g];
    let node_of = loop {
        let node_of = assign_any(&mut assigner, &pair_cost, nodes);
        let mut all_exact = true;
        for (a, &b) in node_of.iter().enumerate() {
            if exact[a * nodes + b] {
                continue;
            }
            all_exact = false;
            sub_of(a, b, &mut sub);
            let perm = assign_any(&mut assigner, &sub, g);
            let base = (a * nodes + b) * g;
            let mut c = 0;
            for (ii, &jj) in perm.iter().enumerate() {
                c += sub[ii * g + jj];
                pair_perm[base + ii] = jj;
            }
            pair_cost[a * nodes + b] = c;
            exact[a * nodes + b] = true;
        }
        if all_exact {
            break node_of;
        }
    };
    let mut total = 0usize;
    for (a, &b) in node_of.iter().enumerate() {
        total += pair_cost[a * nodes + b] as usize;
        let base = (a * nodes + b) * g;
        for ii in 0..g {
            let from = a * g + ii;
            let to = b * g + pair_perm[base + ii];
            out[to * spr..(to + 1) * spr].copy_from_slice(&placement[from * spr..(from + 1) * spr]);
        }
    }
    total
}

/// Minimum-cost assignment: exact up to `EXACT_MAX` rows, else greedy
/// (cheapest remaining pair first, ties by row then column).
fn assign_any(assigner: &mut Assigner, cost: &[i64], n: usize) -> Vec<usize> {
    if n <= EXACT_MAX {
        return assigner.assign(cost, n).to_vec();
    }
    let mut pairs: Vec<(i64, usize, usize)> = (0..n * n).map(|k| (cost[k], k / n, k % n)).collect();
    pairs.sort_unstable();
    let mut col_of_row = vec![usize::MAX; n];
    let mut col_used = vec![false; n];
    for (_, i, j) in pairs {
        if col_of_row[i] == usize::MAX && !col_used[j] {
            col_of_row[i] = j;
            col_used[j] = true;
        }
    }
    col_of_row
}

/// Reorders the slots inside every rank so that an expert the rank held in
/// `old` stays in its old slot when the rank still holds it (fewer local
/// copies; loads and received experts do not change).
pub(crate) fn keep_slots(topo: &Topology, placement: &mut [usize], old: &[i64]) {
    let spr = topo.slots_per_rank();
    // Per expert: copies on the current rank not yet given a slot, and copies
    // kept in their old slot (both back to zero after each rank).
    let mut left = vec![0u32; topo.experts];
    let mut kept = vec![0u32; topo.experts];
    let mut fixed: Vec<Option<usize>> = vec![None; spr];
    let mut rest: Vec<usize> = Vec::with_capacity(spr);
    for r in 0..topo.ranks {
        let row = &mut placement[r * spr..(r + 1) * spr];
        let old_row = &old[r * spr..(r + 1) * spr];
        for &e in row.iter() {
            left[e] += 1;
        }
        for (f, &o) in fixed.iter_mut().zip(old_row) {
            *f = usize::try_from(o)
                .ok()
                .filter(|&e| e < topo.experts && left[e] > 0);
            if let Some(e) = *f {
                left[e] -= 1;
                kept[e] += 1;
            }
        }
        // The rest in the rank's order, an expert's kept copies taken from
        // its first occurrences.
        rest.clear();
        for &e in row.iter() {
            if kept[e] > 0 {
                kept[e] -= 1;
            } else {
                left[e] -= 1;
                rest.push(e);
            }
        }
        let mut it = rest.iter();
        for (s, f) in fixed.iter().enumerate() {
            row[s] = match f {
                Some(e) => *e,
                None => it.next().copied().unwrap_or(row[s]),
            };
        }
    }
}
