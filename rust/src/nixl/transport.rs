//! The NIXL transport: drives a [`Session`] with real time, NIXL
//! notifications and NIXL transfers.
//!
//! Set-up ([`Endpoint`]) runs on the caller's thread: create the agent,
//! register memory, exchange blobs (the caller all-gathers them), prepare
//! descriptor lists once, decide each pair's direction and schedule, and
//! probe every peer with a tiny transfer so a transport that cannot move
//! bytes fails here, naming the UCX settings, and not in the middle of a
//! rebalance.
//!
//! Then one worker thread per communicator owns the agent and the session
//! for good ([`Transport`]). It never needs the GIL and always answers peers
//! (agreement rounds, goodbyes), also between the caller's calls, so a rank
//! that is alive is never mistaken for a dead one because its caller is busy
//! elsewhere. The caller hands it jobs over a channel and waits on a reply.
//! On host memory the worker also does a layer's row copies and verification
//! itself, so a layer crosses the Python boundary once.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::agent::{Agent, MemKind, PreparedList, XferOp, XferReq, XferState};
use super::ffi::Api;
use super::topology::{self, DirectionChoice, RankFacts, Schedule, Topology};
use super::NixlError;
use crate::descriptors::{DescriptorSpace, Mode};
use crate::layout::{RankLayout, TensorRows};
use crate::protocol::{
    AbortCode, Config as SessionConfig, Direction, Event, ExchangeSpec, Failure, Op, Output,
    Session, Time, Transfer,
};

const BLOB_MAGIC: &[u8; 8] = b"EPXFPR02";
/// Set-up notification: "my tests with every peer are done".
const PROBED: &[u8] = b"EPXPROBED";

/// Static settings of one rank's transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub rank: u32,
    pub world: u32,
    pub mode: Mode,
    pub mem: MemKind,
    pub device_id: u64,
    pub timeout: Duration,
    pub direction: DirectionChoice,
    pub schedule: Schedule,
}

