//! The per-layer transfer protocol over one NIXL agent.
//!
//! One `exchange` per layer, called in lockstep by every rank of the group:
//! 1. each rank tells every peer READY (staged: after packing its sends);
//! 2. it posts one READ per source (zero-copy: as soon as called; staged: once
//!    that source is READY), and polls them to completion;
//! 3. with all its reads complete it tells every peer DONE;
//! 4. it returns once every peer said DONE. Only then may the caller overwrite
//!    rows (peers have finished reading them) and commit the layer (every rank
//!    has finished its part).
//!
//! Messages carry a sequence number that all ranks advance together, so a
//! fast peer's messages for the next layer are kept for later, and stale ones
//! from an aborted exchange are dropped. There is no global collective and no
//! fixed sleep: polling backs off from spinning to at most 200 µs naps.

use std::collections::{HashMap, HashSet};
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
    inbox: HashSet<(u64, u32, u8)>,
    /// Aborts announced by peers: seq -> (announcing rank, failed rank).
    aborts: HashMap<u64, (u32, u32)>,
    seq: u64,
    prepared_lists_built: u64,
    scratch: Vec<(String, Vec<u8>)>,
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
            aborts: HashMap::new(),
            seq: 0,
            prepared_lists_built: 0,
            scratch: Vec::new(),
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

    /// Checks reads against the index spaces before anything moves.
    pub fn validate_reads(&self, layer: usize, reads: &[PeerRead]) -> Result<(), NixlError> {
        if self.cfg.mode == Mode::ZeroCopy && layer >= self.layout.n_layers() {
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

    /// Runs one layer's exchange (see the module docs). All ranks must call it
    /// the same number of times, in the same order.
    pub fn exchange(
        &mut self,
        layer: usize,
        reads: &[PeerRead],
    ) -> Result<ExchangeStats, NixlError> {
        self.validate_reads(layer, reads)?;
        let local = self
            .local
            .ok_or_else(|| NixlError::Protocol("exchange before connect".into()))?;
        for r in reads {
            if self.peers[r.src_rank as usize].is_none() {
                return Err(NixlError::Protocol(format!(
                    "no connection to rank {}",
                    r.src_rank
                )));
            }
        }
        self.seq += 1;
        let seq = self.seq;
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        let staged = self.cfg.mode == Mode::Staged;
        let mut inflight: Vec<Option<XferReq>> = reads.iter().map(|_| None).collect();
        let mut posted = vec![false; reads.len()];
        let mut done = vec![false; reads.len()];
        let result = self.run_exchange(
            layer,
            seq,
            reads,
            local,
            staged,
            deadline,
            &mut inflight,
            &mut posted,
            &mut done,
        );
        for req in inflight.into_iter().flatten() {
            self.agent.release(req);
        }
        if let Err(e) = &result {
            // Tell the others at once, so they fail fast naming the real culprit.
            let culprit = match e {
                NixlError::Timeout { peer, .. } | NixlError::PeerFailed { peer, .. } => *peer,
                _ => self.cfg.rank,
            };
            self.announce_abort(seq, culprit);
        }
        // Keep only messages of later exchanges.
        self.inbox.retain(|&(s, _, _)| s > seq);
        self.aborts.retain(|&s, _| s > seq);
        result?;
        let row_bytes = self.layout.expert_bytes();
        let rows_per_peer: Vec<(u32, usize)> = reads.iter().map(|r| (r.src_rank, r.rows)).collect();
        let bytes_read = rows_per_peer
            .iter()
            .map(|&(_, n)| n as u64 * row_bytes)
            .sum();
        Ok(ExchangeStats {
            rows_per_peer,
            bytes_read,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run_exchange(
        &mut self,
        layer: usize,
        seq: u64,
        reads: &[PeerRead],
        local: PreparedList,
        staged: bool,
        deadline: Instant,
        inflight: &mut [Option<XferReq>],
        posted: &mut [bool],
        done: &mut [bool],
    ) -> Result<(), NixlError> {
        // READY means "I entered this layer (and, staged, packed my sends)".
        // Zero-copy does not wait for it; it tells a live-but-waiting peer
        // from a dead one when a deadline passes.
        self.broadcast(layer, seq, KIND_READY)?;
        let mut done_sent = false;
        let mut idle_polls: u32 = 0;
        loop {
            let mut progressed = false;
            // Pumping also progresses UCX, so our own DONE is flushed at least
            // once before we leave (we run without NIXL's progress thread).
            self.pump_inbox(layer)?;
            if done_sent && self.missing_peer(seq, KIND_DONE).is_none() {
                return Ok(());
            }
            if let Some(&(from, culprit)) = self.aborts.get(&seq) {
                return Err(NixlError::PeerFailed {
                    peer: culprit,
                    layer,
                    reason: format!("rank {from} aborted the layer because rank {culprit} failed"),
                });
            }
            for i in 0..reads.len() {
                let r = &reads[i];
                if !posted[i] && (!staged || self.inbox.contains(&(seq, r.src_rank, KIND_READY))) {
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
                        .map_err(|e| peer_failed(r.src_rank, layer, e))?;
                    posted[i] = true;
                    progressed = true;
                    if state == XferState::Done {
                        done[i] = true;
                        self.agent.release(req);
                    } else {
                        inflight[i] = Some(req);
                    }
                }
                if let Some(req) = &inflight[i] {
                    match self.agent.status(req) {
                        Ok(XferState::Done) => {
                            done[i] = true;
                            progressed = true;
                            if let Some(req) = inflight[i].take() {
                                self.agent.release(req);
                            }
                        }
                        Ok(XferState::InProgress) => {}
                        Err(e) => return Err(peer_failed(r.src_rank, layer, e)),
                    }
                }
            }
            if !done_sent && done.iter().all(|&d| d) {
                self.broadcast(layer, seq, KIND_DONE)?;
                done_sent = true;
                progressed = true;
            }
            if Instant::now() >= deadline {
                let waited_s = self.cfg.timeout.as_secs_f64();
                // Blame, in order: a peer that never entered the layer (dead or
                // stuck earlier), a source whose READ did not finish, then a
                // peer that did not say DONE.
                let (peer, waiting_for) = if let Some(p) = self.missing_peer(seq, KIND_READY) {
                    (p, "READY")
                } else if let Some(i) = (0..reads.len()).find(|&i| !done[i]) {
                    (reads[i].src_rank, "READ")
                } else {
                    (
                        self.missing_peer(seq, KIND_DONE).unwrap_or(self.cfg.rank),
                        "DONE",
                    )
                };
                return Err(NixlError::Timeout {
                    peer,
                    layer,
                    waited_s,
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

    fn missing_peer(&self, seq: u64, kind: u8) -> Option<u32> {
        (0..self.cfg.world).find(|&r| r != self.cfg.rank && !self.inbox.contains(&(seq, r, kind)))
    }

    fn announce_abort(&self, seq: u64, culprit: u32) {
        let mut msg = encode_msg(seq, KIND_ABORT);
        msg.extend_from_slice(&culprit.to_le_bytes());
        for (rank, peer) in self.peers.iter().enumerate() {
            if let Some(p) = peer {
                if rank as u32 != culprit {
                    let _ = self.agent.notify(&p.name, &msg); // best effort
                }
            }
        }
    }

    fn broadcast(&self, layer: usize, seq: u64, kind: u8) -> Result<(), NixlError> {
        let msg = encode_msg(seq, kind);
        for (rank, peer) in self.peers.iter().enumerate() {
            if let Some(p) = peer {
                self.agent
                    .notify(&p.name, &msg)
                    .map_err(|e| peer_failed(rank as u32, layer, e))?;
            }
        }
        Ok(())
    }

    fn pump_inbox(&mut self, layer: usize) -> Result<(), NixlError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = self.agent.drain_notifs(&mut scratch);
        for (sender, msg) in scratch.drain(..) {
            if let (Some(&rank), Some((seq, kind))) =
                (self.name_to_rank.get(&sender), decode_msg(&msg))
            {
                if seq >= self.seq {
                    if kind == KIND_ABORT {
                        let culprit = decode_abort(&msg).unwrap_or(rank);
                        self.aborts.entry(seq).or_insert((rank, culprit));
                    } else {
                        self.inbox.insert((seq, rank, kind));
                    }
                }
            }
        }
        self.scratch = scratch;
        res.map_err(|e| NixlError::PeerFailed {
            peer: self.cfg.rank,
            layer,
            reason: e.to_string(),
        })
    }

    /// Says goodbye to every peer and waits (at most `linger`) for theirs, so
    /// that no message still queued in UCX (a final DONE) is lost when the
    /// agent goes away; then forgets peers' metadata. The agent is freed on drop.
    pub fn close(&mut self, linger: Duration) {
        if self.local.is_some() {
            let seq = self.seq + 1;
            let _ = self.broadcast(0, seq, KIND_BYE);
            let deadline = Instant::now() + linger;
            let mut idle = 0u32;
            while self.missing_peer(seq, KIND_BYE).is_some() && Instant::now() < deadline {
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

fn decode_abort(m: &[u8]) -> Option<u32> {
    let b: [u8; 4] = m.get(13..17)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

fn decode_msg(m: &[u8]) -> Option<(u64, u8)> {
    let ok_len = m.len() == 13 || (m.len() == 17 && m.get(12) == Some(&KIND_ABORT));
    if !ok_len || &m[..4] != MSG_MAGIC {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&m[4..12]);
    Some((u64::from_le_bytes(s), m[12]))
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
            Some((42, KIND_DONE))
        );
        assert_eq!(decode_msg(b"hello"), None);
        assert_eq!(decode_msg(&[0u8; 13]), None);
        let mut a = encode_msg(7, KIND_ABORT);
        a.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(decode_msg(&a), Some((7, KIND_ABORT)));
        assert_eq!(decode_abort(&a), Some(3));
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
