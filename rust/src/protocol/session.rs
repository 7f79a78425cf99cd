//! One rank's protocol state machine (see the module docs of `protocol`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use super::agreement::Agreement;
use super::knowledge::{AbortCode, Blame, Knowledge, Report, Verdict, Waiting};
use super::ranks::RankSet;
use super::wire::{Msg, Ready, WireError};
use super::Time;

/// Who initiates transfers between a pair of ranks (both sides agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The receiver READs from the sender's rows.
    Read,
    /// The sender WRITEs into the receiver's buffer rows and tells it so
    /// with a notification attached to the write.
    Write,
}

/// Static settings of a session.
#[derive(Debug, Clone)]
pub struct Config {
    pub rank: u32,
    pub world: u32,
    /// Rows per rank: every row index in a message must be below it.
    pub n_local: u32,
    /// Deadline of one exchange, from the moment this rank begins it.
    pub timeout: Time,
    /// Length of one round of the failure agreement.
    pub round_timeout: Time,
    /// `direction[p]` for the pair (this rank, p); own entry unused.
    pub direction: Vec<Direction>,
    /// `round_of[p]`: schedule round of transfers with p. Round 0 runs at
    /// once; rounds 1, 2, ... run one after the other, each once this rank's
    /// transfers of the earlier rounds completed.
    pub round_of: Vec<u32>,
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

/// What this rank does in one exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeSpec {
    /// The caller's name for the exchange (layer index), reported on failure.
    pub label: u32,
    /// Must be equal on every rank (covers the placement and the label).
    pub fingerprint: u64,
    /// `(src_rank, src_row, dst_row)`: rows this rank receives.
    pub recvs: Vec<(u32, u32, u32)>,
    /// `(dst_rank, src_row)`: rows this rank serves (one entry per reader and row).
    pub sends: Vec<(u32, u32)>,
    /// `(peer, bytes)`: opaque payload for a peer's READY (e.g. checksums).
    pub payloads: Vec<(u32, Vec<u8>)>,
    /// Emit [`Event::Landed`] and wait for [`Session::done`] (verification)
    /// instead of saying DONE as soon as the data landed.
    pub hold_done: bool,
}

/// Transfer direction of a posted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// A transfer the driver must post (one request per peer and exchange).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub id: u64,
    pub seq: u64,
    pub op: Op,
    pub peer: u32,
    /// `(src_row, dst_row)`: Read: peer's row -> our buffer row; Write: our
    /// row -> peer's buffer row.
    pub rows: Vec<(u32, u32)>,
    /// Notification to attach (delivered to the peer once the data landed).
    pub notify: Option<Vec<u8>>,
}

/// Something for the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send {
        to: u32,
        msg: Vec<u8>,
    },
    Post(Transfer),
    /// Release a posted request that is no longer wanted (abort it if in flight).
    Cancel {
        id: u64,
    },
}

/// Why an exchange failed, as every survivor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub culprit: u32,
    pub blame: Blame,
    /// The exchange whose agreement produced this failure.
    pub seq: u64,
    pub detail: String,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// All incoming data of `seq` landed (only with `hold_done`); `payloads`
    /// are the peers' READY payloads by rank. Call `done` or `abort`.
    Landed {
        seq: u64,
        payloads: Vec<Option<Vec<u8>>>,
    },
    /// The exchange ended. `Ok(None)`: commit. `Ok(Some(f))`: commit, but a
    /// peer failed while it completed (the next exchange fails with `f`).
    /// `Err(f)`: do not commit; the session is failed for good.
    Finished {
        seq: u64,
        label: u32,
        result: Result<Option<Failure>, Failure>,
    },
}

/// A command the session cannot take in its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    ExchangeOpen,
    NoExchange,
    NotLanded,
    Closed,
    Spec(String),
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::ExchangeOpen => write!(f, "an exchange is already open"),
            UsageError::NoExchange => write!(f, "no exchange is open"),
            UsageError::NotLanded => write!(f, "the exchange's data has not landed yet"),
            UsageError::Closed => write!(f, "the session is closed"),
            UsageError::Spec(m) => f.write_str(m),
        }
    }
}
impl std::error::Error for UsageError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XState {
    Waiting,
    InFlight,
    Done,
}

#[derive(Debug, Clone)]
struct Xfer {
    id: u64,
    op: Op,
    peer: u32,
    rows: Vec<(u32, u32)>,
    round: u32,
    state: XState,
}

