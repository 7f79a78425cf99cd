//! Deterministic simulation of the per-exchange protocol (`eplb_xfer::protocol`).
//!
//! N sessions talk over a simulated network (per-message random delays, so
//! messages between a pair may be reordered) and a simulated data plane
//! (transfers take random time; those touching a dead rank fail or hang).
//! Each seeded schedule picks ranks that die at random points (after their
//! k-th action, so broadcasts can be cut short), callers that arrive late,
//! ranks that disagree on the placement, checksum verdicts and interrupts.
//! Every schedule checks the protocol's promises:
//! - every surviving rank reports the same (culprit, failing layer,
//!   committed layers), and all succeed when nothing went wrong;
//! - no rank commits an exchange before every rank finished its part
//!   (said DONE), and never while a peer's transfer from its rows runs;
//! - no transfer touches a rank before it said READY, none starts unless all
//!   ranks agree on the fingerprint, and no write lands in a rank's buffer
//!   after it moved on;
//! - nobody waits past its deadline plus the stated grace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use eplb_xfer::protocol::wire::Msg;
use eplb_xfer::protocol::{
    AbortCode, Config, Direction, Event, ExchangeSpec, Failure, Op, Output, Session, Time,
};

const MS: Time = 1_000_000;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Deliver { from: u32, to: u32, bytes: Vec<u8> },
    Complete { rank: u32, id: u64, ok: bool },
    Land { writer: u32, reader: u32, seq: u64 },
    Caller { rank: u32 },
    Timer { rank: u32 },
    Kill { rank: u32 },
    Interrupt { rank: u32 },
    Verified { rank: u32, seq: u64 },
}

/// One scheduled transfer of the global plan: `reader` gets `src_row` of
/// `source` into its buffer row `dst_row`.
#[derive(Debug, Clone, Copy)]
struct Move {
    reader: u32,
    source: u32,
    src_row: u32,
    dst_row: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    failure: Option<(u32, u32)>, // (culprit, label)
    committed: Vec<u32>,
}

struct Rank {
    s: Session,
    dead: bool,
    die_after: Option<u64>,
    actions: u64,
    layer: u32,
    in_exchange: bool,
    began_at: Time,
    record: Option<Record>,
    committed: Vec<u32>,
    interrupted: bool,
    /// (seq) -> landed at (for the verify delay)
    holding: Option<u64>,
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    world: u32,
    layers: u32,
    n_local: u32,
    timeout: Time,
    round_timeout: Time,
    max_delay: Time,
    direction: Vec<Vec<Direction>>,
    round_of: Vec<Vec<u32>>,
    moves: Vec<Vec<Move>>,   // per layer
    deaths: Vec<(u32, u64)>, // (rank, dies after k actions)
    kill_at: Vec<(u32, Time)>,
    late: Vec<(u32, u32, Time)>,      // (rank, layer, caller delay)
    disagree: Option<(u32, u32)>,     // (rank, layer) with a different fingerprint
    drop_send: Option<(u32, u32)>,    // (rank, layer): the rank forgets one of its sends
    checksum_bad: Option<(u32, u32)>, // (reader rank, layer): verdict on its first source
    interrupt: Option<(u32, Time)>,
    verify: bool,
}

impl Scenario {
    /// The same run without any fault.
    fn without_faults(&mut self) {
        self.deaths.clear();
        self.kill_at.clear();
        self.late.clear();
        self.disagree = None;
        self.drop_send = None;
        self.checksum_bad = None;
        self.interrupt = None;
    }
}

