//! `NixlEngine`: one rank's transport, as Python sees it.
//!
//! It takes the tensors themselves (never addresses), keeps them alive,
//! re-checks before every exchange that they were not reallocated, and
//! waits for the worker thread with the GIL released, checking for Ctrl-C
//! every 50 ms (an interrupt becomes an abort every rank agrees on).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::nixl_err;
use super::plan::{plan_err, read_i64s, PyTransferPlan};
use super::tensors::{data_ptr, geometry, size, Device, Geometry};
use crate::descriptors::Mode;
use crate::layout::{PackedLayer, RankLayout, TensorRows};
use crate::nixl::agent::MemKind;
use crate::nixl::topology::{DirectionChoice, Schedule};
use crate::nixl::transport::{
    Connected, Endpoint, HostOps, Job, Reply, Transport, TransportConfig, Verify,
};
use crate::nixl::{load_api, NixlError};
use crate::plan::layer_fingerprint;
use crate::protocol::{AbortCode, Blame, Direction, ExchangeSpec, Failure};

enum State {
    Setup(Box<Endpoint>),
    Connected(Box<Connected>),
    Running(Arc<Transport>),
    Closed,
    Moved,
}

/// A registered tensor, its geometry at registration and its name.
type Held = (Py<PyAny>, Geometry, String);

/// One layer's receives and sends in rows, checked against a placement row.
#[pyclass(name = "MappedLayer", module = "eplb_xfer._core", frozen)]
pub struct PyMappedLayer {
    label: u32,
    fingerprint: u64,
    /// `(src_rank, src_row, dst_row)`, sorted.
    #[pyo3(get)]
    recvs: Vec<(u32, u32, u32)>,
    sends: Vec<(u32, u32)>,
    /// Rows this rank serves (each once): staged mode packs them.
    #[pyo3(get)]
    served_rows: Vec<u32>,
    /// The row serving each send, in the order the sends were given.
    #[pyo3(get)]
    send_rows: Vec<u32>,
}

#[pyclass(name = "NixlEngine", module = "eplb_xfer._core")]
pub struct PyNixlEngine {
    state: Mutex<State>,
    busy: AtomicBool,
    rank: u32,
    world: u32,
    mode: Mode,
    host: bool,
    layout: RankLayout,
    /// Every registered tensor with the geometry it had at registration:
    /// the weights layer by layer, then the buffer, then the packed layer.
    held: Vec<Held>,
    node_of_rank: Vec<u32>,
    directions: Vec<String>,
    rounds: Vec<u32>,
}

fn parse_mode(mode: &str) -> PyResult<Mode> {
    match mode {
        "zero_copy" => Ok(Mode::ZeroCopy),
        "staged" => Ok(Mode::Staged),
        other => Err(PyValueError::new_err(format!(
            "mode: expected 'zero_copy' or 'staged', got {other:?}"
        ))),
    }
}

fn parse_direction(d: &str) -> PyResult<DirectionChoice> {
    match d {
        "auto" => Ok(DirectionChoice::Auto),
        "read" => Ok(DirectionChoice::Read),
        "write" => Ok(DirectionChoice::Write),
        other => Err(PyValueError::new_err(format!(
            "direction: expected 'auto', 'read' or 'write', got {other:?}"
        ))),
    }
}

fn parse_schedule(s: &str) -> PyResult<Schedule> {
    match s {
        "rounds" => Ok(Schedule::Rounds),
        "all" => Ok(Schedule::All),
        other => Err(PyValueError::new_err(format!(
            "schedule: expected 'rounds' or 'all', got {other:?}"
        ))),
    }
}

/// A positive, finite number of seconds that fits a `Duration`.
pub(crate) fn seconds(name: &str, v: f64, max: f64) -> PyResult<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= max) {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a number of seconds in (0, {max}], got {v}"
        )));
    }
    Duration::try_from_secs_f64(v)
        .map_err(|_| PyValueError::new_err(format!("{name}: {v} seconds is out of range")))
}

fn blame_name(b: Blame) -> &'static str {
    match b {
        Blame::Dead => "dead",
        Blame::Verdict(AbortCode::Checksum) => "checksum",
        Blame::Verdict(AbortCode::Interrupted) => "interrupted",
        Blame::Verdict(AbortCode::Closed) => "closed",
        Blame::Verdict(_) => "failed",
        Blame::Disagreement => "disagreement",
        Blame::Absent => "absent",
        Blame::Stalled(_) => "stalled",
        Blame::Transport => "transport",
    }
}

