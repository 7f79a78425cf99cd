//! Torch tensors as the edge sees them: geometry read from the tensor object
//! itself (through `torch.Tensor`'s own methods, so a subclass cannot forge
//! it), never a bare address from Python.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyType;

use crate::layout::TensorRows;

static TENSOR_TYPE: GILOnceCell<Py<PyType>> = GILOnceCell::new();

fn tensor_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    TENSOR_TYPE
        .get_or_try_init(py, || {
            let t = py.import("torch")?.getattr("Tensor")?;
            Ok::<_, PyErr>(t.downcast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

/// Where a tensor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(u64),
    Other(String),
}

/// A tensor's memory as rows along dim 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub ptr: u64,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
    pub elem: u64,
    pub device: Device,
    pub requires_grad: bool,
}

impl Geometry {
    pub fn rows(&self) -> usize {
        self.shape.first().map_or(0, |&n| n.max(0) as usize)
    }

    /// `(base, row_stride, row_bytes)` of the rows; `Err` if a row is not
    /// contiguous or rows overlap.
    pub fn row_layout(&self, name: &str) -> PyResult<TensorRows> {
        if self.shape.is_empty() {
            return Err(PyValueError::new_err(format!(
                "{name}: expected a tensor with a row dimension, got a 0-d tensor"
            )));
        }
        // Row r starts at ptr + r * stride0; the rest of each row must be
        // laid out densely (dims of size 1 may have any stride).
        let mut expect: i64 = 1;
        for d in (1..self.shape.len()).rev() {
            if self.shape[d] != 1 && self.strides[d] != expect {
                return Err(PyValueError::new_err(format!(
                    "{name}: each row (expert) must be contiguous; shape {:?}, strides {:?}",
                    self.shape, self.strides
                )));
            }
            expect = expect.saturating_mul(self.shape[d].max(0));
        }
        let row_elems = u64::try_from(expect).unwrap_or(0);
        let row_bytes = row_elems.saturating_mul(self.elem);
        if row_bytes == 0 {
            return Err(PyValueError::new_err(format!(
                "{name}: rows of 0 bytes (shape {:?})",
                self.shape
            )));
        }
        let n = self.rows();
        let stride0 = self.strides.first().copied().unwrap_or(0);
        let row_stride = if n <= 1 {
            row_bytes
        } else if stride0 < 0 {
            return Err(PyValueError::new_err(format!(
                "{name}: negative row stride {stride0}"
            )));
        } else {
            (stride0 as u64).saturating_mul(self.elem)
        };
        if n > 1 && row_stride < row_bytes {
            return Err(PyValueError::new_err(format!(
                "{name}: rows overlap (row stride {row_stride} B < row size {row_bytes} B)"
            )));
        }
        if self.ptr == 0 {
            return Err(PyValueError::new_err(format!(
                "{name}: has no storage (data pointer 0)"
            )));
        }
        let span = row_stride
            .checked_mul(n.saturating_sub(1) as u64)
            .and_then(|s| s.checked_add(row_bytes))
            .and_then(|s| s.checked_add(self.ptr));
        if span.is_none() {
            return Err(PyValueError::new_err(format!(
                "{name}: address range overflows"
            )));
        }
        Ok(TensorRows {
            base: self.ptr,
            row_stride,
            row_bytes,
        })
    }

    /// Bytes of the whole tensor if it is contiguous, else `None`.
    pub fn contiguous_bytes(&self) -> Option<u64> {
        let mut expect: i64 = 1;
        for d in (0..self.shape.len()).rev() {
            if self.shape[d] != 1 && self.strides[d] != expect {
                return None;
            }
            expect = expect.saturating_mul(self.shape[d].max(0));
        }
        u64::try_from(expect)
            .ok()
            .map(|e| e.saturating_mul(self.elem))
    }
}

/// Reads `t`'s geometry; `TypeError` naming `name` if it is not a tensor,
/// `ValueError` for meta tensors or tensors without storage.
pub fn geometry(t: &Bound<'_, PyAny>, name: &str) -> PyResult<Geometry> {
    let py = t.py();
    let ty = tensor_type(py)?;
    if !t.is_instance(ty)? {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a torch.Tensor, got {}",
            t.get_type().name()?
        )));
    }
    let call = |m: &str| ty.getattr(m)?.call1((t,));
    let prop =
        |p: &str| -> PyResult<Bound<'_, PyAny>> { ty.getattr(p)?.call_method1("__get__", (t, ty)) };
    if prop("is_meta")?.extract::<bool>()? {
        return Err(PyValueError::new_err(format!(
            "{name}: a meta tensor has no memory to move"
        )));
    }
    let dev = prop("device")?;
    let kind: String = dev.getattr("type")?.extract()?;
    let device = match kind.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            let idx: Option<i64> = dev.getattr("index")?.extract()?;
            Device::Cuda(idx.unwrap_or(0).max(0) as u64)
        }
        other => Device::Other(other.to_string()),
    };
    let shape: Vec<i64> = call("size")?.extract()?;
    let strides: Vec<i64> = call("stride")?.extract()?;
    let elem: u64 = call("element_size")?.extract()?;
    let numel: i64 = call("numel")?.extract()?;
    let ptr: u64 = if numel == 0 {
        0
    } else {
        call("data_ptr")?.extract()?
    };
    let requires_grad: bool = prop("requires_grad")?.extract()?;
    Ok(Geometry {
        ptr,
        shape,
        strides,
        elem,
        device,
        requires_grad,
    })
}

/// Reads the geometry of stacked tensors `ts` (named `name[i]`) and their row
/// layouts; all must be CPU tensors when `host_only`.
pub fn row_layouts(
    ts: &[Bound<'_, PyAny>],
    name: &str,
    host_only: bool,
) -> PyResult<Vec<(Geometry, TensorRows)>> {
    ts.iter()
        .enumerate()
        .map(|(i, t)| {
            let n = format!("{name}[{i}]");
            let g = geometry(t, &n)?;
            if host_only && g.device != Device::Cpu {
                return Err(PyValueError::new_err(format!(
                    "{n}: expected a CPU tensor, got one on {:?}",
                    g.device
                )));
            }
            let r = g.row_layout(&n)?;
            Ok((g, r))
        })
        .collect()
}