fn scenario(seed: u64) -> Scenario {
    let mut r = Rng(seed);
    let world = r.range(2, 6) as u32;
    let layers = r.range(1, 4) as u32;
    let n_local = r.range(1, 4) as u32;
    let timeout = 1000 * MS;
    let round_timeout = 200 * MS;
    let max_delay = r.range(1, 5) * MS;
    // nodes: ranks split over 1..3 nodes; same node -> Read, round 0;
    // other nodes -> random direction, round = pairing round
    let n_nodes = r.range(1, world.min(3) as u64) as u32;
    let node: Vec<u32> = (0..world).map(|i| i * n_nodes / world).collect();
    let mut direction = vec![vec![Direction::Read; world as usize]; world as usize];
    let mut round_of = vec![vec![0u32; world as usize]; world as usize];
    for a in 0..world {
        for b in (a + 1)..world {
            let (na, nb) = (node[a as usize], node[b as usize]);
            if na != nb {
                let d = if r.chance(50) {
                    Direction::Write
                } else {
                    Direction::Read
                };
                let round = ((na + nb) % n_nodes) + 1;
                direction[a as usize][b as usize] = d;
                direction[b as usize][a as usize] = d;
                round_of[a as usize][b as usize] = round;
                round_of[b as usize][a as usize] = round;
            }
        }
    }
    let mut moves = Vec::new();
    for _ in 0..layers {
        let mut m = Vec::new();
        if world > 1 {
            for reader in 0..world {
                for dst_row in 0..n_local {
                    if r.chance(60) {
                        let mut source = r.below(world as u64 - 1) as u32;
                        if source >= reader {
                            source += 1;
                        }
                        m.push(Move {
                            reader,
                            source,
                            src_row: r.below(n_local as u64) as u32,
                            dst_row,
                        });
                    }
                }
            }
        }
        moves.push(m);
    }
    let mut deaths = Vec::new();
    let mut kill_at = Vec::new();
    let n_victims = match r.below(10) {
        0..=3 => 0,
        4..=7 => 1,
        8 => 2,
        _ => 3,
    }
    .min(world as u64 - 1);
    let mut victims = BTreeSet::new();
    while (victims.len() as u64) < n_victims {
        victims.insert(r.below(world as u64) as u32);
    }
    for &v in &victims {
        if r.chance(70) {
            let per_layer = (2 * world + 2 * n_local) as u64;
            deaths.push((v, r.below(per_layer * (layers as u64 + 1) + 2)));
        } else if r.chance(50) {
            kill_at.push((v, r.below(60) * MS));
        } else {
            // during the agreement that follows another rank's failure
            kill_at.push((v, timeout + r.below(700) * MS));
        }
    }
    // a whole host: two ranks at the same instant
    if world >= 4 && r.chance(10) {
        let a = r.below(world as u64 / 2) as u32 * 2;
        let at = r.below(60) * MS;
        kill_at.push((a, at));
        kill_at.push((a + 1, at));
    }
    let mut late = Vec::new();
    for _ in 0..r.below(3) {
        let rank = r.below(world as u64) as u32;
        let layer = r.below(layers as u64 + 1) as u32;
        let delay = if r.chance(30) {
            timeout + r.below(800) * MS
        } else {
            r.below(300) * MS
        };
        late.push((rank, layer, delay));
    }
    let disagree = r
        .chance(8)
        .then(|| (r.below(world as u64) as u32, r.below(layers as u64) as u32));
    let drop_send = r
        .chance(6)
        .then(|| (r.below(world as u64) as u32, r.below(layers as u64) as u32));
    let verify = r.chance(40);
    let checksum_bad = (verify && r.chance(20))
        .then(|| (r.below(world as u64) as u32, r.below(layers as u64) as u32));
    let interrupt = r
        .chance(8)
        .then(|| (r.below(world as u64) as u32, r.below(40) * MS));
    Scenario {
        seed,
        world,
        layers,
        n_local,
        timeout,
        round_timeout,
        max_delay,
        direction,
        round_of,
        moves,
        deaths,
        kill_at,
        late,
        disagree,
        drop_send,
        checksum_bad,
        interrupt,
        verify,
    }
}

