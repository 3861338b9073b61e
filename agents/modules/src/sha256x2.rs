//! SHA-256 of two 4096-byte blocks at once, for the fs-verity tree's data level, through the
//! x86-64 SHA extensions (SHA-NI).
//!
//! A SHA-256 round depends on the one before it, so one message leaves the SHA unit waiting for
//! its own results between rounds; two independent messages interleaved fill those waits. The
//! fs-verity tree's data blocks are independent of each other, so its bottom level, nearly all
//! of the work, can go two at a time. Everything else (one block, the upper levels, other CPUs)
//! stays with ring.
//!
//! The sequence of instructions is the one Intel documents for SHA-NI (the "Intel SHA
//! Extensions" white paper), written out for two states.

/// The length of the blocks [`digest_pair`] hashes.
pub const BLOCK: usize = 4096;

/// Whether this CPU can run [`digest_pair`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse4.1")
            && std::arch::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The SHA-256 digests of `a` and `b`, each [`BLOCK`] bytes long; `None` when the CPU lacks
/// SHA-NI ([`available`]) or a block is not [`BLOCK`] bytes.
pub fn digest_pair(a: &[u8], b: &[u8]) -> Option<([u8; 32], [u8; 32])> {
    if a.len() != BLOCK || b.len() != BLOCK {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: the CPU has the features `x86::digest_pair` is compiled for (checked just
            // above), and both blocks are BLOCK bytes, all it reads.
            return Some(unsafe { x86::digest_pair(a, b) });
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const H0: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// The final block of a 4096-byte message: the `1` bit, zeros, the length in bits (32768)
    /// big-endian.
    const PADDING: [u8; 64] = {
        let mut block = [0u8; 64];
        block[0] = 0x80;
        block[62] = 0x80;
        block
    };

    /// The shuffle that turns each 32-bit word of a vector around: SHA-256's words are
    /// big-endian, x86's little-endian.
    #[target_feature(enable = "sse2")]
    unsafe fn word_swap() -> __m128i {
        // SAFETY: builds a constant vector; the feature is the caller's promise. (Safe to call
        // on newer compilers; not on the workspace's minimum, 1.85.)
        #[allow(unused_unsafe)]
        unsafe {
            _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3)
        }
    }

    /// A SHA-256 state as SHA-NI holds it: (ABEF, CDGH).
    type State = (__m128i, __m128i);

    /// The digests of two blocks of [`super::BLOCK`] bytes.
    ///
    /// # Safety
    /// The CPU must have SHA, SSSE3 and SSE4.1; `a` and `b` must be [`super::BLOCK`] bytes
    /// long.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn digest_pair(a: &[u8], b: &[u8]) -> ([u8; 32], [u8; 32]) {
        // SAFETY: the features are the caller's promise; every block handed to `compress` is
        // 64 bytes (chunks of the BLOCK-long inputs, or PADDING).
        unsafe {
            let mut states = (initial(), initial());
            for (block_a, block_b) in a.chunks_exact(64).zip(b.chunks_exact(64)) {
                compress(&mut states, block_a, block_b);
            }
            compress(&mut states, &PADDING, &PADDING);
            (finish(states.0), finish(states.1))
        }
    }

    #[target_feature(enable = "sse2,ssse3,sse4.1")]
    unsafe fn initial() -> State {
        // SAFETY: `H0` is eight u32s: two 16-byte loads within it; the features are the
        // caller's promise.
        unsafe {
            let abcd = _mm_loadu_si128(H0.as_ptr().cast());
            let efgh = _mm_loadu_si128(H0.as_ptr().add(4).cast());
            let cdab = _mm_shuffle_epi32(abcd, 0xB1);
            let hgfe = _mm_shuffle_epi32(efgh, 0x1B);
            (
                _mm_alignr_epi8(cdab, hgfe, 8),
                _mm_blend_epi16(hgfe, cdab, 0xF0),
            )
        }
    }

    #[target_feature(enable = "sse2,ssse3,sse4.1")]
    unsafe fn finish((abef, cdgh): State) -> [u8; 32] {
        let mut out = [0u8; 32];
        // SAFETY: two 16-byte stores into a 32-byte array; the features are the caller's
        // promise.
        unsafe {
            let feba = _mm_shuffle_epi32(abef, 0x1B);
            let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
            let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
            let hgfe = _mm_alignr_epi8(dchg, feba, 8);
            // Each 32-bit word big-endian, in order A..H.
            let swap = _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3);
            _mm_storeu_si128(out.as_mut_ptr().cast(), _mm_shuffle_epi8(dcba, swap));
            _mm_storeu_si128(
                out.as_mut_ptr().add(16).cast(),
                _mm_shuffle_epi8(hgfe, swap),
            );
        }
        out
    }

    /// One 64-byte block into each state.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn compress(states: &mut (State, State), a: &[u8], b: &[u8]) {
        debug_assert!(a.len() == 64 && b.len() == 64);
        // SAFETY: the loads read bytes 0..64 of the 64-byte blocks and the 64 round constants
        // four at a time; the features are the caller's promise.
        unsafe {
            let swap = word_swap();
            let load = |bytes: &[u8], at: usize| {
                _mm_shuffle_epi8(_mm_loadu_si128(bytes.as_ptr().add(at).cast()), swap)
            };
            let ((mut a0, mut a1), (mut b0, mut b1)) = *states;
            let (save_a0, save_a1, save_b0, save_b1) = (a0, a1, b0, b1);
            // The message schedule, four words to a vector: the first sixteen words from the
            // block, each later four from the sixteen before them.
            let mut wa = [load(a, 0), load(a, 16), load(a, 32), load(a, 48)];
            let mut wb = [load(b, 0), load(b, 16), load(b, 32), load(b, 48)];
            for group in 0..16 {
                let slot = group % 4;
                if group >= 4 {
                    let (i1, i2, i3) = ((slot + 1) % 4, (slot + 2) % 4, (slot + 3) % 4);
                    wa[slot] = schedule(wa[slot], wa[i1], wa[i2], wa[i3]);
                    wb[slot] = schedule(wb[slot], wb[i1], wb[i2], wb[i3]);
                }
                let k = _mm_loadu_si128(K.as_ptr().add(4 * group).cast());
                let ka = _mm_add_epi32(wa[slot], k);
                let kb = _mm_add_epi32(wb[slot], k);
                a1 = _mm_sha256rnds2_epu32(a1, a0, ka);
                b1 = _mm_sha256rnds2_epu32(b1, b0, kb);
                a0 = _mm_sha256rnds2_epu32(a0, a1, _mm_shuffle_epi32(ka, 0x0E));
                b0 = _mm_sha256rnds2_epu32(b0, b1, _mm_shuffle_epi32(kb, 0x0E));
            }
            *states = (
                (_mm_add_epi32(a0, save_a0), _mm_add_epi32(a1, save_a1)),
                (_mm_add_epi32(b0, save_b0), _mm_add_epi32(b1, save_b1)),
            );
        }
    }

    /// The next four words of the schedule, W[t..t+4], from W[t-16..t-12] (`w16`),
    /// W[t-12..t-8] (`w12`), W[t-8..t-4] (`w8`) and W[t-4..t] (`w4`).
    #[target_feature(enable = "sha,sse2,ssse3")]
    unsafe fn schedule(w16: __m128i, w12: __m128i, w8: __m128i, w4: __m128i) -> __m128i {
        // SAFETY: register operations only; the features are the caller's promise. (Newer
        // compilers call these intrinsics safe inside a function with the features; the
        // workspace's minimum, 1.85, does not.)
        #[allow(unused_unsafe)]
        unsafe {
            // W[t-16] + σ0(W[t-15]), plus W[t-7] (W[t-7..t-3], from w8 and w4), then
            // σ1(W[t-2]).
            let x = _mm_add_epi32(_mm_sha256msg1_epu32(w16, w12), _mm_alignr_epi8(w4, w8, 4));
            _mm_sha256msg2_epu32(x, w4)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u8) -> Box<[u8; BLOCK]> {
        let mut block = Box::new([0u8; BLOCK]);
        let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
        for byte in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
        block
    }

    fn ring(data: &[u8]) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
        out
    }

    #[test]
    fn both_digests_are_sha256_of_their_blocks() {
        if !available() {
            // The fallback is ring's, which the fs-verity tests check against the real tool.
            assert!(digest_pair(&block(1)[..], &block(2)[..]).is_none());
            return;
        }
        for seed in 0..32u8 {
            let (a, b) = (block(seed), block(seed.wrapping_add(100)));
            let (da, db) = digest_pair(&a[..], &b[..]).unwrap();
            assert_eq!(da, ring(&a[..]), "first of pair {seed}");
            assert_eq!(db, ring(&b[..]), "second of pair {seed}");
        }
        let zeros = Box::new([0u8; BLOCK]);
        let ones = Box::new([0xffu8; BLOCK]);
        assert_eq!(
            digest_pair(&zeros[..], &ones[..]),
            None.or(Some((ring(&zeros[..]), ring(&ones[..]))))
        );
        assert_eq!(digest_pair(&zeros[..100], &ones[..]), None, "a short block");
        assert_eq!(
            digest_pair(&zeros[..], &ones[..]).unwrap(),
            (ring(&zeros[..]), ring(&ones[..]))
        );
    }
}
