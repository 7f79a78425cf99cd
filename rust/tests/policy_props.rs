//! Property tests for `eplb_xfer::policy`: the invariants of every placement
//! method on random loads and shapes (global and hierarchical, one node, one
//! rank, ties, zero loads, old placements with holes), the balance guard,
//! exact relabeling, determinism, and the errors of bad input.

#[path = "support/plan_check.rs"]
#[allow(dead_code)]
mod plan_check;
use eplb_xfer::policy::{
    log2phy_logcnt, metrics, rebalance_experts, Method, Options, PolicyError, Request, Topology,
    LOAD_EPS,
};
use plan_check::SplitMix64;
use proptest::prelude::*;

/// One random problem: shape, loads and an old placement.
#[derive(Clone, Debug)]
struct Case {
    layers: usize,
    experts: usize,
    replicas: usize,
    groups: usize,
    nodes: usize,
    ranks: usize,
    weight: Vec<f64>,
    old: Vec<i64>,
}

impl Case {
    fn request(&self, old: bool) -> Request<'_> {
        Request {
            weight: &self.weight,
            num_layers: self.layers,
            num_logical_experts: self.experts,
            num_replicas: self.replicas,
            num_groups: self.groups,
            num_nodes: self.nodes,
            num_ranks: self.ranks,
            old: old.then_some(&self.old[..]),
        }
    }

    fn topo(&self) -> Topology {
        Topology::new(
            self.experts,
            self.replicas,
            self.groups,
            self.nodes,
            self.ranks,
        )
        .unwrap()
    }

    fn run(&self, method: Method, old: bool, threads: usize) -> Vec<i64> {
        let opts = Options {
            method,
            max_imbalance: 0.0,
            threads,
        };
        rebalance_experts(&self.request(old), &opts).unwrap()
    }

    fn layer<'a, T>(&self, v: &'a [T], l: usize, width: usize) -> &'a [T] {
        &v[l * width..(l + 1) * width]
    }
}

fn loads(rng: &mut SplitMix64, n: usize) -> Vec<f64> {
    match rng.below(5) {
        // Continuous, skewed (no ties).
        0 | 1 => (0..n)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (4.0 * u).exp() * 10.0
            })
            .collect(),
        // Small integers: many ties.
        2 => (0..n).map(|_| rng.below(4) as f64).collect(),
        // All zero.
        3 => vec![0.0; n],
        // Mostly zero, a few hot experts.
        _ => (0..n)
            .map(|_| {
                if rng.below(5) == 0 {
                    (1 + rng.below(1000)) as f64
                } else {
                    0.0
                }
            })
            .collect(),
    }
}

fn make_case(seed: u64) -> Case {
    let mut rng = SplitMix64(seed);
    let nodes = 1 + rng.below(3);
    let ranks_per_node = 1 + rng.below(4);
    let ranks = nodes * ranks_per_node;
    let slots_per_rank = 1 + rng.below(5);
    let replicas = ranks * slots_per_rank;
    // Hierarchical (groups a multiple of nodes, experts a multiple of groups)
    // or DeepSeek's global fallback (groups do not bind).
    let hierarchical = nodes == 1 || rng.below(3) != 0;
    let (groups, experts) = if hierarchical {
        let groups = nodes * (1 + rng.below((replicas / nodes).min(3)));
        (groups, groups * (1 + rng.below(replicas / groups)))
    } else {
        let mut g = 1 + rng.below(5);
        if g % nodes == 0 {
            g += 1;
        }
        (g, 1 + rng.below(replicas))
    };
    let layers = 1 + rng.below(3);
    let weight = loads(&mut rng, layers * experts);
    // Old placement: random experts with holes, or a stock placement of
    // drifted loads (the realistic case).
    let old = if rng.below(2) == 0 {
        (0..layers * replicas)
            .map(|_| {
                if rng.below(6) == 0 {
                    -1
                } else {
                    rng.below(experts) as i64
                }
            })
            .collect()
    } else {
        let drifted: Vec<f64> = weight
            .iter()
            .map(|&w| w * (0.5 + rng.below(100) as f64 / 100.0) + rng.below(3) as f64)
            .collect();
        let req = Request {
            weight: &drifted,
            num_layers: layers,
            num_logical_experts: experts,
            num_replicas: replicas,
            num_groups: groups,
            num_nodes: nodes,
            num_ranks: ranks,
            old: None,
        };
        let opts = Options {
            method: Method::Stock,
            ..Options::default()
        };
        rebalance_experts(&req, &opts).unwrap()
    };
    Case {
        layers,
        experts,
        replicas,
        groups,
        nodes,
        ranks,
        weight,
        old,
    }
}