struct Sim {
    sc: Scenario,
    rng: Rng,
    now: Time,
    order: u64,
    queue: BinaryHeap<Reverse<(Time, u64, Ev)>>,
    ranks: Vec<Rank>,
    /// (rank, seq) -> time READY was first sent
    ready_sent: HashMap<(u32, u64), Time>,
    done_sent: BTreeSet<(u32, u64)>,
    /// seq -> label (the exchange's layer)
    /// in-flight transfers: id (per rank) -> (owner, op, peer, seq)
    inflight: BTreeMap<(u32, u64), (Op, u32, u64)>,
    /// current exchange seq of each rank
    cur_seq: Vec<u64>,
    failed_rank: Vec<bool>,
    posted_in_seq: BTreeSet<u64>,
    /// (seq, initiator, peer) of every posted transfer
    posted_pairs: BTreeSet<(u64, u32, u32)>,
    violations: Vec<String>,
    max_wait: Vec<(u32, Time)>,
    trace: bool,
}

impl Sim {
    fn new(sc: Scenario) -> Sim {
        let world = sc.world;
        let ranks = (0..world)
            .map(|rank| {
                let cfg = Config {
                    rank,
                    world,
                    n_local: sc.n_local,
                    timeout: sc.timeout,
                    round_timeout: sc.round_timeout,
                    direction: sc.direction[rank as usize].clone(),
                    round_of: sc.round_of[rank as usize].clone(),
                };
                Rank {
                    s: Session::new(cfg).expect("valid config"),
                    dead: false,
                    die_after: sc.deaths.iter().find(|d| d.0 == rank).map(|d| d.1),
                    actions: 0,
                    layer: 0,
                    in_exchange: false,
                    began_at: 0,
                    record: None,
                    committed: Vec::new(),
                    interrupted: false,
                    holding: None,
                }
            })
            .collect();
        let seed = sc.seed;
        let mut sim = Sim {
            sc,
            rng: Rng(seed ^ 0xABCD),
            now: 0,
            order: 0,
            queue: BinaryHeap::new(),
            ranks,
            ready_sent: HashMap::new(),
            done_sent: BTreeSet::new(),
            inflight: BTreeMap::new(),
            cur_seq: vec![0; world as usize],
            failed_rank: vec![false; world as usize],
            posted_in_seq: BTreeSet::new(),
            posted_pairs: BTreeSet::new(),
            violations: Vec::new(),
            max_wait: Vec::new(),
            trace: false,
        };
        for rank in 0..world {
            let d = sim.caller_delay(rank, 0);
            sim.push(d, Ev::Caller { rank });
        }
        for (rank, at) in sim.sc.kill_at.clone() {
            sim.push(at, Ev::Kill { rank });
        }
        if let Some((rank, at)) = sim.sc.interrupt {
            sim.push(at, Ev::Interrupt { rank });
        }
        sim
    }

    fn push(&mut self, at: Time, ev: Ev) {
        self.order += 1;
        self.queue.push(Reverse((at, self.order, ev)));
    }

    fn caller_delay(&mut self, rank: u32, layer: u32) -> Time {
        let base = self.rng.below(3 * MS);
        base + self
            .sc
            .late
            .iter()
            .filter(|l| l.0 == rank && l.1 == layer)
            .map(|l| l.2)
            .sum::<Time>()
    }

    fn spec(&self, rank: u32, layer: u32) -> ExchangeSpec {
        if layer >= self.sc.layers {
            // closing barrier: no transfers
            return ExchangeSpec {
                label: layer,
                fingerprint: 0xB0B0 + layer as u64,
                ..Default::default()
            };
        }
        let moves = &self.sc.moves[layer as usize];
        let mut fp = 0x1000 + layer as u64;
        if self.sc.disagree == Some((rank, layer)) {
            fp ^= 0xFFFF;
        }
        let recvs = moves
            .iter()
            .filter(|m| m.reader == rank)
            .map(|m| (m.source, m.src_row, m.dst_row))
            .collect();
        let mut sends: Vec<(u32, u32)> = moves
            .iter()
            .filter(|m| m.source == rank)
            .map(|m| (m.reader, m.src_row))
            .collect();
        if self.sc.drop_send == Some((rank, layer)) {
            sends.pop();
        }
        ExchangeSpec {
            label: layer,
            fingerprint: fp,
            recvs,
            sends,
            payloads: Vec::new(),
            hold_done: self.sc.verify,
        }
    }

