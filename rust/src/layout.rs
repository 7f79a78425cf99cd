//! Per-rank memory layout of one EP rank's expert weights.
//!
//! A layer holds `n_tensors` stacked weight tensors; tensor `t` of layer `l`
//! keeps local row `r` (one expert) at `base + r * row_stride`, `row_bytes`
//! long and contiguous. Tensors may differ in dtype and row size; layers must
//! agree tensor by tensor (the one-layer buffer serves every layer).
//!
//! Layouts travel between ranks once, at set-up, as a small versioned blob.

use std::fmt;

/// One stacked tensor's rows: row `r` lives at `base + r * row_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRows {
    pub base: u64,
    pub row_stride: u64,
    pub row_bytes: u64,
}

impl TensorRows {
    /// Address of local row `row`.
    #[inline]
    pub fn row_addr(&self, row: usize) -> u64 {
        self.base + self.row_stride * row as u64
    }
    /// Bytes spanned by `n_rows` rows, from `base` to the end of the last row.
    pub fn span(&self, n_rows: usize) -> u64 {
        if n_rows == 0 {
            0
        } else {
            self.row_stride * (n_rows as u64 - 1) + self.row_bytes
        }
    }
}

/// The packed send layer of staged mode: slot `s` (a local row) holds the
/// expert's tensors back to back at `base + s * slot_bytes + offsets[t]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedLayer {
    pub base: u64,
    pub slot_bytes: u64,
}

/// Everything a peer needs to address this rank's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLayout {
    pub n_local: usize,
    pub device_id: u64,
    /// `weights[layer][tensor]`
    pub weights: Vec<Vec<TensorRows>>,
    /// `buffer[tensor]`: the one-layer receive buffer.
    pub buffer: Vec<TensorRows>,
    /// Present in staged mode.
    pub packed: Option<PackedLayer>,
}

/// A layout that cannot be used, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    NoTensors,
    TensorCount {
        layer: usize,
        got: usize,
        expected: usize,
    },
    RowBytes {
        layer: usize,
        tensor: usize,
        got: u64,
        expected: u64,
    },
    ZeroRowBytes {
        tensor: usize,
    },
    Stride {
        layer: Option<usize>,
        tensor: usize,
        row_stride: u64,
        row_bytes: u64,
    },
    Overflow {
        layer: Option<usize>,
        tensor: usize,
    },
    /// Two distinct rows share bytes (aliased tensors or layers, or a buffer
    /// that overlaps the weights).
    Aliased {
        first: String,
        second: String,
    },
    Blob(String),
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::NoTensors => write!(f, "expert_buffer: a layer needs at least one tensor"),
            LayoutError::TensorCount { layer, got, expected } => write!(
                f,
                "expert_weights[{layer}]: has {got} tensors, expected {expected} (like expert_buffer)"
            ),
            LayoutError::RowBytes { layer, tensor, got, expected } => write!(
                f,
                "expert_weights[{layer}][{tensor}]: row has {got} bytes, expected {expected} (like expert_buffer[{tensor}])"
            ),
            LayoutError::ZeroRowBytes { tensor } => write!(f, "expert_buffer[{tensor}]: rows of 0 bytes"),
            LayoutError::Stride { layer, tensor, row_stride, row_bytes } => match layer {
                Some(l) => write!(
                    f,
                    "expert_weights[{l}][{tensor}]: row stride {row_stride} bytes is below the row size {row_bytes} (rows overlap)"
                ),
                None => write!(
                    f,
                    "expert_buffer[{tensor}]: row stride {row_stride} bytes is below the row size {row_bytes} (rows overlap)"
                ),
            },
            LayoutError::Overflow { layer, tensor } => {
                write!(f, "tensor {tensor} of layer {layer:?}: address range overflows")
            }
            LayoutError::Aliased { first, second } => write!(
                f,
                "{second}: shares memory with {first}; every layer, tensor and the buffer must be separate memory"
            ),
            LayoutError::Blob(m) => write!(f, "peer layout blob: {m}"),
        }
    }
}

impl std::error::Error for LayoutError {}