/// Every slot holds an expert; every expert has a replica; in the
/// hierarchical case every group lies on one node and nodes hold equally
/// many groups.
fn check_placement(c: &Case, p: &[i64]) -> Result<(), TestCaseError> {
    let t = c.topo();
    prop_assert_eq!(p.len(), c.layers * c.replicas);
    for l in 0..c.layers {
        let row = c.layer(p, l, c.replicas);
        prop_assert!(row.iter().all(|&e| e >= 0 && (e as usize) < c.experts));
        let cnt = metrics::replica_counts(row, c.experts);
        prop_assert!(cnt.iter().all(|&n| n >= 1), "layer {}: an expert lost", l);
        if t.hierarchical() {
            let gs = t.experts_per_group();
            let spr = t.slots_per_rank();
            let mut node_of_group = vec![usize::MAX; t.groups];
            for (s, &e) in row.iter().enumerate() {
                let g = e as usize / gs;
                let n = t.node_of_rank(s / spr);
                prop_assert!(
                    node_of_group[g] == usize::MAX || node_of_group[g] == n,
                    "layer {}: group {} on two nodes",
                    l,
                    g
                );
                node_of_group[g] = n;
            }
            for n in 0..t.nodes {
                let k = node_of_group.iter().filter(|&&m| m == n).count();
                prop_assert_eq!(k, t.groups_per_node());
            }
        }
    }
    Ok(())
}

/// The guard: sorted rank loads prefix by prefix at most stock's.
fn check_guard(c: &Case, ours: &[i64], stock: &[i64], imbalance: f64) -> Result<(), TestCaseError> {
    let t = c.topo();
    for l in 0..c.layers {
        let w = c.layer(&c.weight, l, c.experts);
        let a = metrics::sorted_loads(w, c.layer(ours, l, c.replicas), &t);
        let b = metrics::sorted_loads(w, c.layer(stock, l, c.replicas), &t);
        let excess = metrics::prefix_excess(&a, &b, imbalance);
        prop_assert!(excess <= 0.0, "layer {}: prefix excess {}", l, excess);
    }
    Ok(())
}

fn received(c: &Case, new: &[i64]) -> usize {
    let t = c.topo();
    (0..c.layers)
        .map(|l| {
            metrics::experts_received(
                c.layer(&c.old, l, c.replicas),
                c.layer(new, l, c.replicas),
                &t,
            )
        })
        .sum()
}

