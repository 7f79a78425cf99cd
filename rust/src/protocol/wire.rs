//! The wire format of peer messages (NIXL notifications).
//!
//! Every message starts with a 13-byte header: `b"EPX"`, a version byte, a
//! kind byte and the exchange sequence number (u64). All integers are little
//! endian. The decoder accepts exactly what the encoder produces (one
//! canonical encoding: `encode(decode(b)) == b` whenever decoding succeeds);
//! any other bytes give a [`WireError`], never a panic, and never an
//! allocation larger than the message itself.

use std::fmt;

use super::knowledge::{AbortCode, Knowledge, Report, Waiting};
use super::ranks::RankSet;

pub const MAGIC: &[u8; 3] = b"EPX";
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 13;

const KIND_READY: u8 = b'R';
const KIND_DONE: u8 = b'D';
const KIND_WROTE: u8 = b'W';
const KIND_RESOLVE: u8 = b'A';
const KIND_BYE: u8 = b'B';
const KIND_BYE_ACK: u8 = b'K';

/// A rank entered exchange `seq`; sent to each peer with that peer's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub seq: u64,
    /// The caller's label of the exchange (layer index).
    pub label: u32,
    /// Placement fingerprint; every rank must send the same.
    pub fingerprint: u64,
    /// `(src_row, dst_row)`: rows the sender receives from the addressee
    /// (the sender's buffer rows `dst_row` take the addressee's rows `src_row`).
    pub wants: Vec<(u32, u32)>,
    /// Rows the sender serves the addressee (sorted): both sides check that
    /// what one wants is what the other serves before any byte moves.
    pub serves: Vec<u32>,
    /// Opaque bytes for the addressee (e.g. checksums of rows it will get).
    pub payload: Vec<u8>,
}

/// One round of the failure agreement about exchange `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolve {
    pub seq: u64,
    pub round: u32,
    /// The sender decided on `knowledge`; receivers adopt it.
    pub decided: bool,
    pub knowledge: Knowledge,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Ready(Ready),
    /// The sender's incoming data of `seq` has landed (and was verified).
    Done {
        seq: u64,
    },
    /// Attached to a WRITE: the sender's writes of `seq` into the addressee landed.
    Wrote {
        seq: u64,
    },
    Resolve(Resolve),
    /// The sender is closing its communicator; `seq`: its last exchange.
    Bye {
        seq: u64,
    },
    /// Answer to a BYE: everything up to `seq` (the last exchange committed
    /// here) arrived. Messages between a pair arrive in order, so the closing
    /// rank knows its last DONE was delivered.
    ByeAck {
        seq: u64,
    },
}

/// Why bytes are not a message of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    Truncated,
    BadMagic,
    Version(u8),
    Kind(u8),
    World { got: u32, expected: u32 },
    Rank(u32),
    Field(&'static str),
    Trailing(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "message truncated"),
            WireError::BadMagic => write!(f, "not an eplb-xfer message"),
            WireError::Version(v) => write!(f, "wire version {v}, expected {VERSION}"),
            WireError::Kind(k) => write!(f, "unknown message kind {k}"),
            WireError::World { got, expected } => {
                write!(f, "message for a world of {got} ranks, expected {expected}")
            }
            WireError::Rank(r) => write!(f, "rank {r} outside the world"),
            WireError::Field(m) => write!(f, "invalid field: {m}"),
            WireError::Trailing(n) => write!(f, "{n} trailing bytes"),
        }
    }
}

impl std::error::Error for WireError {}

