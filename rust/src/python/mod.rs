//! The only file that knows PyO3: converts types and errors at the edge.

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

mod engine;
mod plan;
mod policy;
mod tensors;

use crate::layout::TensorRows;
use crate::nixl::NixlError;

create_exception!(
    _core,
    NixlUnavailable,
    PyRuntimeError,
    "NIXL's C API library could not be loaded."
);

pub(crate) fn nixl_err(e: NixlError) -> PyErr {
    match &e {
        NixlError::Load { .. } => NixlUnavailable::new_err(e.to_string()),
        NixlError::Input(_) | NixlError::Layout(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// NIXL agents alive in this process (0 once every communicator is closed).
#[pyfunction]
fn live_agents() -> u64 {
    crate::nixl::agent::live_agents()
}

/// Copies row `s` of every tensor of `src` to row `d` of the matching tensor
/// of `dst`, for each `(s, d)` in `pairs` (CPU tensors, rows along dim 0).
/// Everything is checked before the first byte moves.
#[pyfunction]
fn copy_rows(
    py: Python<'_>,
    dst: Vec<Bound<'_, PyAny>>,
    src: Vec<Bound<'_, PyAny>>,
    pairs: Vec<(u32, u32)>,
) -> PyResult<()> {
    let d = tensors::row_layouts(&dst, "dst", true)?;
    let s = tensors::row_layouts(&src, "src", true)?;
    let n = d.iter().chain(&s).map(|(g, _)| g.rows()).min().unwrap_or(0);
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    let dr: Vec<TensorRows> = d.iter().map(|(_, r)| *r).collect();
    let sr: Vec<TensorRows> = s.iter().map(|(_, r)| *r).collect();
    crate::host_copy::validate(&dr, &sr, n, &pairs)
        .map_err(|e| PyValueError::new_err(format!("pairs: {e}")))?;
    // The tensor objects are held for the whole call; their geometry was
    // read from them above and every row checked against it.
    py.allow_threads(|| {
        // SAFETY: live CPU tensors (held by this call), rows validated.
        unsafe { crate::host_copy::copy_rows(&dr, &sr, &pairs) }
    });
    Ok(())
}

/// `verify` checksums of experts given as their rows (contiguous CPU
/// tensors, one per weight tensor).
#[pyfunction]
fn expert_checksums(py: Python<'_>, experts: Vec<Vec<Bound<'_, PyAny>>>) -> PyResult<Vec<u64>> {
    let mut rows: Vec<Vec<(u64, u64)>> = Vec::with_capacity(experts.len());
    for (i, e) in experts.iter().enumerate() {
        let mut v = Vec::with_capacity(e.len());
        for (j, t) in e.iter().enumerate() {
            let name = format!("experts[{i}][{j}]");
            let g = tensors::geometry(t, &name)?;
            if g.device != tensors::Device::Cpu {
                return Err(PyValueError::new_err(format!(
                    "{name}: expected a CPU tensor"
                )));
            }
            let n = g.contiguous_bytes().ok_or_else(|| {
                PyValueError::new_err(format!("{name}: expected a contiguous tensor"))
            })?;
            if n > 0 && g.ptr == 0 {
                return Err(PyValueError::new_err(format!("{name}: no storage")));
            }
            v.push((g.ptr, n));
        }
        rows.push(v);
    }
    Ok(py.allow_threads(|| {
        rows.iter()
            .map(|e| {
                crate::checksum::expert_checksum(e.iter().map(|&(p, n)| {
                    if n == 0 {
                        &[][..]
                    } else {
                        // SAFETY: contiguous bytes of a live CPU tensor held by this call.
                        unsafe { std::slice::from_raw_parts(p as *const u8, n as usize) }
                    }
                }))
            })
            .collect()
    }))
}

/// Folds per-row checksum parts (computed by torch on a device) into expert
/// checksums: `parts[e]` lists `[sum, block-weighted, column-weighted]` per
/// row of expert `e` (the definition lives in `crate::checksum`).
#[pyfunction]
fn checksums_from_parts(parts: Vec<Vec<[u64; 3]>>) -> Vec<u64> {
    parts
        .iter()
        .map(|rows| crate::checksum::fold_parts(rows.iter().copied()))
        .collect()
}

/// Block width of the checksum for a row of `n` bytes.
#[pyfunction]
fn checksum_block_width(n: usize) -> PyResult<usize> {
    if n == 0 {
        return Err(PyValueError::new_err("n: rows of 0 bytes have no checksum"));
    }
    Ok(crate::checksum::block_width(n))
}

/// This process's node facts: `(node key, rdma, cuda GET zero-copy)`; ranks
/// with the same node key share a node (same kernel, same PID namespace).
#[pyfunction]
fn local_node_key() -> String {
    crate::nixl::topology::local_node_key()
}

/// Dense node ids (first appearance order) of per-rank node keys.
#[pyfunction]
fn node_ids(keys: Vec<String>) -> Vec<u32> {
    crate::nixl::topology::renumber(&keys)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<plan::PyTransferPlan>()?;
    m.add_class::<engine::PyNixlEngine>()?;
    m.add_class::<engine::PyMappedLayer>()?;
    m.add_function(wrap_pyfunction!(engine::check_layout, m)?)?;
    m.add_function(wrap_pyfunction!(plan::plan_rebalance_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(copy_rows, m)?)?;
    m.add_function(wrap_pyfunction!(expert_checksums, m)?)?;
    m.add_function(wrap_pyfunction!(checksums_from_parts, m)?)?;
    m.add_function(wrap_pyfunction!(checksum_block_width, m)?)?;
    m.add_function(wrap_pyfunction!(live_agents, m)?)?;
    m.add_function(wrap_pyfunction!(local_node_key, m)?)?;
    m.add_function(wrap_pyfunction!(node_ids, m)?)?;
    policy::register(m)?;
    m.add("NixlUnavailable", m.py().get_type::<NixlUnavailable>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
