//! Fuzz target: raw bytes -> planner inputs -> `plan_rebalance` -> contract check.
//!
//! `plan_check::fuzz_one` (rust/tests/support/plan_check.rs, test code
//! shared with the stable replay) decodes the bytes (deliberately including invalid
//! inputs), plans them and checks the result; a planner panic or a broken
//! invariant is a crash. `rust/tests/plan_fuzz_replay.rs` replays the same
//! function on stable Rust.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../rust/tests/support/plan_check.rs"]
#[allow(dead_code)]
mod plan_check;

fuzz_target!(|data: &[u8]| {
    if let Err(msg) = plan_check::fuzz_one(data) {
        panic!("planner contract violated: {msg}");
    }
});
