//! `TransferPlan` and `plan_rebalance_bytes`.

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::plan::{self, PlanError};

pub(crate) fn plan_err(e: PlanError) -> PyErr {
    match e {
        PlanError::OutOfRange { .. } => PyIndexError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

pub(crate) fn read_i64s(name: &str, b: &[u8], expected: usize) -> PyResult<Vec<i64>> {
    if b.len() != expected.saturating_mul(8) {
        return Err(PyValueError::new_err(format!(
            "{name}: got {} bytes, expected {} (int64 values)",
            b.len(),
            expected.saturating_mul(8)
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
    /// Hash of the plan's inputs (equal on ranks that planned the same).
    #[getter]
    fn fingerprint(&self) -> u64 {
        self.inner.fingerprint
    }
    fn unchanged(&self, layer: usize, rank: usize) -> PyResult<Vec<u32>> {
        Ok(self.rl(layer, rank)?.unchanged.clone())
    }
    fn local_copies(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, u32)>> {
        Ok(self
            .rl(layer, rank)?
            .local_copies
            .iter()
            .map(|c| (c.expert, c.src_row, c.dst_row))
            .collect())
    }
    fn recvs(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, u32, u32)>> {
        Ok(self
            .rl(layer, rank)?
            .recvs
            .iter()
            .map(|r| (r.expert, r.src_rank, r.src_row, r.dst_row))
            .collect())
    }
    fn dup_fills(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, u32)>> {
        Ok(self
            .rl(layer, rank)?
            .dup_fills
            .iter()
            .map(|d| (d.expert, d.src_row, d.dst_row))
            .collect())
    }
    fn sends(&self, layer: usize, rank: usize) -> PyResult<Vec<(i64, u32, Vec<u32>)>> {
        Ok(self
            .rl(layer, rank)?
            .sends
            .iter()
            .map(|s| (s.expert, s.src_row, s.readers.clone()))
            .collect())
    }
    fn changed_runs(&self, layer: usize, rank: usize) -> PyResult<Vec<(u32, u32)>> {
        Ok(self.rl(layer, rank)?.changed_runs())
    }
    fn layer_moves(&self, layer: usize) -> PyResult<bool> {
        self.moving_layers().get(layer).copied().ok_or_else(|| {
            PyIndexError::new_err(format!(
                "layer {layer} outside 0..{}",
                self.inner.num_layers
            ))
        })
    }
    /// `layer_moves` of every layer, in one call.
    fn moving_layers(&self) -> Vec<bool> {
        self.inner
            .layers
            .iter()
            .map(|l| {
                l.ranks.iter().any(|r| {
                    !r.local_copies.is_empty() || !r.recvs.is_empty() || !r.dup_fills.is_empty()
                })
            })
            .collect()
    }
    /// Per layer, the rows `rank` fills by a local copy or a duplicate fill.
    fn local_rows(&self, rank: usize) -> PyResult<Vec<usize>> {
        (0..self.inner.num_layers)
            .map(|l| {
                let r = self.rl(l, rank)?;
                Ok(r.local_copies.len() + r.dup_fills.len())
            })
            .collect()
    }
    /// Bytes each rank receives from other nodes over all layers, given a
    /// node id per rank and the bytes of one expert.
    fn cross_node_rows(&self, node_of_rank: Vec<u32>) -> PyResult<u64> {
        if node_of_rank.len() != self.inner.ep_size {
            return Err(PyValueError::new_err(format!(
                "node_of_rank: {} entries for {} ranks",
                node_of_rank.len(),
                self.inner.ep_size
            )));
        }
        let mut n = 0u64;
        for l in &self.inner.layers {
            for (rank, r) in l.ranks.iter().enumerate() {
                n += r
                    .recvs
                    .iter()
                    .filter(|x| node_of_rank[x.src_rank as usize] != node_of_rank[rank])
                    .count() as u64;
            }
        }
        Ok(n)
    }
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
pub fn plan_rebalance_bytes(
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
