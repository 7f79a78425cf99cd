//! The per-layer transfer protocol over one NIXL agent.
//!
//! One exchange per layer, called in lockstep by every rank of the group
//! ([`Engine::exchange`], or [`Engine::begin`] + [`Engine::end`]):
//! 1. each rank tells every peer READY (staged: after packing its sends; the
//!    message may carry a payload, e.g. checksums of the rows it serves);
//! 2. it posts one READ per source (zero-copy: at once; staged, or when
//!    payloads are wanted: once that source is READY) and polls them;
//! 3. with all its reads complete it tells every peer DONE;
//! 4. it returns once every peer said DONE. Only then may the caller overwrite
//!    rows (peers have finished reading them) and commit the layer (every rank
//!    has finished its part).
//!
//! Messages carry a sequence number that all ranks advance together, so a
//! fast peer's messages for the next layer are kept for later, and stale ones
//! from an aborted exchange are dropped. A message of a later exchange proves
//! that its sender had every DONE of the earlier ones. There is no global
//! collective and no fixed sleep: polling backs off from spinning to at most
//! 200 µs naps.
//!
//! Failure (a deadline, a failed READ, an ABORT from a peer): the rank tells
//! every peer ABORT naming the culprit and waits a short grace period to learn
//! whether the layer still completed everywhere (a peer's later message); if
//! so it commits and fails at the next exchange instead. So all survivors
//! agree on the committed layers and report the same failing layer. The
//! closing [`Engine::barrier`] settles the last layer the same way.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::agent::{Agent, MemKind, PreparedList, XferReq, XferState};
use super::ffi::Api;
use super::NixlError;
use crate::descriptors::{DescriptorSpace, Mode, PeerRead};
use crate::layout::RankLayout;

const MSG_MAGIC: &[u8; 4] = b"EPXF";
const KIND_READY: u8 = b'R';
const KIND_DONE: u8 = b'D';
const KIND_BYE: u8 = b'B';
const KIND_ABORT: u8 = b'A';
const BLOB_MAGIC: &[u8; 8] = b"EPXFPEER";

/// Static settings of one rank's engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub rank: u32,
    pub world: u32,
    pub mode: Mode,
    pub mem: MemKind,
    pub device_id: u64,
    pub timeout: Duration,
    /// Run NIXL's own progress thread (default off: our polling progresses).
    pub progress_thread: bool,
}

/// What one exchange did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExchangeStats {
    /// `(source rank, rows read)` per request.
    pub rows_per_peer: Vec<(u32, usize)>,
    pub bytes_read: u64,
    pub seconds: f64,
}

struct Peer {
    name: String,
    remote: PreparedList,
}

/// One rank's NIXL endpoint with its registered memory and prepared lists.
pub struct Engine {
    agent: Agent,
    cfg: EngineConfig,
    layout: RankLayout,
    space: DescriptorSpace,
    local: Option<PreparedList>,
    peers: Vec<Option<Peer>>,
    name_to_rank: HashMap<String, u32>,
    /// `(seq, sender, kind)` of READY / DONE / BYE messages not yet consumed.
    inbox: HashSet<(u64, u32, u8)>,
    /// READY payloads: `(seq, sender)` -> bytes.
    payloads: HashMap<(u64, u32), Vec<u8>>,
    /// Aborts announced by peers: `(seq, announcing rank)` -> failed rank.
    /// ... and whether it was a verdict on the data (not a liveness failure).
    aborts: HashMap<(u64, u32), (u32, bool)>,
    /// Highest sequence number of any peer message (BYE excluded): a peer in a
    /// later exchange proves the earlier ones completed on every rank.
    max_seq_seen: u64,
    seq: u64,
    cur: Option<Current>,
    /// A peer failed during a layer that still completed everywhere: the next
    /// exchange fails at once with it.
    pending_failure: Option<(u32, String)>,
    /// Peers found dead or stuck (close does not wait for them).
    failed_peers: BTreeSet<u32>,
    prepared_lists_built: u64,
    scratch: Vec<(String, Vec<u8>)>,
    fault: Option<(Fault, usize)>,
}

/// The exchange in progress.
struct Current {
    layer: usize,
    seq: u64,
    start: Instant,
    deadline: Instant,
    reads: Vec<PeerRead>,
    inflight: Vec<Option<XferReq>>,
    done: Vec<bool>,
    done_sent: bool,
    /// This exchange failed on a verdict about a peer's data (checksum), not
    /// because a peer died or stalled.
    verdict: bool,
    /// Post a READ only once its source said READY (staged: it packed; with
    /// READY payloads: what the source described is what gets read).
    gate_on_ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Until every READ completed (and, if asked, every source's READY is in).
    Reads { want_payloads: bool },
    /// Until every peer said DONE.
    Done,
}

/// Test-only fault injection points (see `Engine::fault_point`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    ExitBeforeReady,
    HangBeforeDone,
    ExitMidDone,
}

