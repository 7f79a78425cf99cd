//! The only file that knows PyO3: converts types and errors at the edge.

mod policy;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::descriptors::{Mode, PeerRead};
use crate::layout::{PackedLayer, RankLayout, TensorRows};
use crate::nixl::agent::MemKind;
use crate::nixl::engine::{Engine, EngineConfig, EngineCounters, ExchangeStats};
use crate::nixl::{load_api, NixlError};
use crate::plan::{self, PlanError};

create_exception!(
    _core,
    NixlUnavailable,
    PyRuntimeError,
    "NIXL's C API library could not be loaded."
);
create_exception!(
    _core,
    PeerTransferError,
    PyRuntimeError,
    "A peer failed or timed out during a layer exchange; args are (message, peer, layer)."
);

fn plan_err(e: PlanError) -> PyErr {
    match e {
        PlanError::OutOfRange { .. } => pyo3::exceptions::PyIndexError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

fn nixl_err(e: NixlError) -> PyErr {
    match &e {
        NixlError::Load { .. } => NixlUnavailable::new_err(e.to_string()),
        NixlError::Input(_) | NixlError::Layout(_) => PyValueError::new_err(e.to_string()),
        NixlError::Timeout { peer, layer, .. } | NixlError::PeerFailed { peer, layer, .. } => {
            PeerTransferError::new_err((e.to_string(), *peer, *layer))
        }
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

fn read_i64s(name: &str, b: &[u8], expected: usize) -> PyResult<Vec<i64>> {
    if b.len() != expected * 8 {
        return Err(PyValueError::new_err(format!(
            "{name}: got {} bytes, expected {} (int64 [layers, slots])",
            b.len(),
            expected * 8
        )));
    }
    Ok(b.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            i64::from_le_bytes(a)
        })
        .collect())
}

/// The per-rank, per-layer transfer plan (computed once, in Rust).
#[pyclass(name = "TransferPlan", module = "eplb_xfer._core", frozen)]
pub struct PyTransferPlan {
    pub inner: plan::TransferPlan,
}

impl PyTransferPlan {
    fn rl(&self, layer: usize, rank: usize) -> PyResult<&plan::RankLayerPlan> {
        self.inner.rank_layer(layer, rank).map_err(plan_err)
    }
}

#[pymethods]
impl PyTransferPlan {
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers
    }
    #[getter]
    fn num_slots(&self) -> usize {
        self.inner.num_slots
    }
    #[getter]
    fn ep_size(&self) -> usize {
        self.inner.ep_size
    }
    #[getter]
    fn n_local(&self) -> usize {
        self.inner.n_local
    }
    /// Rows whose expert stays: `list[int]`.
    fn unchanged(&self, layer: usize, rank: usize) -> PyResult<Vec<u32>> {
        Ok(self.rl(layer, rank)?.unchanged.clone())
    }
    /// `list[(expert, src_row, dst_row)]` copied from this rank's own rows.
    fn local_copies(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, u32)>> {
        Ok(self
            .rl(layer, rank)?
            .local_copies
            .iter()
            .map(|c| (c.expert, c.src_row, c.dst_row))
            .collect())
    }
    /// `list[(expert, src_rank, src_row, dst_row)]` received from peers.
    fn recvs(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, u32, u32)>> {
        Ok(self
            .rl(layer, rank)?
            .recvs
            .iter()
            .map(|r| (r.expert, r.src_rank, r.src_row, r.dst_row))
            .collect())
    }
    /// `list[(expert, src_row, dst_row)]` filled from a received primary row.
    fn dup_fills(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, u32)>> {
        Ok(self
            .rl(layer, rank)?
            .dup_fills
            .iter()
            .map(|d| (d.expert, d.src_row, d.dst_row))
            .collect())
    }
    /// `list[(expert, src_row, readers)]`: each expert row served once.
    fn sends(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, Vec<u32>)>> {
        Ok(self
            .rl(layer, rank)?
            .sends
            .iter()
            .map(|s| (s.expert, s.src_row, s.readers.clone()))
            .collect())
    }
    /// Changed rows merged into `(start, length)` runs, for the commit copy.
    fn changed_runs(&self, layer: usize, rank: usize) -> PyResult<Vec<(u32, u32)>> {
        Ok(self.rl(layer, rank)?.changed_runs())
    }
    /// True if any rank changes any row in `layer` (every rank agrees).
    fn layer_moves(&self, layer: usize) -> PyResult<bool> {
        let l = self.inner.layers.get(layer).ok_or_else(|| {
            pyo3::exceptions::PyIndexError::new_err(format!(
                "layer {layer} outside 0..{}",
                self.inner.num_layers
            ))
        })?;
        Ok(l.ranks
            .iter()
            .any(|r| !r.local_copies.is_empty() || !r.recvs.is_empty() || !r.dup_fills.is_empty()))
    }
    /// Totals over all layers and ranks.
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("num_layers", self.inner.num_layers)?;
        d.set_item("num_slots", self.inner.num_slots)?;
        d.set_item("ep_size", self.inner.ep_size)?;
        d.set_item("recvs", self.inner.total_recvs())?;
        d.set_item("local_copies", self.inner.total_local_copies())?;
        d.set_item("dup_fills", self.inner.total_dup_fills())?;
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!(
            "TransferPlan(layers={}, slots={}, ep_size={}, recvs={}, local_copies={}, dup_fills={})",
            self.inner.num_layers,
            self.inner.num_slots,
            self.inner.ep_size,
            self.inner.total_recvs(),
            self.inner.total_local_copies(),
            self.inner.total_dup_fills()
        )
    }
}