impl TransportConfig {
    /// One agreement round: long enough for a live peer's worker to answer
    /// under load, short next to the deadline.
    pub fn round_timeout(&self) -> Duration {
        (self.timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// Set-up state, before the worker starts.
pub struct Endpoint {
    agent: Agent,
    cfg: TransportConfig,
    layout: RankLayout,
    space: DescriptorSpace,
    facts: RankFacts,
}

struct PeerBlob {
    name: String,
    md: Vec<u8>,
    layout: RankLayout,
    facts: RankFacts,
    options: [u8; 3],
}

impl Endpoint {
    /// Creates the agent and registers the layout's memory (each region once).
    pub fn new(
        api: Arc<Api>,
        agent_name: &str,
        cfg: TransportConfig,
        layout: RankLayout,
    ) -> Result<Endpoint, NixlError> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(NixlError::Input(format!(
                "rank {} is outside world size {}",
                cfg.rank, cfg.world
            )));
        }
        layout.validate()?;
        layout.check_aliasing()?;
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
        let mut agent = Agent::new(api, agent_name, cfg.mem, cfg.device_id)?;
        agent.register(&layout.registration_regions(cfg.mode == Mode::ZeroCopy))?;
        Ok(Endpoint {
            agent,
            cfg,
            layout,
            space,
            facts: RankFacts {
                node_key: topology::local_node_key(),
                rdma: topology::local_rdma(),
                cuda_get_zcopy: topology::local_cuda_get_zcopy(),
                host_get: topology::local_host_get(),
            },
        })
    }

    /// The bytes every peer needs: agent name, NIXL metadata, layout, node
    /// facts and the options that must agree across ranks.
    pub fn local_blob(&self) -> Result<Vec<u8>, NixlError> {
        let md = self.agent.local_metadata()?;
        let mut out = BLOB_MAGIC.to_vec();
        out.extend_from_slice(&self.cfg.rank.to_le_bytes());
        let flags = [
            u8::from(self.facts.rdma)
                | (u8::from(self.facts.cuda_get_zcopy) << 1)
                | (u8::from(self.facts.host_get) << 2),
            self.cfg.direction as u8,
            self.cfg.schedule as u8,
            self.cfg.mode as u8,
        ];
        let parts: [&[u8]; 5] = [
            self.agent.name().as_bytes(),
            &md,
            &self.layout.to_blob(),
            self.facts.node_key.as_bytes(),
            &flags,
        ];
        for p in parts {
            out.extend_from_slice(&(p.len() as u64).to_le_bytes());
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    /// Loads every rank's blob (index = rank), agrees on the topology,
    /// prepares descriptor lists once and starts nothing yet. `nodes`
    /// overrides node detection.
    pub fn connect(
        mut self,
        blobs: &[Vec<u8>],
        nodes: Option<&[u32]>,
    ) -> Result<Connected, NixlError> {
        let world = self.cfg.world as usize;
        if blobs.len() != world {
            return Err(NixlError::Input(format!(
                "got {} peer blobs for world size {world}",
                blobs.len()
            )));
        }
        let me = self.cfg.rank as usize;
        let mut peers = Vec::with_capacity(world);
        for (rank, blob) in blobs.iter().enumerate() {
            let (r, pb) = parse_blob(blob)?;
            if r as usize != rank {
                return Err(NixlError::Protocol(format!(
                    "blob at index {rank} is from rank {r}"
                )));
            }
            peers.push(pb);
        }
        let mine = peers[me].options;
        for (rank, p) in peers.iter().enumerate() {
            if p.options[..3] != mine[..3] {
                return Err(NixlError::Input(format!(
                    "rank {rank} was created with other options (mode, direction or schedule) than rank {me}; every rank must pass the same"
                )));
            }
            if rank != me {
                check_peer_layout(rank, &p.layout, &self.layout)?;
            }
        }
        let facts: Vec<RankFacts> = peers.iter().map(|p| p.facts.clone()).collect();
        let topo = Topology::new(
            &facts,
            self.cfg.mem == MemKind::Vram,
            self.cfg.direction,
            self.cfg.schedule,
            nodes,
        );
        let needs_write = (0..world).any(|p| p != me && topo.direction[me][p] == Direction::Write);
        let local_buf = self.agent.prepare(
            None,
            &self.space.local_descs(&self.layout),
            self.cfg.device_id,
        )?;
        let local_src = if needs_write {
            Some(self.agent.prepare(
                None,
                &self.space.remote_descs(&self.layout),
                self.cfg.device_id,
            )?)
        } else {
            None
        };
        let mut names = vec![String::new(); world];
        let mut peer_lists = vec![None; world];
        for (rank, p) in peers.iter().enumerate() {
            if rank == me {
                continue;
            }
            let loaded = load_with_retry(&mut self.agent, rank, &p.name, &p.md)?;
            if loaded != p.name {
                return Err(NixlError::Protocol(format!(
                    "rank {rank} metadata names agent {loaded:?}, expected {:?}",
                    p.name
                )));
            }
            let descs = match topo.direction[me][rank] {
                Direction::Read => self.space.remote_descs(&p.layout),
                Direction::Write => self.space.local_descs(&p.layout),
            };
            peer_lists[rank] = Some(self.agent.prepare(
                Some(&p.name),
                &descs,
                p.layout.device_id,
            )?);
            names[rank] = p.name.clone();
        }
        let probe_targets: Vec<Option<(u64, u64)>> = peers
            .iter()
            .map(|p| {
                p.layout
                    .buffer
                    .first()
                    .map(|t| (t.base, p.layout.device_id))
            })
            .collect();
        Ok(Connected {
            agent: self.agent,
            cfg: self.cfg,
            layout: self.layout,
            space: self.space,
            topo,
            names,
            local_buf,
            local_src,
            peer_lists,
            probe_targets,
            backlog: Vec::new(),
        })
    }
}

/// Set-up done; not yet probed or running.
pub struct Connected {
    agent: Agent,
    cfg: TransportConfig,
    layout: RankLayout,
    space: DescriptorSpace,
    topo: Topology,
    names: Vec<String>,
    local_buf: PreparedList,
    local_src: Option<PreparedList>,
    peer_lists: Vec<Option<PreparedList>>,
    probe_targets: Vec<Option<(u64, u64)>>,
    /// Peer messages that arrived during set-up, for the worker.
    backlog: Vec<(String, Vec<u8>)>,
}

impl Connected {
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Moves 8 bytes with every peer in the pair's direction (buffer row 0
    /// to buffer row 0; nothing else is touched). Returns, per failed peer,
    /// what went wrong, naming the UCX settings in effect.
    pub fn probe(&mut self) -> Vec<(u32, String)> {
        let me = self.cfg.rank as usize;
        let mut failures = Vec::new();
        let Some(mine) = self.layout.buffer.first().copied() else {
            return failures;
        };
        let len = mine.row_bytes.min(8);
        let local = match self
            .agent
            .prepare(None, &[(mine.base, len)], self.cfg.device_id)
        {
            Ok(l) => l,
            Err(e) => return vec![(self.cfg.rank, e.to_string())],
        };
        let deadline = Instant::now() + self.cfg.timeout.min(Duration::from_secs(30));
        let mut inflight: Vec<(u32, XferReq, Option<PreparedList>)> = Vec::new();
        for peer in 0..self.names.len() {
            if peer == me {
                continue;
            }
            let Some((base, dev)) = self.probe_targets[peer] else {
                continue;
            };
            let op = match self.topo.direction[me][peer] {
                Direction::Read => XferOp::Read,
                Direction::Write => XferOp::Write,
            };
            let remote = match self
                .agent
                .prepare(Some(&self.names[peer]), &[(base, len)], dev)
            {
                Ok(r) => r,
                Err(e) => {
                    failures.push((peer as u32, probe_message(op, peer, &e.to_string())));
                    continue;
                }
            };
            match self.agent.post(op, local, &[0], remote, &[0], None) {
                Ok((req, XferState::Done)) => {
                    self.agent.release(req);
                    self.agent.release_list(remote);
                }
                Ok((req, XferState::InProgress)) => inflight.push((peer as u32, req, Some(remote))),
                Err(e) => {
                    failures.push((peer as u32, probe_message(op, peer, &e.to_string())));
                    self.agent.release_list(remote);
                }
            }
        }
        let mut idle = 0u32;
        while !inflight.is_empty() {
            let mut i = 0;
            while i < inflight.len() {
                let peer = inflight[i].0;
                let op = match self.topo.direction[me][peer as usize] {
                    Direction::Read => XferOp::Read,
                    Direction::Write => XferOp::Write,
                };
                let st = self.agent.status(&inflight[i].1);
                let timed_out = Instant::now() >= deadline;
                match st {
                    Ok(XferState::InProgress) if !timed_out => i += 1,
                    other => {
                        let (_, req, remote) = inflight.swap_remove(i);
                        self.agent.release(req);
                        if let Some(r) = remote {
                            self.agent.release_list(r);
                        }
                        match other {
                            Ok(XferState::Done) => {}
                            Ok(XferState::InProgress) => failures.push((
                                peer,
                                probe_message(
                                    op,
                                    peer as usize,
                                    "no completion before the deadline",
                                ),
                            )),
                            Err(e) => failures
                                .push((peer, probe_message(op, peer as usize, &e.to_string()))),
                        }
                    }
                }
            }
            idle = idle.saturating_add(1);
            backoff(idle);
        }
        self.agent.release_list(local);
        // Keep driving UCX until every peer finished its own tests: a peer's
        // READ may need this side's progress to connect. Peers say so with
        // a notification, which also proves notifications work.
        let names: Vec<String> = self.names.clone();
        let mut missing: Vec<bool> = (0..names.len()).map(|p| p != me).collect();
        for (p, name) in names.iter().enumerate() {
            if p != me && self.agent.notify(name, PROBED).is_err() {
                failures.push((
                    p as u32,
                    probe_message(XferOp::Read, p, "a notification could not be sent"),
                ));
            }
        }
        let mut got = Vec::new();
        let mut idle = 0u32;
        while missing.iter().any(|&m| m) && Instant::now() < deadline {
            got.clear();
            if self.agent.drain_notifs(&mut got).is_err() {
                break;
            }
            for (sender, msg) in got.drain(..) {
                match names.iter().position(|n| *n == sender) {
                    Some(p) if msg == PROBED => missing[p] = false,
                    _ => self.backlog.push((sender, msg)),
                }
            }
            idle = idle.saturating_add(1);
            backoff(idle);
        }
        for (p, m) in missing.iter().enumerate() {
            if *m {
                failures.push((
                    p as u32,
                    probe_message(XferOp::Read, p, "its set-up notification never arrived"),
                ));
            }
        }
        failures
    }

    /// Starts the worker thread; the transport is ready for jobs.
    pub fn spawn(self) -> Result<Transport, NixlError> {
        let me = self.cfg.rank as usize;
        let scfg = SessionConfig {
            rank: self.cfg.rank,
            world: self.cfg.world,
            n_local: self.layout.n_local as u32,
            timeout: dur_ns(self.cfg.timeout),
            round_timeout: dur_ns(self.cfg.round_timeout()),
            direction: self.topo.direction[me].clone(),
            round_of: self.topo.round_of[me].clone(),
        };
        let session = Session::new(scfg).map_err(|e| NixlError::Input(e.to_string()))?;
        let shared = Arc::new(Shared::default());
        let mut core = Core {
            agent: self.agent,
            session,
            space: self.space,
            layout: self.layout,
            names: self.names.clone(),
            name_to_rank: self
                .names
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.is_empty())
                .map(|(r, n)| (n.clone(), r as u32))
                .collect(),
            local_buf: self.local_buf,
            local_src: self.local_src,
            peer_lists: self.peer_lists,
            inflight: HashMap::new(),
            finished: Vec::new(),
            index_scratch: (Vec::new(), Vec::new()),
            job: None,
            replies: std::collections::VecDeque::new(),
            epoch: Instant::now(),
            shared: shared.clone(),
            scratch: self.backlog,
            round_timeout: self.cfg.round_timeout(),
            torn_down: false,
        };
        core.publish_final(); // counters are valid before the first job
        let core = Arc::new(Mutex::new(core));
        let cuda_device = (self.cfg.mem == MemKind::Vram).then_some(self.cfg.device_id);
        let (c2, s2) = (core.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("eplbx-r{}", self.cfg.rank))
            .spawn(move || background(c2, s2, cuda_device))
            .map_err(|e| NixlError::Input(format!("cannot start the transport thread: {e}")))?;
        Ok(Transport {
            core,
            shared,
            thread: Mutex::new(Some(thread)),
            owner_pid: std::process::id(),
            closed: AtomicBool::new(false),
        })
    }
}

fn probe_message(op: XferOp, peer: usize, why: &str) -> String {
    format!(
        "a set-up test {} with rank {peer} failed ({why}); NIXL cannot move bytes between these ranks with the UCX settings in effect ({}). Check UCX_TLS / UCX_NET_DEVICES, and do not combine UCX_PROTO_EMULATION_ENABLE=n with tcp",
        match op {
            XferOp::Read => "READ",
            XferOp::Write => "WRITE",
        },
        topology::ucx_settings()
    )
}

/// UCX occasionally refuses the first connection to a just-created peer on
/// loopback; a short bounded retry makes set-up dependable.
fn load_with_retry(
    agent: &mut Agent,
    rank: usize,
    name: &str,
    md: &[u8],
) -> Result<String, NixlError> {
    let mut last = None;
    for attempt in 0..5u32 {
        match agent.load_remote(md) {
            Ok(n) => return Ok(n),
            Err(e) => {
                agent.invalidate_remote(name);
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

fn check_peer_layout(rank: usize, l: &RankLayout, mine: &RankLayout) -> Result<(), NixlError> {
    let same_rows = l
        .buffer
        .iter()
        .map(|t| t.row_bytes)
        .eq(mine.buffer.iter().map(|t| t.row_bytes));
    if l.n_local != mine.n_local || l.n_layers() != mine.n_layers() || !same_rows {
        return Err(NixlError::Input(format!(
            "rank {rank} has a different layer layout ({} layers x {} rows, row bytes {:?}) than this rank ({} x {}, {:?})",
            l.n_layers(),
            l.n_local,
            l.buffer.iter().map(|t| t.row_bytes).collect::<Vec<_>>(),
            mine.n_layers(),
            mine.n_local,
            mine.buffer.iter().map(|t| t.row_bytes).collect::<Vec<_>>()
        )));
    }
    Ok(())
}

fn parse_blob(b: &[u8]) -> Result<(u32, PeerBlob), NixlError> {
    let bad = |m: &str| NixlError::Protocol(format!("peer blob: {m}"));
    if b.len() < 12 || &b[..8] != BLOB_MAGIC {
        return Err(bad("not an eplb-xfer peer blob of this version"));
    }
    let rank = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let mut pos = 12usize;
    let mut parts: Vec<&[u8]> = Vec::with_capacity(5);
    for _ in 0..5 {
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
    if pos != b.len() {
        return Err(bad("trailing bytes"));
    }
    let name = String::from_utf8(parts[0].to_vec()).map_err(|_| bad("agent name is not UTF-8"))?;
    let layout = RankLayout::from_blob(parts[2])?;
    let node_key =
        String::from_utf8(parts[3].to_vec()).map_err(|_| bad("node key is not UTF-8"))?;
    let flags: [u8; 4] = parts[4].try_into().map_err(|_| bad("flags"))?;
    Ok((
        rank,
        PeerBlob {
            name,
            md: parts[1].to_vec(),
            layout,
            facts: RankFacts {
                node_key,
                rdma: flags[0] & 1 != 0,
                cuda_get_zcopy: flags[0] & 2 != 0,
                host_get: flags[0] & 4 != 0,
            },
            options: [flags[1], flags[2], flags[3]],
        },
    ))
}

// ---- the running transport ------------------------------------------------------

/// Host-memory work of one layer, done by the worker (CPU tensors only).
#[derive(Debug, Clone, Default)]
pub struct HostOps {
    /// `(src_row, dst_row)`: weights -> buffer, before the exchange.
    pub local: Vec<(u32, u32)>,
    /// Rows served from the packed send layer (staged): weights -> slot.
    pub pack: Vec<u32>,
    /// `(src_row, dst_row)`: buffer -> buffer, after the exchange.
    pub dups: Vec<(u32, u32)>,
    /// Rows committed buffer -> weights, after the exchange.
    pub commit: Vec<u32>,
}

/// How received rows are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    Off,
    /// The worker checksums host rows itself.
    Host,
    /// The caller verifies: READY payloads are given, [`Reply::Landed`]
    /// comes back, then `Cmd::Done` or `Cmd::Abort`.
    Caller(Vec<(u32, Vec<u8>)>),
}

/// One exchange for the worker.
#[derive(Debug, Clone)]
pub struct Job {
    pub spec: ExchangeSpec,
    /// Weights layer the rows belong to (`None`: no transfers, e.g. a barrier).
    pub layer: Option<usize>,
    pub host: Option<HostOps>,
    pub verify: Verify,
}

/// What one exchange moved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerStats {
    /// `(source rank, rows)` received per source.
    pub rows_per_peer: Vec<(u32, usize)>,
    pub bytes_received: u64,
    pub seconds: f64,
}

/// The worker's answer to a job or command.
#[derive(Debug, Clone)]
pub enum Reply {
    Landed {
        payloads: Vec<Option<Vec<u8>>>,
    },
    Finished {
        label: u32,
        result: Result<Option<Failure>, Failure>,
        stats: LayerStats,
    },
    Refused(String),
    Closed,
}

/// Counters of a transport (readable at any time, without waiting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub exchanges: u64,
    pub prepared_lists_live: u64,
    pub requests_created: u64,
    pub requests_live: u64,
    pub notifications_sent: u64,
    pub notifications_received: u64,
    pub buffered: u64,
    pub ignored_messages: u64,
    pub failed_peers: Vec<u32>,
}

/// State shared with other threads without taking the core's lock.
#[derive(Default)]
struct Shared {
    counters: Mutex<Counters>,
    /// An abort asked for by another thread (close, Ctrl-C), applied by
    /// whoever drives the core next.
    abort: Mutex<Option<(AbortCode, u32)>>,
    stop: AtomicBool,
}

/// A running transport: the core (agent + session) behind a lock. The
/// caller's thread drives it during a call (no thread hand-off on the hot
/// path); a background thread drives it between calls, so peers are always
/// answered. Dropping it closes it (short linger).
pub struct Transport {
    core: Arc<Mutex<Core>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    owner_pid: u32,
    closed: AtomicBool,
}

impl Transport {
    /// True in the process that created the transport (false in a fork).
    pub fn owned_here(&self) -> bool {
        std::process::id() == self.owner_pid
    }

    /// The core, for this process only; `new_work`: refused once closed (a
    /// call in progress still collects its outcome).
    fn lock(&self, new_work: bool) -> Result<std::sync::MutexGuard<'_, Core>, NixlError> {
        if !self.owned_here() {
            return Err(NixlError::Input(format!(
                "this communicator belongs to process {} (this is a forked child); create a new one here",
                self.owner_pid
            )));
        }
        if new_work && self.closed.load(Ordering::Acquire) {
            return Err(NixlError::Input("the communicator is closed".into()));
        }
        Ok(self.core.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Starts an exchange; drive it with [`Transport::drive`].
    pub fn submit(&self, job: Job) -> Result<(), NixlError> {
        let mut core = self.lock(true)?;
        core.take_abort(&self.shared);
        core.begin(job).map_err(NixlError::Input)
    }

    /// Drives the open exchange for at most `step`; returns its next reply
    /// (`Landed` or `Finished`) once there is one.
    pub fn drive(&self, step: Duration) -> Result<Option<Reply>, NixlError> {
        let mut core = self.lock(false)?;
        let until = Instant::now() + step;
        let mut idle = 0u32;
        loop {
            core.take_abort(&self.shared);
            if let Some(r) = core.replies.pop_front() {
                return Ok(Some(r));
            }
            if core.job.is_none() || core.torn_down {
                return Err(NixlError::Protocol("no exchange is open".into()));
            }
            if core.pump() {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if Instant::now() >= until {
                    return Ok(None);
                }
                backoff(idle);
            }
        }
    }

    /// Says DONE after a `Landed` reply (the caller verified the data).
    pub fn done(&self) -> Result<(), NixlError> {
        let mut core = self.lock(false)?;
        let now = core.now();
        core.session
            .done(now)
            .map_err(|e| NixlError::Protocol(e.to_string()))
    }

    /// Gives up on the open exchange (or, between exchanges, on the next
    /// one), telling peers why. Never waits for a running call.
    pub fn abort(&self, code: AbortCode, culprit: u32) -> Result<(), NixlError> {
        if !self.owned_here() {
            return Ok(());
        }
        *self.shared.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, culprit));
        Ok(())
    }

    pub fn counters(&self) -> Counters {
        self.shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Closes: aborts an open exchange (peers are told), says goodbye, waits
    /// at most `linger` for live peers to confirm they have everything this
    /// rank sent, then tears the agent down. Idempotent. In a forked child
    /// it only forgets.
    pub fn close(&self, linger: Duration) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if !self.owned_here() {
            std::mem::forget(thread);
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = thread {
            let _ = t.join();
        }
        let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
        core.take_abort(&self.shared); // an abort asked for just before closing goes out
        let now = core.now();
        if core.job.is_some() {
            let me = core.session.config().rank;
            core.session.abort(now, AbortCode::Closed, me);
        }
        core.session.close(now);
        let until = Instant::now() + linger;
        let mut idle = 0u32;
        // Settle agreements and goodbyes, bounded by the linger (the
        // agreement of an exchange this aborts gets its rounds too).
        let hard = Instant::now() + linger.max(core.round_timeout * 3);
        while !core.session.close_settled() {
            let open = core.session.next_timeout().is_some();
            let now = Instant::now();
            if (now >= until && !open) || now >= hard {
                break;
            }
            if core.pump() {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                backoff(idle);
            }
        }
        core.teardown();
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.close(Duration::from_millis(200));
    }
}

/// The background thread: drives the core whenever no caller does.
fn background(core: Arc<Mutex<Core>>, shared: Arc<Shared>, cuda_device: Option<u64>) {
    if let Some(dev) = cuda_device {
        // UCX's CUDA transports act on the calling thread's context.
        bind_cuda_context(dev);
    }
    let mut idle = 0u32;
    while !shared.stop.load(Ordering::Acquire) {
        let Ok(mut c) = core.try_lock() else {
            // A caller drives the core: stay out of its way.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        c.take_abort(&shared);
        let progressed = c.pump();
        c.publish();
        drop(c);
        if progressed {
            idle = 0;
            continue;
        }
        idle = idle.saturating_add(1);
        // Between calls only peers' agreement messages and goodbyes need an
        // answer: short naps right after activity, then 1 ms.
        let us = match idle {
            0..=15 => 50,
            16..=63 => 200,
            _ => 1000,
        };
        std::thread::sleep(Duration::from_micros(us));
    }
}

// ---- the core ------------------------------------------------------------------

struct JobState {
    job: Job,
    seq: u64,
    started: Instant,
    /// Source of each buffer row received (for host verification).
    received_from: HashMap<u32, Vec<(u32, u32)>>,
}

struct Core {
    agent: Agent,
    session: Session,
    space: DescriptorSpace,
    layout: RankLayout,
    names: Vec<String>,
    name_to_rank: HashMap<String, u32>,
    local_buf: PreparedList,
    local_src: Option<PreparedList>,
    peer_lists: Vec<Option<PreparedList>>,
    inflight: HashMap<u64, XferReq>,
    /// `(id, succeeded)` of requests that left `inflight` in one poll
    /// (reused across polls).
    finished: Vec<(u64, bool)>,
    /// `(source, destination)` descriptor indices of the transfer being
    /// posted (reused across transfers).
    index_scratch: (Vec<c_int>, Vec<c_int>),
    job: Option<JobState>,
    replies: std::collections::VecDeque<Reply>,
    epoch: Instant,
    shared: Arc<Shared>,
    scratch: Vec<(String, Vec<u8>)>,
    round_timeout: Duration,
    torn_down: bool,
}

fn dur_ns(d: Duration) -> Time {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Core {
    fn now(&self) -> Time {
        dur_ns(self.epoch.elapsed())
    }

    /// Applies an abort asked for by another thread.
    fn take_abort(&mut self, shared: &Shared) {
        let req = shared
            .abort
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((code, culprit)) = req {
            let now = self.now();
            self.session.abort(now, code, culprit);
        }
    }

    fn begin(&mut self, mut job: Job) -> Result<(), String> {
        if self.torn_down {
            return Err("the communicator is closed".into());
        }
        if self.job.is_some() || self.session.is_open() {
            return Err("another exchange is still open on this communicator".into());
        }
        self.replies.clear();
        // Host work before the exchange: local copies and staged packing.
        if let (Some(h), Some(layer)) = (&job.host, job.layer) {
            self.host_before(layer, h)?;
        }
        if job.verify == Verify::Host {
            if job.layer.is_some() {
                job.spec.payloads = self.served_checksums(&job)?;
            }
            job.spec.hold_done = true;
        } else if let Verify::Caller(p) = &mut job.verify {
            job.spec.payloads = std::mem::take(p);
            job.spec.hold_done = true;
        }
        let mut received_from: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
        for &(src, s, d) in &job.spec.recvs {
            received_from.entry(src).or_default().push((s, d));
        }
        let now = self.now();
        // The session owns the spec from here on; the job keeps its layer,
        // host work and verify mode.
        self.session
            .begin(now, std::mem::take(&mut job.spec))
            .map_err(|e| e.to_string())?;
        self.job = Some(JobState {
            seq: self.session.seq(),
            job,
            started: Instant::now(),
            received_from,
        });
        Ok(())
    }

    fn pump(&mut self) -> bool {
        let mut progressed = false;
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = self.agent.drain_notifs(&mut scratch);
        let now = self.now();
        for (sender, msg) in scratch.drain(..) {
            progressed = true;
            if let Some(&rank) = self.name_to_rank.get(&sender) {
                self.session.handle_message(now, rank, &msg);
            }
        }
        self.scratch = scratch;
        let _ = res; // a failing progress call shows up as failed transfers

        // Transfers in flight.
        let mut finished = std::mem::take(&mut self.finished);
        for (&id, req) in &self.inflight {
            match self.agent.status(req) {
                Ok(XferState::InProgress) => {}
                other => finished.push((id, matches!(other, Ok(XferState::Done)))),
            }
        }
        for (id, ok) in finished.drain(..) {
            progressed = true;
            if let Some(req) = self.inflight.remove(&id) {
                self.agent.release(req);
            }
            let now = self.now();
            self.session.handle_completion(now, id, ok);
        }
        self.finished = finished;
        let now = self.now();
        if self.session.next_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
            progressed = true;
        }
        while let Some(out) = self.session.poll_output() {
            progressed = true;
            self.output(out);
        }
        while let Some(ev) = self.session.poll_event() {
            progressed = true;
            self.event(ev);
        }
        progressed
    }

    fn output(&mut self, out: Output) {
        match out {
            Output::Send { to, msg } => {
                let ok = self
                    .names
                    .get(to as usize)
                    .filter(|n| !n.is_empty())
                    .map(|n| self.agent.notify(n, &msg).is_ok())
                    .unwrap_or(false);
                if !ok {
                    let now = self.now();
                    self.session.handle_send_failure(now, to);
                }
            }
            Output::Post(t) => {
                let id = t.id;
                if let Err(_e) = self.post(&t) {
                    let now = self.now();
                    self.session.handle_completion(now, id, false);
                }
            }
            Output::Cancel { id } => {
                if let Some(req) = self.inflight.remove(&id) {
                    self.agent.release(req);
                }
            }
        }
    }

    fn post(&mut self, t: &Transfer) -> Result<(), NixlError> {
        let layer = self
            .job
            .as_ref()
            .filter(|j| j.seq == t.seq)
            .and_then(|j| j.job.layer)
            .ok_or_else(|| NixlError::Protocol("transfer without a layer".into()))?;
        let remote = self
            .peer_lists
            .get(t.peer as usize)
            .copied()
            .flatten()
            .ok_or_else(|| NixlError::Protocol(format!("no list for rank {}", t.peer)))?;
        let (op, local) = match t.op {
            Op::Read => (XferOp::Read, self.local_buf),
            Op::Write => {
                let src = self
                    .local_src
                    .ok_or_else(|| NixlError::Protocol("no source list for writes".into()))?;
                (XferOp::Write, src)
            }
        };
        // Source rows index the serving rank's list, destination rows the
        // reader's buffer list; this side's list is the source on a WRITE.
        let (src_idx, dst_idx) = &mut self.index_scratch;
        src_idx.clear();
        dst_idx.clear();
        for &(s, d) in &t.rows {
            self.space.push_row(layer, s, d, src_idx, dst_idx);
        }
        let (local_idx, remote_idx) = match op {
            XferOp::Read => (&*dst_idx, &*src_idx),
            XferOp::Write => (&*src_idx, &*dst_idx),
        };
        let (req, state) = self.agent.post(
            op,
            local,
            local_idx,
            remote,
            remote_idx,
            t.notify.as_deref(),
        )?;
        if state == XferState::Done {
            self.agent.release(req);
            let now = self.now();
            self.session.handle_completion(now, t.id, true);
        } else {
            self.inflight.insert(t.id, req);
        }
        Ok(())
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Landed { seq, payloads } => {
                let Some(j) = self.job.as_ref().filter(|j| j.seq == seq) else {
                    return;
                };
                if j.job.verify == Verify::Host {
                    let now = self.now();
                    match self.verify_host(&payloads) {
                        Ok(()) => {
                            let _ = self.session.done(now);
                        }
                        Err(src) => self.session.abort(now, AbortCode::Checksum, src),
                    }
                } else {
                    self.replies.push_back(Reply::Landed { payloads });
                }
            }
            Event::Finished { seq, label, result } => {
                let Some(j) = self.job.take() else { return };
                if j.seq != seq {
                    self.job = Some(j);
                    return;
                }
                if result.is_ok() {
                    if let (Some(h), Some(layer)) = (&j.job.host, j.job.layer) {
                        self.host_after(layer, h);
                    }
                }
                let row_bytes = self.layout.expert_bytes();
                let mut rows_per_peer: Vec<(u32, usize)> =
                    j.received_from.iter().map(|(&p, v)| (p, v.len())).collect();
                rows_per_peer.sort_unstable();
                let bytes_received = rows_per_peer
                    .iter()
                    .map(|&(_, n)| n as u64 * row_bytes)
                    .sum();
                let stats = LayerStats {
                    rows_per_peer,
                    bytes_received,
                    seconds: j.started.elapsed().as_secs_f64(),
                };
                // Counters are current when the caller sees the reply.
                self.publish_final();
                self.replies.push_back(Reply::Finished {
                    label,
                    result,
                    stats,
                });
            }
        }
    }

    // ---- host memory (CPU tensors) ----------------------------------------------

    fn rows_of(&self, layer: usize) -> Option<&[TensorRows]> {
        self.layout.weights.get(layer).map(|v| v.as_slice())
    }

    fn host_before(&self, layer: usize, h: &HostOps) -> Result<(), String> {
        let n = self.layout.n_local as u32;
        let w = self
            .rows_of(layer)
            .ok_or("layer outside the registered weights")?;
        let b = &self.layout.buffer;
        crate::host_copy::validate(b, w, n, &h.local).map_err(|e| e.to_string())?;
        if h.pack.iter().any(|&r| r >= n)
            || h.dups.iter().any(|&(s, d)| s >= n || d >= n)
            || h.commit.iter().any(|&r| r >= n)
        {
            return Err(format!("a host row is outside 0..{n}"));
        }
        // SAFETY: layouts describe the registered (live, held) tensors; rows validated.
        unsafe { crate::host_copy::copy_rows(b, w, &h.local) };
        if let Some(p) = &self.layout.packed {
            let offs = self.layout.packed_offsets();
            for &row in &h.pack {
                for (t, rows) in w.iter().enumerate() {
                    let src = rows.row_addr(row as usize) as *const u8;
                    let dst = (p.base + p.slot_bytes * u64::from(row) + offs[t]) as *mut u8;
                    // SAFETY: the slot lies inside the registered packed layer
                    // (validated layout); source row validated above.
                    unsafe { std::ptr::copy(src, dst, rows.row_bytes as usize) };
                }
            }
        }
        Ok(())
    }

    fn host_after(&self, layer: usize, h: &HostOps) {
        let Some(w) = self.rows_of(layer) else {
            return;
        };
        let b = &self.layout.buffer;
        // SAFETY: as in host_before; rows were validated there.
        unsafe {
            crate::host_copy::copy_rows(b, b, &h.dups);
            let commit: Vec<(u32, u32)> = h.commit.iter().map(|&r| (r, r)).collect();
            crate::host_copy::copy_rows(w, b, &commit);
        }
    }

    fn expert_sum(&self, rows: &[TensorRows], row: u32) -> u64 {
        crate::checksum::expert_checksum(rows.iter().map(|t| {
            // SAFETY: a row of a registered, live host tensor.
            unsafe {
                std::slice::from_raw_parts(
                    t.row_addr(row as usize) as *const u8,
                    t.row_bytes as usize,
                )
            }
        }))
    }

    /// READY payloads: per reader, `(row, checksum)` of each row it reads.
    fn served_checksums(&self, job: &Job) -> Result<Vec<(u32, Vec<u8>)>, String> {
        let layer = job.layer.ok_or("no layer")?;
        let w = self
            .rows_of(layer)
            .ok_or("layer outside the registered weights")?;
        let mut by_reader: HashMap<u32, Vec<u32>> = HashMap::new();
        for &(dst, row) in &job.spec.sends {
            by_reader.entry(dst).or_default().push(row);
        }
        let mut cache: HashMap<u32, u64> = HashMap::new();
        let mut out = Vec::new();
        for (reader, rows) in by_reader {
            let mut bytes = Vec::with_capacity(rows.len() * 12);
            for row in rows {
                if row as usize >= self.layout.n_local {
                    return Err(format!("send row {row} outside 0..{}", self.layout.n_local));
                }
                let sum = *cache.entry(row).or_insert_with(|| self.expert_sum(w, row));
                bytes.extend_from_slice(&row.to_le_bytes());
                bytes.extend_from_slice(&sum.to_le_bytes());
            }
            out.push((reader, bytes));
        }
        Ok(out)
    }

    /// Checks every received row against its source's checksum; `Err(src)`
    /// names the first source whose data does not match.
    fn verify_host(&self, payloads: &[Option<Vec<u8>>]) -> Result<(), u32> {
        let Some(j) = &self.job else { return Ok(()) };
        let mut srcs: Vec<u32> = j.received_from.keys().copied().collect();
        srcs.sort_unstable();
        for src in srcs {
            let expected = decode_sums(payloads.get(src as usize).and_then(|p| p.as_deref()));
            for &(s, d) in &j.received_from[&src] {
                let got = self.expert_sum(&self.layout.buffer, d);
                if expected.get(&s) != Some(&got) {
                    return Err(src);
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self) {
        let a = self.agent.counters();
        let c = Counters {
            exchanges: self.session.seq(),
            prepared_lists_live: a.prepared_lists_live,
            requests_created: a.requests_created,
            requests_live: a.requests_created - a.requests_released,
            notifications_sent: a.notifications_sent,
            notifications_received: a.notifications_received,
            buffered: self.session.buffered() as u64,
            ignored_messages: self.session.ignored_messages,
            failed_peers: self.session.failed_peers().iter().collect(),
        };
        *self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// Releases every request and the agent (in UCX's order, see `Agent`'s
    /// Drop) while the core is still held.
    fn teardown(&mut self) {
        for (_, req) in self.inflight.drain() {
            self.agent.release(req);
        }
        self.job = None;
        self.replies.push_back(Reply::Closed);
        self.publish_final();
        self.torn_down = true;
    }

    fn publish_final(&mut self) {
        // Completed requests of the finished exchange are released by now.
        self.publish();
    }
}

/// Makes device `ordinal`'s primary CUDA context current on this thread
/// (through the driver library, loaded at run time; best effort: without it
/// UCX falls back to whatever context it finds).
fn bind_cuda_context(ordinal: u64) {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type DeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type Retain = unsafe extern "C" fn(*mut *mut std::ffi::c_void, i32) -> i32;
    type SetCurrent = unsafe extern "C" fn(*mut std::ffi::c_void) -> i32;
    let Ok(ordinal) = i32::try_from(ordinal) else {
        return;
    };
    // SAFETY: the CUDA driver library's documented entry points, called with
    // valid out-pointers; the library stays loaded for the process's life.
    unsafe {
        let Ok(lib) = libloading::Library::new("libcuda.so.1") else {
            return;
        };
        let (Ok(init), Ok(get), Ok(retain), Ok(set)) = (
            lib.get::<Init>(b"cuInit"),
            lib.get::<DeviceGet>(b"cuDeviceGet"),
            lib.get::<Retain>(b"cuDevicePrimaryCtxRetain"),
            lib.get::<SetCurrent>(b"cuCtxSetCurrent"),
        ) else {
            return;
        };
        let mut dev = 0i32;
        let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
        if init(0) == 0 && get(&mut dev, ordinal) == 0 && retain(&mut ctx, dev) == 0 {
            set(ctx);
        }
        std::mem::forget(lib);
    }
}

/// `(row, checksum)` pairs of a READY payload.
pub fn decode_sums(p: Option<&[u8]>) -> HashMap<u32, u64> {
    let mut m = HashMap::new();
    if let Some(b) = p {
        for c in b.chunks_exact(12) {
            let row = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let mut s = [0u8; 8];
            s.copy_from_slice(&c[4..12]);
            m.insert(row, u64::from_le_bytes(s));
        }
    }
    m
}

/// Spin briefly, then yield, then nap up to 200 µs.
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
