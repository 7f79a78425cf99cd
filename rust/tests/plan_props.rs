//! Property tests for `eplb_xfer::plan`.

use std::collections::{BTreeMap, BTreeSet};

use eplb_xfer::plan::{plan_rebalance, PlanError, TransferPlan};
use proptest::prelude::*;

/// splitmix64: small deterministic generator driven by a proptest seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// One layer: every expert 0..e appears at least once; the rest are replicas or -1.
fn placement(rng: &mut Rng, p: usize, e: usize) -> Vec<i64> {
    let mut v: Vec<i64> = (0..e as i64).collect();
    while v.len() < p {
        if rng.below(4) == 0 {
            v.push(-1);
        } else {
            v.push(rng.below(e) as i64);
        }
    }
    rng.shuffle(&mut v);
    v
}

struct Case {
    old: Vec<i64>,
    new: Vec<i64>,
    layers: usize,
    p: usize,
    ep: usize,
    nodes: Option<Vec<usize>>,
}

fn make_case(ep: usize, n_local: usize, layers: usize, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let p = ep * n_local;
    let e = 1 + rng.below(p);
    let mut old = Vec::with_capacity(layers * p);
    let mut new = Vec::with_capacity(layers * p);
    for _ in 0..layers {
        let o = placement(&mut rng, p, e);
        let n = if rng.below(3) == 0 {
            // Mostly unchanged: a few swaps / empties / replicas on top of old.
            let mut n = o.clone();
            for _ in 0..rng.below(3) + 1 {
                let (a, b) = (rng.below(p), rng.below(p));
                n.swap(a, b);
            }
            if rng.below(2) == 0 {
                let a = rng.below(p);
                n[a] = rng.below(e) as i64;
            }
            n
        } else {
            placement(&mut rng, p, e)
        };
        old.extend(o);
        new.extend(n);
    }
    let nodes = if rng.below(2) == 0 {
        let n_nodes = 1 + rng.below(3);
        Some((0..ep).map(|_| rng.below(n_nodes)).collect())
    } else {
        None
    };
    Case {
        old,
        new,
        layers,
        p,
        ep,
        nodes,
    }
}

fn run(c: &Case) -> Result<TransferPlan, PlanError> {
    plan_rebalance(&c.old, &c.new, c.layers, c.p, c.ep, c.nodes.as_deref())
}