impl Msg {
    pub fn seq(&self) -> u64 {
        match self {
            Msg::Ready(r) => r.seq,
            Msg::Done { seq } | Msg::Wrote { seq } | Msg::Bye { seq } | Msg::ByeAck { seq } => *seq,
            Msg::Resolve(r) => r.seq,
        }
    }

    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, seq) = match self {
            Msg::Ready(r) => (KIND_READY, r.seq),
            Msg::Done { seq } => (KIND_DONE, *seq),
            Msg::Wrote { seq } => (KIND_WROTE, *seq),
            Msg::Resolve(r) => (KIND_RESOLVE, r.seq),
            Msg::Bye { seq } => (KIND_BYE, *seq),
            Msg::ByeAck { seq } => (KIND_BYE_ACK, *seq),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + 32);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&seq.to_le_bytes());
        match self {
            Msg::Ready(r) => {
                out.extend_from_slice(&r.label.to_le_bytes());
                out.extend_from_slice(&r.fingerprint.to_le_bytes());
                put_u32(&mut out, r.wants.len());
                for &(s, d) in &r.wants {
                    out.extend_from_slice(&s.to_le_bytes());
                    out.extend_from_slice(&d.to_le_bytes());
                }
                put_u32(&mut out, r.serves.len());
                for &s in &r.serves {
                    out.extend_from_slice(&s.to_le_bytes());
                }
                put_u32(&mut out, r.payload.len());
                out.extend_from_slice(&r.payload);
            }
            Msg::Resolve(r) => {
                out.extend_from_slice(&r.round.to_le_bytes());
                out.push(u8::from(r.decided));
                encode_knowledge(&mut out, &r.knowledge);
            }
            Msg::Done { .. } | Msg::Wrote { .. } | Msg::Bye { .. } | Msg::ByeAck { .. } => {}
        }
        out
    }

    /// Decodes one message of a world of `world` ranks.
    pub fn decode(b: &[u8], world: u32) -> Result<Msg, WireError> {
        let mut r = Reader { b, pos: 0 };
        if r.take(3)? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let kind = r.u8()?;
        let seq = r.u64()?;
        let msg = match kind {
            KIND_READY => {
                let label = r.u32()?;
                let fingerprint = r.u64()?;
                let n = r.count(8)?;
                let mut wants = Vec::with_capacity(n);
                for _ in 0..n {
                    wants.push((r.u32()?, r.u32()?));
                }
                let n = r.count(4)?;
                let mut serves = Vec::with_capacity(n);
                for _ in 0..n {
                    serves.push(r.u32()?);
                }
                let n = r.count(1)?;
                let payload = r.take(n)?.to_vec();
                Msg::Ready(Ready {
                    seq,
                    label,
                    fingerprint,
                    wants,
                    serves,
                    payload,
                })
            }
            KIND_DONE => Msg::Done { seq },
            KIND_WROTE => Msg::Wrote { seq },
            KIND_BYE => Msg::Bye { seq },
            KIND_BYE_ACK => Msg::ByeAck { seq },
            KIND_RESOLVE => {
                let round = r.u32()?;
                let decided = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Field("decided flag")),
                };
                let knowledge = decode_knowledge(&mut r, world)?;
                Msg::Resolve(Resolve {
                    seq,
                    round,
                    decided,
                    knowledge,
                })
            }
            k => return Err(WireError::Kind(k)),
        };
        if r.pos != b.len() {
            return Err(WireError::Trailing(b.len() - r.pos));
        }
        Ok(msg)
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Lengths above u32 are never produced: callers build bounded messages.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

const REPORT_LEN: usize = 4 + 1 + 8 + 4 + 1 + 1 + 4;
const F_ENTERED: u8 = 1;
const F_FP: u8 = 2;
const F_BLOCKED: u8 = 4;
const F_ACCUSE: u8 = 8;

fn encode_knowledge(out: &mut Vec<u8>, k: &Knowledge) {
    out.extend_from_slice(&k.world().to_le_bytes());
    out.push(u8::from(k.committed));
    out.extend_from_slice(&k.done.to_bytes());
    out.extend_from_slice(&k.dead.to_bytes());
    out.extend_from_slice(&k.left.to_bytes());
    let reports: Vec<(u32, &Report)> = k
        .reports
        .iter()
        .enumerate()
        .filter_map(|(r, p)| p.as_ref().map(|p| (r as u32, p)))
        .collect();
    put_u32(out, reports.len());
    for (rank, p) in reports {
        let mut flags = 0u8;
        if p.entered {
            flags |= F_ENTERED;
        }
        if p.fingerprint.is_some() {
            flags |= F_FP;
        }
        if p.blocked_on.is_some() {
            flags |= F_BLOCKED;
        }
        if p.accuse.is_some() {
            flags |= F_ACCUSE;
        }
        out.extend_from_slice(&rank.to_le_bytes());
        out.push(flags);
        out.extend_from_slice(&p.fingerprint.unwrap_or(0).to_le_bytes());
        let (b, w) = p.blocked_on.map_or((0, 0), |(b, w)| (b, w as u8));
        out.extend_from_slice(&b.to_le_bytes());
        out.push(w);
        let (code, c) = p.accuse.map_or((0, 0), |(code, c)| (code as u8, c));
        out.push(code);
        out.extend_from_slice(&c.to_le_bytes());
    }
}