    fn run(&mut self) {
        let limit = 60_000 * MS;
        while let Some(Reverse((at, _, ev))) = self.queue.pop() {
            if at > limit {
                self.violations.push("simulation did not settle".into());
                break;
            }
            self.now = at;
            self.step(ev);
            if self.ranks.iter().all(|r| r.dead || r.record.is_some())
                && self.all_agreements_quiet()
            {
                // keep delivering a little so late agreement traffic settles
                if self
                    .queue
                    .iter()
                    .all(|Reverse((t, _, _))| *t > self.now + 5_000 * MS)
                {
                    break;
                }
            }
        }
        for (i, r) in self.ranks.iter().enumerate() {
            if !r.dead && r.record.is_none() {
                self.violations
                    .push(format!("rank {i} never finished (layer {})", r.layer));
            }
        }
    }

    fn all_agreements_quiet(&self) -> bool {
        true
    }

    fn step(&mut self, ev: Ev) {
        let now = self.now;
        if self.trace {
            let short = match &ev {
                Ev::Deliver { from, to, bytes } => format!(
                    "deliver {from}->{to} {:?}",
                    Msg::decode(bytes, self.sc.world).map(|m| match m {
                        Msg::Resolve(r) => format!(
                            "RESOLVE seq {} round {} decided {} dead {:?} done {:?} committed {}",
                            r.seq,
                            r.round,
                            r.decided,
                            r.knowledge.dead,
                            r.knowledge.done,
                            r.knowledge.committed
                        ),
                        other => format!("{other:?}"),
                    })
                ),
                other => format!("{other:?}"),
            };
            eprintln!("{:>8.3}ms {short}", now as f64 / MS as f64);
        }
        match ev {
            Ev::Deliver { from, to, bytes } => {
                if self.ranks[to as usize].dead {
                    return;
                }
                self.ranks[to as usize].s.handle_message(now, from, &bytes);
                self.pump(to);
            }
            Ev::Complete { rank, id, ok } => {
                if self.ranks[rank as usize].dead {
                    return;
                }
                if self.inflight.remove(&(rank, id)).is_none() {
                    return; // cancelled
                }
                self.ranks[rank as usize].s.handle_completion(now, id, ok);
                self.pump(rank);
            }
            Ev::Land {
                writer,
                reader,
                seq,
            } => {
                let r = &self.ranks[reader as usize];
                if !r.dead
                    && self.cur_seq[reader as usize] != seq
                    && !self.failed_rank[reader as usize]
                {
                    self.violations.push(format!(
                        "write of seq {seq} from rank {writer} landed in rank {reader}'s buffer while it is at seq {}",
                        self.cur_seq[reader as usize]
                    ));
                }
            }
            Ev::Caller { rank } => self.caller(rank),
            Ev::Timer { rank } => {
                if self.ranks[rank as usize].dead {
                    return;
                }
                self.ranks[rank as usize].s.handle_timeout(now);
                self.pump(rank);
            }
            Ev::Kill { rank } => self.kill(rank),
            Ev::Interrupt { rank } => {
                let r = &mut self.ranks[rank as usize];
                if r.dead || r.record.is_some() {
                    return;
                }
                r.interrupted = true;
                r.s.abort(now, AbortCode::Interrupted, rank);
                self.pump(rank);
            }
            Ev::Verified { rank, seq } => {
                let bad = self.sc.checksum_bad;
                let r = &mut self.ranks[rank as usize];
                if r.dead || r.holding != Some(seq) {
                    return;
                }
                r.holding = None;
                let layer = r.layer;
                let mine = self
                    .sc
                    .moves
                    .get(layer as usize)
                    .and_then(|m| m.iter().find(|m| m.reader == rank).map(|m| m.source));
                match (bad, mine) {
                    (Some((br, bl)), Some(src)) if br == rank && bl == layer => {
                        self.ranks[rank as usize]
                            .s
                            .abort(now, AbortCode::Checksum, src);
                    }
                    _ => {
                        let _ = self.ranks[rank as usize].s.done(now);
                    }
                }
                self.pump(rank);
            }
        }
    }