/// Plans a rebalance from little-endian int64 `[num_layers, num_slots]` bytes.
#[pyfunction]
#[pyo3(signature = (old, new, num_layers, num_slots, ep_size, node_of_rank=None))]
fn plan_rebalance_bytes(
    py: Python<'_>,
    old: &[u8],
    new: &[u8],
    num_layers: usize,
    num_slots: usize,
    ep_size: usize,
    node_of_rank: Option<Vec<usize>>,
) -> PyResult<PyTransferPlan> {
    let n = num_layers
        .checked_mul(num_slots)
        .ok_or_else(|| PyValueError::new_err("num_layers * num_slots overflows"))?;
    let old = read_i64s("old_indices", old, n)?;
    let new = read_i64s("new_indices", new, n)?;
    let inner = py
        .allow_threads(|| {
            plan::plan_rebalance(
                &old,
                &new,
                num_layers,
                num_slots,
                ep_size,
                node_of_rank.as_deref(),
            )
        })
        .map_err(plan_err)?;
    Ok(PyTransferPlan { inner })
}

type RowsTuple = (u64, u64, u64);

fn rows(t: RowsTuple) -> TensorRows {
    TensorRows {
        base: t.0,
        row_stride: t.1,
        row_bytes: t.2,
    }
}

/// One rank's NIXL endpoint: agent, registrations, prepared lists, protocol.
#[pyclass(name = "NixlEngine", module = "eplb_xfer._core")]
pub struct PyNixlEngine {
    inner: Mutex<Option<Engine>>,
    rank: u32,
}

fn stats_dict<'py>(py: Python<'py>, s: &ExchangeStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rows_per_peer", s.rows_per_peer.clone())?;
    d.set_item("bytes_read", s.bytes_read)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

impl PyNixlEngine {
    fn with<R>(&self, f: impl FnOnce(&mut Engine) -> Result<R, NixlError>) -> PyResult<R> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("NixlEngine lock poisoned"))?;
        let eng = guard
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("NixlEngine is closed"))?;
        f(eng).map_err(nixl_err)
    }
}

