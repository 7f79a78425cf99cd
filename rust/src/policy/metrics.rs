//! Measures of one layer's placement: rank loads, the balance guard, and the
//! experts a rebalance makes each rank receive.

use super::{Topology, LOAD_EPS};

/// Replicas of each logical expert in `phy2log` (`-1` ignored).
pub fn replica_counts<T: Copy + TryInto<usize>>(phy2log: &[T], experts: usize) -> Vec<u32> {
    let mut cnt = vec![0u32; experts];
    for &v in phy2log {
        if let Ok(e) = v.try_into() {
            if let Some(c) = cnt.get_mut(e) {
                *c += 1;
            }
        }
    }
    cnt
}

/// Load of every rank: the sum over its slots of `w[e] / replicas(e)`, summed
/// in slot order (`-1` slots carry nothing).
pub fn rank_loads<T: Copy + TryInto<usize>>(w: &[f64], phy2log: &[T], topo: &Topology) -> Vec<f64> {
    let cnt = replica_counts(phy2log, topo.experts);
    let spr = topo.slots_per_rank();
    let mut load = vec![0.0f64; topo.ranks];
    for (p, &v) in phy2log.iter().enumerate() {
        if let Ok(e) = v.try_into() {
            if let (Some(&x), Some(&c)) = (w.get(e), cnt.get(e)) {
                load[p / spr] += x / c as f64;
            }
        }
    }
    load
}

/// Rank loads sorted in descending order.
pub fn sorted_loads<T: Copy + TryInto<usize>>(
    w: &[f64],
    phy2log: &[T],
    topo: &Topology,
) -> Vec<f64> {
    let mut l = rank_loads(w, phy2log, topo);
    l.sort_unstable_by(|a, b| b.total_cmp(a));
    l
}

/// The balance guard: with both vectors sorted in descending order, every
/// prefix sum of `ours` is at most `(1 + max_imbalance)` times that of
/// `reference`, plus `LOAD_EPS` times the reference total (rounding). Returns
/// the largest excess (`<= 0` when the guard holds).
pub fn prefix_excess(ours_sorted: &[f64], reference_sorted: &[f64], max_imbalance: f64) -> f64 {
    let total: f64 = reference_sorted.iter().sum();
    let slack = LOAD_EPS * total;
    let (mut a, mut b) = (0.0f64, 0.0f64);
    let mut worst = f64::NEG_INFINITY;
    for (x, y) in ours_sorted.iter().zip(reference_sorted) {
        a += x;
        b += y;
        worst = worst.max(a - (b * (1.0 + max_imbalance) + slack));
    }
    worst
}

/// [`experts_received`] of a placement given as expert ids (`usize`).
pub(crate) fn experts_received_of(old: &[i64], new: &[usize], topo: &Topology) -> usize {
    let new: Vec<i64> = new.iter().map(|&e| e as i64).collect();
    experts_received(old, &new, topo)
}

/// Experts rank `r` must receive to go from `old` to `new` (one layer): the
/// distinct logical experts it holds in `new` but not in `old`, summed over
/// ranks. Duplicates on a rank are filled locally and do not count.
pub fn experts_received(old: &[i64], new: &[i64], topo: &Topology) -> usize {
    let spr = topo.slots_per_rank();
    let mut total = 0;
    let (mut o, mut n) = (Vec::with_capacity(spr), Vec::with_capacity(spr));
    for r in 0..topo.ranks {
        o.clear();
        o.extend_from_slice(&old[r * spr..(r + 1) * spr]);
        o.sort_unstable();
        n.clear();
        n.extend(
            new[r * spr..(r + 1) * spr]
                .iter()
                .copied()
                .filter(|&e| e >= 0),
        );
        n.sort_unstable();
        n.dedup();
        total += n.iter().filter(|e| o.binary_search(e).is_err()).count();
    }
    total
}