    fn kill(&mut self, rank: u32) {
        let r = &mut self.ranks[rank as usize];
        if r.dead {
            return;
        }
        r.dead = true;
        // its own transfers stop
        let mine: Vec<(u32, u64)> = self
            .inflight
            .keys()
            .filter(|k| k.0 == rank)
            .copied()
            .collect();
        for k in mine {
            self.inflight.remove(&k);
        }
    }

    fn caller(&mut self, rank: u32) {
        let now = self.now;
        let r = &mut self.ranks[rank as usize];
        if r.dead || r.record.is_some() || r.in_exchange {
            return;
        }
        let layer = r.layer;
        let spec = self.spec(rank, layer);
        let r = &mut self.ranks[rank as usize];
        r.in_exchange = true;
        r.began_at = now;
        r.s.begin(now, spec).expect("valid spec");
        self.cur_seq[rank as usize] = r.s.seq();
        self.pump(rank);
    }

    /// Drains a rank's outputs and events; schedules its timer.
    fn pump(&mut self, rank: u32) {
        loop {
            if self.ranks[rank as usize].dead {
                return;
            }
            let Some(out) = self.ranks[rank as usize].s.poll_output() else {
                break;
            };
            let r = &mut self.ranks[rank as usize];
            r.actions += 1;
            if r.die_after.is_some_and(|k| r.actions > k) {
                self.kill(rank);
                return;
            }
            match out {
                Output::Send { to, msg } => {
                    if let Ok(m) = Msg::decode(&msg, self.sc.world) {
                        match &m {
                            Msg::Ready(rd) => {
                                self.ready_sent.entry((rank, rd.seq)).or_insert(self.now);
                            }
                            Msg::Done { seq } => {
                                self.done_sent.insert((rank, *seq));
                            }
                            _ => {}
                        }
                    } else {
                        self.violations
                            .push("session sent an undecodable message".into());
                    }
                    let d = self.rng.range(MS / 100, self.sc.max_delay);
                    self.push(
                        self.now + d,
                        Ev::Deliver {
                            from: rank,
                            to,
                            bytes: msg,
                        },
                    );
                }
                Output::Post(t) => self.post(rank, t),
                Output::Cancel { id } => {
                    self.inflight.remove(&(rank, id));
                }
            }
        }
        while let Some(ev) = self.ranks[rank as usize].s.poll_event() {
            self.on_event(rank, ev);
        }
        if let Some(t) = self.ranks[rank as usize].s.next_timeout() {
            let at = t.max(self.now);
            self.push(at, Ev::Timer { rank });
        }
    }

    fn post(&mut self, rank: u32, t: eplb_xfer::protocol::Transfer) {
        let seq = t.seq;
        self.posted_in_seq.insert(seq);
        self.posted_pairs.insert((seq, rank, t.peer));
        // the peer must have said READY for this exchange
        if !self.ready_sent.contains_key(&(t.peer, seq)) {
            self.violations.push(format!(
                "rank {rank} posted a {:?} with rank {} before its READY of seq {seq}",
                t.op, t.peer
            ));
        }
        let peer_dead = self.ranks[t.peer as usize].dead;
        let dur = self.rng.range(MS / 10, 20 * MS);
        self.inflight.insert((rank, t.id), (t.op, t.peer, seq));
        if peer_dead {
            if self.rng.chance(50) {
                self.push(
                    self.now + dur,
                    Ev::Complete {
                        rank,
                        id: t.id,
                        ok: false,
                    },
                );
            }
            return; // else it hangs
        }
        self.push(
            self.now + dur,
            Ev::Complete {
                rank,
                id: t.id,
                ok: true,
            },
        );
        if t.op == Op::Write {
            self.push(
                self.now + dur,
                Ev::Land {
                    writer: rank,
                    reader: t.peer,
                    seq,
                },
            );
            if let Some(n) = t.notify {
                let d = self.rng.range(MS / 100, self.sc.max_delay);
                self.push(
                    self.now + dur + d,
                    Ev::Deliver {
                        from: rank,
                        to: t.peer,
                        bytes: n,
                    },
                );
            }
        }
    }