fn failure_dict<'py>(py: Python<'py>, f: &Failure) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("culprit", f.culprit)?;
    d.set_item("blame", blame_name(f.blame))?;
    d.set_item("detail", &f.detail)?;
    Ok(d)
}

impl PyNixlEngine {
    /// `held` indices of the tensors of weights layer `layer`, or of the
    /// buffer for `None`.
    fn held_of(&self, layer: Option<usize>) -> std::ops::Range<usize> {
        let t = self.layout.n_tensors();
        let at = layer.unwrap_or(self.layout.n_layers()) * t;
        at..at + t
    }

    fn running(&self) -> PyResult<Arc<Transport>> {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            State::Running(t) => {
                if !t.owned_here() {
                    return Err(PyRuntimeError::new_err(
                        "this communicator belongs to the parent process (this is a forked child); create a new one here",
                    ));
                }
                Ok(t.clone())
            }
            State::Closed => Err(PyRuntimeError::new_err("NixlEngine is closed")),
            _ => Err(PyRuntimeError::new_err(
                "NixlEngine is not started (set-up incomplete)",
            )),
        }
    }

    /// Checks that every held tensor of `layer` (all layers if `None`) and
    /// the buffer still have the memory they had when registered: the data
    /// pointer (one call per tensor on the hot path), and the shape once per
    /// rebalance. A tensor given other storage or resized fails here.
    fn check_unchanged(&self, py: Python<'_>, layer: Option<usize>) -> PyResult<()> {
        // The buffer first, then the layer's weights (or everything else).
        let buffer = self.held_of(None);
        let (rest, tail) = match layer {
            Some(l) if l < self.layout.n_layers() => (self.held_of(Some(l)), 0..0),
            Some(_) => (0..0, 0..0),
            None => (0..buffer.start, buffer.end..self.held.len()),
        };
        let idx = buffer.chain(rest).chain(tail);
        let changed = |name: &str| {
            PyValueError::new_err(format!(
                "{name}: was reallocated or resized since this communicator registered it; create a new communicator"
            ))
        };
        for i in idx {
            let (obj, g, name) = &self.held[i];
            let t = obj.bind(py);
            if data_ptr(t)? != g.ptr || (layer.is_none() && size(t)? != g.shape) {
                return Err(changed(name));
            }
        }
        Ok(())
    }

    fn enter(&self) -> PyResult<BusyGuard<'_>> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(PyRuntimeError::new_err(
                "another thread is using this communicator right now; a communicator runs one rebalance (one exchange) at a time",
            ));
        }
        Ok(BusyGuard(&self.busy))
    }

    /// Drives the open exchange to its next reply (see [`wait`]).
    fn run<'py>(&self, py: Python<'py>, t: &Transport) -> PyResult<Bound<'py, PyDict>> {
        let (reply, interrupted) = wait(py, t, self.rank)?;
        self.reply_dict(py, reply, interrupted.is_some())
    }

    fn reply_dict<'py>(
        &self,
        py: Python<'py>,
        reply: Reply,
        interrupted: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("interrupted", interrupted)?;
        match reply {
            Reply::Landed { payloads } => {
                d.set_item("state", "landed")?;
                let items: Vec<Option<Bound<'py, PyBytes>>> = payloads
                    .iter()
                    .map(|p| p.as_ref().map(|b| PyBytes::new(py, b)))
                    .collect();
                d.set_item("payloads", PyList::new(py, items)?)?;
            }
            Reply::Finished {
                label,
                result,
                stats,
            } => {
                d.set_item("label", label)?;
                d.set_item("rows_per_peer", stats.rows_per_peer)?;
                d.set_item("bytes_received", stats.bytes_received)?;
                d.set_item("seconds", stats.seconds)?;
                match result {
                    Ok(pending) => {
                        d.set_item("state", "committed")?;
                        match pending {
                            Some(f) => d.set_item("pending", failure_dict(py, &f)?)?,
                            None => d.set_item("pending", py.None())?,
                        }
                    }
                    Err(f) => {
                        d.set_item("state", "failed")?;
                        d.set_item("failure", failure_dict(py, &f)?)?;
                    }
                }
            }
            Reply::Refused(m) => return Err(PyRuntimeError::new_err(m)),
            Reply::Closed => return Err(PyRuntimeError::new_err("the communicator was closed")),
        }
        Ok(d)
    }

    fn verify_of(&self, verify: &str, payloads: Option<Vec<(u32, Vec<u8>)>>) -> PyResult<Verify> {
        match verify {
            "off" => Ok(Verify::Off),
            "host" if self.host => Ok(Verify::Host),
            "host" => Err(PyValueError::new_err(
                "verify: 'host' needs CPU tensors; pass checksums with verify='caller'",
            )),
            "caller" => Ok(Verify::Caller(payloads.unwrap_or_default())),
            other => Err(PyValueError::new_err(format!(
                "verify: expected 'off', 'host' or 'caller', got {other:?}"
            ))),
        }
    }
}

