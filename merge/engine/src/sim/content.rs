//! Page contents: the zero page, the deterministic fill pattern, the zero test.

use crate::host::PAGE_SIZE;

pub(super) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// The content pattern used by [`SimFleet::fill`](super::SimFleet::fill): `seed` 0 is the
/// zero page.
pub fn pattern(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE_SIZE];
    fill_pattern(&mut v, seed);
    v
}

pub(super) fn fill_pattern(dst: &mut [u8], seed: u64) {
    if seed == 0 {
        dst.fill(0);
        return;
    }
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in dst.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}

pub(super) fn is_zero(b: &[u8]) -> bool {
    b.chunks_exact(16)
        .all(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")) == 0)
}
