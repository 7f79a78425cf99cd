//! Criterion bench of the per-rebalance bookkeeping: plan + descriptor-index
//! selection, at DeepSeek-V3 scale (256 logical experts, 288 physical slots,
//! 4 tensors per expert, 58 MoE layers).
//!
//! Ids:
//! - `plan_layer/ep{8,32,72}`: `plan_rebalance` on a `[1, 288]` placement, then
//!   `select_for_plan` for that layer on every rank;
//! - `plan_all/ep72`: `plan_rebalance` on `[58, 288]`, then `select_for_plan`
//!   for every rank and layer.
//!
//! Placements are deterministic (splitmix64): `old` holds every expert once plus
//! 32 redundant replicas, shuffled; `new` re-assigns about a quarter of the
//! slots (72 of 288) while keeping every expert present.
//!
//! Run: `cargo bench --bench descriptor_path`. Medians land in
//! `target/criterion/<id>/new/estimates.json`; `python3 benches/rebalance.py
//! --collect-criterion` gathers them into `benches/results/descriptor_path.json`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use eplb_xfer::descriptors::{DescriptorSpace, Mode};
use eplb_xfer::plan::plan_rebalance;
#[path = "../rust/tests/support/plan_check.rs"]
#[allow(dead_code)]
mod plan_check;
use plan_check::SplitMix64;

const NUM_EXPERTS: usize = 256;
const NUM_SLOTS: usize = 288;
const NUM_TENSORS: usize = 4;
const NUM_LAYERS: usize = 58;
/// Slots re-assigned per layer (a quarter of 288).
const CHANGED_SLOTS: usize = NUM_SLOTS / 4;

/// `[P]` placement: every expert once plus `P - E` random replicas, shuffled.
fn old_layer(rng: &mut SplitMix64) -> Vec<i64> {
    let mut v: Vec<i64> = (0..NUM_EXPERTS as i64).collect();
    while v.len() < NUM_SLOTS {
        v.push(rng.below(NUM_EXPERTS) as i64);
    }
    rng.shuffle(&mut v);
    v
}

/// `old` with `CHANGED_SLOTS` slots re-assigned: the experts of the chosen
/// slots rotate one position (every expert stays present), then chosen slots
/// still holding their old expert, or holding a replicated expert, get a fresh
/// random expert where that keeps every expert present.
fn new_layer(rng: &mut SplitMix64, old: &[i64]) -> Vec<i64> {
    let mut slots: Vec<usize> = (0..NUM_SLOTS).collect();
    rng.shuffle(&mut slots);
    slots.truncate(CHANGED_SLOTS);
    let mut new = old.to_vec();
    for (k, &s) in slots.iter().enumerate() {
        new[s] = old[slots[(k + 1) % slots.len()]];
    }
    let mut count = vec![0usize; NUM_EXPERTS];
    for &e in &new {
        count[e as usize] += 1;
    }
    for &s in &slots {
        let cur = new[s] as usize;
        if new[s] == old[s] || (count[cur] > 1 && rng.below(4) == 0) {
            if count[cur] < 2 {
                continue; // the only copy: keep it so every expert stays present
            }
            let mut e = rng.below(NUM_EXPERTS);
            while e as i64 == old[s] {
                e = rng.below(NUM_EXPERTS);
            }
            count[cur] -= 1;
            count[e] += 1;
            new[s] = e as i64;
        }
    }
    debug_assert!(count.iter().all(|&c| c > 0));
    new
}

/// `[layers, P]` old and new placements, row-major.
fn placements(layers: usize, seed: u64) -> (Vec<i64>, Vec<i64>) {
    let mut rng = SplitMix64(seed);
    let mut old = Vec::with_capacity(layers * NUM_SLOTS);
    let mut new = Vec::with_capacity(layers * NUM_SLOTS);
    for _ in 0..layers {
        let o = old_layer(&mut rng);
        new.extend(new_layer(&mut rng, &o));
        old.extend(o);
    }
    (old, new)
}

/// Plan + selection for every rank and layer; returns the descriptor count
/// (so nothing is optimised away).
fn plan_and_select(old: &[i64], new: &[i64], layers: usize, ep: usize) -> usize {
    let plan = plan_rebalance(old, new, layers, NUM_SLOTS, ep, None).expect("valid placement");
    let space = DescriptorSpace::new(Mode::ZeroCopy, NUM_LAYERS, NUM_SLOTS / ep, NUM_TENSORS)
        .expect("fits i32");
    let mut descs = 0;
    for (layer, lp) in plan.layers.iter().enumerate() {
        for rank_plan in &lp.ranks {
            for read in space.select_for_plan(layer, rank_plan) {
                descs += read.local.len();
            }
        }
    }
    descs
}

fn bench(c: &mut Criterion) {
    let (old1, new1) = placements(1, 0x5EED);
    let changed = old1.iter().zip(&new1).filter(|(a, b)| a != b).count();
    eprintln!("one layer: {changed} of {NUM_SLOTS} slots change");
    let mut g = c.benchmark_group("plan_layer");
    for ep in [8usize, 32, 72] {
        eprintln!(
            "ep{ep}: {} descriptors selected per layer",
            plan_and_select(&old1, &new1, 1, ep)
        );
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("ep{ep}")),
            &ep,
            |b, &ep| b.iter(|| plan_and_select(black_box(&old1), black_box(&new1), 1, ep)),
        );
    }
    g.finish();

    let (old, new) = placements(NUM_LAYERS, 0x05EE_DA11);
    let mut g = c.benchmark_group("plan_all");
    g.bench_function("ep72", |b| {
        b.iter(|| plan_and_select(black_box(&old), black_box(&new), NUM_LAYERS, 72))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
