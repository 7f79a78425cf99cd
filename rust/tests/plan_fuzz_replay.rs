//! Stable-Rust replay of the `cargo fuzz` target `fuzz/fuzz_targets/plan_bytes.rs`.
//!
//! Runs `plan_check::fuzz_one` over deterministic pseudo-random byte strings
//! and a few hand-written edge cases, so plain `cargo test` covers the fuzz
//! target's decoder and checks without nightly or libFuzzer.

use eplb_xfer::plan::{plan_rebalance, PlanError};
#[path = "support/plan_check.rs"]
#[allow(dead_code)]
mod plan_check;
use plan_check::{check_rejection, decode, fuzz_one, SplitMix64};

fn must_pass(data: &[u8]) {
    if let Err(m) = fuzz_one(data) {
        panic!("fuzz_one failed on {data:02x?}:\n{m}");
    }
}

#[test]
fn replay_pseudo_random_inputs() {
    const CASES: u64 = 20_000;
    let mut rng = SplitMix64(0x5EED_F022);
    // Plans with at least one layer, and errors.
    let (mut planned, mut rejected) = (0u32, 0u32);
    let mut kinds = std::collections::BTreeMap::new();
    let mut data = Vec::with_capacity(1200);
    for i in 0..CASES {
        // Lengths: mostly enough for every value of the case (<= 4 x 64 slots,
        // 1 byte each, plus header), sometimes short (zero-padded decode),
        // sometimes long enough for the 9-byte raw mode.
        let len = match i % 4 {
            0 => (rng.next_u64() % 24) as usize,
            1 | 2 => (rng.next_u64() % 600) as usize,
            _ => (rng.next_u64() % 2400) as usize,
        };
        data.clear();
        while data.len() < len {
            data.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        data.truncate(len);
        if i % 2 == 0 && data.len() > 3 {
            // Half the cases favour valid encodings: aligned slots, right
            // shape and nodes length, small or sparse ids, new picked from old.
            data[3] &= !0xdd;
        }
        must_pass(&data);
        let c = decode(&data);
        match plan_rebalance(
            &c.old,
            &c.new,
            c.num_layers,
            c.num_slots,
            c.ep_size,
            c.nodes.as_deref(),
        ) {
            Ok(p) if !p.layers.is_empty() => planned += 1,
            Ok(_) => {}
            Err(e) => {
                rejected += 1;
                let dbg = format!("{e:?}");
                let name = dbg.split([' ', '{']).next().unwrap_or_default().to_owned();
                *kinds.entry(name).or_insert(0u32) += 1;
            }
        }
    }
    // The generator must reach both outcomes in good measure.
    eprintln!("planned {planned}, rejected {rejected}: {kinds:?}");
    assert!(planned > 5_000, "only {planned} of {CASES} inputs planned");
    assert!(
        rejected > 2_000,
        "only {rejected} of {CASES} inputs rejected"
    );
    // ... and every kind of error (OutOfRange: zero layers, num_slots > u32::MAX).
    for kind in [
        "ZeroEpSize",
        "ZeroSlots",
        "ShapeMismatch",
        "SlotsNotDivisible",
        "InvalidExpert",
        "MissingSource",
        "NodeOfRankLen",
        "OutOfRange",
    ] {
        assert!(kinds.contains_key(kind), "no {kind} error in {kinds:?}");
    }
}

#[test]
fn replay_edge_cases() {
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 1],
        vec![0xff; 7],
        vec![0xff; 64],
        vec![0xff; 4096],
        vec![0x00; 4096],
        vec![0x80; 4096],
        // 4 layers, ep 16, 64 slots, small ids, new picked from old.
        [&[4u8, 16, 3, 0, 63, 3][..], &[0x5a; 600][..]].concat(),
        // Same with node_of_rank and sparse ids.
        [&[4u8, 16, 3, 0x22, 63, 3][..], &[0xa5; 600][..]].concat(),
        // Raw i64 values.
        [&[2u8, 2, 7, 0x30, 0, 0][..], &[0x01; 1200][..]].concat(),
        // ep 0; slots not divisible; nodes of the wrong length.
        [&[1u8, 0, 5, 1, 3, 0][..], &[1; 16][..]].concat(),
        [&[1u8, 3, 7, 1, 3, 0][..], &[1; 16][..]].concat(),
        [&[1u8, 2, 1, 0x06, 3, 0][..], &[1; 16][..]].concat(),
    ];
    // Zero layers with each huge num_slots choice: a valid (empty) shape.
    for pick in 0u8..4 {
        for ep in [1u8, 2, 3, 5, 16] {
            cases.push([&[0u8, ep, 0, 0x08, 0, 0, 3, pick][..], &[0xff; 8][..]].concat());
        }
    }
    for data in &cases {
        must_pass(data);
    }
}

#[test]
fn zero_layers_huge_slots_plans_without_allocating() {
    // Empty arrays are the right shape for 0 layers and any num_slots; the
    // planner must not size its scratch buffers by num_slots then.
    for slots in [1usize << 31, u32::MAX as usize - 2, 15 << 28] {
        let plan = plan_rebalance(&[], &[], 0, slots, 1, None).expect("valid");
        assert!(plan.layers.is_empty());
        assert_eq!(plan.n_local, slots);
    }
    let e = plan_rebalance(&[], &[], 0, usize::MAX, 1, None).unwrap_err();
    assert!(matches!(e, PlanError::OutOfRange { .. }));
    check_rejection(&[], &[], 0, usize::MAX, 1, None, &e).unwrap();
}

#[test]
fn rejections_are_checked() {
    // check_rejection refuses errors that do not describe the input.
    let ok = [0i64, 1, 2, 3];
    let lie = PlanError::MissingSource {
        layer: 0,
        expert: 1,
        slot: 1,
    };
    assert!(check_rejection(&ok, &ok, 1, 4, 2, None, &lie).is_err());
    assert!(check_rejection(&ok, &ok, 1, 4, 2, None, &PlanError::ZeroEpSize).is_err());
    let e = plan_rebalance(&ok, &[0, 1, 9, 3], 1, 4, 2, None).unwrap_err();
    check_rejection(&ok, &[0, 1, 9, 3], 1, 4, 2, None, &e).unwrap();
}
