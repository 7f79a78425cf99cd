//! The wire decoder's contract as one check, shared by the `cargo fuzz`
//! target `wire_decode` and the stable replay `rust/tests/wire_replay.rs`.

use eplb_xfer::protocol::wire::Msg;
use eplb_xfer::protocol::{Config, Direction, ExchangeSpec, Session};

/// First byte: world size (1..=64); rest: a peer's message. Decoding must
/// not panic, a decoded message must re-encode to the same bytes, and a live
/// session (rank 0, in an open exchange) must take the bytes from every
/// possible sender without panicking.
pub fn check_bytes(data: &[u8]) -> Result<(), String> {
    let Some((&w, msg)) = data.split_first() else {
        return Ok(());
    };
    let world = u32::from(w % 64) + 1;
    if let Ok(m) = Msg::decode(msg, world) {
        let again = m.encode();
        if again != msg {
            return Err(format!(
                "decoded {m:?} re-encodes differently:\n in  {msg:02x?}\n out {again:02x?}"
            ));
        }
    }
    let cfg = Config {
        rank: 0,
        world,
        n_local: 4,
        timeout: 1_000_000_000,
        round_timeout: 100_000_000,
        direction: vec![Direction::Read; world as usize],
        round_of: vec![0; world as usize],
    };
    let mut s = Session::new(cfg).map_err(|e| e.to_string())?;
    let spec = ExchangeSpec {
        label: 0,
        fingerprint: 1,
        recvs: if world > 1 {
            vec![(world - 1, 0, 0)]
        } else {
            vec![]
        },
        ..Default::default()
    };
    s.begin(10, spec).map_err(|e| e.to_string())?;
    for from in 0..world.min(4) + 1 {
        s.handle_message(20, from, msg);
    }
    s.handle_timeout(2_000_000_000);
    while s.poll_output().is_some() {}
    while s.poll_event().is_some() {}
    Ok(())
}
