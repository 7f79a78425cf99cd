//! The balance guard and its fast evaluation.
//!
//! Rank loads sorted in descending order must have every prefix sum at most
//! stock's times `1 + max_imbalance` (the full sums are equal). `Sorted`
//! keeps the current loads sorted with their prefix excesses so that the
//! guard after a change of a few loads costs a scan of the window of sorted
//! positions the change moves, not a sort.

use super::LOAD_EPS;

/// Prefix caps of the guard: `cap[k]` bounds the sum of the `k + 1` largest loads.
pub(crate) struct Guard {
    pub(crate) cap: Vec<f64>,
    /// Improvements smaller than this are rounding noise.
    pub(crate) tiny: f64,
}

impl Guard {
    pub(crate) fn new(stock_sorted: &[f64], max_imbalance: f64) -> Self {
        let total: f64 = stock_sorted.iter().sum();
        let slack = LOAD_EPS * total;
        let mut cap = Vec::with_capacity(stock_sorted.len());
        let mut s = 0.0;
        for &x in stock_sorted {
            s += x;
            // Half the canonical check's allowance, so that rounding in the
            // search cannot pass a placement the final check refuses.
            cap.push(s * (1.0 + max_imbalance) + 0.5 * slack);
        }
        Guard {
            cap,
            tiny: 1e-9 * total,
        }
    }
}

/// The guard evaluated on some loads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Eval {
    /// Sum of the positive prefix excesses.
    pub(crate) phi: f64,
    /// Largest prefix excess (`<= 0`: the guard holds).
    pub(crate) worst: f64,
}

/// Sorted view of the rank loads (descending, ties by rank id) with the
/// guard's prefix excesses, for evaluating changes of a few loads.
///
/// Every move keeps the total load, so only the window of sorted positions
/// between the changed ranks' old and new places changes: prefix sums before
/// and after it are as they were. `eval` rescans just that window.
pub(crate) struct Sorted {
    /// Ranks by descending load (ties: rank id).
    pub(crate) order: Vec<usize>,
    /// Position of each rank in `order`.
    pub(crate) pos: Vec<usize>,
    vals: Vec<f64>,
    /// `prefix[k]`: sum of `vals[..k]`.
    pub(crate) prefix: Vec<f64>,
    /// `exc[k]`: excess of `prefix[k + 1]` over the guard's cap (`-inf` for
    /// the full sum).
    pub(crate) exc: Vec<f64>,
    /// `cum[k]`: sum of the positive excesses of the first `k` prefixes.
    cum: Vec<f64>,
    /// `pmax[k]`: largest excess of the first `k` prefixes; `smax[k]`: of the rest.
    pmax: Vec<f64>,
    smax: Vec<f64>,
    /// The guard on the current loads.
    base: Eval,
    /// Loads to evaluate: `(rank, new load)`.
    pub(crate) changes: Vec<(usize, f64)>,
    /// Buffers of evaluations of many changes.
    add: Vec<(f64, usize)>,
    skip: Vec<usize>,
}

impl Sorted {
    pub(crate) fn new(ranks: usize) -> Self {
        Sorted {
            order: (0..ranks).collect(),
            pos: (0..ranks).collect(),
            vals: vec![0.0; ranks],
            prefix: vec![0.0; ranks + 1],
            exc: vec![f64::NEG_INFINITY; ranks],
            cum: vec![0.0; ranks + 1],
            pmax: vec![f64::NEG_INFINITY; ranks + 1],
            smax: vec![f64::NEG_INFINITY; ranks + 1],
            base: Eval {
                phi: 0.0,
                worst: f64::NEG_INFINITY,
            },
            changes: Vec::new(),
            add: Vec::new(),
            skip: Vec::new(),
        }
    }