struct BusyGuard<'a>(&'a AtomicBool);
impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Drives the open exchange on this thread, with the GIL released, in
/// slices of 50 ms, looking for signals between slices. A signal (Ctrl-C)
/// aborts the exchange (peers are told) and driving goes on to the agreed
/// outcome; the caller then raises.
fn wait(py: Python<'_>, t: &Transport, rank: u32) -> PyResult<(Reply, Option<PyErr>)> {
    let mut interrupted: Option<PyErr> = None;
    loop {
        let r = py.allow_threads(|| t.drive(Duration::from_millis(50)));
        match r {
            Ok(Some(Reply::Landed { .. })) if interrupted.is_some() => continue,
            Ok(Some(reply)) => return Ok((reply, interrupted)),
            Ok(None) => {
                if interrupted.is_none() {
                    if let Err(e) = py.check_signals() {
                        let _ = t.abort(AbortCode::Interrupted, rank);
                        interrupted = Some(e);
                    }
                }
            }
            Err(e) => return Err(nixl_err(e)),
        }
    }
}

fn device_of(g: &Geometry, name: &str) -> PyResult<(MemKind, u64)> {
    match &g.device {
        Device::Cpu => Ok((MemKind::Dram, 0)),
        Device::Cuda(i) => Ok((MemKind::Vram, *i)),
        Device::Other(o) => Err(PyValueError::new_err(format!(
            "{name}: tensors on {o} are not supported (cpu or cuda)"
        ))),
    }
}

