//! The expert checksum of `verify=True`, for host (CPU) rows.
//!
//! Same definition as `eplb_xfer._tensors.expert_checksums` (torch, used on
//! GPUs), so either side may compute it: a row of `n` bytes is viewed as
//! `[n / C, C]` blocks (`C` = the largest power of two up to 4096 dividing
//! `n`); its parts are the byte sum, the block sums weighted by block index
//! (1-based) and the column sums weighted by column index (1-based), in
//! wrapping 64-bit arithmetic; an expert's checksum folds the parts of its
//! rows, in order, into a splitmix64 chain seeded with "EPLB".

/// Seed of an expert's checksum chain (`"EPLB"`).
pub const SEED: u64 = 0x4550_4C42;

/// Block width `C` for a row of `n` bytes.
pub fn block_width(n: usize) -> usize {
    let mut c = 4096;
    while n % c != 0 {
        c /= 2;
    }
    c
}

/// `[sum, block-weighted sum, column-weighted sum]` of one row's bytes.
pub fn row_parts(bytes: &[u8]) -> [u64; 3] {
    let c = block_width(bytes.len());
    let (mut s0, mut s1, mut s2) = (0u64, 0u64, 0u64);
    for (j, block) in bytes.chunks_exact(c).enumerate() {
        let mut block_sum = 0u64;
        for (k, &b) in block.iter().enumerate() {
            block_sum += u64::from(b);
            s2 = s2.wrapping_add((k as u64 + 1).wrapping_mul(u64::from(b)));
        }
        s0 = s0.wrapping_add(block_sum);
        s1 = s1.wrapping_add((j as u64 + 1).wrapping_mul(block_sum));
    }
    [s0, s1, s2]
}

/// Folds `v` into `h` (the splitmix64 finalizer over the xor).
pub fn mix(h: u64, v: u64) -> u64 {
    let mut z = h ^ v;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checksum of one expert from its rows' parts (see [`row_parts`]), in order.
pub fn fold_parts(rows: impl IntoIterator<Item = [u64; 3]>) -> u64 {
    rows.into_iter()
        .fold(SEED, |h, p| p.iter().fold(h, |h, &v| mix(h, v)))
}

/// Checksum of one expert given as its rows' bytes (one slice per tensor).
pub fn expert_checksum<'a>(rows: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    fold_parts(rows.into_iter().map(row_parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_width_divides() {
        assert_eq!(block_width(8192), 4096);
        assert_eq!(block_width(10), 2);
        assert_eq!(block_width(7), 1);
        assert_eq!(block_width(3 * 1024), 1024);
    }

    #[test]
    fn parts_match_the_definition() {
        let bytes: Vec<u8> = (0..24u32).map(|i| (i * 37 % 251) as u8).collect();
        let c = block_width(bytes.len()); // 8
        let mut want = [0u64; 3];
        for (i, &b) in bytes.iter().enumerate() {
            want[0] += u64::from(b);
            want[1] += (i / c + 1) as u64 * u64::from(b);
            want[2] += (i % c + 1) as u64 * u64::from(b);
        }
        assert_eq!(row_parts(&bytes), want);
    }

    #[test]
    fn a_flipped_or_swapped_byte_changes_the_checksum() {
        let a: Vec<u8> = (0..64u8).collect();
        let base = expert_checksum([&a[..], &a[..8]]);
        let mut flipped = a.clone();
        flipped[5] ^= 1;
        assert_ne!(expert_checksum([&flipped[..], &a[..8]]), base);
        let mut swapped = a.clone();
        swapped.swap(1, 2);
        assert_ne!(expert_checksum([&swapped[..], &a[..8]]), base);
        // which tensor a row belongs to matters too
        assert_ne!(expert_checksum([&a[..8], &a[..]]), base);
    }
}
