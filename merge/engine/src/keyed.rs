//! The secret-keyed hash of every index keyed by agent data.
//!
//! The engine's indexes are keyed by 64-bit page hashes that agents report (a VM process
//! may be hostile and report any values it likes). Placing those keys with a fixed,
//! invertible mixer would let such an agent choose values that all land in one bucket of a
//! table (one long probe cluster in the unstable set, one overfull group in the stable
//! set) and make every lookup of every guest of its domain walk it: a hash flood. So the
//! place of a key in a table is SipHash-1-3 (the hash Rust's `HashMap` uses against the
//! same attack) of the key under a secret 128-bit [`HashKey`], drawn at random for each
//! engine; an agent that cannot learn the key cannot aim.

use std::hash::{BuildHasher, Hasher};

/// The secret key of the engine's index hashing. [`HashKey::random`] for a daemon;
/// [`HashKey::fixed`] for simulations and tests that must replay exactly.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKey {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("HashKey(..)")
    }
}

impl HashKey {
    /// A key nobody outside this process can know: drawn from the operating system's
    /// randomness (through the standard library's randomly keyed `RandomState`).
    pub fn random() -> Self {
        let s = std::collections::hash_map::RandomState::new();
        HashKey {
            k0: s.hash_one(0x6b30_u64),
            k1: s.hash_one(0x6b31_u64),
        }
    }

    /// A key derived from `seed` alone: the same seed places keys the same way in every
    /// run (deterministic simulations). Not for a daemon that serves untrusted agents.
    pub fn fixed(seed: u64) -> Self {
        HashKey {
            k0: seed,
            k1: seed.rotate_left(32) ^ 0x5851_f42d_4c95_7f2d,
        }
    }

    /// SipHash-1-3 of `x` (as its 8 little-endian bytes) under this key.
    #[inline]
    pub fn hash(&self, x: u64) -> u64 {
        let mut v = [
            self.k0 ^ 0x736f_6d65_7073_6575,
            self.k1 ^ 0x646f_7261_6e64_6f6d,
            self.k0 ^ 0x6c79_6765_6e65_7261,
            self.k1 ^ 0x7465_6462_7974_6573,
        ];
        // One message block (the 8 bytes), then the length block (8 << 56), each with one
        // compression round; then three finalization rounds.
        for m in [x, 8u64 << 56] {
            v[3] ^= m;
            sip_round(&mut v);
            v[0] ^= m;
        }
        v[2] ^= 0xff;
        sip_round(&mut v);
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// `BuildHasher` of maps keyed by agent-reported hashes (the stable set): each `u64` key is
/// placed by [`HashKey::hash`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyedBuild(pub(crate) HashKey);

impl BuildHasher for KeyedBuild {
    type Hasher = KeyedHasher;
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            key: self.0,
            acc: 0,
        }
    }
}

/// The hasher of [`KeyedBuild`]: meant for one `u64` key (other writes are folded in
/// 8-byte words, each through the keyed hash).
pub(crate) struct KeyedHasher {
    key: HashKey,
    acc: u64,
}

impl Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        self.acc
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.acc = self.key.hash(n ^ self.acc.rotate_left(23));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the zero key this is exactly the standard library's SipHash-1-3
    /// (`DefaultHasher::new()`, whose keys are zero) of a `u64`.
    #[test]
    fn the_keyed_hash_is_siphash13() {
        let zero = HashKey { k0: 0, k1: 0 };
        for x in [0u64, 1, 42, u64::MAX, 0x0123_4567_89ab_cdef] {
            let mut std = std::collections::hash_map::DefaultHasher::new();
            std.write_u64(x);
            assert_eq!(zero.hash(x), std.finish(), "{x:#x}");
        }
    }

    #[test]
    fn keys_place_values_differently_and_fixed_keys_replay() {
        let (a, b) = (HashKey::random(), HashKey::random());
        assert_ne!(a, b);
        assert_ne!(a.hash(7), b.hash(7));
        assert_eq!(HashKey::fixed(3).hash(9), HashKey::fixed(3).hash(9));
        assert_ne!(HashKey::fixed(3).hash(9), HashKey::fixed(4).hash(9));
        assert_eq!(format!("{a:?}"), "HashKey(..)");
    }
}
