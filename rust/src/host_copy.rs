//! Row copies between host (CPU) tensors, by address.
//!
//! The per-layer local copies, duplicate fills and commit of a rebalance are
//! many small row copies; issuing them one torch call at a time costs a few µs
//! of Python dispatch each, which dominated per-layer latency on CPU. Here they
//! are plain `memmove`s over the same row layout the NIXL path uses. GPU
//! tensors keep using torch kernels (Python side).

use crate::layout::TensorRows;

/// Why a copy request was refused (nothing was copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyError {
    TensorCount {
        dst: usize,
        src: usize,
    },
    RowBytes {
        tensor: usize,
        dst: u64,
        src: u64,
    },
    RowOutOfRange {
        what: &'static str,
        row: u32,
        n_rows: u32,
    },
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::TensorCount { dst, src } => {
                write!(
                    f,
                    "tensors: {dst} destination tensors but {src} source tensors"
                )
            }
            CopyError::RowBytes { tensor, dst, src } => {
                write!(
                    f,
                    "tensor {tensor}: destination rows of {dst} bytes, source rows of {src}"
                )
            }
            CopyError::RowOutOfRange { what, row, n_rows } => {
                write!(f, "{what} row {row} is outside 0..{n_rows}")
            }
        }
    }
}

impl std::error::Error for CopyError {}

/// Checks a batch of `(src_row, dst_row)` copies against both layouts.
pub fn validate(
    dst: &[TensorRows],
    src: &[TensorRows],
    n_rows: u32,
    pairs: &[(u32, u32)],
) -> Result<(), CopyError> {
    if dst.len() != src.len() {
        return Err(CopyError::TensorCount {
            dst: dst.len(),
            src: src.len(),
        });
    }
    for (t, (d, s)) in dst.iter().zip(src).enumerate() {
        if d.row_bytes != s.row_bytes {
            return Err(CopyError::RowBytes {
                tensor: t,
                dst: d.row_bytes,
                src: s.row_bytes,
            });
        }
    }
    for &(s, d) in pairs {
        if s >= n_rows {
            return Err(CopyError::RowOutOfRange {
                what: "source",
                row: s,
                n_rows,
            });
        }
        if d >= n_rows {
            return Err(CopyError::RowOutOfRange {
                what: "destination",
                row: d,
                n_rows,
            });
        }
    }
    Ok(())
}

/// Copies row `s` of every source tensor to row `d` of the matching
/// destination tensor, for each `(s, d)` in `pairs`, in order.
///
/// # Safety
/// Every layout must describe live host memory of at least `n_rows` rows that
/// nothing else accesses during the call, and [`validate`] must have passed.
pub unsafe fn copy_rows(dst: &[TensorRows], src: &[TensorRows], pairs: &[(u32, u32)]) {
    for (d, s) in dst.iter().zip(src) {
        let len = d.row_bytes as usize;
        for &(sr, dr) in pairs {
            let from = s.row_addr(sr as usize) as *const u8;
            let to = d.row_addr(dr as usize) as *mut u8;
            // memmove: source and destination may be rows of the same tensor.
            std::ptr::copy(from, to, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_rows_between_and_within_tensors() {
        let mut a = vec![0u8; 4 * 3];
        let mut b: Vec<u8> = (0..12).collect();
        let la = TensorRows {
            base: a.as_mut_ptr() as u64,
            row_stride: 4,
            row_bytes: 3,
        };
        let lb = TensorRows {
            base: b.as_mut_ptr() as u64,
            row_stride: 4,
            row_bytes: 3,
        };
        validate(&[la], &[lb], 3, &[(2, 0), (0, 1)]).unwrap();
        // SAFETY: both vectors are live and 12 bytes long; rows fit.
        unsafe { copy_rows(&[la], &[lb], &[(2, 0), (0, 1)]) };
        assert_eq!(&a[..8], &[8, 9, 10, 0, 0, 1, 2, 0]);
        // SAFETY: as above, same tensor on both sides.
        unsafe { copy_rows(&[la], &[la], &[(0, 2)]) };
        assert_eq!(&a[8..11], &[8, 9, 10]);
    }

    #[test]
    fn out_of_range_rows_and_size_mismatch_are_refused() {
        let l = TensorRows {
            base: 0,
            row_stride: 4,
            row_bytes: 4,
        };
        let m = TensorRows {
            base: 0,
            row_stride: 8,
            row_bytes: 8,
        };
        assert!(validate(&[l], &[l], 2, &[(2, 0)]).is_err());
        assert!(validate(&[l], &[l], 2, &[(0, 5)]).is_err());
        assert!(validate(&[l], &[m], 2, &[(0, 1)]).is_err());
        assert!(validate(&[l], &[], 2, &[]).is_err());
    }
}