impl RankLayout {
    pub fn n_layers(&self) -> usize {
        self.weights.len()
    }
    pub fn n_tensors(&self) -> usize {
        self.buffer.len()
    }
    /// Bytes of one expert: the sum of its row sizes over tensors.
    pub fn expert_bytes(&self) -> u64 {
        self.buffer.iter().map(|t| t.row_bytes).sum()
    }
    /// Offset of tensor `t` inside a packed slot.
    pub fn packed_offsets(&self) -> Vec<u64> {
        let mut off = 0;
        self.buffer
            .iter()
            .map(|t| {
                let o = off;
                off += t.row_bytes;
                o
            })
            .collect()
    }

    /// Checks internal consistency: tensor counts, row sizes, strides, overflow.
    pub fn validate(&self) -> Result<(), LayoutError> {
        let n_t = self.buffer.len();
        if n_t == 0 {
            return Err(LayoutError::NoTensors);
        }
        for (t, b) in self.buffer.iter().enumerate() {
            if b.row_bytes == 0 {
                return Err(LayoutError::ZeroRowBytes { tensor: t });
            }
            check_rows(b, self.n_local, None, t)?;
        }
        for (l, layer) in self.weights.iter().enumerate() {
            if layer.len() != n_t {
                return Err(LayoutError::TensorCount {
                    layer: l,
                    got: layer.len(),
                    expected: n_t,
                });
            }
            for (t, w) in layer.iter().enumerate() {
                if w.row_bytes != self.buffer[t].row_bytes {
                    return Err(LayoutError::RowBytes {
                        layer: l,
                        tensor: t,
                        got: w.row_bytes,
                        expected: self.buffer[t].row_bytes,
                    });
                }
                check_rows(w, self.n_local, Some(l), t)?;
            }
        }
        Ok(())
    }

    /// Every row of every tensor (weights, buffer, packed slots) as
    /// `(start, end, name)`: the unit of the aliasing check.
    fn row_spans(&self) -> Vec<(u64, u64, RowName)> {
        let n = self.n_local;
        let mut v = Vec::with_capacity((self.weights.len() + 1) * self.buffer.len() * n + n);
        for (l, layer) in self.weights.iter().enumerate() {
            for (t, rows) in layer.iter().enumerate() {
                for r in 0..n {
                    let a = rows.row_addr(r);
                    v.push((a, a + rows.row_bytes, RowName::Weight(l, t, r)));
                }
            }
        }
        for (t, rows) in self.buffer.iter().enumerate() {
            for r in 0..n {
                let a = rows.row_addr(r);
                v.push((a, a + rows.row_bytes, RowName::Buffer(t, r)));
            }
        }
        if let Some(p) = &self.packed {
            let span = p.slot_bytes.saturating_mul(n as u64);
            v.push((p.base, p.base.saturating_add(span), RowName::Packed));
        }
        v
    }

    /// Checks that no two rows share a byte: aliased tensors, a layer listed
    /// twice, or a buffer overlapping the weights would make a rebalance
    /// overwrite bytes it still has to read. `O(rows log rows)`; call after
    /// [`RankLayout::validate`] (which rules out address overflow).
    pub fn check_aliasing(&self) -> Result<(), LayoutError> {
        let mut spans = self.row_spans();
        spans.retain(|s| s.1 > s.0);
        spans.sort_unstable_by_key(|s| (s.0, s.1));
        let mut reach: Option<(u64, RowName)> = None;
        for &(a, b, name) in &spans {
            if let Some((end, prev)) = reach {
                if a < end {
                    return Err(LayoutError::Aliased {
                        first: prev.to_string(),
                        second: name.to_string(),
                    });
                }
            }
            if reach.map_or(true, |(end, _)| b > end) {
                reach = Some((b, name));
            }
        }
        Ok(())
    }

    /// The memory to register with NIXL: the spans of every tensor, merged
    /// where they overlap (a region is registered once, however many tensors
    /// share it). Spans that merely touch stay apart: on GPUs they may belong
    /// to two allocations, and one registration must not span both (CUDA IPC
    /// maps one allocation per handle).
    pub fn registration_regions(&self, with_weights: bool) -> Vec<(u64, u64)> {
        let n = self.n_local;
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut add = |t: &TensorRows| {
            let len = t.span(n);
            if len > 0 {
                spans.push((t.base, t.base + len));
            }
        };
        self.buffer.iter().for_each(&mut add);
        if with_weights {
            self.weights.iter().flatten().for_each(&mut add);
        }
        if let Some(p) = &self.packed {
            let len = p.slot_bytes.saturating_mul(n as u64);
            if len > 0 {
                spans.push((p.base, p.base + len));
            }
        }
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a < last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        merged.into_iter().map(|(a, b)| (a, b - a)).collect()
    }

