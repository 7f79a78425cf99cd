//! Fuzz target: raw bytes from a peer -> `protocol::wire::Msg::decode` and a
//! live `Session`.
//!
//! The first byte picks the world size (1..=64); the rest is the message. A
//! panic, or a decoded message that does not re-encode to the same bytes, is
//! a crash. `rust/tests/wire_replay.rs` replays the same checks on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../rust/tests/support/wire_check.rs"]
mod wire_check;

fuzz_target!(|data: &[u8]| {
    if let Err(msg) = wire_check::check_bytes(data) {
        panic!("{msg}");
    }
});