    fn on_event(&mut self, rank: u32, ev: Event) {
        let now = self.now;
        if self.trace {
            eprintln!("   event rank {rank}: {ev:?}");
        }
        match ev {
            Event::Landed { seq, .. } => {
                self.ranks[rank as usize].holding = Some(seq);
                let d = self.rng.range(0, 5 * MS);
                self.push(now + d, Ev::Verified { rank, seq });
            }
            Event::Finished { seq, label, result } => {
                let began = self.ranks[rank as usize].began_at;
                self.max_wait.push((rank, now - began));
                self.check_wait(rank, now - began);
                match result {
                    Ok(_) => {
                        self.check_commit(rank, seq);
                        let r = &mut self.ranks[rank as usize];
                        r.in_exchange = false;
                        if label < self.sc.layers {
                            r.committed.push(label);
                        }
                        r.layer += 1;
                        if r.layer > self.sc.layers {
                            r.record = Some(Record {
                                failure: None,
                                committed: r.committed.clone(),
                            });
                        } else {
                            let layer = r.layer;
                            let d = self.caller_delay(rank, layer);
                            self.push(now + d, Ev::Caller { rank });
                        }
                    }
                    Err(f) => {
                        self.failed_rank[rank as usize] = true;
                        let r = &mut self.ranks[rank as usize];
                        r.in_exchange = false;
                        r.record = Some(Record {
                            failure: Some((f.culprit, label)),
                            committed: r.committed.clone(),
                        });
                        let _: &Failure = &f;
                    }
                }
            }
        }
    }

    fn check_commit(&mut self, rank: u32, seq: u64) {
        for q in 0..self.sc.world {
            if !self.done_sent.contains(&(q, seq)) {
                self.violations.push(format!(
                    "rank {rank} committed seq {seq} but rank {q} never said DONE"
                ));
            }
        }
        for (&(owner, _), &(op, peer, s)) in &self.inflight {
            if s == seq && op == Op::Read && peer == rank {
                self.violations.push(format!(
                    "rank {rank} committed seq {seq} while rank {owner} still reads its rows"
                ));
            }
            if s == seq && op == Op::Write && owner == rank {
                self.violations.push(format!(
                    "rank {rank} committed seq {seq} while its own write still runs"
                ));
            }
        }
    }

    fn check_wait(&mut self, rank: u32, waited: Time) {
        let deaths = (self.sc.deaths.len() + self.sc.kill_at.len()) as u64;
        let late_max = self.sc.late.iter().map(|l| l.2).max().unwrap_or(0);
        // deadline + agreement rounds + message slack; a late peer may keep
        // this rank waiting at most its own lateness before the deadline hits.
        let bound = self.sc.timeout
            + (3 + deaths) * self.sc.round_timeout
            + 50 * self.sc.max_delay
            + 60 * MS;
        let _ = late_max;
        if waited > bound {
            self.violations.push(format!(
                "rank {rank} waited {} ms in one exchange (bound {} ms)",
                waited / MS,
                bound / MS
            ));
        }
    }