    /// Sorts `load` and evaluates the guard on it.
    pub(crate) fn update(&mut self, load: &[f64], guard: &Guard) -> Eval {
        let n = load.len();
        // The previous order is nearly right (a step changes a few loads):
        // insertion sort is linear then. Loads descending (`total_cmp`),
        // ties by rank id: a strict total order, so the result is unique.
        for (v, &r) in self.vals.iter_mut().zip(&self.order) {
            *v = load[r];
        }
        let before = |v: f64, r: usize, w: f64, q: usize| v.total_cmp(&w).then(q.cmp(&r)).is_gt();
        for i in 1..n {
            let (v, r) = (self.vals[i], self.order[i]);
            let mut j = i;
            while j > 0 && before(v, r, self.vals[j - 1], self.order[j - 1]) {
                self.vals[j] = self.vals[j - 1];
                self.order[j] = self.order[j - 1];
                j -= 1;
            }
            self.vals[j] = v;
            self.order[j] = r;
        }
        for (i, &r) in self.order.iter().enumerate() {
            self.pos[r] = i;
        }
        // Comparisons instead of `f64::max`: the same values (a NaN excess
        // counts as none), without its NaN handling in the loop.
        // Running values stay in registers (no store-to-load chains).
        let (mut sum, mut cum, mut pmax) = (0.0, 0.0, f64::NEG_INFINITY);
        for k in 0..n {
            sum += self.vals[k];
            self.prefix[k + 1] = sum;
            let v = excess(sum, k, n, guard);
            self.exc[k] = v;
            cum += if v > 0.0 { v } else { 0.0 };
            self.cum[k + 1] = cum;
            if v > pmax {
                pmax = v;
            }
            self.pmax[k + 1] = pmax;
        }
        let mut smax = f64::NEG_INFINITY;
        for k in (0..n).rev() {
            let v = self.exc[k];
            if v > smax {
                smax = v;
            }
            self.smax[k] = smax;
        }
        self.base = Eval {
            phi: self.cum[n],
            worst: self.pmax[n],
        };
        self.base
    }

    /// The guard's sum of positive prefix excesses with `self.changes` applied.
    pub(crate) fn phi(&mut self, guard: &Guard) -> f64 {
        let m = self.changes.len();
        if m <= SMALL {
            let mut skip = [0usize; SMALL];
            let mut add = [(0.0f64, 0usize); SMALL];
            let w = self.prepare(&mut skip[..m], &mut add[..m]);
            self.phi_of(guard, &skip[..m], &add[..m], w)
        } else {
            let (mut skip, mut add) = self.take_buffers(m);
            let w = self.prepare(&mut skip, &mut add);
            let phi = self.phi_of(guard, &skip, &add, w);
            (self.skip, self.add) = (skip, add);
            phi
        }
    }

    /// Whether the guard holds with `self.changes` applied.
    pub(crate) fn holds(&mut self, guard: &Guard) -> bool {
        let m = self.changes.len();
        if m <= SMALL {
            let mut skip = [0usize; SMALL];
            let mut add = [(0.0f64, 0usize); SMALL];
            let w = self.prepare(&mut skip[..m], &mut add[..m]);
            self.holds_of(guard, &skip[..m], &add[..m], w)
        } else {
            let (mut skip, mut add) = self.take_buffers(m);
            let w = self.prepare(&mut skip, &mut add);
            let ok = self.holds_of(guard, &skip, &add, w);
            (self.skip, self.add) = (skip, add);
            ok
        }
    }

    /// The heap buffers for `m` changes (many changes are rare).
    fn take_buffers(&mut self, m: usize) -> (Vec<usize>, Vec<(f64, usize)>) {
        let mut skip = std::mem::take(&mut self.skip);
        let mut add = std::mem::take(&mut self.add);
        skip.clear();
        skip.resize(m, 0);
        add.clear();
        add.resize(m, (0.0, 0));
        (skip, add)
    }

    fn phi_of(
        &self,
        guard: &Guard,
        skip: &[usize],
        add: &[(f64, usize)],
        window: Option<(usize, usize)>,
    ) -> f64 {
        let Some((lo, hi)) = window else {
            return self.base.phi;
        };
        let mut phi = self.cum[lo];
        self.excesses(guard, skip, add, lo, hi, |v| {
            phi += if v > 0.0 { v } else { 0.0 };
            true
        });
        phi + self.cum[self.vals.len()] - self.cum[hi + 1]
    }

    fn holds_of(
        &self,
        guard: &Guard,
        skip: &[usize],
        add: &[(f64, usize)],
        window: Option<(usize, usize)>,
    ) -> bool {
        let Some((lo, hi)) = window else {
            return self.base.worst <= 0.0;
        };
        if self.pmax[lo] > 0.0 || self.smax[hi + 1] > 0.0 {
            return false;
        }
        // NaN (overflowing loads) counts as no excess, as `f64::max` does.
        self.excesses(guard, skip, add, lo, hi, |v| v <= 0.0 || v.is_nan())
    }

    /// Feeds `f` the excess over the cap of every prefix in the window
    /// `lo..=hi` after the changes (the full sum never counts), in order,
    /// until `f` returns false; returns whether it never did.
    fn excesses(
        &self,
        guard: &Guard,
        skip: &[usize],
        add: &[(f64, usize)],
        lo: usize,
        hi: usize,
        mut f: impl FnMut(f64) -> bool,
    ) -> bool {
        let last = (hi + 1).min(self.vals.len() - 1);
        let mut sum = self.prefix[lo];
        let mut k = lo;
        let cap = &guard.cap;
        merge(
            &self.vals,
            skip,
            add,
            lo,
            hi,
            last.saturating_sub(lo),
            |x| {
                sum += x;
                let v = sum - cap[k];
                k += 1;
                f(v)
            },
        )
    }