#[pymethods]
impl PyNixlEngine {
    /// Creates the agent and registers `regions` (`list[(addr, nbytes)]`).
    ///
    /// `weights[layer][tensor]` and `buffer[tensor]` are `(base, row_stride, row_bytes)`;
    /// `packed` is `(base, slot_bytes)` in staged mode.
    #[new]
    #[pyo3(signature = (lib_path, agent_name, rank, world, mode, device, device_id, timeout_s, n_local, weights, buffer, packed, regions))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        lib_path: PathBuf,
        agent_name: &str,
        rank: u32,
        world: u32,
        mode: &str,
        device: &str,
        device_id: u64,
        timeout_s: f64,
        n_local: usize,
        weights: Vec<Vec<RowsTuple>>,
        buffer: Vec<RowsTuple>,
        packed: Option<(u64, u64)>,
        regions: Vec<(u64, u64)>,
    ) -> PyResult<Self> {
        let mode = match mode {
            "zero_copy" => Mode::ZeroCopy,
            "staged" => Mode::Staged,
            other => {
                return Err(PyValueError::new_err(format!(
                    "mode: expected 'zero_copy' or 'staged', got {other:?}"
                )))
            }
        };
        let mem = match device {
            "cpu" => MemKind::Dram,
            "cuda" => MemKind::Vram,
            other => {
                return Err(PyTypeError::new_err(format!(
                    "device: expected 'cpu' or 'cuda', got {other:?}"
                )))
            }
        };
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            return Err(PyValueError::new_err(format!(
                "timeout_s: expected a positive number of seconds, got {timeout_s}"
            )));
        }
        let layout = RankLayout {
            n_local,
            device_id,
            weights: weights
                .into_iter()
                .map(|l| l.into_iter().map(rows).collect())
                .collect(),
            buffer: buffer.into_iter().map(rows).collect(),
            packed: packed.map(|(base, slot_bytes)| PackedLayer { base, slot_bytes }),
        };
        let progress_thread =
            std::env::var("EPLB_XFER_NIXL_PROGRESS_THREAD").is_ok_and(|v| v == "1");
        let cfg = EngineConfig {
            rank,
            world,
            mode,
            mem,
            device_id,
            timeout: Duration::from_secs_f64(timeout_s),
            progress_thread,
        };
        let name = agent_name.to_string();
        let engine = py.allow_threads(move || {
            let api = load_api(&lib_path)?;
            Engine::new(api, &name, cfg, layout, &regions)
        });
        Ok(PyNixlEngine {
            inner: Mutex::new(Some(engine.map_err(nixl_err)?)),
            rank,
        })
    }

    /// Bytes to hand every peer (agent name, NIXL metadata, layout).
    fn local_blob<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.with(|e| e.local_blob())?;
        Ok(PyBytes::new(py, &b))
    }

    /// Loads all ranks' blobs (index = rank) and prepares descriptor lists once.
    fn connect(&self, py: Python<'_>, blobs: Vec<Vec<u8>>) -> PyResult<()> {
        py.allow_threads(|| self.with(|e| e.connect(&blobs)))
    }

    /// Runs this rank's part of `layer` of `plan`; returns stats.
    fn exchange_plan<'py>(
        &self,
        py: Python<'py>,
        plan: &PyTransferPlan,
        layer: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let rl = plan
            .inner
            .rank_layer(layer, self.rank as usize)
            .map_err(plan_err)?;
        let s = py.allow_threads(|| {
            self.with(|e| {
                let reads = e.space().select_for_plan(layer, rl);
                e.exchange(layer, reads)
            })
        })?;
        stats_dict(py, &s)
    }

    /// Runs one exchange for explicit reads `list[(src_rank, src_row, dst_row)]`.
    fn exchange_reads<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        reads: Vec<(u32, u32, u32)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = py.allow_threads(|| {
            self.with(|e| {
                let reads = explicit_reads(e, layer, reads)?;
                e.exchange(layer, reads)
            })
        })?;
        stats_dict(py, &s)
    }

    /// First half of `layer` of `plan`: READY (with `ready_payload`), reads;
    /// returns every source's READY payload (`None` for other ranks) once all
    /// reads completed. Call `end` (commit-safe on success) or `abort` next.
    fn begin_plan<'py>(
        &self,
        py: Python<'py>,
        plan: &PyTransferPlan,
        layer: usize,
        ready_payload: Vec<u8>,
    ) -> PyResult<Bound<'py, PyList>> {
        let rl = plan
            .inner
            .rank_layer(layer, self.rank as usize)
            .map_err(plan_err)?;
        let payloads = py.allow_threads(|| {
            self.with(|e| {
                let reads = e.space().select_for_plan(layer, rl);
                e.begin(layer, reads, &ready_payload, true)
            })
        })?;
        payload_list(py, &payloads)
    }

    /// Like `begin_plan`, for explicit `(src_rank, src_row, dst_row)` reads.
    fn begin_reads<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        reads: Vec<(u32, u32, u32)>,
        ready_payload: Vec<u8>,
    ) -> PyResult<Bound<'py, PyList>> {
        let payloads = py.allow_threads(|| {
            self.with(|e| {
                let reads = explicit_reads(e, layer, reads)?;
                e.begin(layer, reads, &ready_payload, true)
            })
        })?;
        payload_list(py, &payloads)
    }

    /// Second half of the open exchange: DONE, then wait for every peer's.
    fn end<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.allow_threads(|| self.with(|e| e.end()))?;
        stats_dict(py, &s)
    }

    /// Abandons the open exchange blaming `culprit`; always raises
    /// `PeerTransferError` (peers are told at once).
    fn abort(&self, py: Python<'_>, culprit: u32, reason: String) -> PyResult<()> {
        let err = py.allow_threads(|| self.with(|e| Ok(e.abort(culprit, reason))))?;
        Err(nixl_err(err))
    }

    /// End-of-rebalance handshake (an exchange without reads); `label` is the
    /// layer number reported if a peer fails in it.
    fn barrier(&self, py: Python<'_>, label: usize) -> PyResult<()> {
        py.allow_threads(|| self.with(|e| e.barrier(label)))
    }

    /// Handle and message counters (see `EngineCounters`).
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c: EngineCounters = self.with(|e| Ok(e.counters()))?;
        let d = PyDict::new(py);
        d.set_item("exchanges", c.exchanges)?;
        d.set_item("prepared_lists_built", c.prepared_lists_built)?;
        d.set_item("prepared_lists_live", c.prepared_lists_live)?;
        d.set_item("requests_created", c.requests_created)?;
        d.set_item("requests_live", c.requests_live)?;
        d.set_item("notifications_sent", c.notifications_sent)?;
        d.set_item("notifications_received", c.notifications_received)?;
        d.set_item("inbox_entries", c.inbox_entries)?;
        d.set_item("failed_peers", c.failed_peers)?;
        Ok(d)
    }

    /// How many prepared descriptor lists this engine has built (set-up only).
    #[getter]
    fn prepared_lists_built(&self) -> PyResult<u64> {
        self.with(|e| Ok(e.prepared_lists_built()))
    }

    /// Exchanges run so far.
    #[getter]
    fn exchanges(&self) -> PyResult<u64> {
        self.with(|e| Ok(e.seq()))
    }

    /// Says goodbye to peers (waiting at most `linger_s` for theirs), then
    /// releases the agent and its registrations. Idempotent.
    #[pyo3(signature = (linger_s=5.0))]
    fn close(&self, py: Python<'_>, linger_s: f64) -> PyResult<()> {
        let linger = Duration::from_secs_f64(if linger_s.is_finite() && linger_s > 0.0 {
            linger_s
        } else {
            0.0
        });
        let taken = {
            let mut g = self
                .inner
                .lock()
                .map_err(|_| PyRuntimeError::new_err("NixlEngine lock poisoned"))?;
            g.take()
        };
        if let Some(mut e) = taken {
            py.allow_threads(move || {
                e.close(linger);
                drop(e);
            });
        }
        Ok(())
    }
}