fn decode_knowledge(r: &mut Reader<'_>, world: u32) -> Result<Knowledge, WireError> {
    let got = r.u32()?;
    if got != world {
        return Err(WireError::World {
            got,
            expected: world,
        });
    }
    let committed = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(WireError::Field("committed flag")),
    };
    let nb = (world as usize).div_ceil(8);
    let done = RankSet::from_bytes(world, r.take(nb)?).ok_or(WireError::Field("done set"))?;
    let dead = RankSet::from_bytes(world, r.take(nb)?).ok_or(WireError::Field("dead set"))?;
    let left = RankSet::from_bytes(world, r.take(nb)?).ok_or(WireError::Field("left set"))?;
    let n = r.count(REPORT_LEN)?;
    let mut k = Knowledge {
        committed,
        done,
        dead,
        left,
        reports: vec![None; world as usize],
    };
    let rank_ok = |x: u32| {
        if x < world {
            Ok(x)
        } else {
            Err(WireError::Rank(x))
        }
    };
    let mut last: Option<u32> = None;
    for _ in 0..n {
        let rank = rank_ok(r.u32()?)?;
        // Ascending rank order, as the encoder writes them (one canonical
        // encoding per message).
        if last.is_some_and(|l| rank <= l) {
            return Err(WireError::Field("report order"));
        }
        last = Some(rank);
        let flags = r.u8()?;
        if flags & !(F_ENTERED | F_FP | F_BLOCKED | F_ACCUSE) != 0 {
            return Err(WireError::Field("report flags"));
        }
        let fp = r.u64()?;
        let blocked = r.u32()?;
        let wait = r.u8()?;
        let code = r.u8()?;
        let culprit = r.u32()?;
        // Fields a flag leaves unused must be zero (canonical encoding).
        if (flags & F_FP == 0 && fp != 0)
            || (flags & F_BLOCKED == 0 && (blocked != 0 || wait != 0))
            || (flags & F_ACCUSE == 0 && (code != 0 || culprit != 0))
        {
            return Err(WireError::Field("unused report field"));
        }
        let blocked_on = if flags & F_BLOCKED != 0 {
            Some((
                rank_ok(blocked)?,
                Waiting::from_u8(wait).ok_or(WireError::Field("waiting kind"))?,
            ))
        } else {
            None
        };
        let accuse = if flags & F_ACCUSE != 0 {
            Some((
                AbortCode::from_u8(code).ok_or(WireError::Field("abort code"))?,
                rank_ok(culprit)?,
            ))
        } else {
            None
        };
        k.reports[rank as usize] = Some(Report {
            entered: flags & F_ENTERED != 0,
            fingerprint: (flags & F_FP != 0).then_some(fp),
            blocked_on,
            accuse,
        });
    }
    Ok(k)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.b.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// A u32 element count whose elements (`elem` bytes each) must fit in
    /// the rest of the message: bounds allocations by the message size.
    fn count(&mut self, elem: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        let rest = self.b.len() - self.pos;
        if n.checked_mul(elem).map_or(true, |need| need > rest) {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_knowledge(world: u32) -> Knowledge {
        let mut k = Knowledge::new(world);
        k.committed = true;
        k.done.insert(0);
        k.dead.insert(world - 1);
        k.reports[1] = Some(Report {
            entered: true,
            fingerprint: Some(0xdead_beef),
            blocked_on: Some((0, Waiting::Transfer)),
            accuse: Some((AbortCode::Checksum, 0)),
        });
        k.reports[0] = Some(Report {
            entered: false,
            fingerprint: None,
            blocked_on: None,
            accuse: None,
        });
        k
    }

    #[test]
    fn every_kind_round_trips() {
        let msgs = vec![
            Msg::Ready(Ready {
                seq: 5,
                label: 3,
                fingerprint: 99,
                wants: vec![(1, 2), (3, 0)],
                serves: vec![0, 0, 2],
                payload: b"sums".to_vec(),
            }),
            Msg::Done { seq: 1 },
            Msg::Wrote { seq: u64::MAX },
            Msg::Bye { seq: 0 },
            Msg::ByeAck { seq: 3 },
            Msg::Resolve(Resolve {
                seq: 7,
                round: 2,
                decided: true,
                knowledge: sample_knowledge(9),
            }),
        ];
        for m in msgs {
            assert_eq!(Msg::decode(&m.encode(), 9), Ok(m.clone()));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(Msg::decode(b"", 2), Err(WireError::Truncated));
        assert_eq!(
            Msg::decode(b"EPXF........", 2),
            Err(WireError::Version(b'F'))
        );
        assert_eq!(Msg::decode(b"xyz", 2), Err(WireError::BadMagic));
        let mut m = Msg::Done { seq: 1 }.encode();
        m.push(0);
        assert_eq!(Msg::decode(&m, 2), Err(WireError::Trailing(1)));
        let r = Msg::Resolve(Resolve {
            seq: 1,
            round: 1,
            decided: false,
            knowledge: sample_knowledge(4),
        })
        .encode();
        assert!(matches!(Msg::decode(&r, 5), Err(WireError::World { .. })));
        for cut in 0..r.len() {
            assert!(Msg::decode(&r[..cut], 4).is_err());
        }
        // a huge count never allocates
        let mut big = Msg::Ready(Ready {
            seq: 1,
            label: 0,
            fingerprint: 0,
            wants: vec![],
            serves: vec![],
            payload: vec![],
        })
        .encode();
        big[HEADER_LEN + 12..HEADER_LEN + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Msg::decode(&big, 2), Err(WireError::Truncated));
    }
}