    fn check_outcome(&mut self) {
        let live: Vec<(u32, Record)> = self
            .ranks
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.dead)
            .filter_map(|(i, r)| r.record.clone().map(|rec| (i as u32, rec)))
            .collect();
        if let Some((r0, first)) = live.first() {
            for (r, rec) in &live[1..] {
                if rec != first {
                    self.violations.push(format!(
                        "survivors disagree: rank {r0} {first:?} vs rank {r} {rec:?}"
                    ));
                }
            }
        }
        let trouble = !self.sc.deaths.is_empty()
            || !self.sc.kill_at.is_empty()
            || self.sc.disagree.is_some()
            || self.sc.drop_send.is_some()
            || self.sc.interrupt.is_some()
            || self.sc.checksum_bad.is_some()
            || self.sc.late.iter().any(|l| l.2 > self.sc.timeout / 2);
        if !trouble {
            for (r, rec) in &live {
                if rec.failure.is_some() || rec.committed.len() != self.sc.layers as usize {
                    self.violations
                        .push(format!("rank {r} failed without any fault: {rec:?}"));
                }
            }
        }
        if let Some((rank, layer)) = self.sc.drop_send {
            // the reader whose row the rank forgot, and the rank, never transfer
            let seq = layer as u64 + 1;
            let moves = &self.sc.moves[layer as usize];
            if let Some(m) = moves.iter().rev().find(|m| m.source == rank) {
                for (a, b) in [(m.reader, rank), (rank, m.reader)] {
                    if self.posted_pairs.contains(&(seq, a, b)) {
                        self.violations.push(format!(
                            "ranks {a} and {b} disagree on rows in seq {seq} but a transfer started"
                        ));
                    }
                }
            }
        }
        if let Some((_, layer)) = self.sc.disagree {
            let seq = layer as u64 + 1;
            if self.posted_in_seq.contains(&seq) {
                self.violations.push(format!(
                    "a transfer started in seq {seq} although ranks disagree"
                ));
            }
        }
    }
}

fn run_seed(seed: u64) -> Vec<String> {
    let sc = scenario(seed);
    let mut sim = Sim::new(sc.clone());
    sim.run();
    sim.check_outcome();
    if !sim.violations.is_empty() {
        let mut v = sim.violations.clone();
        v.insert(0, format!("seed {seed}: {sc:?}"));
        let recs: Vec<_> = sim
            .ranks
            .iter()
            .map(|r| (r.dead, r.record.clone()))
            .collect();
        v.push(format!("records: {recs:?}"));
        return v;
    }
    Vec::new()
}

#[test]
fn thousands_of_schedules_keep_every_promise() {
    let n: u64 = std::env::var("PROTOCOL_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut failures = Vec::new();
    for seed in 0..n {
        let v = run_seed(seed);
        if !v.is_empty() {
            failures.push(v.join("\n  "));
            if failures.len() >= 3 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_clean_run_commits_everything_and_sends_little() {
    for seed in 0..200u64 {
        let mut sc = scenario(seed);
        sc.without_faults();
        let mut sim = Sim::new(sc.clone());
        sim.run();
        sim.check_outcome();
        assert!(sim.violations.is_empty(), "{:?}", sim.violations);
        for r in &sim.ranks {
            let rec = r.record.clone().expect("finished");
            assert_eq!(rec.failure, None);
            assert_eq!(rec.committed, (0..sc.layers).collect::<Vec<_>>());
            assert_eq!(r.s.buffered(), 0, "seed {seed}: state left behind");
        }
    }
}

#[test]
#[ignore]
fn debug_one() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let mut sc = scenario(seed);
    if std::env::var("CLEAN").is_ok() {
        sc.without_faults();
    }
    let mut sim = Sim::new(sc.clone());
    sim.trace = true;
    sim.run();
    sim.check_outcome();
    for v in &sim.violations {
        eprintln!("VIOLATION {v}");
    }
}

#[test]
#[ignore]
fn stats() {
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for seed in 0..3000u64 {
        let sc = scenario(seed);
        let mut sim = Sim::new(sc.clone());
        sim.run();
        let live: Vec<_> = sim.ranks.iter().filter(|r| !r.dead).collect();
        let dead = sim.ranks.len() - live.len();
        let rec = live.first().and_then(|r| r.record.clone());
        let k = match rec {
            Some(Record { failure: None, .. }) => format!("ok dead={dead}"),
            Some(Record {
                failure: Some(_),
                committed,
            }) => {
                format!("fail dead={dead} committed={}", committed.len())
            }
            None => "none".into(),
        };
        *kinds.entry(k).or_default() += 1;
        let w = sim.max_wait.iter().map(|w| w.1).max().unwrap_or(0);
        *kinds
            .entry(format!("maxwait>{}ms", (w / MS / 500) * 500))
            .or_default() += 1;
    }
    for (k, v) in kinds {
        eprintln!("{k}: {v}");
    }
}