fn check_all(c: &Case) -> Result<(), TestCaseError> {
    let stock = c.run(Method::Stock, false, 1);
    check_placement(c, &stock)?;
    // The old placement does not change stock; Migrate without one is stock.
    prop_assert_eq!(&c.run(Method::Stock, true, 1), &stock);
    prop_assert_eq!(&c.run(Method::Migrate, false, 1), &stock);

    let relabeled = c.run(Method::Relabel, true, 1);
    check_placement(c, &relabeled)?;
    // Relabeling keeps every rank load: the sorted loads are stock's.
    let t = c.topo();
    for l in 0..c.layers {
        let w = c.layer(&c.weight, l, c.experts);
        let a = metrics::sorted_loads(w, c.layer(&relabeled, l, c.replicas), &t);
        let b = metrics::sorted_loads(w, c.layer(&stock, l, c.replicas), &t);
        let total: f64 = b.iter().sum();
        for (x, y) in a.iter().zip(&b) {
            prop_assert!((x - y).abs() <= LOAD_EPS * total.max(1.0), "layer {}", l);
        }
    }
    prop_assert!(received(c, &relabeled) <= received(c, &stock));

    let ours = c.run(Method::Migrate, true, 1);
    check_placement(c, &ours)?;
    check_guard(c, &ours, &stock, 0.0)?;
    prop_assert!(received(c, &ours) <= received(c, &relabeled));
    // Deterministic, whatever the thread count.
    prop_assert_eq!(&c.run(Method::Migrate, true, 3), &ours);
    prop_assert_eq!(&c.run(Method::Migrate, true, 0), &ours);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn every_method_keeps_the_invariants(seed in any::<u64>()) {
        check_all(&make_case(seed))?;
    }

    #[test]
    fn max_imbalance_loosens_the_guard_only(seed in any::<u64>(), pct in 0u32..20) {
        let c = make_case(seed);
        let imbalance = pct as f64 / 100.0;
        let opts = Options { method: Method::Migrate, max_imbalance: imbalance, threads: 1 };
        let ours = rebalance_experts(&c.request(true), &opts).unwrap();
        check_placement(&c, &ours)?;
        check_guard(&c, &ours, &c.run(Method::Stock, false, 1), imbalance)?;
        prop_assert!(received(&c, &ours) <= received(&c, &c.run(Method::Relabel, true, 1)));
    }

    #[test]
    fn log2phy_inverts_phy2log(seed in any::<u64>()) {
        let c = make_case(seed);
        let p = c.run(Method::Migrate, true, 1);
        let (log2phy, max_count, logcnt) = log2phy_logcnt(&p, c.layers, c.replicas, c.experts).unwrap();
        prop_assert_eq!(logcnt.len(), c.layers * c.experts);
        prop_assert_eq!(log2phy.len(), c.layers * c.experts * max_count);
        for l in 0..c.layers {
            let row = c.layer(&p, l, c.replicas);
            for e in 0..c.experts {
                let n = logcnt[l * c.experts + e] as usize;
                let slots = &log2phy[(l * c.experts + e) * max_count..(l * c.experts + e + 1) * max_count];
                let want: Vec<i64> = (0..c.replicas as i64).filter(|&s| row[s as usize] == e as i64).collect();
                prop_assert_eq!(&slots[..n], &want[..]);
                prop_assert!(slots[n..].iter().all(|&s| s == -1));
            }
        }
    }
}

/// All node and rank renamings of a small placement, to check that
/// relabeling finds the fewest received experts.
fn brute_force_relabel(c: &Case, stock: &[i64], l: usize) -> usize {
    fn perms(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in perms(n - 1) {
            for i in 0..n {
                let mut q = p.clone();
                q.insert(i, n - 1);
                out.push(q);
            }
        }
        out
    }
    let t = c.topo();
    let (g, spr) = (t.ranks_per_node(), t.slots_per_rank());
    let row = c.layer(stock, l, c.replicas);
    let old = c.layer(&c.old, l, c.replicas);
    let rank_perms = perms(g);
    let mut best = usize::MAX;
    for node_perm in perms(t.nodes) {
        // Per node, the best rank permutation is independent of the others.
        let mut total = 0;
        for (a, &b) in node_perm.iter().enumerate() {
            let mut node_best = usize::MAX;
            for rp in &rank_perms {
                let mut new = old.to_vec();
                for (i, &j) in rp.iter().enumerate() {
                    let (from, to) = (a * g + i, b * g + j);
                    new[to * spr..(to + 1) * spr]
                        .copy_from_slice(&row[from * spr..(from + 1) * spr]);
                }
                let cost: usize = (0..g)
                    .map(|j| {
                        let r = b * g + j;
                        let n = &new[r * spr..(r + 1) * spr];
                        let o = &old[r * spr..(r + 1) * spr];
                        n.iter()
                            .enumerate()
                            .filter(|&(k, e)| !o.contains(e) && !n[..k].contains(e))
                            .count()
                    })
                    .sum();
                node_best = node_best.min(cost);
            }
            total += node_best;
        }
        best = best.min(total);
    }
    best
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn relabeling_is_an_exact_two_level_assignment(seed in any::<u64>()) {
        let c = make_case(seed);
        let t = c.topo();
        // Brute force: nodes! * (ranks per node!)^nodes renamings.
        prop_assume!(t.ranks_per_node() <= 5 && t.nodes <= 3);
        let stock = c.run(Method::Stock, false, 1);
        let relabeled = c.run(Method::Relabel, true, 1);
        for l in 0..c.layers {
            let got = metrics::experts_received(
                c.layer(&c.old, l, c.replicas),
                c.layer(&relabeled, l, c.replicas),
                &t,
            );
            prop_assert_eq!(got, brute_force_relabel(&c, &stock, l), "layer {}", l);
        }
    }
}