/// Reads every tensor's geometry and builds this rank's layout (validated,
/// no aliasing), keeping the tensors for later checks.
pub(crate) fn layout_from_tensors(
    weights: &[Vec<Bound<'_, PyAny>>],
    buffer: &[Bound<'_, PyAny>],
    packed: Option<&Bound<'_, PyAny>>,
) -> PyResult<(RankLayout, Vec<Held>, MemKind)> {
    if buffer.is_empty() {
        return Err(PyValueError::new_err(
            "expert_buffer: expected a non-empty list of tensors",
        ));
    }
    let mut held: Vec<Held> = Vec::new();
    fn hold(
        held: &mut Vec<Held>,
        t: &Bound<'_, PyAny>,
        name: String,
    ) -> PyResult<(Geometry, TensorRows)> {
        let g = geometry(t, &name)?;
        if g.requires_grad {
            return Err(PyValueError::new_err(format!(
                "{name}: requires_grad=True; tensors moved in place must not require grad"
            )));
        }
        let rows = g.row_layout(&name)?;
        held.push((t.clone().unbind(), g.clone(), name));
        Ok((g, rows))
    }
    let mut w_rows = Vec::with_capacity(weights.len());
    let mut first: Option<Geometry> = None;
    for (l, layer) in weights.iter().enumerate() {
        let mut v = Vec::with_capacity(layer.len());
        for (t, x) in layer.iter().enumerate() {
            let (g, r) = hold(&mut held, x, format!("expert_weights[{l}][{t}]"))?;
            first.get_or_insert(g);
            v.push(r);
        }
        w_rows.push(v);
    }
    let buffer_at = held.len();
    let mut b_rows = Vec::with_capacity(buffer.len());
    let mut n_local = None;
    for (t, x) in buffer.iter().enumerate() {
        let (g, r) = hold(&mut held, x, format!("expert_buffer[{t}]"))?;
        n_local.get_or_insert(g.rows());
        first.get_or_insert(g);
        b_rows.push(r);
    }
    let packed_layer = match packed {
        Some(p) => {
            let (g, _) = hold(&mut held, p, "staged send layer".into())?;
            let bytes = g
                .contiguous_bytes()
                .ok_or_else(|| PyValueError::new_err("staged send layer: must be contiguous"))?;
            let slot: u64 = b_rows.iter().map(|r| r.row_bytes).sum();
            let n = n_local.unwrap_or(0) as u64;
            if bytes < slot.saturating_mul(n) {
                return Err(PyValueError::new_err(format!(
                    "staged send layer: {bytes} bytes, needs {}",
                    slot.saturating_mul(n)
                )));
            }
            Some(PackedLayer {
                base: g.ptr,
                slot_bytes: slot,
            })
        }
        None => None,
    };
    let first = first.ok_or_else(|| PyValueError::new_err("expert_buffer: empty"))?;
    let (mem, device_id) = device_of(&first, "expert_buffer[0]")?;
    for (_, g, name) in &held {
        let (m, d) = device_of(g, name)?;
        if (m, d) != (mem, device_id) {
            return Err(PyValueError::new_err(format!(
                    "{name}: on {:?}, but expert_buffer[0] is on {:?}; all tensors must share one device",
                    g.device, first.device
                )));
        }
    }
    let n_local = n_local.unwrap_or(0);
    for (_, g, name) in &held[..buffer_at + buffer.len()] {
        if g.rows() != n_local {
            return Err(PyValueError::new_err(format!(
                "{name}: has {} rows, expected n_local={n_local} (like expert_buffer[0])",
                g.rows()
            )));
        }
    }
    let layout = RankLayout {
        n_local,
        device_id,
        weights: w_rows,
        buffer: b_rows,
        packed: packed_layer,
    };
    layout
        .validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    layout
        .check_aliasing()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((layout, held, mem))
}

#[pymethods]
impl PyNixlEngine {
    /// Creates the agent and registers the tensors' memory (each region once).
    #[new]
    #[pyo3(signature = (lib_path, agent_name, rank, world, mode, timeout_s, weights, buffer, packed=None, direction="auto", schedule="rounds"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        lib_path: PathBuf,
        agent_name: &str,
        rank: u32,
        world: u32,
        mode: &str,
        timeout_s: f64,
        weights: Vec<Vec<Bound<'_, PyAny>>>,
        buffer: Vec<Bound<'_, PyAny>>,
        packed: Option<Bound<'_, PyAny>>,
        direction: &str,
        schedule: &str,
    ) -> PyResult<Self> {
        let mode = parse_mode(mode)?;
        let direction = parse_direction(direction)?;
        let schedule = parse_schedule(schedule)?;
        let timeout = seconds("timeout_s", timeout_s, 1e6)?;
        if world == 0 || rank >= world {
            return Err(PyValueError::new_err(format!(
                "rank: {rank} is outside world size {world}"
            )));
        }
        let (layout, held, mem) = layout_from_tensors(&weights, &buffer, packed.as_ref())?;
        let device_id = layout.device_id;
        let cfg = TransportConfig {
            rank,
            world,
            mode,
            mem,
            device_id,
            timeout,
            direction,
            schedule,
        };
        let name = agent_name.to_string();
        let lay = layout.clone();
        let ep = py
            .allow_threads(move || {
                let api = load_api(&lib_path)?;
                Endpoint::new(api, &name, cfg, lay)
            })
            .map_err(nixl_err)?;
        Ok(PyNixlEngine {
            state: Mutex::new(State::Setup(Box::new(ep))),
            busy: AtomicBool::new(false),
            rank,
            world,
            mode,
            host: mem == MemKind::Dram,
            layout,
            held,
            node_of_rank: Vec::new(),
            directions: Vec::new(),
            rounds: Vec::new(),
        })
    }

    /// Bytes to hand every peer.
    fn local_blob<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            State::Setup(ep) => {
                let b = ep.local_blob().map_err(nixl_err)?;
                Ok(PyBytes::new(py, &b))
            }
            _ => Err(PyRuntimeError::new_err("local_blob: set-up already done")),
        }
    }

    /// Loads every rank's blob, agrees on the topology, prepares lists once
    /// and probes every peer. Returns `[(peer, why)]` for failed probes.
    #[pyo3(signature = (blobs, node_of_rank=None))]
    fn connect(
        &mut self,
        py: Python<'_>,
        blobs: Vec<Vec<u8>>,
        node_of_rank: Option<Vec<u32>>,
    ) -> PyResult<Vec<(u32, String)>> {
        if let Some(n) = &node_of_rank {
            if n.len() != self.world as usize {
                return Err(PyValueError::new_err(format!(
                    "node_of_rank: {} entries for {} ranks",
                    n.len(),
                    self.world
                )));
            }
        }
        let ep = {
            let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *g, State::Moved) {
                State::Setup(ep) => ep,
                other => {
                    *g = other;
                    return Err(PyRuntimeError::new_err("connect: already connected"));
                }
            }
        };
        let res = py.allow_threads(|| {
            let mut c = ep.connect(&blobs, node_of_rank.as_deref())?;
            let fails = c.probe();
            Ok::<_, NixlError>((c, fails))
        });
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match res {
            Ok((c, fails)) => {
                let me = self.rank as usize;
                let topo = c.topology();
                self.node_of_rank = topo.node_of_rank.clone();
                self.directions = (0..self.world as usize)
                    .map(|p| {
                        if p == me {
                            "self".to_string()
                        } else {
                            match topo.direction[me][p] {
                                Direction::Read => "read".to_string(),
                                Direction::Write => "write".to_string(),
                            }
                        }
                    })
                    .collect();
                self.rounds = topo.round_of[me].clone();
                *g = State::Connected(Box::new(c));
                Ok(fails)
            }
            Err(e) => {
                *g = State::Closed;
                Err(nixl_err(e))
            }
        }
    }

    /// Starts the worker thread (after every rank's probes passed).
    fn start(&self) -> PyResult<()> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *g, State::Moved) {
            State::Connected(c) => match c.spawn() {
                Ok(t) => {
                    *g = State::Running(Arc::new(t));
                    Ok(())
                }
                Err(e) => {
                    *g = State::Closed;
                    Err(nixl_err(e))
                }
            },
            other => {
                *g = other;
                Err(PyRuntimeError::new_err("start: connect first"))
            }
        }
    }

    /// Node index of every rank (learned at set-up).
    #[getter]
    fn node_of_rank(&self) -> Vec<u32> {
        self.node_of_rank.clone()
    }
    /// Per rank: "read" (this rank READs from it / it READs from us),
    /// "write" (the sender WRITEs), "self".
    #[getter]
    fn directions(&self) -> Vec<String> {
        self.directions.clone()
    }
    /// Per rank: schedule round of transfers with it (0 = no wait).
    #[getter]
    fn rounds(&self) -> Vec<u32> {
        self.rounds.clone()
    }
    #[getter]
    fn n_local(&self) -> usize {
        self.layout.n_local
    }
    #[getter]
    fn num_layers(&self) -> usize {
        self.layout.n_layers()
    }

    /// `ValueError` unless `weights`/`buffer` are exactly the registered
    /// tensors, unchanged.
    fn check_bound(
        &self,
        py: Python<'_>,
        weights: Vec<Vec<Bound<'_, PyAny>>>,
        buffer: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if weights.len() != self.layout.n_layers() {
            return Err(PyValueError::new_err(format!(
                "expert_weights: {} layers, but this communicator registered {}",
                weights.len(),
                self.layout.n_layers()
            )));
        }
        let t = self.layout.n_tensors();
        let check = |got: &[Bound<'_, PyAny>], at: usize, name: &str| -> PyResult<()> {
            if got.len() != t {
                return Err(PyValueError::new_err(format!(
                    "{name}: {} tensors, but this communicator registered {t}",
                    got.len()
                )));
            }
            for (k, (a, (b, _, _))) in got.iter().zip(&self.held[at..at + t]).enumerate() {
                if !a.is(b.bind(py)) {
                    return Err(PyValueError::new_err(format!(
                        "{name}[{k}]: not the tensor this communicator registered; create a new one"
                    )));
                }
            }
            Ok(())
        };
        for (l, layer) in weights.iter().enumerate() {
            check(
                layer,
                self.held_of(Some(l)).start,
                &format!("expert_weights[{l}]"),
            )?;
        }
        check(&buffer, self.held_of(None).start, "expert_buffer")?;
        self.check_unchanged(py, None)
    }

    /// The row `r` such that `tensors[i]` is row `r` of the registered
    /// `what` tensors ("weights" of `layer`, or "buffer"), or `None`.
    #[pyo3(signature = (tensors, what, layer=0))]
    fn row_of(
        &self,
        tensors: Vec<Bound<'_, PyAny>>,
        what: &str,
        layer: usize,
    ) -> PyResult<Option<usize>> {
        let rows: &[TensorRows] = match what {
            "buffer" => &self.layout.buffer,
            "weights" => match self.layout.weights.get(layer) {
                Some(w) => w,
                None => {
                    return Err(PyValueError::new_err(format!(
                        "layer_idx: {layer} outside 0..{}",
                        self.layout.n_layers()
                    )))
                }
            },
            other => {
                return Err(PyValueError::new_err(format!(
                    "what: expected 'weights' or 'buffer', got {other:?}"
                )))
            }
        };
        if tensors.len() != rows.len() {
            return Ok(None);
        }
        let mut found: Option<usize> = None;
        for (i, (t, r)) in tensors.iter().zip(rows).enumerate() {
            let g = geometry(t, &format!("tensors[{i}]"))?;
            let bytes = g.contiguous_bytes();
            if bytes != Some(r.row_bytes) || g.ptr < r.base {
                return Ok(None);
            }
            let off = g.ptr - r.base;
            if off % r.row_stride != 0 {
                return Ok(None);
            }
            let row = (off / r.row_stride) as usize;
            if row >= self.layout.n_local || found.is_some_and(|f| f != row) {
                return Ok(None);
            }
            found = Some(row);
        }
        Ok(found)
    }

    /// Maps one layer's `(expert, src_rank, dst_row)` receives and
    /// `(expert, dst_rank)` sends to rows, using `old_row` (int64 `[P]`):
    /// a source serves the first of its rows holding the expert.
    fn map_experts(
        &self,
        layer_idx: usize,
        old_row: &[u8],
        recvs: Vec<(i64, u32, u32)>,
        sends: Vec<(i64, u32)>,
    ) -> PyResult<PyMappedLayer> {
        let n = self.layout.n_local;
        let p = n * self.world as usize;
        let old = read_i64s("old_indices", old_row, p)?;
        let label = u32::try_from(layer_idx)
            .map_err(|_| PyValueError::new_err(format!("layer_idx: {layer_idx} is too large")))?;
        if layer_idx >= self.layout.n_layers() {
            return Err(PyValueError::new_err(format!(
                "layer_idx: {layer_idx} outside 0..{}",
                self.layout.n_layers()
            )));
        }
        let first_row = |rank: u32, expert: i64, what: &str| -> PyResult<u32> {
            let seg = &old[rank as usize * n..(rank as usize + 1) * n];
            seg.iter()
                .position(|&e| e == expert)
                .map(|r| r as u32)
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "expert_id: {expert} is not held by rank {rank} in old_indices ({what})"
                    ))
                })
        };
        let mut rv = Vec::with_capacity(recvs.len());
        let mut dst_seen = vec![false; n];
        for (expert, src, dst) in recvs {
            if src >= self.world || src == self.rank {
                return Err(PyValueError::new_err(format!(
                    "src_rank: {src} is not a peer of rank {} (world {})",
                    self.rank, self.world
                )));
            }
            if dst as usize >= n || std::mem::replace(&mut dst_seen[dst as usize], true) {
                return Err(PyValueError::new_err(format!(
                    "tensors: buffer row {dst} is outside 0..{n} or receives twice"
                )));
            }
            rv.push((src, first_row(src, expert, "add_recv")?, dst));
        }
        let mut sv = Vec::with_capacity(sends.len());
        let mut send_rows = Vec::with_capacity(sends.len());
        let mut served: Vec<u32> = Vec::new();
        for (expert, dst) in sends {
            if dst >= self.world || dst == self.rank {
                return Err(PyValueError::new_err(format!(
                    "dst_rank: {dst} is not a peer of rank {} (world {})",
                    self.rank, self.world
                )));
            }
            let row = first_row(self.rank, expert, "add_send")?;
            sv.push((dst, row));
            send_rows.push(row);
            if !served.contains(&row) {
                served.push(row);
            }
        }
        rv.sort_unstable();
        sv.sort_unstable();
        let mut fp = crate::checksum::mix(0x564C_4C4D, layer_idx as u64);
        for &v in &old {
            fp = crate::checksum::mix(fp, v as u64);
        }
        Ok(PyMappedLayer {
            label,
            fingerprint: fp,
            recvs: rv,
            sends: sv,
            served_rows: served,
            send_rows,
        })
    }

    /// Runs this rank's part of `layer` of `plan`. `host`: the worker also
    /// does the layer's row copies (CPU tensors): local copies and staged
    /// packing before, duplicate fills and the commit after. `verify`:
    /// "off", "host" (the worker checksums host rows) or "caller" (READY
    /// carries `payloads`; a "landed" result asks for `done` or
    /// `abort_verdict`).
    #[pyo3(signature = (plan, layer, host, verify="off", payloads=None))]
    fn exchange_plan<'py>(
        &self,
        py: Python<'py>,
        plan: &PyTransferPlan,
        layer: usize,
        host: bool,
        verify: &str,
        payloads: Option<Vec<(u32, Vec<u8>)>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let t = self.running()?;
        let _busy = self.enter()?;
        let p = &plan.inner;
        if p.ep_size != self.world as usize || p.n_local != self.layout.n_local {
            return Err(PyValueError::new_err(format!(
                "plan: made for {} ranks x {} rows, but this communicator has {} x {}",
                p.ep_size, p.n_local, self.world, self.layout.n_local
            )));
        }
        if self.mode == Mode::ZeroCopy && p.num_layers != self.layout.n_layers() {
            return Err(PyValueError::new_err(format!(
                "plan: has {} layers, but this communicator registered {}",
                p.num_layers,
                self.layout.n_layers()
            )));
        }
        let rl = p.rank_layer(layer, self.rank as usize).map_err(plan_err)?;
        if host && !self.host {
            return Err(PyValueError::new_err(
                "host: the tensors are not on the CPU",
            ));
        }
        let verify = self.verify_of(verify, payloads)?;
        self.check_unchanged(py, Some(layer))?;
        let sends: Vec<(u32, u32)> = rl
            .sends
            .iter()
            .flat_map(|s| s.readers.iter().map(move |&r| (r, s.src_row)))
            .collect();
        let spec = ExchangeSpec {
            label: u32::try_from(layer).unwrap_or(u32::MAX),
            fingerprint: layer_fingerprint(p.fingerprint, layer),
            recvs: rl
                .recvs
                .iter()
                .map(|r| (r.src_rank, r.src_row, r.dst_row))
                .collect(),
            sends,
            payloads: Vec::new(),
            hold_done: false,
        };
        let host_ops = host.then(|| HostOps {
            local: rl
                .local_copies
                .iter()
                .map(|c| (c.src_row, c.dst_row))
                .collect(),
            pack: if self.mode == Mode::Staged {
                rl.sends.iter().map(|s| s.src_row).collect()
            } else {
                Vec::new()
            },
            dups: rl
                .dup_fills
                .iter()
                .map(|d| (d.src_row, d.dst_row))
                .collect(),
            commit: rl.changed_rows(),
        });
        let job = Job {
            spec,
            layer: Some(layer),
            host: host_ops,
            verify,
        };
        py.allow_threads(|| t.submit(job)).map_err(nixl_err)?;
        self.run(py, &t)
    }

    /// Runs a layer mapped by `map_experts` (vLLM's call style).
    #[pyo3(signature = (mapped, verify="off", payloads=None))]
    fn exchange_mapped<'py>(
        &self,
        py: Python<'py>,
        mapped: &PyMappedLayer,
        verify: &str,
        payloads: Option<Vec<(u32, Vec<u8>)>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let t = self.running()?;
        let _busy = self.enter()?;
        let verify = self.verify_of(verify, payloads)?;
        let layer = mapped.label as usize;
        self.check_unchanged(py, Some(layer))?;
        // Staged packing is the caller's (torch copies of the add_send rows).
        let job = Job {
            spec: ExchangeSpec {
                label: mapped.label,
                fingerprint: mapped.fingerprint,
                recvs: mapped.recvs.clone(),
                sends: mapped.sends.clone(),
                payloads: Vec::new(),
                hold_done: false,
            },
            layer: Some(layer),
            host: None,
            verify,
        };
        py.allow_threads(|| t.submit(job)).map_err(nixl_err)?;
        self.run(py, &t)
    }

    /// An exchange without transfers: the opening handshake of a rebalance
    /// (`fingerprint` = the plan's: ranks that planned differently fail
    /// before anything moves) or its closing one.
    #[pyo3(signature = (label, fingerprint=None))]
    fn barrier<'py>(
        &self,
        py: Python<'py>,
        label: u32,
        fingerprint: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let t = self.running()?;
        let _busy = self.enter()?;
        let job = Job {
            spec: ExchangeSpec {
                label,
                fingerprint: crate::checksum::mix(
                    0x4241_5252 ^ fingerprint.unwrap_or(0),
                    u64::from(label),
                ),
                ..Default::default()
            },
            layer: None,
            host: None,
            verify: Verify::Off,
        };
        py.allow_threads(|| t.submit(job)).map_err(nixl_err)?;
        self.run(py, &t)
    }

    /// After a "landed" result: the data verified; say DONE and wait.
    fn done<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = self.running()?;
        let _busy = self.enter()?;
        py.allow_threads(|| t.done()).map_err(nixl_err)?;
        self.run(py, &t)
    }

    /// After a "landed" result: data from `culprit` failed verification.
    /// Peers are told; waits for the agreed outcome.
    fn abort_verdict<'py>(&self, py: Python<'py>, culprit: u32) -> PyResult<Bound<'py, PyDict>> {
        let t = self.running()?;
        let _busy = self.enter()?;
        if culprit >= self.world {
            return Err(PyValueError::new_err(format!(
                "culprit: {culprit} outside 0..{}",
                self.world
            )));
        }
        t.abort(AbortCode::Checksum, culprit).map_err(nixl_err)?;
        self.run(py, &t)
    }

    /// This rank failed after validation (`why`: "error" or "interrupted"):
    /// peers are told at once, without waiting. The open exchange (or the
    /// next one) fails on every rank.
    fn abort_local(&self, why: &str) -> PyResult<()> {
        let code = match why {
            "error" => AbortCode::LocalError,
            "interrupted" => AbortCode::Interrupted,
            other => {
                return Err(PyValueError::new_err(format!(
                    "why: expected 'error' or 'interrupted', got {other:?}"
                )))
            }
        };
        match self.running() {
            Ok(t) => t.abort(code, self.rank).map_err(nixl_err),
            Err(_) => Ok(()),
        }
    }

    /// Handle and message counters; never waits for a running exchange.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = self.running()?;
        let c = t.counters();
        let d = PyDict::new(py);
        d.set_item("exchanges", c.exchanges)?;
        d.set_item("prepared_lists_live", c.prepared_lists_live)?;
        d.set_item("requests_created", c.requests_created)?;
        d.set_item("requests_live", c.requests_live)?;
        d.set_item("notifications_sent", c.notifications_sent)?;
        d.set_item("notifications_received", c.notifications_received)?;
        d.set_item("buffered", c.buffered)?;
        d.set_item("ignored_messages", c.ignored_messages)?;
        d.set_item("failed_peers", c.failed_peers)?;
        Ok(d)
    }

    /// Says goodbye (waiting at most `linger_s` for live peers to confirm
    /// they got everything), then releases the agent. Idempotent; from
    /// another thread it aborts a running exchange first.
    #[pyo3(signature = (linger_s=0.5))]
    fn close(&self, py: Python<'_>, linger_s: f64) -> PyResult<()> {
        let linger = if linger_s == 0.0 {
            Duration::ZERO
        } else {
            seconds("linger_s", linger_s, 600.0)?
        };
        let taken = {
            let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *g, State::Closed)
        };
        match taken {
            State::Running(t) => py.allow_threads(move || {
                t.close(linger);
                drop(t);
            }),
            State::Setup(ep) => py.allow_threads(move || drop(ep)),
            State::Connected(c) => py.allow_threads(move || drop(c)),
            State::Closed | State::Moved => {}
        }
        Ok(())
    }
}

/// Checks that `weights`/`buffer` can be moved by any backend: rows are
/// contiguous, every layer matches the buffer, one device, and no two
/// rows (of any layer, tensor or the buffer) share memory.
#[pyfunction]
pub fn check_layout(
    weights: Vec<Vec<Bound<'_, PyAny>>>,
    buffer: Vec<Bound<'_, PyAny>>,
) -> PyResult<()> {
    layout_from_tensors(&weights, &buffer, None).map(|_| ())
}