/// READY payloads by rank as `list[bytes | None]`.
fn payload_list<'py>(
    py: Python<'py>,
    payloads: &[Option<Vec<u8>>],
) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<Option<Bound<'py, PyBytes>>> = payloads
        .iter()
        .map(|p| p.as_ref().map(|b| PyBytes::new(py, b)))
        .collect();
    PyList::new(py, items)
}

/// Checks explicit `(src_rank, src_row, dst_row)` reads and turns them into
/// descriptor selections.
fn explicit_reads(
    e: &Engine,
    layer: usize,
    reads: Vec<(u32, u32, u32)>,
) -> Result<Vec<PeerRead>, NixlError> {
    let n_local = e.layout().n_local as u32;
    if let Some(&(_, s, d)) = reads
        .iter()
        .find(|&&(_, s, d)| s >= n_local || d >= n_local)
    {
        return Err(NixlError::Input(format!(
            "row ({s} -> {d}) is outside 0..{n_local}"
        )));
    }
    let mut sorted = reads;
    sorted.sort_by_key(|r| r.0);
    Ok(e.space().select(layer, sorted))
}

/// `verify=True` checksums of host experts, each given as its rows
/// `list[(addr, nbytes)]` (see `crate::checksum`).
#[pyfunction]
fn host_expert_checksums(py: Python<'_>, experts: Vec<Vec<(u64, u64)>>) -> PyResult<Vec<u64>> {
    if let Some(&(addr, n)) = experts.iter().flatten().find(|&&(addr, n)| {
        addr == 0 || usize::try_from(n).is_err() || addr.checked_add(n).is_none()
    }) {
        return Err(PyValueError::new_err(format!(
            "experts: invalid row (address {addr:#x}, {n} bytes)"
        )));
    }
    // SAFETY: the Python caller passes rows of live CPU tensors it holds for
    // the duration of the call; they are only read.
    Ok(py.allow_threads(|| {
        experts
            .iter()
            .map(|rows| {
                crate::checksum::expert_checksum(rows.iter().map(|&(addr, n)| unsafe {
                    std::slice::from_raw_parts(addr as *const u8, n as usize)
                }))
            })
            .collect()
    }))
}