    /// Serialises to the blob exchanged at set-up.
    pub fn to_blob(&self) -> Vec<u8> {
        let mut w: Vec<u64> = vec![BLOB_MAGIC, BLOB_VERSION];
        w.push(self.n_local as u64);
        w.push(self.device_id);
        w.push(self.weights.len() as u64);
        w.push(self.buffer.len() as u64);
        for t in &self.buffer {
            w.extend([t.base, t.row_stride, t.row_bytes]);
        }
        for layer in &self.weights {
            for t in layer {
                w.extend([t.base, t.row_stride, t.row_bytes]);
            }
        }
        match &self.packed {
            Some(p) => w.extend([1, p.base, p.slot_bytes]),
            None => w.extend([0, 0, 0]),
        }
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Parses and validates a blob made by [`RankLayout::to_blob`].
    pub fn from_blob(blob: &[u8]) -> Result<RankLayout, LayoutError> {
        if blob.len() % 8 != 0 {
            return Err(LayoutError::Blob(format!(
                "length {} is not a multiple of 8",
                blob.len()
            )));
        }
        let words: Vec<u64> = blob
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect();
        let mut it = words.into_iter();
        let mut next = |what: &str| {
            it.next()
                .ok_or_else(|| LayoutError::Blob(format!("truncated at {what}")))
        };
        if next("magic")? != BLOB_MAGIC {
            return Err(LayoutError::Blob(
                "bad magic (not an eplb-xfer layout)".into(),
            ));
        }
        let v = next("version")?;
        if v != BLOB_VERSION {
            return Err(LayoutError::Blob(format!(
                "version {v}, expected {BLOB_VERSION}"
            )));
        }
        let n_local = to_usize(next("n_local")?)?;
        let device_id = next("device_id")?;
        let n_layers = to_usize(next("n_layers")?)?;
        let n_tensors = to_usize(next("n_tensors")?)?;
        if n_tensors > 1 << 16 || n_layers > 1 << 20 {
            return Err(LayoutError::Blob(
                "implausible tensor or layer count".into(),
            ));
        }
        let read_rows = |next: &mut dyn FnMut(&str) -> Result<u64, LayoutError>| -> Result<TensorRows, LayoutError> {
            Ok(TensorRows { base: next("base")?, row_stride: next("stride")?, row_bytes: next("row_bytes")? })
        };
        let mut buffer = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            buffer.push(read_rows(&mut next)?);
        }
        let mut weights = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            let mut layer = Vec::with_capacity(n_tensors);
            for _ in 0..n_tensors {
                layer.push(read_rows(&mut next)?);
            }
            weights.push(layer);
        }
        let has_packed = next("packed flag")?;
        let (pb, ps) = (next("packed base")?, next("packed slot bytes")?);
        let packed = if has_packed == 1 {
            Some(PackedLayer {
                base: pb,
                slot_bytes: ps,
            })
        } else {
            None
        };
        let layout = RankLayout {
            n_local,
            device_id,
            weights,
            buffer,
            packed,
        };
        layout.validate()?;
        Ok(layout)
    }
}

/// Names a row for error messages, in the caller's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowName {
    Weight(usize, usize, usize),
    Buffer(usize, usize),
    Packed,
}

impl fmt::Display for RowName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowName::Weight(l, t, r) => write!(f, "expert_weights[{l}][{t}] (row {r})"),
            RowName::Buffer(t, r) => write!(f, "expert_buffer[{t}] (row {r})"),
            RowName::Packed => write!(f, "the staged send layer"),
        }
    }
}

const BLOB_MAGIC: u64 = 0x5846_5842_4c50_4501; // "EPLBXFX" + 1
const BLOB_VERSION: u64 = 1;

