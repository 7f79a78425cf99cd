//! Minimum-cost perfect assignment on a square matrix (Hungarian method with
//! potentials and shortest augmenting paths, O(n^3)); deterministic.

/// Reusable buffers of [`Assigner::assign`].
#[derive(Default)]
pub(crate) struct Assigner {
    u: Vec<i64>,
    v: Vec<i64>,
    row_of_col: Vec<usize>,
    way: Vec<usize>,
    minv: Vec<i64>,
    used: Vec<bool>,
    col_of_row: Vec<usize>,
}

impl Assigner {
    /// Returns `col_of_row` minimizing `sum cost[r * n + col_of_row[r]]`.
    ///
    /// `cost` is row-major `n x n`; costs are small non-negative integers here
    /// (expert counts), so the arithmetic cannot overflow.
    pub(crate) fn assign(&mut self, cost: &[i64], n: usize) -> &[usize] {
        const INF: i64 = i64::MAX / 4;
        // 1-based as in the classic formulation; column 0 is the virtual start.
        let reset = |v: &mut Vec<i64>, x: i64| {
            v.clear();
            v.resize(n + 1, x);
        };
        reset(&mut self.u, 0);
        reset(&mut self.v, 0);
        reset(&mut self.minv, INF);
        self.row_of_col.clear();
        self.row_of_col.resize(n + 1, 0);
        self.way.clear();
        self.way.resize(n + 1, 0);
        self.used.clear();
        self.used.resize(n + 1, false);
        let (u, v, row_of_col, way, minv, used) = (
            &mut self.u,
            &mut self.v,
            &mut self.row_of_col,
            &mut self.way,
            &mut self.minv,
            &mut self.used,
        );
        for i in 1..=n {
            row_of_col[0] = i;
            let mut j0 = 0usize;
            minv.iter_mut().for_each(|m| *m = INF);
            used.iter_mut().for_each(|x| *x = false);
            loop {
                used[j0] = true;
                let i0 = row_of_col[j0];
                let row = &cost[(i0 - 1) * n..i0 * n];
                let mut delta = INF;
                let mut j1 = 0usize;
                for j in 1..=n {
                    if !used[j] {
                        let cur = row[j - 1] - u[i0] - v[j];
                        if cur < minv[j] {
                            minv[j] = cur;
                            way[j] = j0;
                        }
                        if minv[j] < delta {
                            delta = minv[j];
                            j1 = j;
                        }
                    }
                }
                for j in 0..=n {
                    if used[j] {
                        u[row_of_col[j]] += delta;
                        v[j] -= delta;
                    } else {
                        minv[j] -= delta;
                    }
                }
                j0 = j1;
                if row_of_col[j0] == 0 {
                    break;
                }
            }
            loop {
                let j1 = way[j0];
                row_of_col[j0] = row_of_col[j1];
                j0 = j1;
                if j0 == 0 {
                    break;
                }
            }
        }
        self.col_of_row.clear();
        self.col_of_row.resize(n, 0);
        for (j, &row) in row_of_col.iter().enumerate().skip(1) {
            if row > 0 {
                self.col_of_row[row - 1] = j - 1;
            }
        }
        &self.col_of_row
    }
}

#[cfg(test)]
mod tests {
    use super::Assigner;

    fn brute(cost: &[i64], n: usize) -> i64 {
        fn rec(cost: &[i64], n: usize, row: usize, used: &mut Vec<bool>) -> i64 {
            if row == n {
                return 0;
            }
            let mut best = i64::MAX;
            for c in 0..n {
                if !used[c] {
                    used[c] = true;
                    best = best.min(cost[row * n + c] + rec(cost, n, row + 1, used));
                    used[c] = false;
                }
            }
            best
        }
        rec(cost, n, 0, &mut vec![false; n])
    }

    #[test]
    fn matches_brute_force() {
        let mut x = 12345u64;
        for n in 0..7 {
            for _ in 0..50 {
                let cost: Vec<i64> = (0..n * n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x % 9) as i64
                    })
                    .collect();
                let a = Assigner::default().assign(&cost, n).to_vec();
                let mut seen = vec![false; n];
                for &c in &a {
                    assert!(!seen[c]);
                    seen[c] = true;
                }
                let got: i64 = a.iter().enumerate().map(|(r, &c)| cost[r * n + c]).sum();
                assert_eq!(got, brute(&cost, n));
            }
        }
    }
}
