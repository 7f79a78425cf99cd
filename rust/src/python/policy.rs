//! PyO3 edge of `crate::policy`: little-endian bytes in and out, errors as
//! `ValueError` naming the argument, the GIL released while planning.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::policy::{self, Method, Options, PolicyError, Request};

fn value_err(e: PolicyError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A count argument: a Python int that must fit in `usize`.
fn count(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v)
        .map_err(|_| PyValueError::new_err(format!("{name}: expected a non-negative int, got {v}")))
}

/// `n` little-endian 8-byte values of `name`, decoded by `f`.
fn decode<T>(name: &str, b: &[u8], n: Option<usize>, f: fn([u8; 8]) -> T) -> PyResult<Vec<T>> {
    let want = n.and_then(|n| n.checked_mul(8));
    if want != Some(b.len()) {
        return Err(PyValueError::new_err(format!(
            "{name}: got {} bytes, expected {} (8 per value)",
            b.len(),
            n.map_or_else(|| "too many".to_string(), |n| format!("{n} values")),
        )));
    }
    Ok(b.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            f(a)
        })
        .collect())
}

fn encode<'py>(py: Python<'py>, v: &[i64]) -> Bound<'py, PyBytes> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    PyBytes::new(py, &bytes)
}

/// Plans `phy2log` from float64 `[num_layers, num_logical_experts]` loads and
/// (optionally) an int64 `[num_layers, num_replicas]` old placement; returns
/// int64 `[num_layers, num_replicas]` bytes.
#[pyfunction]
#[pyo3(signature = (
    weight, num_layers, num_logical_experts, num_replicas, num_groups, num_nodes, num_ranks,
    old=None, method="migrate", max_imbalance=0.0, threads=0
))]
#[allow(clippy::too_many_arguments)]
fn rebalance_experts_bytes<'py>(
    py: Python<'py>,
    weight: &[u8],
    num_layers: i64,
    num_logical_experts: i64,
    num_replicas: i64,
    num_groups: i64,
    num_nodes: i64,
    num_ranks: i64,
    old: Option<&[u8]>,
    method: &str,
    max_imbalance: f64,
    threads: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    let layers = count("num_layers", num_layers)?;
    let experts = count("num_logical_experts", num_logical_experts)?;
    let replicas = count("num_replicas", num_replicas)?;
    let method = Method::parse(method).map_err(value_err)?;
    let w = decode(
        "weight",
        weight,
        layers.checked_mul(experts),
        f64::from_le_bytes,
    )?;
    let old = match old {
        Some(b) => Some(decode(
            "old_global_expert_indices",
            b,
            layers.checked_mul(replicas),
            i64::from_le_bytes,
        )?),
        None => None,
    };
    let req = Request {
        weight: &w,
        num_layers: layers,
        num_logical_experts: experts,
        num_replicas: replicas,
        num_groups: count("num_groups", num_groups)?,
        num_nodes: count("num_nodes", num_nodes)?,
        num_ranks: count("num_ranks", num_ranks)?,
        old: old.as_deref(),
    };
    let opts = Options {
        method,
        max_imbalance,
        threads: count("threads", threads)?,
    };
    let phy2log = py
        .allow_threads(|| policy::rebalance_experts(&req, &opts))
        .map_err(value_err)?;
    Ok(encode(py, &phy2log))
}

/// `(log2phy bytes, max_count, logcnt bytes)` of an int64 `[num_layers,
/// num_slots]` placement, in DeepSeek's conventions (see `policy::log2phy_logcnt`).
#[pyfunction]
fn log2phy_logcnt_bytes<'py>(
    py: Python<'py>,
    phy2log: &[u8],
    num_layers: i64,
    num_slots: i64,
    num_logical_experts: i64,
) -> PyResult<(Bound<'py, PyBytes>, usize, Bound<'py, PyBytes>)> {
    let layers = count("num_layers", num_layers)?;
    let slots = count("num_slots", num_slots)?;
    let experts = count("num_logical_experts", num_logical_experts)?;
    let p = decode(
        "phy2log",
        phy2log,
        layers.checked_mul(slots),
        i64::from_le_bytes,
    )?;
    let (log2phy, max_count, logcnt) = py
        .allow_threads(|| policy::log2phy_logcnt(&p, layers, slots, experts))
        .map_err(value_err)?;
    Ok((encode(py, &log2phy), max_count, encode(py, &logcnt)))
}

/// Adds the policy functions to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rebalance_experts_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(log2phy_logcnt_bytes, m)?)?;
    Ok(())
}