/// DeepSeek-V3-like layers (256 experts, 8 groups) on a multi-node and a
/// one-node shape, loads drifting 10% from the old placement's: the search
/// must beat relabeling by a wide margin and keep the guard.
#[test]
fn deepseek_shapes_move_far_fewer_experts() {
    for &(replicas, nodes, ranks) in &[(288usize, 4usize, 32usize), (264, 1, 8)] {
        let (layers, experts) = (3, 256);
        let mut rng = SplitMix64(7);
        let base: Vec<f64> = (0..layers * experts)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (3.0 * u).exp() * 100.0
            })
            .collect();
        let drifted: Vec<f64> = base
            .iter()
            .map(|&w| w * (0.9 + 0.2 * ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)))
            .collect();
        let req = |w: &'_ [f64], old: Option<&'_ [i64]>, method: Method| {
            let r = Request {
                weight: w,
                num_layers: layers,
                num_logical_experts: experts,
                num_replicas: replicas,
                num_groups: 8,
                num_nodes: nodes,
                num_ranks: ranks,
                old,
            };
            let o = Options {
                method,
                ..Options::default()
            };
            rebalance_experts(&r, &o).unwrap()
        };
        let old = req(&base, None, Method::Stock);
        let case = Case {
            layers,
            experts,
            replicas,
            groups: 8,
            nodes,
            ranks,
            weight: drifted.clone(),
            old: old.clone(),
        };
        let stock = req(&drifted, None, Method::Stock);
        let relabeled = req(&drifted, Some(&old), Method::Relabel);
        let ours = req(&drifted, Some(&old), Method::Migrate);
        check_placement(&case, &ours).unwrap();
        check_guard(&case, &ours, &stock, 0.0).unwrap();
        let (r, o) = (received(&case, &relabeled), received(&case, &ours));
        assert!(2 * o < r, "ranks {ranks}: ours {o} vs relabeled {r}");
    }
}

/// A valid small request: 4 experts, 8 slots, 2 groups on 2 nodes of 2 ranks.
fn small() -> Request<'static> {
    Request {
        weight: &[1.0, 2.0, 3.0, 4.0],
        num_layers: 1,
        num_logical_experts: 4,
        num_replicas: 8,
        num_groups: 2,
        num_nodes: 2,
        num_ranks: 4,
        old: None,
    }
}

fn error_of(req: Request<'_>, max_imbalance: f64) -> PolicyError {
    let opts = Options {
        max_imbalance,
        ..Options::default()
    };
    rebalance_experts(&req, &opts).unwrap_err()
}