    /// Writes the changed ranks' old sorted positions into `skip` (ascending)
    /// and their new loads into `add` (descending), each with its insertion
    /// point (the number of current loads at least as large); returns the
    /// window `lo..=hi` of sorted positions the changes affect (`None`
    /// without changes). Every move keeps the total load, so positions
    /// before `lo` and after `hi` keep their loads and prefix sums.
    fn prepare(&self, skip: &mut [usize], add: &mut [(f64, usize)]) -> Option<(usize, usize)> {
        let vals = &self.vals;
        let n = vals.len();
        let (mut lo, mut hi) = (n, 0usize);
        for ((&(r, v), s), a) in self.changes.iter().zip(skip.iter_mut()).zip(add.iter_mut()) {
            let p = self.pos[r];
            // `vals` is descending: a load at most `vals[p]` goes after `p`,
            // a larger one before it.
            let after = if v <= vals[p] {
                p + 1 + vals[p + 1..].partition_point(|&x| x >= v)
            } else {
                vals[..p].partition_point(|&x| x >= v)
            };
            let at = after.min(n - 1);
            lo = lo.min(p).min(at);
            hi = hi.max(p).max(at);
            *s = p;
            *a = (v, after);
        }
        if lo > hi {
            return None;
        }
        insertion_sort(skip, |a, b| a < b);
        insertion_sort(add, |a, b| a.0 > b.0);
        Some((lo, hi))
    }
}

/// Changes evaluated with buffers on the stack.
const SMALL: usize = 8;

/// Feeds the loads at sorted positions `lo..` with the changes applied to
/// `f`, in order, until `f` has seen `count` of them or returns false;
/// returns false if `f` did.
///
/// Positions `lo..=hi` hold exactly the unchanged ranks there plus the
/// changed ones: an unchanged load goes before a changed one when it is at
/// least as large, i.e. before the changed load's insertion point. Runs of
/// unchanged loads are fed without a comparison per load.
#[inline(always)]
fn merge(
    vals: &[f64],
    skip: &[usize],
    add: &[(f64, usize)],
    lo: usize,
    hi: usize,
    count: usize,
    mut f: impl FnMut(f64) -> bool,
) -> bool {
    let mut cur = Cursor {
        p: lo,
        si: 0,
        left: count,
    };
    for &(c, at) in add {
        if cur.left == 0 {
            return true;
        }
        let end = at.min(hi + 1).max(cur.p);
        if let Some(r) = cur.run(vals, skip, end, &mut f) {
            return r;
        }
        if !f(c) {
            return false;
        }
        cur.left -= 1;
    }
    if cur.left == 0 {
        return true;
    }
    cur.run(vals, skip, hi + 1, &mut f).unwrap_or(true)
}

/// Position of a [`merge`] in the unchanged loads and in `skip`, and loads left.
struct Cursor {
    p: usize,
    si: usize,
    left: usize,
}

impl Cursor {
    /// Feeds the unchanged loads at positions `p..end`; `Some` when the
    /// merge is over (`f` refused a load, or `left` reached 0).
    #[inline(always)]
    fn run(
        &mut self,
        vals: &[f64],
        skip: &[usize],
        end: usize,
        f: &mut impl FnMut(f64) -> bool,
    ) -> Option<bool> {
        while self.p < end {
            while self.si < skip.len() && skip[self.si] < self.p {
                self.si += 1;
            }
            let stop = match skip.get(self.si) {
                Some(&s) if s == self.p => {
                    self.si += 1;
                    self.p += 1;
                    continue;
                }
                Some(&s) => end.min(s),
                None => end,
            };
            let take = (stop - self.p).min(self.left);
            for &x in &vals[self.p..self.p + take] {
                if !f(x) {
                    return Some(false);
                }
            }
            self.left -= take;
            if self.left == 0 {
                return Some(true);
            }
            self.p = stop;
        }
        None
    }
}

/// Sorts a short slice (a move changes a few ranks) so that `before(a, b)`
/// holds for consecutive elements.
fn insertion_sort<T: Copy>(v: &mut [T], before: impl Fn(T, T) -> bool) {
    for i in 1..v.len() {
        let x = v[i];
        let mut j = i;
        while j > 0 && before(x, v[j - 1]) {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
}

/// Excess of the sum of the `k + 1` largest loads over the guard's cap; the
/// full sum (`k + 1 == n`) is equal by construction and never counts.
#[inline]
fn excess(prefix: f64, k: usize, n: usize, guard: &Guard) -> f64 {
    if k + 1 < n {
        prefix - guard.cap[k]
    } else {
        f64::NEG_INFINITY
    }
}