fn parse_fault(v: &str) -> Option<(Fault, usize)> {
    let (kind, layer) = v.split_once(':')?;
    let f = match kind {
        "exit_before_ready" => Fault::ExitBeforeReady,
        "hang_before_done" => Fault::HangBeforeDone,
        "exit_mid_done" => Fault::ExitMidDone,
        _ => return None,
    };
    Some((f, layer.trim().parse().ok()?))
}

/// Counters of one engine (see [`Engine::counters`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineCounters {
    pub exchanges: u64,
    pub prepared_lists_built: u64,
    pub prepared_lists_live: u64,
    pub requests_created: u64,
    pub requests_live: u64,
    pub notifications_sent: u64,
    pub notifications_received: u64,
    /// Buffered peer messages (bounded: only those of unfinished exchanges).
    pub inbox_entries: u64,
    pub failed_peers: Vec<u32>,
}

impl Engine {
    /// Creates the agent, validates `layout` and registers `regions`.
    pub fn new(
        api: std::sync::Arc<Api>,
        agent_name: &str,
        cfg: EngineConfig,
        layout: RankLayout,
        regions: &[(u64, u64)],
    ) -> Result<Engine, NixlError> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(NixlError::Input(format!(
                "rank {} is outside world size {}",
                cfg.rank, cfg.world
            )));
        }
        layout.validate()?;
        if cfg.mode == Mode::Staged && layout.packed.is_none() {
            return Err(NixlError::Input(
                "staged mode needs a packed send layer in the layout".into(),
            ));
        }
        let space = DescriptorSpace::new(
            cfg.mode,
            layout.n_layers(),
            layout.n_local,
            layout.n_tensors(),
        )
        .map_err(|e| NixlError::Input(e.to_string()))?;
        let mut agent = Agent::new(api, agent_name, cfg.mem, cfg.device_id, cfg.progress_thread)?;
        agent.register(regions)?;
        let world = cfg.world as usize;
        Ok(Engine {
            agent,
            cfg,
            layout,
            space,
            local: None,
            peers: (0..world).map(|_| None).collect(),
            name_to_rank: HashMap::new(),
            inbox: HashSet::new(),
            payloads: HashMap::new(),
            aborts: HashMap::new(),
            max_seq_seen: 0,
            seq: 0,
            cur: None,
            pending_failure: None,
            failed_peers: BTreeSet::new(),
            prepared_lists_built: 0,
            scratch: Vec::new(),
            fault: std::env::var("EPLB_XFER_FAULT")
                .ok()
                .and_then(|v| parse_fault(&v)),
        })
    }

    /// The blob peers need: agent name, NIXL metadata, layout.
    pub fn local_blob(&self) -> Result<Vec<u8>, NixlError> {
        let md = self.agent.local_metadata()?;
        let name = self.agent.name().as_bytes();
        let lay = self.layout.to_blob();
        let mut out = Vec::with_capacity(8 + 4 + 3 * 8 + name.len() + md.len() + lay.len());
        out.extend_from_slice(BLOB_MAGIC);
        out.extend_from_slice(&self.cfg.rank.to_le_bytes());
        for part in [name, &md[..], &lay[..]] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    /// Loads every peer's blob (index = rank; our own is skipped) and prepares
    /// one remote list per peer plus the local buffer list. Done once.
    pub fn connect(&mut self, blobs: &[Vec<u8>]) -> Result<(), NixlError> {
        if blobs.len() != self.cfg.world as usize {
            return Err(NixlError::Input(format!(
                "got {} peer blobs for world size {}",
                blobs.len(),
                self.cfg.world
            )));
        }
        if self.local.is_some() {
            return Err(NixlError::Protocol("connect called twice".into()));
        }
        let mut parsed = Vec::with_capacity(blobs.len());
        for (rank, blob) in blobs.iter().enumerate() {
            let (blob_rank, name, md, layout) = parse_blob(blob)?;
            if blob_rank as usize != rank {
                return Err(NixlError::Protocol(format!(
                    "blob at index {rank} is from rank {blob_rank}"
                )));
            }
            if rank != self.cfg.rank as usize {
                self.check_peer_layout(rank as u32, &layout)?;
            }
            parsed.push((name, md, layout));
        }
        let local_descs = self.space.local_descs(&self.layout);
        self.local = Some(self.agent.prepare(None, &local_descs, self.cfg.device_id)?);
        self.prepared_lists_built += 1;
        for (rank, (name, md, layout)) in parsed.into_iter().enumerate() {
            if rank == self.cfg.rank as usize {
                continue;
            }
            let loaded = self.load_with_retry(rank, &name, &md)?;
            if loaded != name {
                return Err(NixlError::Protocol(format!(
                    "rank {rank} metadata names agent {loaded:?}, expected {name:?}"
                )));
            }
            let descs = self.space.remote_descs(&layout);
            let remote = self.agent.prepare(Some(&name), &descs, layout.device_id)?;
            self.prepared_lists_built += 1;
            self.name_to_rank.insert(name.clone(), rank as u32);
            self.peers[rank] = Some(Peer { name, remote });
        }
        Ok(())
    }

    /// UCX occasionally refuses the first connection to a just-created peer
    /// on loopback; a short bounded retry makes set-up dependable.
    fn load_with_retry(&self, rank: usize, name: &str, md: &[u8]) -> Result<String, NixlError> {
        let mut last = None;
        for attempt in 0..5u32 {
            match self.agent.load_remote(md) {
                Ok(n) => return Ok(n),
                Err(e) => {
                    self.agent.invalidate_remote(name);
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(20 << attempt));
                }
            }
        }
        Err(NixlError::PeerFailed {
            peer: rank as u32,
            layer: 0,
            reason: format!(
                "loading metadata failed: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            ),
        })
    }

    fn check_peer_layout(&self, rank: u32, l: &RankLayout) -> Result<(), NixlError> {
        let mine = &self.layout;
        let same_rows = l
            .buffer
            .iter()
            .map(|t| t.row_bytes)
            .eq(mine.buffer.iter().map(|t| t.row_bytes));
        if l.n_local != mine.n_local || l.n_layers() != mine.n_layers() || !same_rows {
            return Err(NixlError::Input(format!(
                "rank {rank} has a different layer layout ({} layers x {} rows, row bytes {:?}) than rank {} ({} x {}, {:?})",
                l.n_layers(),
                l.n_local,
                l.buffer.iter().map(|t| t.row_bytes).collect::<Vec<_>>(),
                self.cfg.rank,
                mine.n_layers(),
                mine.n_local,
                mine.buffer.iter().map(|t| t.row_bytes).collect::<Vec<_>>()
            )));
        }
        if self.cfg.mode == Mode::Staged && l.packed.is_none() {
            return Err(NixlError::Input(format!(
                "rank {rank} is not in staged mode"
            )));
        }
        Ok(())
    }

    pub fn space(&self) -> &DescriptorSpace {
        &self.space
    }
    pub fn layout(&self) -> &RankLayout {
        &self.layout
    }
    pub fn prepared_lists_built(&self) -> u64 {
        self.prepared_lists_built
    }
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Handle and message counters (for leak checks in soak tests).
    pub fn counters(&self) -> EngineCounters {
        let a = self.agent.counters();
        EngineCounters {
            exchanges: self.seq,
            prepared_lists_built: self.prepared_lists_built,
            prepared_lists_live: a.prepared_lists_live,
            requests_created: a.requests_created,
            requests_live: a.requests_created - a.requests_released,
            notifications_sent: a.notifications_sent,
            notifications_received: a.notifications_received,
            inbox_entries: (self.inbox.len() + self.payloads.len() + self.aborts.len()) as u64,
            failed_peers: self.failed_peers.iter().copied().collect(),
        }
    }

    /// Checks reads against the index spaces before anything moves.
    pub fn validate_reads(&self, layer: usize, reads: &[PeerRead]) -> Result<(), NixlError> {
        // Reads name rows of `layer` (zero-copy); an exchange without reads
        // (the closing barrier) may carry any label.
        if self.cfg.mode == Mode::ZeroCopy && !reads.is_empty() && layer >= self.layout.n_layers() {
            return Err(NixlError::Input(format!(
                "layer_idx {layer} is outside 0..{}",
                self.layout.n_layers()
            )));
        }
        let n = (self.layout.n_local * self.layout.n_tensors()) as i32;
        for r in reads {
            if r.src_rank >= self.cfg.world {
                return Err(NixlError::Input(format!(
                    "src_rank {} is outside world size {}",
                    r.src_rank, self.cfg.world
                )));
            }
            if r.src_rank == self.cfg.rank {
                return Err(NixlError::Input(format!(
                    "src_rank {} is this rank; local moves are torch copies",
                    r.src_rank
                )));
            }
            if r.local.iter().any(|&i| i < 0 || i >= n) {
                return Err(NixlError::Input(
                    "destination row outside the buffer".into(),
                ));
            }
        }
        Ok(())
    }

    /// Runs one layer's exchange (see the module docs): [`Engine::begin`] then
    /// [`Engine::end`]. All ranks must call it the same number of times, in
    /// the same order.
    pub fn exchange(
        &mut self,
        layer: usize,
        reads: Vec<PeerRead>,
    ) -> Result<ExchangeStats, NixlError> {
        self.begin(layer, reads, &[], false)?;
        self.end()
    }

    /// The closing handshake of a rebalance: an exchange without reads. A rank
    /// that missed a dead peer's last DONE learns from the others' messages
    /// here that the last layer completed everywhere (see [`Engine::begin`]).
    /// `label` is the layer number reported on failure.
    pub fn barrier(&mut self, label: usize) -> Result<(), NixlError> {
        self.begin(label, Vec::new(), &[], false)?;
        self.end().map(|_| ())
    }

    /// First half of an exchange: says READY (carrying `ready_payload` to every
    /// peer), posts this rank's READs and returns once they all completed; with
    /// `want_payloads`, also once every source's READY arrived, returning their
    /// payloads (index = rank). Nothing is committed-safe until [`Engine::end`].
    ///
    /// If an earlier layer completed everywhere but a peer failed while it
    /// did, this fails at once (naming that peer) so that every survivor
    /// reports the same layer.
    pub fn begin(
        &mut self,
        layer: usize,
        reads: Vec<PeerRead>,
        ready_payload: &[u8],
        want_payloads: bool,
    ) -> Result<Vec<Option<Vec<u8>>>, NixlError> {
        self.validate_reads(layer, &reads)?;
        let local = self
            .local
            .ok_or_else(|| NixlError::Protocol("exchange before connect".into()))?;
        if let Some(r) = reads
            .iter()
            .find(|r| self.peers[r.src_rank as usize].is_none())
        {
            return Err(NixlError::Protocol(format!(
                "no connection to rank {}",
                r.src_rank
            )));
        }
        if self.cur.is_some() {
            return Err(NixlError::Protocol(
                "begin called while an exchange is open; call end first".into(),
            ));
        }
        self.seq += 1;
        let now = Instant::now();
        let n = reads.len();
        self.cur = Some(Current {
            layer,
            seq: self.seq,
            start: now,
            deadline: now + self.cfg.timeout,
            reads,
            inflight: (0..n).map(|_| None).collect(),
            done: vec![false; n],
            done_sent: false,
            verdict: false,
            gate_on_ready: self.cfg.mode == Mode::Staged || want_payloads,
        });
        if let Some((peer, reason)) = self.pending_failure.take() {
            let err = NixlError::PeerFailed {
                peer,
                layer,
                reason,
            };
            return Err(self.fail_before_done(err));
        }
        self.fault_point(layer, Fault::ExitBeforeReady);
        let res = self
            .broadcast_kind(KIND_READY, ready_payload)
            .and_then(|_| self.drive(local, Phase::Reads { want_payloads }));
        match res {
            Ok(()) => {
                let seq = self.seq;
                let payloads = (0..self.cfg.world)
                    .map(|r| self.payloads.get(&(seq, r)).cloned())
                    .collect();
                Ok(payloads)
            }
            Err(e) => Err(self.fail_before_done(e)),
        }
    }

    /// [`Engine::fail`] before this rank said DONE: nobody can have committed
    /// the layer, so it always ends in an error and closes the exchange.
    fn fail_before_done(&mut self, err: NixlError) -> NixlError {
        match self.fail(err) {
            Err(e) => e,
            Ok(()) => {
                self.close_current();
                NixlError::Protocol("a layer completed before this rank said DONE".into())
            }
        }
    }

    /// Second half of an exchange: says DONE and waits for every peer's DONE
    /// (or for proof that every peer has it: a message of a later exchange).
    /// On success the caller may commit the layer.
    pub fn end(&mut self) -> Result<ExchangeStats, NixlError> {
        let local = self
            .local
            .ok_or_else(|| NixlError::Protocol("exchange before connect".into()))?;
        let layer = match &self.cur {
            Some(c) => c.layer,
            None => return Err(NixlError::Protocol("end called without begin".into())),
        };
        self.fault_point(layer, Fault::HangBeforeDone);
        self.fault_point(layer, Fault::ExitMidDone);
        // Marked before sending: a partial broadcast (a dead peer refuses the
        // message) may still let the others commit on our DONE.
        if let Some(c) = self.cur.as_mut() {
            c.done_sent = true;
        }
        let res = self
            .broadcast_kind(KIND_DONE, &[])
            .and_then(|_| self.drive(local, Phase::Done));
        match res {
            Ok(()) => Ok(self.finish_ok()),
            Err(e) => self.fail(e).map(|_| self.finish_ok()),
        }
    }

    /// Abandons the open exchange because this rank found `culprit` at fault
    /// (e.g. a checksum mismatch); peers are told at once. Never commits.
    pub fn abort(&mut self, culprit: u32, reason: String) -> NixlError {
        let layer = self.cur.as_ref().map_or(0, |c| c.layer);
        if self.cur.is_none() {
            return NixlError::Protocol("abort called without an open exchange".into());
        }
        if let Some(c) = self.cur.as_mut() {
            c.done_sent = false; // we never said DONE: nobody can commit this layer
            c.verdict = true;
        }
        let err = NixlError::PeerFailed {
            peer: culprit,
            layer,
            reason,
        };
        self.fail_before_done(err)
    }

    fn finish_ok(&mut self) -> ExchangeStats {
        let cur = self.close_current();
        let row_bytes = self.layout.expert_bytes();
        let (rows_per_peer, start) = match &cur {
            Some(c) => (
                c.reads.iter().map(|r| (r.src_rank, r.rows)).collect(),
                c.start,
            ),
            None => (Vec::new(), Instant::now()),
        };
        let rows_per_peer: Vec<(u32, usize)> = rows_per_peer;
        let bytes_read = rows_per_peer
            .iter()
            .map(|&(_, n)| n as u64 * row_bytes)
            .sum();
        ExchangeStats {
            rows_per_peer,
            bytes_read,
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    /// Releases the open exchange's requests and drops messages it no longer needs.
    fn close_current(&mut self) -> Option<Current> {
        let mut cur = self.cur.take()?;
        for req in cur.inflight.iter_mut().filter_map(Option::take) {
            self.agent.release(req);
        }
        let seq = cur.seq;
        self.inbox.retain(|&(s, _, _)| s > seq);
        self.payloads.retain(|&(s, _), _| s > seq);
        self.aborts.retain(|&(s, _), _| s > seq);
        Some(cur)
    }

    /// Polls until `phase` is reached, a peer fails, or the deadline passes.
    fn drive(&mut self, local: PreparedList, phase: Phase) -> Result<(), NixlError> {
        let (layer, seq, deadline) = match &self.cur {
            Some(c) => (c.layer, c.seq, c.deadline),
            None => return Err(NixlError::Protocol("no open exchange".into())),
        };
        let mut idle_polls: u32 = 0;
        loop {
            let mut progressed = false;
            // Pumping also progresses UCX, so our own DONE is flushed at least
            // once before we leave (we run without NIXL's progress thread).
            self.pump_inbox(layer)?;
            let mut cur = match self.cur.take() {
                Some(c) => c,
                None => return Err(NixlError::Protocol("no open exchange".into())),
            };
            let step = self.step_reads(&mut cur, local, &mut progressed);
            let reached = match phase {
                Phase::Reads { want_payloads } => {
                    cur.done.iter().all(|&d| d)
                        && (!want_payloads
                            || cur
                                .reads
                                .iter()
                                .all(|r| self.inbox.contains(&(seq, r.src_rank, KIND_READY))))
                }
                // A peer's message of a later exchange proves that peer got
                // every DONE of this one, so every rank finished it.
                Phase::Done => {
                    cur.done_sent
                        && (self.missing_peer(seq, KIND_DONE).is_none() || self.max_seq_seen > seq)
                }
            };
            self.cur = Some(cur);
            step?;
            if reached {
                return Ok(());
            }
            if let Some((from, named, verdict)) = self.first_abort(seq) {
                // A peer that timed out may blame us while we wait, alive, on
                // someone else: then pass on our own view of who is missing.
                let culprit = if named == self.cfg.rank && !verdict {
                    self.local_blame(seq).map_or(named, |(p, _)| p)
                } else {
                    named
                };
                if let Some(c) = self.cur.as_mut() {
                    c.verdict = verdict;
                }
                return Err(NixlError::PeerFailed {
                    peer: culprit,
                    layer,
                    reason: format!("rank {from} aborted the layer because rank {named} failed"),
                });
            }
            if Instant::now() >= deadline {
                let (peer, waiting_for) = self.local_blame(seq).unwrap_or((self.cfg.rank, "DONE"));
                return Err(NixlError::Timeout {
                    peer,
                    layer,
                    waited_s: self.cfg.timeout.as_secs_f64(),
                    waiting_for,
                });
            }
            if progressed {
                idle_polls = 0;
            } else {
                idle_polls = idle_polls.saturating_add(1);
                backoff(idle_polls);
            }
        }
    }

    /// Posts READs that may go (see `gate_on_ready`) and polls those in flight.
    fn step_reads(
        &mut self,
        cur: &mut Current,
        local: PreparedList,
        progressed: &mut bool,
    ) -> Result<(), NixlError> {
        for i in 0..cur.reads.len() {
            if cur.done[i] {
                continue;
            }
            let r = &cur.reads[i];
            if cur.inflight[i].is_none()
                && (!cur.gate_on_ready || self.inbox.contains(&(cur.seq, r.src_rank, KIND_READY)))
            {
                let remote = match &self.peers[r.src_rank as usize] {
                    Some(p) => p.remote,
                    None => {
                        return Err(NixlError::Protocol(format!(
                            "no connection to rank {}",
                            r.src_rank
                        )))
                    }
                };
                let (req, state) = self
                    .agent
                    .post_read(local, &r.local, remote, &r.remote)
                    .map_err(|e| peer_failed(r.src_rank, cur.layer, e))?;
                *progressed = true;
                if state == XferState::Done {
                    cur.done[i] = true;
                    self.agent.release(req);
                    continue;
                }
                cur.inflight[i] = Some(req);
            }
            if let Some(req) = &cur.inflight[i] {
                match self.agent.status(req) {
                    Ok(XferState::Done) => {
                        cur.done[i] = true;
                        *progressed = true;
                        if let Some(req) = cur.inflight[i].take() {
                            self.agent.release(req);
                        }
                    }
                    Ok(XferState::InProgress) => {}
                    Err(e) => return Err(peer_failed(r.src_rank, cur.layer, e)),
                }
            }
        }
        Ok(())
    }

    /// Failure path of the open exchange: tell every peer (ABORT naming the
    /// culprit), then wait a short grace period to learn whether the layer
    /// nevertheless completed everywhere. It did if a peer already sent a
    /// message of a later exchange (it had every DONE, so every rank finished
    /// its reads and nobody reads our rows any more); then this returns `Ok`
    /// (commit) and the failure is raised by the next exchange instead, so
    /// that all survivors agree on which layers were committed. The wait ends
    /// early once every peer but the culprit(s) has aborted this layer too.
    fn fail(&mut self, err: NixlError) -> Result<(), NixlError> {
        let (layer, seq, done_sent, verdict) = match &self.cur {
            Some(c) => (c.layer, c.seq, c.done_sent, c.verdict),
            None => return Err(err),
        };
        // Cancel our READs now: nothing of this layer is used unless proven.
        if let Some(c) = self.cur.as_mut() {
            let reqs: Vec<XferReq> = c.inflight.iter_mut().filter_map(Option::take).collect();
            for req in reqs {
                self.agent.release(req);
            }
        }
        let culprit = match &err {
            NixlError::Timeout { peer, .. } | NixlError::PeerFailed { peer, .. } => *peer,
            _ => self.cfg.rank,
        };
        self.announce_abort(seq, culprit, verdict);
        let grace_end = Instant::now() + self.grace();
        let mut idle = 0u32;
        let proven = loop {
            if self.pump_inbox(layer).is_err() {
                break false;
            }
            if done_sent && self.max_seq_seen > seq {
                break true;
            }
            let mut blamed: HashSet<u32> = HashSet::from([culprit]);
            blamed.extend(
                self.aborts
                    .iter()
                    .filter(|(&(s, _), _)| s == seq)
                    .map(|(_, &(c, _))| c),
            );
            let all_aborted = (0..self.cfg.world).all(|p| {
                p == self.cfg.rank || blamed.contains(&p) || self.aborts.contains_key(&(seq, p))
            });
            if all_aborted || Instant::now() >= grace_end {
                break false;
            }
            idle = idle.saturating_add(1);
            backoff(idle);
        };
        // A rank that itself aborted is alive: follow its word to the real culprit.
        let mut blame = culprit;
        for _ in 0..self.cfg.world {
            match self.aborts.get(&(seq, blame)) {
                Some(&(next, _)) if next != blame && next != self.cfg.rank => blame = next,
                _ => break,
            }
        }
        if blame != self.cfg.rank {
            self.failed_peers.insert(blame);
        }
        let err = if blame == culprit {
            err
        } else {
            NixlError::PeerFailed {
                peer: blame,
                layer,
                reason: format!("rank {culprit} reported rank {blame} failed ({err})"),
            }
        };
        if proven {
            self.pending_failure = Some((
                blame,
                format!("rank {blame} failed while layer {layer} completed: {err}"),
            ));
            Ok(())
        } else {
            self.close_current();
            Err(err)
        }
    }

    /// How long a failing rank waits to learn whether the layer completed
    /// elsewhere: long enough for a peer's next message to arrive.
    fn grace(&self) -> Duration {
        self.cfg.timeout.min(Duration::from_secs(2))
    }

    /// `(announcing rank, named culprit, verdict)` of the first ABORT of `seq`.
    fn first_abort(&self, seq: u64) -> Option<(u32, u32, bool)> {
        (0..self.cfg.world)
            .find_map(|from| self.aborts.get(&(seq, from)).map(|&(c, v)| (from, c, v)))
    }

    /// Whom this rank is waiting on in exchange `seq`, and for what, in blame
    /// order: a peer that never said READY (dead or stuck before the layer), a
    /// source whose READ is unfinished, a peer that never said DONE. Peers
    /// that sent ABORT are alive and skipped.
    fn local_blame(&self, seq: u64) -> Option<(u32, &'static str)> {
        let silent = |kind: u8| {
            (0..self.cfg.world).find(|&r| {
                r != self.cfg.rank
                    && !self.aborts.contains_key(&(seq, r))
                    && !self.inbox.contains(&(seq, r, kind))
            })
        };
        let unread = self
            .cur
            .as_ref()
            .and_then(|c| c.done.iter().position(|&d| !d).map(|i| c.reads[i].src_rank));
        silent(KIND_READY)
            .map(|p| (p, "READY"))
            .or(unread.map(|p| (p, "READ")))
            .or_else(|| silent(KIND_DONE).map(|p| (p, "DONE")))
    }

    fn missing_peer(&self, seq: u64, kind: u8) -> Option<u32> {
        (0..self.cfg.world).find(|&r| r != self.cfg.rank && !self.inbox.contains(&(seq, r, kind)))
    }

    /// Tells every peer, the culprit too (it may be alive, e.g. a source whose
    /// rows failed verification); best effort.
    fn announce_abort(&mut self, seq: u64, culprit: u32, verdict: bool) {
        let mut msg = encode_msg(seq, KIND_ABORT);
        msg.extend_from_slice(&culprit.to_le_bytes());
        msg.push(u8::from(verdict));
        for p in self.peers.iter().flatten() {
            let _ = self.agent.notify(&p.name, &msg);
        }
    }

    /// Sends `kind` (with `payload`) for the open exchange to every peer.
    fn broadcast_kind(&mut self, kind: u8, payload: &[u8]) -> Result<(), NixlError> {
        let (layer, seq) = match &self.cur {
            Some(c) => (c.layer, c.seq),
            None => return Err(NixlError::Protocol("no open exchange".into())),
        };
        let mut msg = encode_msg(seq, kind);
        msg.extend_from_slice(payload);
        self.send_all(layer, &msg, None)
    }

    /// Sends `msg` to every connected peer (but `skip`). A peer that cannot
    /// be reached does not stop the others from getting it; the first such
    /// failure is returned after all sends.
    fn send_all(&self, layer: usize, msg: &[u8], skip: Option<u32>) -> Result<(), NixlError> {
        let mut first_err = None;
        for (rank, peer) in self.peers.iter().enumerate() {
            if let Some(p) = peer {
                if Some(rank as u32) == skip {
                    continue;
                }
                if let Err(e) = self.agent.notify(&p.name, msg) {
                    first_err.get_or_insert(peer_failed(rank as u32, layer, e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn pump_inbox(&mut self, layer: usize) -> Result<(), NixlError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = self.agent.drain_notifs(&mut scratch);
        for (sender, msg) in scratch.drain(..) {
            let rank = match self.name_to_rank.get(&sender) {
                Some(&r) => r,
                None => continue,
            };
            let (seq, kind, tail) = match decode_msg(&msg) {
                Some(m) => m,
                None => continue,
            };
            if kind != KIND_BYE && seq > self.max_seq_seen {
                self.max_seq_seen = seq;
            }
            if seq < self.seq {
                continue; // stale: an exchange that already ended here
            }
            match kind {
                KIND_ABORT => {
                    let culprit = decode_u32(tail).unwrap_or(rank);
                    let verdict = tail.get(4) == Some(&1);
                    self.aborts.entry((seq, rank)).or_insert((culprit, verdict));
                }
                KIND_READY | KIND_DONE | KIND_BYE => {
                    if kind == KIND_READY && !tail.is_empty() {
                        self.payloads.insert((seq, rank), tail.to_vec());
                    }
                    self.inbox.insert((seq, rank, kind));
                }
                _ => {}
            }
        }
        self.scratch = scratch;
        res.map_err(|e| NixlError::PeerFailed {
            peer: self.cfg.rank,
            layer,
            reason: e.to_string(),
        })
    }

    /// Test-only fault injection (`EPLB_XFER_FAULT=<kind>:<layer>`): makes this
    /// process die or hang at a chosen protocol step, so tests can check what
    /// survivors do. Unset in production; an unknown value is ignored.
    fn fault_point(&self, layer: usize, at: Fault) {
        match self.fault {
            Some((f, l)) if f == at && l == layer => {}
            _ => return,
        }
        match at {
            Fault::ExitBeforeReady => std::process::exit(17),
            Fault::HangBeforeDone => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Fault::ExitMidDone => {
                // DONE reaches only the lowest-numbered peer, then the process dies.
                if let Some(c) = &self.cur {
                    let msg = encode_msg(c.seq, KIND_DONE);
                    if let Some((_, p)) = self
                        .peers
                        .iter()
                        .enumerate()
                        .find_map(|(r, p)| p.as_ref().map(|p| (r, p)))
                    {
                        let _ = self.agent.notify(&p.name, &msg);
                        let until = Instant::now() + Duration::from_millis(300);
                        let mut sink = Vec::new();
                        while Instant::now() < until {
                            let _ = self.agent.drain_notifs(&mut sink); // flush
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                std::process::exit(17)
            }
        }
    }

    /// Says goodbye to every peer and waits (at most `linger`) for theirs, so
    /// that no message still queued in UCX (a final DONE) is lost when the
    /// agent goes away; then forgets peers' metadata. The agent is freed on drop.
    pub fn close(&mut self, linger: Duration) {
        self.close_current();
        if self.local.is_some() {
            let seq = self.seq + 1;
            let _ = self.send_all(0, &encode_msg(seq, KIND_BYE), None);
            let deadline = Instant::now() + linger;
            let mut idle = 0u32;
            let waiting = |e: &Engine| {
                (0..e.cfg.world).any(|r| {
                    r != e.cfg.rank
                        && !e.failed_peers.contains(&r)
                        && !e.inbox.contains(&(seq, r, KIND_BYE))
                })
            };
            while waiting(self) && Instant::now() < deadline {
                if self.pump_inbox(0).is_err() {
                    break;
                }
                idle = idle.saturating_add(1);
                backoff(idle);
            }
            self.local = None;
        }
        for p in self.peers.iter().flatten() {
            self.agent.invalidate_remote(&p.name);
        }
        self.peers.iter_mut().for_each(|p| *p = None);
    }
}

fn peer_failed(peer: u32, layer: usize, e: NixlError) -> NixlError {
    NixlError::PeerFailed {
        peer,
        layer,
        reason: e.to_string(),
    }
}

/// Spin briefly, then yield, then nap up to 200 µs: low latency when a peer is
/// about to answer, little CPU stolen from the progress thread when it is not.
fn backoff(idle_polls: u32) {
    if idle_polls < 32 {
        std::hint::spin_loop();
    } else if idle_polls < 96 {
        std::thread::yield_now();
    } else {
        let us = 1u64 << ((idle_polls - 96) / 16).min(7);
        std::thread::sleep(Duration::from_micros(us.min(200)));
    }
}

fn encode_msg(seq: u64, kind: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(13);
    m.extend_from_slice(MSG_MAGIC);
    m.extend_from_slice(&seq.to_le_bytes());
    m.push(kind);
    m
}

fn decode_u32(tail: &[u8]) -> Option<u32> {
    let b: [u8; 4] = tail.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// `(seq, kind, payload)` of one of our messages, or None for anything else.
fn decode_msg(m: &[u8]) -> Option<(u64, u8, &[u8])> {
    if m.len() < 13 || &m[..4] != MSG_MAGIC {
        return None;
    }
    let s: [u8; 8] = m[4..12].try_into().ok()?;
    let kind = m[12];
    let tail = &m[13..];
    if kind == KIND_ABORT && tail.len() != 5 {
        return None;
    }
    Some((u64::from_le_bytes(s), kind, tail))
}

type ParsedBlob = (u32, String, Vec<u8>, RankLayout);

fn parse_blob(b: &[u8]) -> Result<ParsedBlob, NixlError> {
    let bad = |m: &str| NixlError::Protocol(format!("peer blob: {m}"));
    if b.len() < 12 || &b[..8] != BLOB_MAGIC {
        return Err(bad("not an eplb-xfer peer blob"));
    }
    let mut r4 = [0u8; 4];
    r4.copy_from_slice(&b[8..12]);
    let rank = u32::from_le_bytes(r4);
    let mut pos = 12usize;
    let mut parts: Vec<&[u8]> = Vec::with_capacity(3);
    for _ in 0..3 {
        let end = pos
            .checked_add(8)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| bad("truncated"))?;
        let mut l8 = [0u8; 8];
        l8.copy_from_slice(&b[pos..end]);
        let len = usize::try_from(u64::from_le_bytes(l8)).map_err(|_| bad("length overflow"))?;
        let stop = end
            .checked_add(len)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| bad("truncated"))?;
        parts.push(&b[end..stop]);
        pos = stop;
    }
    let name = String::from_utf8(parts[0].to_vec()).map_err(|_| bad("agent name is not UTF-8"))?;
    let layout = RankLayout::from_blob(parts[2])?;
    Ok((rank, name, parts[1].to_vec(), layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_garbage() {
        assert_eq!(
            decode_msg(&encode_msg(42, KIND_DONE)),
            Some((42, KIND_DONE, &[][..]))
        );
        assert_eq!(decode_msg(b"hello"), None);
        assert_eq!(decode_msg(&[0u8; 13]), None);
        let mut a = encode_msg(7, KIND_ABORT);
        assert_eq!(decode_msg(&a), None); // an ABORT must name the culprit
        a.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(decode_msg(&a), None); // ... and say whether it is a verdict
        a.push(1);
        let (seq, kind, tail) = decode_msg(&a).unwrap();
        assert_eq!((seq, kind, decode_u32(tail)), (7, KIND_ABORT, Some(3)));
        assert_eq!(tail.get(4), Some(&1));
        let mut r = encode_msg(9, KIND_READY);
        r.extend_from_slice(b"hashes");
        assert_eq!(decode_msg(&r), Some((9, KIND_READY, &b"hashes"[..])));
    }

    #[test]
    fn fault_spec_parses_or_is_ignored() {
        assert_eq!(
            parse_fault("exit_mid_done:3"),
            Some((Fault::ExitMidDone, 3))
        );
        assert_eq!(
            parse_fault("hang_before_done:0"),
            Some((Fault::HangBeforeDone, 0))
        );
        assert_eq!(parse_fault("exit_before_ready:x"), None);
        assert_eq!(parse_fault("explode:1"), None);
        assert_eq!(parse_fault(""), None);
    }

    #[test]
    fn garbage_blobs_are_errors_not_panics() {
        assert!(parse_blob(b"").is_err());
        assert!(parse_blob(b"EPXFPEER\0\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
        let mut b = BLOB_MAGIC.to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        for _ in 0..3 {
            b.extend_from_slice(&0u64.to_le_bytes());
        }
        assert!(parse_blob(&b).is_err()); // empty layout blob
    }
}