/// The open exchange.
#[derive(Debug, Clone)]
struct Exchange {
    seq: u64,
    label: u32,
    fingerprint: u64,
    deadline: Time,
    hold_done: bool,
    /// source -> (src_row, dst_row), sorted
    recv_from: BTreeMap<u32, Vec<(u32, u32)>>,
    /// reader -> src_rows, sorted
    send_to: BTreeMap<u32, Vec<u32>>,
    payload_for: BTreeMap<u32, Vec<u8>>,
    ready: RankSet,
    payloads: Vec<Option<Vec<u8>>>,
    /// What each peer (a Write-direction reader) wants from us.
    peer_wants: BTreeMap<u32, Vec<(u32, u32)>>,
    xfers: Vec<Xfer>,
    started_transfers: bool,
    wrote: RankSet,
    landed: bool,
    done_sent: bool,
    done: RankSet,
    /// A peer sent a message of a later exchange: it committed this one.
    later_proof: bool,
    /// In the agreement: the outcome comes from it alone.
    frozen: bool,
    /// Locally found fault (aborting), before joining the agreement.
    accuse: Option<(AbortCode, u32)>,
}

/// One rank's protocol state (see the module docs).
#[derive(Debug)]
pub struct Session {
    cfg: Config,
    seq: u64,
    cur: Option<Exchange>,
    /// Every exchange `<= committed` committed here.
    committed: u64,
    /// READY messages of the next exchange, by sender.
    early: BTreeMap<u32, Ready>,
    agreements: BTreeMap<u64, Agreement>,
    /// Commit decided with a failure: the next exchange fails with it.
    pending: Option<Failure>,
    /// An exchange failed: the session refuses further work.
    failed: Option<Failure>,
    /// Exchange finished by an agreement, waiting for the previous exchange's
    /// agreement to decide (its culprit takes precedence).
    deferred: Option<(u64, u32, Failure)>,
    left: RankSet,
    /// Peers that confirmed our goodbye, with their last committed exchange.
    acked: BTreeMap<u32, u64>,
    closed: bool,
    next_id: u64,
    out: VecDeque<Output>,
    events: VecDeque<Event>,
    /// Undecodable or out-of-place peer messages (ignored).
    pub ignored_messages: u64,
    pub last_wire_error: Option<WireError>,
}

