//! Property tests for `eplb_xfer::plan`.

use std::collections::BTreeMap;

use eplb_xfer::plan::{plan_rebalance, PlanError, TransferPlan};
#[path = "support/plan_check.rs"]
#[allow(dead_code)]
mod plan_check;
use plan_check::{check_plan, check_rejection, fuzz_one, SplitMix64};
use proptest::prelude::*;

/// One layer: every expert 0..e appears at least once; the rest are replicas or -1.
fn placement(rng: &mut SplitMix64, p: usize, e: usize) -> Vec<i64> {
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
    let mut rng = SplitMix64(seed);
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

/// The whole contract (`plan_check::check_plan`) plus the reference source choice.
fn check(c: &Case) -> Result<(), TestCaseError> {
    let plan = run(c).map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_plan(
        &c.old,
        &c.new,
        c.layers,
        c.p,
        c.ep,
        c.nodes.as_deref(),
        &plan,
    )
    .map_err(TestCaseError::fail)?;
    // Source selection matches the reference (incl. balance and node preference).
    for (l, lp) in plan.layers.iter().enumerate() {
        let reference = reference_sources(c, l);
        let mut got = BTreeMap::new();
        for (r, rp) in lp.ranks.iter().enumerate() {
            for rv in &rp.recvs {
                got.insert((r as u32, rv.expert), (rv.src_rank, rv.src_row, rv.dst_row));
            }
        }
        prop_assert_eq!(got, reference, "layer {}", l);
    }
    Ok(())
}

/// Plans `c`, breaks the plan in several ways and requires `check_plan` to
/// notice each one (so the checker is not vacuous).
fn tampering_is_detected(c: &Case) -> Result<(), TestCaseError> {
    let plan = run(c).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let check =
        |p: &TransferPlan| check_plan(&c.old, &c.new, c.layers, c.p, c.ep, c.nodes.as_deref(), p);
    prop_assert_eq!(check(&plan), Ok(()));
    let mut broken: Vec<(&str, TransferPlan)> = Vec::new();
    let mut mutate = |what: &'static str, f: &dyn Fn(&mut TransferPlan) -> bool| {
        let mut p = plan.clone();
        if f(&mut p) {
            broken.push((what, p));
        }
    };
    mutate("n_local", &|p| {
        p.n_local += 1;
        true
    });
    mutate("extra layer", &|p| {
        let l = p.layers.first().cloned();
        l.map(|l| p.layers.push(l)).is_some()
    });
    mutate("drop unchanged row", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .any(|r| r.unchanged.pop().is_some())
    });
    mutate("drop recv", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .any(|r| r.recvs.pop().is_some())
    });
    mutate("drop send", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .any(|r| r.sends.pop().is_some())
    });
    mutate("drop dup fill", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .any(|r| r.dup_fills.pop().is_some())
    });
    mutate("drop local copy", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .any(|r| r.local_copies.pop().is_some())
    });
    mutate("recv source row", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .flat_map(|r| r.recvs.iter_mut())
            .next()
            .map(|v| v.src_row ^= 1)
            .is_some()
    });
    mutate("recv expert", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .flat_map(|r| r.recvs.iter_mut())
            .next()
            .map(|v| v.expert += 1)
            .is_some()
    });
    mutate("send reader", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .flat_map(|r| r.sends.iter_mut())
            .next()
            .map(|s| s.readers.push(u32::MAX))
            .is_some()
    });
    mutate("local copy source row", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .flat_map(|r| r.local_copies.iter_mut())
            .next()
            .map(|lc| lc.src_row = u32::MAX)
            .is_some()
    });
    mutate("dup fill as local copy", &|p| {
        p.layers
            .iter_mut()
            .flat_map(|l| l.ranks.iter_mut())
            .any(|r| match r.dup_fills.pop() {
                Some(f) => {
                    r.local_copies.push(eplb_xfer::plan::LocalCopy {
                        expert: f.expert,
                        src_row: f.src_row,
                        dst_row: f.dst_row,
                    });
                    r.local_copies.sort_unstable_by_key(|lc| lc.dst_row);
                    true
                }
                None => false,
            })
    });
    for (what, p) in &broken {
        prop_assert!(check(p).is_err(), "check_plan missed: {}", what);
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
        let (old_s, new_s) = (map(&c.old), map(&c.new));
        let sparse = plan_rebalance(&old_s, &new_s, c.layers, c.p, c.ep, c.nodes.as_deref()).unwrap();
        check_plan(&old_s, &new_s, c.layers, c.p, c.ep, c.nodes.as_deref(), &sparse)
            .map_err(TestCaseError::fail)?;
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
    fn tampered_plans_fail_the_check(ep in 1usize..=4, n_local in 1usize..=4, seed in any::<u64>()) {
        tampering_is_detected(&make_case(ep, n_local, 2, seed))?;
    }

    #[test]
    fn garbage_never_panics(ep in 0usize..4, slots in 0usize..9, layers in 0usize..3,
                            old in proptest::collection::vec(-3i64..6, 0..20),
                            new in proptest::collection::vec(-3i64..6, 0..20),
                            node_ids in proptest::collection::vec(0usize..2, 0..5)) {
        // Whatever comes back is right: a plan satisfying the contract, or an
        // error that describes a real defect of the input.
        let zeros = vec![0usize; ep];
        for nodes in [None, Some(&zeros[..]), Some(&node_ids[..])] {
            match plan_rebalance(&old, &new, layers, slots, ep, nodes) {
                Ok(plan) => check_plan(&old, &new, layers, slots, ep, nodes, &plan),
                Err(e) => check_rejection(&old, &new, layers, slots, ep, nodes, &e),
            }
            .map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn fuzz_target_holds_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..700)) {
        fuzz_one(&data).map_err(TestCaseError::fail)?;
    }
}

/// Timing smoke test: `cargo test --release --test plan_props -- --ignored --nocapture`.
#[test]
#[ignore]
fn perf_288_slots_ep72() {
    let (ep, n_local, layers, experts) = (72usize, 4usize, 58usize, 256usize);
    let p = ep * n_local;
    let mut rng = SplitMix64(42);
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