fn to_usize(v: u64) -> Result<usize, LayoutError> {
    usize::try_from(v).map_err(|_| LayoutError::Blob(format!("value {v} does not fit usize")))
}

fn check_rows(
    t: &TensorRows,
    n_rows: usize,
    layer: Option<usize>,
    tensor: usize,
) -> Result<(), LayoutError> {
    if n_rows > 1 && t.row_stride < t.row_bytes {
        return Err(LayoutError::Stride {
            layer,
            tensor,
            row_stride: t.row_stride,
            row_bytes: t.row_bytes,
        });
    }
    let span = t
        .row_stride
        .checked_mul(n_rows.saturating_sub(1) as u64)
        .and_then(|s| s.checked_add(t.row_bytes))
        .and_then(|s| s.checked_add(t.base));
    if span.is_none() {
        return Err(LayoutError::Overflow { layer, tensor });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RankLayout {
        let rows = |base, rb| TensorRows {
            base,
            row_stride: rb,
            row_bytes: rb,
        };
        RankLayout {
            n_local: 3,
            device_id: 0,
            weights: vec![
                vec![rows(1000, 16), rows(2000, 4)],
                vec![rows(3000, 16), rows(4000, 4)],
            ],
            buffer: vec![rows(5000, 16), rows(6000, 4)],
            packed: Some(PackedLayer {
                base: 7000,
                slot_bytes: 20,
            }),
        }
    }

    #[test]
    fn blob_round_trips() {
        let l = sample();
        assert_eq!(RankLayout::from_blob(&l.to_blob()).unwrap(), l);
        assert_eq!(l.expert_bytes(), 20);
        assert_eq!(l.packed_offsets(), vec![0, 16]);
    }

    #[test]
    fn truncated_or_garbage_blob_is_an_error() {
        let b = sample().to_blob();
        assert!(RankLayout::from_blob(&b[..b.len() - 8]).is_err());
        assert!(RankLayout::from_blob(&b[..5]).is_err());
        assert!(RankLayout::from_blob(&[0u8; 64]).is_err());
    }

    #[test]
    fn mismatched_row_bytes_rejected() {
        let mut l = sample();
        l.weights[1][0].row_bytes = 8;
        l.weights[1][0].row_stride = 8;
        let e = l.validate().unwrap_err();
        assert!(e.to_string().contains("expert_weights[1][0]"), "{e}");
    }

    #[test]
    fn aliasing_is_found_and_regions_merge() {
        let l = sample();
        l.check_aliasing().unwrap();
        let mut shared = sample();
        shared.weights[1][0] = shared.weights[0][0]; // one tensor in two layers
        let e = shared.check_aliasing().unwrap_err().to_string();
        assert!(
            e.contains("expert_weights[0][0]") && e.contains("expert_weights[1][0]"),
            "{e}"
        );
        let mut buf = sample();
        buf.buffer[1].base = 2004; // the buffer overlaps a weight row
        assert!(buf.check_aliasing().is_err());
        // interleaved rows of two tensors in one allocation are fine
        let mut inter = sample();
        inter.weights[0][0] = TensorRows {
            base: 100,
            row_stride: 20,
            row_bytes: 16,
        };
        inter.weights[0][1] = TensorRows {
            base: 116,
            row_stride: 20,
            row_bytes: 4,
        };
        inter.check_aliasing().unwrap();
        let regions = inter.registration_regions(true);
        assert!(regions.contains(&(100, 60)), "{regions:?}");
        let twice = sample();
        let mut dup = twice.clone();
        dup.weights[1] = dup.weights[0].clone();
        // a repeated region is registered once
        let r = dup.registration_regions(true);
        let mut sorted = r.clone();
        sorted.dedup();
        assert_eq!(r, sorted);
        assert!(r.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        // touching tensors (maybe two GPU allocations) are registered apart
        let mut touch = sample();
        touch.buffer[1].base = 5000 + 48;
        assert!(touch.registration_regions(false).contains(&(5048, 12)));
    }

    #[test]
    fn overlapping_rows_rejected() {
        let mut l = sample();
        l.buffer[0].row_stride = 8;
        assert!(matches!(l.validate(), Err(LayoutError::Stride { .. })));
    }
}