impl Session {
    pub fn new(cfg: Config) -> Result<Session, ConfigError> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(ConfigError(format!(
                "rank {} is outside world size {}",
                cfg.rank, cfg.world
            )));
        }
        let w = cfg.world as usize;
        if cfg.direction.len() != w || cfg.round_of.len() != w {
            return Err(ConfigError(format!(
                "direction and round_of need {w} entries, got {} and {}",
                cfg.direction.len(),
                cfg.round_of.len()
            )));
        }
        if cfg.timeout == 0 || cfg.round_timeout == 0 {
            return Err(ConfigError("timeouts must be positive".into()));
        }
        let world = cfg.world;
        Ok(Session {
            cfg,
            seq: 0,
            cur: None,
            committed: 0,
            early: BTreeMap::new(),
            agreements: BTreeMap::new(),
            pending: None,
            failed: None,
            deferred: None,
            left: RankSet::new(world),
            acked: BTreeMap::new(),
            closed: false,
            next_id: 1,
            out: VecDeque::new(),
            events: VecDeque::new(),
            ignored_messages: 0,
            last_wire_error: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Sequence number of the last exchange begun (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    pub fn is_open(&self) -> bool {
        self.cur.is_some() || self.deferred.is_some()
    }
    pub fn failure(&self) -> Option<&Failure> {
        self.failed.as_ref()
    }
    pub fn pending_failure(&self) -> Option<&Failure> {
        self.pending.as_ref()
    }
    /// Peers an agreement found dead (they stopped answering).
    pub fn failed_peers(&self) -> RankSet {
        let mut s = RankSet::new(self.cfg.world);
        for a in self.agreements.values() {
            if let Some(k) = &a.decided {
                s.union_with(&k.dead);
            }
        }
        s.remove(self.cfg.rank);
        s
    }

    /// Peers known dead or gone (agreements' `dead`, BYE).
    pub fn gone_peers(&self) -> RankSet {
        let mut s = self.failed_peers();
        s.union_with(&self.left);
        s
    }
    /// Buffered state (bounded; for leak checks).
    pub fn buffered(&self) -> usize {
        self.early.len() + self.agreements.len()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time at which `handle_timeout` has work.
    pub fn next_timeout(&self) -> Option<Time> {
        let mut t = self.cur.as_ref().filter(|c| !c.frozen).map(|c| c.deadline);
        for a in self.agreements.values() {
            if let Some(at) = a.next_timeout() {
                t = Some(t.map_or(at, |x| x.min(at)));
            }
        }
        t
    }

    // ---- commands ------------------------------------------------------------

    /// Begins the next exchange. A spec that names ranks or rows outside the
    /// world is refused before anything is sent. If the session already
    /// failed (or a peer failure is pending) the exchange finishes at once.
    pub fn begin(&mut self, now: Time, spec: ExchangeSpec) -> Result<(), UsageError> {
        if self.closed {
            return Err(UsageError::Closed);
        }
        if self.is_open() {
            return Err(UsageError::ExchangeOpen);
        }
        self.check_spec(&spec)?;
        self.seq += 1;
        let seq = self.seq;
        if let Some(f) = self.failed.clone().or_else(|| self.pending.take()) {
            self.failed = Some(f.clone());
            self.early.clear();
            self.events.push_back(Event::Finished {
                seq,
                label: spec.label,
                result: Err(f),
            });
            return Ok(());
        }
        let world = self.cfg.world;
        let mut recv_from: BTreeMap<u32, Vec<(u32, u32)>> = BTreeMap::new();
        for &(src, s, d) in &spec.recvs {
            recv_from.entry(src).or_default().push((s, d));
        }
        for v in recv_from.values_mut() {
            v.sort_unstable();
        }
        let mut send_to: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &(dst, s) in &spec.sends {
            send_to.entry(dst).or_default().push(s);
        }
        for v in send_to.values_mut() {
            v.sort_unstable();
        }
        let mut ready = RankSet::new(world);
        ready.insert(self.cfg.rank);
        let mut done = RankSet::new(world);
        if world == 1 {
            done.insert(0);
        }
        self.cur = Some(Exchange {
            seq,
            label: spec.label,
            fingerprint: spec.fingerprint,
            deadline: now.saturating_add(self.cfg.timeout),
            hold_done: spec.hold_done,
            recv_from,
            send_to,
            payload_for: spec.payloads.into_iter().collect(),
            ready,
            payloads: vec![None; world as usize],
            peer_wants: BTreeMap::new(),
            xfers: Vec::new(),
            started_transfers: false,
            wrote: RankSet::new(world),
            landed: false,
            done_sent: false,
            done: RankSet::new(world),
            later_proof: false,
            frozen: false,
            accuse: None,
        });
        if self.agreements.contains_key(&seq) {
            // Peers already failed this exchange before we began it.
            if let Some(c) = self.cur.as_mut() {
                c.frozen = true;
            }
            self.early.clear();
            self.apply_decisions(now);
            return Ok(());
        }
        for p in 0..world {
            if p == self.cfg.rank {
                continue;
            }
            let c = self.cur.as_ref().map(|c| {
                (
                    c.recv_from.get(&p).cloned().unwrap_or_default(),
                    c.send_to.get(&p).cloned().unwrap_or_default(),
                    c.payload_for.get(&p).cloned().unwrap_or_default(),
                    c.label,
                    c.fingerprint,
                )
            });
            if let Some((wants, serves, payload, label, fingerprint)) = c {
                self.send(
                    p,
                    Msg::Ready(Ready {
                        seq,
                        label,
                        fingerprint,
                        wants,
                        serves,
                        payload,
                    }),
                );
            }
        }
        let early = std::mem::take(&mut self.early);
        for (from, r) in early {
            self.on_ready(now, from, r);
        }
        self.advance(now);
        Ok(())
    }

    /// Says DONE after [`Event::Landed`] (the caller verified the data).
    pub fn done(&mut self, now: Time) -> Result<(), UsageError> {
        let c = self.cur.as_ref().ok_or(UsageError::NoExchange)?;
        if c.frozen || c.done_sent {
            return Ok(()); // the agreement decides, or already said
        }
        if !c.landed {
            return Err(UsageError::NotLanded);
        }
        self.send_done();
        self.advance(now);
        Ok(())
    }

    /// Gives up on the open exchange, naming `culprit` for `code`. Without an
    /// open exchange (the caller fails between exchanges), the peers are told
    /// that this rank will not begin the next one.
    pub fn abort(&mut self, now: Time, code: AbortCode, culprit: u32) {
        let culprit = culprit.min(self.cfg.world - 1);
        match self.cur.as_mut() {
            Some(c) if !c.frozen => {
                c.accuse = Some((code, culprit));
                let seq = c.seq;
                self.join(now, seq);
            }
            Some(_) => {}
            None => {
                if self.failed.is_none() && self.deferred.is_none() {
                    let seq = self.seq + 1;
                    if !self.agreements.contains_key(&seq) {
                        let mut k = Knowledge::new(self.cfg.world);
                        k.reports[self.cfg.rank as usize] = Some(Report {
                            entered: false,
                            fingerprint: None,
                            blocked_on: None,
                            accuse: Some((code, culprit)),
                        });
                        self.start_agreement(now, seq, k);
                    }
                }
            }
        }
    }

    /// Ends the session: aborts an open exchange (code `Closed`) and says BYE.
    pub fn close(&mut self, now: Time) {
        if self.closed {
            return;
        }
        if self.cur.as_ref().is_some_and(|c| !c.frozen) {
            let me = self.cfg.rank;
            self.abort(now, AbortCode::Closed, me);
        }
        self.closed = true;
        let seq = self.seq;
        let gone = self.gone_peers();
        for p in 0..self.cfg.world {
            if p != self.cfg.rank && !gone.contains(p) {
                self.send(p, Msg::Bye { seq });
            }
        }
    }

    /// After [`Session::close`]: every agreement decided and every peer still
    /// there confirmed it has all this rank sent (so nothing is lost when the
    /// transport goes away).
    pub fn close_settled(&self) -> bool {
        if !self.closed {
            return false;
        }
        if self.agreements.values().any(|a| a.decided.is_none()) {
            return false;
        }
        let gone = self.gone_peers();
        (0..self.cfg.world)
            .filter(|&p| p != self.cfg.rank && !gone.contains(p))
            .all(|p| self.acked.contains_key(&p))
    }

    // ---- events --------------------------------------------------------------

    /// A peer's message. Anything malformed or out of place is ignored.
    pub fn handle_message(&mut self, now: Time, from: u32, bytes: &[u8]) {
        if from >= self.cfg.world || from == self.cfg.rank {
            self.ignored_messages += 1;
            return;
        }
        let msg = match Msg::decode(bytes, self.cfg.world) {
            Ok(m) => m,
            Err(e) => {
                self.ignored_messages += 1;
                self.last_wire_error = Some(e);
                return;
            }
        };
        let seq = msg.seq();
        if let Msg::Resolve(r) = &msg {
            self.on_resolve(now, from, r);
            return;
        }
        match msg {
            Msg::Bye { .. } => {
                self.left.insert(from);
                let seq = self.committed;
                self.send(from, Msg::ByeAck { seq });
                return;
            }
            Msg::ByeAck { seq } => {
                self.acked.insert(from, seq);
                return;
            }
            _ => {}
        }
        // A message of a later exchange proves the sender committed ours.
        if let Some(c) = self.cur.as_mut() {
            if seq > c.seq && !c.frozen {
                c.later_proof = true;
            }
        }
        let cur_seq = self.cur.as_ref().map(|c| c.seq);
        match msg {
            Msg::Ready(r) if Some(seq) == cur_seq => self.on_ready(now, from, r),
            Msg::Ready(r) if seq == self.seq + 1 => {
                self.early.insert(from, r);
            }
            Msg::Done { .. } if Some(seq) == cur_seq => {
                if let Some(c) = self.cur.as_mut() {
                    if !c.frozen {
                        c.done.insert(from);
                    }
                }
            }
            Msg::Wrote { .. } if Some(seq) == cur_seq => {
                if let Some(c) = self.cur.as_mut() {
                    if !c.frozen {
                        c.wrote.insert(from);
                    }
                }
            }
            _ => {
                if seq > self.seq + 1 {
                    self.ignored_messages += 1;
                }
            }
        }
        self.advance(now);
    }

    /// A posted transfer finished (`ok`) or failed.
    pub fn handle_completion(&mut self, now: Time, id: u64, ok: bool) {
        let Some(c) = self.cur.as_mut() else { return };
        let Some(x) = c.xfers.iter_mut().find(|x| x.id == id) else {
            return;
        };
        if x.state != XState::InFlight {
            return;
        }
        if ok {
            x.state = XState::Done;
            self.advance(now);
        } else {
            x.state = XState::Done;
            let peer = x.peer;
            self.abort(now, AbortCode::Transport, peer);
        }
    }

    /// A message to `to` could not be sent.
    pub fn handle_send_failure(&mut self, now: Time, to: u32) {
        if to >= self.cfg.world || to == self.cfg.rank {
            return;
        }
        if self.cur.as_ref().is_some_and(|c| !c.frozen) {
            self.abort(now, AbortCode::Transport, to);
        }
    }

    /// Runs deadlines and agreement rounds due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        if let Some(c) = &self.cur {
            if !c.frozen && now >= c.deadline {
                let seq = c.seq;
                if let Some(c) = self.cur.as_mut() {
                    c.accuse.get_or_insert((AbortCode::Deadline, self.cfg.rank));
                }
                self.join(now, seq);
            }
        }
        let seqs: Vec<u64> = self.agreements.keys().copied().collect();
        let mut msgs = Vec::new();
        for s in seqs {
            if let Some(a) = self.agreements.get_mut(&s) {
                a.poll(now, &mut msgs);
            }
        }
        self.push_msgs(msgs);
        self.apply_decisions(now);
    }

    // ---- internals -----------------------------------------------------------

    fn check_spec(&self, spec: &ExchangeSpec) -> Result<(), UsageError> {
        let (w, n, me) = (self.cfg.world, self.cfg.n_local, self.cfg.rank);
        let bad = |m: String| Err(UsageError::Spec(m));
        let mut dst_rows = RankSet::new(n);
        for &(src, s, d) in &spec.recvs {
            if src >= w || src == me {
                return bad(format!(
                    "recv from rank {src}: not a peer (world {w}, rank {me})"
                ));
            }
            if s >= n || d >= n {
                return bad(format!("recv row ({s} -> {d}) outside 0..{n}"));
            }
            if !dst_rows.insert(d) {
                return bad(format!("buffer row {d} receives twice"));
            }
        }
        for &(dst, s) in &spec.sends {
            if dst >= w || dst == me {
                return bad(format!(
                    "send to rank {dst}: not a peer (world {w}, rank {me})"
                ));
            }
            if s >= n {
                return bad(format!("send row {s} outside 0..{n}"));
            }
        }
        for (p, _) in &spec.payloads {
            if *p >= w || *p == me {
                return bad(format!("payload for rank {p}: not a peer"));
            }
        }
        Ok(())
    }

    fn send(&mut self, to: u32, msg: Msg) {
        self.out.push_back(Output::Send {
            to,
            msg: msg.encode(),
        });
    }

    fn push_msgs(&mut self, msgs: Vec<(u32, Vec<u8>)>) {
        for (to, msg) in msgs {
            if !self.left.contains(to) {
                self.out.push_back(Output::Send { to, msg });
            }
        }
    }

    fn on_ready(&mut self, now: Time, from: u32, r: Ready) {
        let n = self.cfg.n_local;
        let Some(c) = self.cur.as_mut() else { return };
        if c.frozen || c.ready.contains(from) {
            return;
        }
        let problem = if r.label != c.label {
            Some(format!(
                "rank {from} is at layer {} but this rank at layer {}",
                r.label, c.label
            ))
        } else if r.fingerprint != c.fingerprint {
            Some(format!(
                "rank {from} has placement fingerprint {:#018x}, this rank {:#018x}",
                r.fingerprint, c.fingerprint
            ))
        } else if r.wants.iter().any(|&(s, d)| s >= n || d >= n) {
            Some(format!("rank {from} wants rows outside 0..{n}"))
        } else {
            let mut asked: Vec<u32> = r.wants.iter().map(|&(s, _)| s).collect();
            asked.sort_unstable();
            let mine = c.send_to.get(&from).cloned().unwrap_or_default();
            let mut wanted: Vec<u32> = c
                .recv_from
                .get(&from)
                .map(|v| v.iter().map(|&(s, _)| s).collect())
                .unwrap_or_default();
            wanted.sort_unstable();
            if asked != mine {
                Some(format!(
                    "rank {from} wants rows {asked:?} from this rank, which serves it {mine:?}"
                ))
            } else if r.serves != wanted {
                Some(format!(
                    "rank {from} serves rows {:?} to this rank, which wants {wanted:?}",
                    r.serves
                ))
            } else {
                None
            }
        };
        if let Some(_why) = problem {
            c.accuse = Some((AbortCode::Disagreement, from));
            let seq = c.seq;
            self.join(now, seq);
            return;
        }
        c.ready.insert(from);
        if !r.payload.is_empty() {
            c.payloads[from as usize] = Some(r.payload);
        }
        if self.cfg.direction[from as usize] == Direction::Write && !r.wants.is_empty() {
            c.peer_wants.insert(from, r.wants);
        }
    }

    /// Moves the open exchange forward as far as its inputs allow.
    fn advance(&mut self, now: Time) {
        let world = self.cfg.world;
        let me = self.cfg.rank;
        let Some(c) = self.cur.as_mut() else { return };
        if c.frozen {
            return;
        }
        let all_ready = c.ready.len() == world as usize;
        if all_ready && !c.started_transfers {
            c.started_transfers = true;
            let mut xfers = Vec::new();
            for (&src, rows) in &c.recv_from {
                if self.cfg.direction[src as usize] == Direction::Read {
                    xfers.push((Op::Read, src, rows.clone()));
                }
            }
            for (&dst, rows) in &c.peer_wants {
                xfers.push((Op::Write, dst, rows.clone()));
            }
            for (op, peer, rows) in xfers {
                let id = self.next_id;
                self.next_id += 1;
                c.xfers.push(Xfer {
                    id,
                    op,
                    peer,
                    rows,
                    round: self.cfg.round_of[peer as usize],
                    state: XState::Waiting,
                });
            }
        }
        // Post what the schedule allows: round 0 at once, then each round
        // once every earlier round's transfers completed.
        if c.started_transfers {
            let open_round = c
                .xfers
                .iter()
                .filter(|x| x.round > 0 && x.state != XState::Done)
                .map(|x| x.round)
                .min();
            let seq = c.seq;
            for x in c.xfers.iter_mut() {
                if x.state == XState::Waiting && (x.round == 0 || Some(x.round) == open_round) {
                    x.state = XState::InFlight;
                    let notify = (x.op == Op::Write).then(|| Msg::Wrote { seq }.encode());
                    self.out.push_back(Output::Post(Transfer {
                        id: x.id,
                        seq,
                        op: x.op,
                        peer: x.peer,
                        rows: x.rows.clone(),
                        notify,
                    }));
                }
            }
        }
        if c.started_transfers && !c.landed {
            let reads_done = c
                .xfers
                .iter()
                .filter(|x| x.op == Op::Read)
                .all(|x| x.state == XState::Done);
            let writes_in = c.recv_from.keys().all(|&src| {
                self.cfg.direction[src as usize] == Direction::Read || c.wrote.contains(src)
            });
            if reads_done && writes_in {
                c.landed = true;
                if c.hold_done {
                    self.events.push_back(Event::Landed {
                        seq: c.seq,
                        payloads: c.payloads.clone(),
                    });
                } else {
                    self.send_done();
                }
            }
        }
        let Some(c) = self.cur.as_mut() else { return };
        let all_done = c.done.len() == world as usize || c.later_proof;
        let own_done = c.xfers.iter().all(|x| x.state == XState::Done);
        if c.done_sent && all_done && own_done {
            let (seq, label) = (c.seq, c.label);
            self.cur = None;
            self.committed = seq;
            let _ = me;
            self.events.push_back(Event::Finished {
                seq,
                label,
                result: Ok(None),
            });
            self.prune();
        }
        let _ = now;
    }

    fn send_done(&mut self) {
        let me = self.cfg.rank;
        let Some(c) = self.cur.as_mut() else { return };
        // Marked before sending: a partial broadcast may still let peers commit.
        c.done_sent = true;
        c.done.insert(me);
        let seq = c.seq;
        for p in 0..self.cfg.world {
            if p != me && !self.left.contains(p) {
                self.send(p, Msg::Done { seq });
            }
        }
    }

    /// This rank's own report and knowledge about exchange `seq`.
    fn own_knowledge(&self, seq: u64) -> Knowledge {
        let world = self.cfg.world;
        let me = self.cfg.rank;
        let mut k = Knowledge::new(world);
        for p in self.left.iter() {
            k.dead.insert(p); // said BYE: will never answer (not waited for)
            k.left.insert(p);
        }
        match &self.cur {
            Some(c) if c.seq == seq => {
                k.done = c.done.clone();
                if c.later_proof {
                    k.committed = true;
                }
                k.reports[me as usize] = Some(Report {
                    entered: true,
                    fingerprint: Some(c.fingerprint),
                    blocked_on: blocked_on(c, &self.cfg),
                    accuse: c.accuse,
                });
            }
            _ if seq <= self.committed => {
                k.committed = true;
                k.done = RankSet::full(world);
                k.reports[me as usize] = Some(Report {
                    entered: true,
                    fingerprint: None,
                    blocked_on: None,
                    accuse: None,
                });
            }
            _ => {
                // Not begun here (a later exchange, or after failing).
                let entered = seq <= self.seq;
                k.reports[me as usize] = Some(Report {
                    entered,
                    fingerprint: None,
                    blocked_on: None,
                    accuse: None,
                });
            }
        }
        k
    }

    /// Joins (or starts) the agreement about `seq` with our own knowledge.
    fn join(&mut self, now: Time, seq: u64) {
        if self.agreements.contains_key(&seq) {
            return;
        }
        let k = self.own_knowledge(seq);
        self.start_agreement(now, seq, k);
    }

    fn start_agreement(&mut self, now: Time, seq: u64, k: Knowledge) {
        let mut cancels = Vec::new();
        if let Some(c) = self.cur.as_mut() {
            if c.seq == seq {
                c.frozen = true;
                for x in c.xfers.iter_mut() {
                    if x.state == XState::InFlight {
                        cancels.push(x.id);
                    }
                    x.state = XState::Done;
                }
            }
        }
        for id in cancels {
            self.out.push_back(Output::Cancel { id });
        }
        let mut msgs = Vec::new();
        let a = Agreement::start(
            seq,
            self.cfg.rank,
            now,
            self.cfg.round_timeout,
            k,
            &mut msgs,
        );
        self.agreements.insert(seq, a);
        self.push_msgs(msgs);
        if let Some(a) = self.agreements.get_mut(&seq) {
            let mut msgs = Vec::new();
            a.poll(now, &mut msgs);
            self.push_msgs(msgs);
        }
        self.apply_decisions(now);
    }

    fn on_resolve(&mut self, now: Time, from: u32, r: &super::wire::Resolve) {
        let seq = r.seq;
        if seq > self.seq + 1 {
            self.ignored_messages += 1;
            return;
        }
        if !self.agreements.contains_key(&seq) {
            if seq + 8 < self.seq {
                return; // long settled
            }
            self.join(now, seq);
        }
        let mut msgs = Vec::new();
        if let Some(a) = self.agreements.get_mut(&seq) {
            a.handle(now, from, r, &mut msgs);
        }
        self.push_msgs(msgs);
        self.apply_decisions(now);
    }

    /// Applies newly decided agreements to the session's state.
    fn apply_decisions(&mut self, _now: Time) {
        let mut decided: Vec<(u64, Knowledge)> = Vec::new();
        for (&s, a) in self.agreements.iter_mut() {
            if let (Some(k), false) = (&a.decided, a.applied) {
                a.applied = true;
                decided.push((s, k.clone()));
            }
        }
        for (seq, k) in decided {
            let v = k.verdict();
            let failure = self.failure_of(seq, &k, v);
            let in_cur = self.cur.as_ref().is_some_and(|c| c.seq == seq && c.frozen);
            if in_cur {
                let label = self.cur.as_ref().map_or(0, |c| c.label);
                self.cur = None;
                if v.commit {
                    self.committed = seq;
                    self.pending.get_or_insert(failure.clone());
                    self.events.push_back(Event::Finished {
                        seq,
                        label,
                        result: Ok(Some(failure)),
                    });
                } else {
                    self.deferred = Some((seq, label, failure));
                }
            } else if seq <= self.committed {
                if self.pending.is_none() && self.failed.is_none() {
                    self.pending = Some(failure.clone());
                }
                // An exchange opened since then fails at once (unless its own
                // agreement already runs; it will yield to this failure).
                let fail_cur = self
                    .cur
                    .as_ref()
                    .filter(|c| c.seq == seq + 1 && !c.frozen)
                    .map(|c| (c.seq, c.label));
                if let Some((s, label)) = fail_cur {
                    self.cancel_cur();
                    let f = self.pending.take().unwrap_or(failure);
                    self.failed = Some(f.clone());
                    self.events.push_back(Event::Finished {
                        seq: s,
                        label,
                        result: Err(f),
                    });
                }
            } else if !v.commit && self.failed.is_none() && seq > self.seq {
                // An exchange not begun here: it fails when begun.
                self.failed = Some(failure);
            }
        }
        self.finish_deferred();
    }

    /// Finishes an exchange whose agreement decided "no commit", once the
    /// previous exchange's agreement (if any) decided too: a failure already
    /// found there is the one every rank reports.
    fn finish_deferred(&mut self) {
        let Some((seq, label, failure)) = self.deferred.clone() else {
            return;
        };
        let prev = seq.checked_sub(1).and_then(|p| self.agreements.get(&p));
        let failure = match prev {
            Some(a) => match &a.decided {
                None => return, // wait for it
                Some(k) => {
                    let v = k.verdict();
                    if v.commit {
                        self.failure_of(seq - 1, k, v)
                    } else {
                        failure
                    }
                }
            },
            None => failure,
        };
        self.deferred = None;
        self.pending = None;
        self.failed = Some(failure.clone());
        self.events.push_back(Event::Finished {
            seq,
            label,
            result: Err(failure),
        });
        self.prune();
    }

    fn cancel_cur(&mut self) {
        if let Some(c) = self.cur.take() {
            for x in c.xfers {
                if x.state == XState::InFlight {
                    self.out.push_back(Output::Cancel { id: x.id });
                }
            }
        }
    }

    fn failure_of(&self, seq: u64, k: &Knowledge, v: Verdict) -> Failure {
        let detail = match v.blame {
            Blame::Dead => format!("rank {} stopped answering", v.culprit),
            Blame::Verdict(AbortCode::Checksum) => {
                format!("data from rank {} failed verification", v.culprit)
            }
            Blame::Verdict(AbortCode::Interrupted) => {
                format!("rank {} was interrupted", v.culprit)
            }
            Blame::Verdict(AbortCode::Closed) => {
                format!("rank {} closed its communicator", v.culprit)
            }
            Blame::Verdict(_) => format!("rank {} failed", v.culprit),
            Blame::Disagreement => format!(
                "rank {} disagrees on the exchange (placement, layer or rows differ)",
                v.culprit
            ),
            Blame::Absent => format!("rank {} did not begin the exchange in time", v.culprit),
            Blame::Stalled(w) => format!(
                "rank {} did not finish in time (waiting for {})",
                v.culprit,
                match w {
                    Waiting::Ready => "READY",
                    Waiting::Transfer => "a transfer",
                    Waiting::Done => "DONE",
                    Waiting::Caller => "its caller",
                }
            ),
            Blame::Transport => format!("a transfer with rank {} failed", v.culprit),
        };
        let dead: Vec<u32> = k.dead.iter().collect();
        let detail = if dead.len() > 1 {
            format!("{detail}; ranks {dead:?} stopped answering")
        } else {
            detail
        };
        Failure {
            culprit: v.culprit,
            blame: v.blame,
            seq,
            detail,
        }
    }

    /// Forgets agreements long settled (late messages about them are ignored).
    fn prune(&mut self) {
        let keep_from = self.seq.saturating_sub(8);
        self.agreements
            .retain(|&s, a| s >= keep_from || a.decided.is_none());
    }
}

/// Whom the open exchange waits for, in blame order (see [`Waiting`]).
fn blocked_on(c: &Exchange, cfg: &Config) -> Option<(u32, Waiting)> {
    let me = cfg.rank;
    let peers = || (0..cfg.world).filter(move |&p| p != me);
    if let Some(p) = peers().find(|&p| !c.ready.contains(p)) {
        return Some((p, Waiting::Ready));
    }
    if let Some(x) = c
        .xfers
        .iter()
        .find(|x| x.op == Op::Read && x.state != XState::Done)
    {
        return Some((x.peer, Waiting::Transfer));
    }
    if let Some(&s) = c
        .recv_from
        .keys()
        .find(|&&s| cfg.direction[s as usize] == Direction::Write && !c.wrote.contains(s))
    {
        return Some((s, Waiting::Transfer));
    }
    if c.landed && !c.done_sent {
        return Some((me, Waiting::Caller));
    }
    if let Some(x) = c.xfers.iter().find(|x| x.state != XState::Done) {
        return Some((x.peer, Waiting::Transfer));
    }
    peers()
        .find(|&p| !c.done.contains(p))
        .map(|p| (p, Waiting::Done))
}
