//! Stable-Rust replay of the `cargo fuzz` target `fuzz/fuzz_targets/wire_decode.rs`:
//! 20k deterministic inputs (random bytes, and valid messages of every kind
//! with bit flips, truncations, insertions and field overwrites) through the
//! decoder's contract (`support/wire_check.rs`).

#[path = "support/wire_check.rs"]
mod wire_check;

use eplb_xfer::protocol::wire::{Msg, Ready, Resolve};
use eplb_xfer::protocol::{AbortCode, Knowledge, Report, Waiting};

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

fn valid(rng: &mut Rng, world: u32) -> Msg {
    let seq = rng.below(5);
    match rng.below(6) {
        0 => Msg::Ready(Ready {
            seq,
            label: rng.below(60) as u32,
            fingerprint: rng.next(),
            wants: (0..rng.below(5))
                .map(|_| (rng.below(6) as u32, rng.below(6) as u32))
                .collect(),
            serves: (0..rng.below(4)).map(|_| rng.below(6) as u32).collect(),
            payload: (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
        }),
        1 => Msg::Done { seq },
        2 => Msg::Wrote { seq },
        3 => Msg::Bye { seq },
        4 => Msg::ByeAck { seq },
        _ => {
            let mut k = Knowledge::new(world);
            k.committed = rng.below(2) == 0;
            for r in 0..world {
                if rng.below(2) == 0 {
                    k.done.insert(r);
                }
                if rng.below(4) == 0 {
                    k.dead.insert(r);
                }
                if rng.below(2) == 0 {
                    k.reports[r as usize] = Some(Report {
                        entered: rng.below(2) == 0,
                        fingerprint: (rng.below(2) == 0).then(|| rng.next()),
                        blocked_on: (rng.below(2) == 0)
                            .then(|| (rng.below(world as u64) as u32, Waiting::Done)),
                        accuse: (rng.below(2) == 0)
                            .then(|| (AbortCode::Checksum, rng.below(world as u64) as u32)),
                    });
                }
            }
            Msg::Resolve(Resolve {
                seq,
                round: rng.below(4) as u32,
                decided: rng.below(2) == 0,
                knowledge: k,
            })
        }
    }
}

#[test]
fn replay_pseudo_random_and_mutated_messages() {
    let mut rng = Rng(0x0051_7E55);
    let mut decoded = 0u32;
    for i in 0..20_000u32 {
        let world = (rng.below(64) + 1) as u32;
        let mut bytes = if i % 5 == 0 {
            (0..rng.below(80)).map(|_| rng.next() as u8).collect()
        } else {
            let m = valid(&mut rng, world);
            let b = m.encode();
            assert_eq!(Msg::decode(&b, world), Ok(m), "round trip");
            b
        };
        match rng.below(6) {
            0 => {}
            1 if !bytes.is_empty() => {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            2 => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
            3 => {
                let at = rng.below(bytes.len() as u64 + 1) as usize;
                bytes.insert(at, rng.next() as u8);
            }
            4 if bytes.len() >= 4 => {
                let at = rng.below(bytes.len() as u64 - 3) as usize;
                bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            _ => {}
        }
        if Msg::decode(&bytes, world).is_ok() {
            decoded += 1;
        }
        let mut data = vec![(world - 1) as u8];
        data.extend_from_slice(&bytes);
        if let Err(e) = wire_check::check_bytes(&data) {
            panic!("input {i}: {e}");
        }
    }
    assert!(
        decoded > 5_000,
        "too few valid messages exercised: {decoded}"
    );
}