#[test]
fn bad_input_is_refused_naming_the_argument() {
    let ok = small();
    assert!(rebalance_experts(&ok, &Options::default()).is_ok());
    let cases: Vec<(&str, Request<'static>, f64)> = vec![
        (
            "num_replicas",
            Request {
                num_replicas: 6,
                ..ok
            },
            0.0,
        ),
        (
            "num_replicas",
            Request {
                num_replicas: 0,
                ..ok
            },
            0.0,
        ),
        (
            "num_replicas",
            Request {
                num_logical_experts: 12,
                weight: &[1.0; 12],
                ..ok
            },
            0.0,
        ),
        ("num_ranks", Request { num_ranks: 0, ..ok }, 0.0),
        (
            "num_ranks",
            Request {
                num_ranks: 1,
                num_nodes: 2,
                num_replicas: 8,
                ..ok
            },
            0.0,
        ),
        ("num_nodes", Request { num_nodes: 0, ..ok }, 0.0),
        (
            "num_groups",
            Request {
                num_groups: 0,
                ..ok
            },
            0.0,
        ),
        (
            "num_groups",
            Request {
                num_groups: 6,
                num_nodes: 2,
                ..ok
            },
            0.0,
        ),
        (
            "num_logical_experts",
            Request {
                num_logical_experts: 0,
                weight: &[],
                ..ok
            },
            0.0,
        ),
        (
            "weight",
            Request {
                weight: &[1.0, 2.0, 3.0],
                ..ok
            },
            0.0,
        ),
        (
            "weight",
            Request {
                weight: &[1.0, -2.0, 3.0, 4.0],
                ..ok
            },
            0.0,
        ),
        (
            "weight",
            Request {
                weight: &[1.0, f64::NAN, 3.0, 4.0],
                ..ok
            },
            0.0,
        ),
        (
            "weight",
            Request {
                weight: &[1.0, f64::INFINITY, 3.0, 4.0],
                ..ok
            },
            0.0,
        ),
        (
            "old_global_expert_indices",
            Request {
                old: Some(&[0; 7]),
                ..ok
            },
            0.0,
        ),
        (
            "old_global_expert_indices",
            Request {
                old: Some(&[0, 1, 2, 3, 4, 0, 0, 0]),
                ..ok
            },
            0.0,
        ),
        (
            "old_global_expert_indices",
            Request {
                old: Some(&[0, 1, 2, 3, -2, 0, 0, 0]),
                ..ok
            },
            0.0,
        ),
        ("max_imbalance", ok, -0.1),
        ("max_imbalance", ok, f64::NAN),
    ];
    for (name, req, imbalance) in cases {
        let err = error_of(req, imbalance);
        assert_eq!(err.argument(), name, "{err}");
        assert!(err.to_string().starts_with(&format!("{name}: ")), "{err}");
    }
    // The message names the value.
    let err = error_of(
        Request {
            num_replicas: 6,
            ..ok
        },
        0.0,
    );
    assert_eq!(
        err.to_string(),
        "num_replicas: 6 is not a multiple of num_ranks 4"
    );
    let err = error_of(
        Request {
            weight: &[1.0, f64::NAN, 3.0, 4.0],
            ..ok
        },
        0.0,
    );
    assert!(err.to_string().contains("NaN"), "{err}");
}

#[test]
fn global_fallback_ignores_groups_that_do_not_divide_experts() {
    // DeepSeek: groups % nodes != 0 -> one group, one node; 3 groups need not divide 4.
    let req = Request {
        num_groups: 3,
        ..small()
    };
    let p = rebalance_experts(&req, &Options::default()).unwrap();
    assert_eq!(p.len(), 8);
}

#[test]
fn zero_layers_give_an_empty_placement() {
    let req = Request {
        num_layers: 0,
        weight: &[],
        ..small()
    };
    assert!(rebalance_experts(&req, &Options::default())
        .unwrap()
        .is_empty());
}

#[test]
fn log2phy_refuses_bad_entries() {
    assert!(log2phy_logcnt(&[0, 1, 5], 1, 3, 4).is_err());
    assert!(log2phy_logcnt(&[0, 1], 1, 3, 4).is_err());
    let (l2p, max, cnt) = log2phy_logcnt(&[0, -1, 0, 2], 1, 4, 3).unwrap();
    assert_eq!(max, 2);
    assert_eq!(cnt, vec![2, 0, 1]);
    assert_eq!(l2p, vec![0, 2, -1, -1, 3, -1]);
}

#[test]
fn huge_shapes_finish_without_panicking() {
    // 100k ranks of 2 slots: heap packing, stock's names kept, no search.
    let weight: Vec<f64> = (0..1000).map(|i| (i % 17) as f64).collect();
    let old: Vec<i64> = (0..200_000).map(|i| (i % 1000) as i64).collect();
    let req = Request {
        weight: &weight,
        num_layers: 1,
        num_logical_experts: 1000,
        num_replicas: 200_000,
        num_groups: 1,
        num_nodes: 1,
        num_ranks: 100_000,
        old: Some(&old),
    };
    let p = rebalance_experts(&req, &Options::default()).unwrap();
    let cnt = metrics::replica_counts(&p, 1000);
    assert!(cnt.iter().all(|&c| c >= 1));
    // An output that cannot exist is refused, not allocated.
    let req = Request {
        weight: &[1.0, 2.0],
        num_layers: 2,
        num_logical_experts: 1,
        num_replicas: usize::MAX / 4,
        num_groups: 1,
        num_nodes: 1,
        num_ranks: 1,
        old: None,
    };
    let err = rebalance_experts(&req, &Options::default()).unwrap_err();
    assert_eq!(err.argument(), "num_replicas");
}