/// Straightforward reference implementation of the spec: per layer, a list of
/// (receiver, expert, primary row) sorted by (expert, receiver) -> chosen (src_rank, src_row).
fn reference_sources(c: &Case, layer: usize) -> BTreeMap<(u32, i64), (u32, u32, u32)> {
    let n_local = c.p / c.ep;
    let old = &c.old[layer * c.p..(layer + 1) * c.p];
    let new = &c.new[layer * c.p..(layer + 1) * c.p];
    let lowest = |rank: usize, e: i64| -> Option<usize> {
        (0..n_local).find(|&d| old[rank * n_local + d] == e)
    };
    // (expert, receiver) -> primary row
    let mut reqs: BTreeMap<(i64, usize), usize> = BTreeMap::new();
    for r in 0..c.ep {
        for d in 0..n_local {
            let e = new[r * n_local + d];
            if e == -1 || e == old[r * n_local + d] || lowest(r, e).is_some() {
                continue;
            }
            reqs.entry((e, r)).or_insert(d);
        }
    }
    let mut load = vec![0usize; c.ep];
    let mut out = BTreeMap::new();
    for (&(e, r), &d) in &reqs {
        let holders: Vec<usize> = (0..c.ep).filter(|&h| lowest(h, e).is_some()).collect();
        let mut cands = holders.clone();
        if let Some(nodes) = &c.nodes {
            let same: Vec<usize> = holders
                .iter()
                .copied()
                .filter(|&h| nodes[h] == nodes[r])
                .collect();
            if !same.is_empty() {
                cands = same;
            }
        }
        let k = cands.len();
        let start = (r + e as usize) % k;
        let min = cands.iter().map(|&h| load[h]).min().unwrap();
        let pick = (0..k)
            .map(|j| cands[(start + j) % k])
            .find(|&h| load[h] == min)
            .unwrap();
        load[pick] += 1;
        out.insert(
            (r as u32, e),
            (pick as u32, lowest(pick, e).unwrap() as u32, d as u32),
        );
    }
    out
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let plan = run(c).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&plan, &run(c).unwrap(), "not deterministic");
    let n_local = c.p / c.ep;
    prop_assert_eq!(plan.layers.len(), c.layers);
    for l in 0..c.layers {
        let old = &c.old[l * c.p..(l + 1) * c.p];
        let new = &c.new[l * c.p..(l + 1) * c.p];
        let lp = &plan.layers[l];
        prop_assert_eq!(lp.ranks.len(), c.ep);

        // Simulate: weights hold expert ids; buffer per rank.
        let mut after = old.to_vec();
        let mut recv_set: BTreeSet<(u32, u32, i64, u32)> = BTreeSet::new(); // (src, src_row, e, reader)
        for (r, rp) in lp.ranks.iter().enumerate() {
            let base = r * n_local;
            let mut buf = vec![i64::MIN; n_local];
            for lc in &rp.local_copies {
                prop_assert_eq!(old[base + lc.src_row as usize], lc.expert);
                buf[lc.dst_row as usize] = old[base + lc.src_row as usize];
            }
            let mut seen = BTreeSet::new();
            for rv in &rp.recvs {
                prop_assert!(seen.insert(rv.expert), "expert received twice");
                let src = rv.src_rank as usize * n_local + rv.src_row as usize;
                prop_assert_eq!(old[src], rv.expert, "recv source does not hold expert");
                prop_assert!(rv.src_rank as usize != r);
                buf[rv.dst_row as usize] = old[src];
                recv_set.insert((rv.src_rank, rv.src_row, rv.expert, r as u32));
            }
            for f in &rp.dup_fills {
                prop_assert_eq!(buf[f.src_row as usize], f.expert);
                buf[f.dst_row as usize] = buf[f.src_row as usize];
            }
            let changed = rp.changed_rows();
            for &d in &changed {
                after[base + d as usize] = buf[d as usize];
            }
            // Unchanged + changed partition the rows.
            let mut all: Vec<u32> = rp.unchanged.iter().copied().chain(changed).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..n_local as u32).collect::<Vec<_>>());
            // Runs cover exactly the changed rows.
            let from_runs: Vec<u32> = rp
                .changed_runs()
                .iter()
                .flat_map(|&(s, n)| s..s + n)
                .collect();
            prop_assert_eq!(from_runs, rp.changed_rows());
            // Ordering contracts.
            prop_assert!(rp.unchanged.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(rp
                .local_copies
                .windows(2)
                .all(|w| w[0].dst_row < w[1].dst_row));
            prop_assert!(rp.dup_fills.windows(2).all(|w| w[0].dst_row < w[1].dst_row));
            prop_assert!(rp
                .recvs
                .windows(2)
                .all(|w| (w[0].src_rank, w[0].dst_row) < (w[1].src_rank, w[1].dst_row)));
            prop_assert!(rp
                .sends
                .windows(2)
                .all(|w| (w[0].src_row, w[0].expert) < (w[1].src_row, w[1].expert)));
            // Each missing expert is received exactly once.
            let missing: BTreeSet<i64> = (0..n_local)
                .map(|d| new[base + d])
                .enumerate()
                .filter(|&(d, e)| e != -1 && e != old[base + d])
                .map(|(_, e)| e)
                .filter(|e| !old[base..base + n_local].contains(e))
                .collect();
            prop_assert_eq!(missing, seen);
        }
        for p in 0..c.p {
            let want = if new[p] == -1 { old[p] } else { new[p] };
            prop_assert_eq!(after[p], want, "slot {} wrong after commit", p);
        }

        // Sends == recvs.
        let mut send_set = BTreeSet::new();
        for (s, rp) in lp.ranks.iter().enumerate() {
            for sd in &rp.sends {
                prop_assert!(!sd.readers.is_empty());
                prop_assert!(sd.readers.windows(2).all(|w| w[0] < w[1]));
                prop_assert_eq!(old[s * n_local + sd.src_row as usize], sd.expert);
                for &rd in &sd.readers {
                    send_set.insert((s as u32, sd.src_row, sd.expert, rd));
                }
            }
        }
        prop_assert_eq!(send_set, recv_set);

        // Source selection matches the reference (incl. balance and node preference).
        let reference = reference_sources(c, l);
        let mut got = BTreeMap::new();
        for (r, rp) in lp.ranks.iter().enumerate() {
            for rv in &rp.recvs {
                got.insert((r as u32, rv.expert), (rv.src_rank, rv.src_row, rv.dst_row));
            }
        }
        prop_assert_eq!(got, reference);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn plan_is_correct(ep in 1usize..=6, n_local in 1usize..=6, layers in 1usize..=3, seed in any::<u64>()) {
        check(&make_case(ep, n_local, layers, seed))?;
    }

    #[test]
    fn sparse_ids_match_dense(ep in 1usize..=4, n_local in 1usize..=4, seed in any::<u64>()) {
        // Remapping ids monotonically to huge values changes nothing but the ids.
        let c = make_case(ep, n_local, 2, seed);
        let map = |v: &Vec<i64>| v.iter().map(|&e| if e < 0 { e } else { (1i64 << 40) + e * 1000 }).collect::<Vec<_>>();
        let dense = run(&c).unwrap();
        let sparse = plan_rebalance(&map(&c.old), &map(&c.new), c.layers, c.p, c.ep, c.nodes.as_deref()).unwrap();
        // Rotation depends on the id, so only compare the structure that does not.
        for (a, b) in dense.layers.iter().zip(&sparse.layers) {
            for (ra, rb) in a.ranks.iter().zip(&b.ranks) {
                prop_assert_eq!(&ra.unchanged, &rb.unchanged);
                prop_assert_eq!(ra.changed_rows(), rb.changed_rows());
                prop_assert_eq!(ra.recvs.len(), rb.recvs.len());
                prop_assert_eq!(ra.local_copies.len(), rb.local_copies.len());
                prop_assert_eq!(ra.dup_fills.len(), rb.dup_fills.len());
            }
        }
    }

    #[test]
    fn garbage_never_panics(ep in 0usize..4, slots in 0usize..9, layers in 0usize..3,
                            old in proptest::collection::vec(-3i64..6, 0..20),
                            new in proptest::collection::vec(-3i64..6, 0..20)) {
        let _ = plan_rebalance(&old, &new, layers, slots, ep, None);
        let nodes = vec![0usize; ep];
        let _ = plan_rebalance(&old, &new, layers, slots, ep, Some(&nodes));
    }
}

/// Timing smoke test: `cargo test --release --test plan_props -- --ignored --nocapture`.
#[test]
#[ignore]
fn perf_288_slots_ep72() {
    let (ep, n_local, layers, experts) = (72usize, 4usize, 58usize, 256usize);
    let p = ep * n_local;
    let mut rng = Rng(42);
    let mut old = Vec::new();
    let mut new = Vec::new();
    for _ in 0..layers {
        old.extend(placement(&mut rng, p, experts));
        new.extend(placement(&mut rng, p, experts));
    }
    let nodes: Vec<usize> = (0..ep).map(|r| r / 4).collect();
    for node_of_rank in [None, Some(&nodes[..])] {
        let iters = 200;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            let plan = plan_rebalance(&old, &new, layers, p, ep, node_of_rank).unwrap();
            std::hint::black_box(&plan);
        }
        let per = t.elapsed() / iters;
        println!(
            "nodes={}: {:?} per plan ({} layers), {:?} per layer",
            node_of_rank.is_some(),
            per,
            layers,
            per / layers as u32
        );
    }
}