/// NIXL agents alive in this process (0 once every communicator is closed).
#[pyfunction]
fn live_agents() -> u64 {
    crate::nixl::agent::live_agents()
}

/// Copies rows between host tensors described by `(base, row_stride, row_bytes)`
/// layouts: row `s` -> row `d` of every tensor, for each `(s, d)`. Validates
/// everything before the first byte moves.
#[pyfunction]
fn host_copy_rows(
    py: Python<'_>,
    dst: Vec<RowsTuple>,
    src: Vec<RowsTuple>,
    n_rows: u32,
    pairs: Vec<(u32, u32)>,
) -> PyResult<()> {
    let dst: Vec<TensorRows> = dst.into_iter().map(rows).collect();
    let src: Vec<TensorRows> = src.into_iter().map(rows).collect();
    crate::host_copy::validate(&dst, &src, n_rows, &pairs)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    // SAFETY: the Python caller passes layouts of live CPU tensors it holds
    // references to for the duration of the call; rows were validated above.
    py.allow_threads(|| unsafe { crate::host_copy::copy_rows(&dst, &src, &pairs) });
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTransferPlan>()?;
    m.add_class::<PyNixlEngine>()?;
    m.add_function(wrap_pyfunction!(plan_rebalance_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(host_copy_rows, m)?)?;
    m.add_function(wrap_pyfunction!(live_agents, m)?)?;
    m.add_function(wrap_pyfunction!(host_expert_checksums, m)?)?;
    m.add("NixlUnavailable", m.py().get_type::<NixlUnavailable>())?;
    m.add("PeerTransferError", m.py().get_type::<PeerTransferError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    policy::register(m)?;
    Ok(())
}
