//! Torch tensors as the edge sees them: geometry read from the tensor object
//! itself (through `torch.Tensor`'s own methods, so a subclass cannot forge
//! it), never a bare address from Python.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyType;

use crate::layout::TensorRows;

/// `torch.Tensor` and its own methods and property getters, looked up once.
struct Torch {
    ty: Py<PyType>,
    data_ptr: Py<PyAny>,
    size: Py<PyAny>,
    stride: Py<PyAny>,
    element_size: Py<PyAny>,
    get_device: Py<PyAny>,
    is_meta: Py<PyAny>,
    is_cuda: Py<PyAny>,
    is_cpu: Py<PyAny>,
    requires_grad: Py<PyAny>,
    device: Py<PyAny>,
}

static TORCH: GILOnceCell<Torch> = GILOnceCell::new();

fn torch(py: Python<'_>) -> PyResult<&Torch> {
    TORCH.get_or_try_init(py, || {
        let ty = py
            .import("torch")?
            .getattr("Tensor")?
            .downcast_into::<PyType>()?;
        let m = |n: &str| ty.getattr(n).map(Bound::unbind);
        // property getters: the descriptor's __get__, called with (tensor, type)
        let g = |n: &str| ty.getattr(n)?.getattr("__get__").map(Bound::unbind);
        Ok::<_, PyErr>(Torch {
            data_ptr: m("data_ptr")?,
            size: m("size")?,
            stride: m("stride")?,
            element_size: m("element_size")?,
            get_device: m("get_device")?,
            is_meta: g("is_meta")?,
            is_cuda: g("is_cuda")?,
            is_cpu: g("is_cpu")?,
            requires_grad: g("requires_grad")?,
            device: g("device")?,
            ty: ty.unbind(),
        })
    })
}

/// `t.size()` through `torch.Tensor`'s own method.
pub fn size(t: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    torch(t.py())?.size.bind(t.py()).call1((t,))?.extract()
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

/// `t.data_ptr()` through `torch.Tensor`'s own method (0 for an empty tensor).
pub fn data_ptr(t: &Bound<'_, PyAny>) -> PyResult<u64> {
    torch(t.py())?.data_ptr.bind(t.py()).call1((t,))?.extract()
}

/// Reads `t`'s geometry; `TypeError` naming `name` if it is not a tensor,
/// `ValueError` for meta tensors or tensors without storage.
pub fn geometry(t: &Bound<'_, PyAny>, name: &str) -> PyResult<Geometry> {
    let py = t.py();
    let api = torch(py)?;
    let ty = api.ty.bind(py);
    if !t.is_instance(ty)? {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a torch.Tensor, got {}",
            t.get_type().name()?
        )));
    }
    let call = |m: &Py<PyAny>| m.bind(py).call1((t,));
    let prop = |g: &Py<PyAny>| g.bind(py).call1((t, ty));
    if prop(&api.is_meta)?.extract::<bool>()? {
        return Err(PyValueError::new_err(format!(
            "{name}: a meta tensor has no memory to move"
        )));
    }
    let device = if prop(&api.is_cuda)?.extract::<bool>()? {
        let idx: i64 = call(&api.get_device)?.extract()?;
        Device::Cuda(idx.max(0) as u64)
    } else if prop(&api.is_cpu)?.extract::<bool>()? {
        Device::Cpu
    } else {
        Device::Other(prop(&api.device)?.getattr("type")?.extract()?)
    };
    let shape: Vec<i64> = call(&api.size)?.extract()?;
    let strides: Vec<i64> = call(&api.stride)?.extract()?;
    let elem: u64 = call(&api.element_size)?.extract()?;
    let numel = shape
        .iter()
        .try_fold(1i64, |a, &d| a.checked_mul(d.max(0)))
        .unwrap_or(i64::MAX);
    let ptr: u64 = if numel == 0 {
        0
    } else {
        call(&api.data_ptr)?.extract()?
    };
    let requires_grad: bool = prop(&api.requires_grad)?.extract()?;
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
