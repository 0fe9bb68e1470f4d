//! BLAKE3 of many short inputs side by side, for the log's entry hashes
//! and the Merkle trees over them.
//!
//! An input of up to one BLAKE3 chunk (1,024 bytes) is hashed as a chain
//! of compressions, one per 64-byte block, none of which can start before
//! the one before it ends: hashed alone, it uses one SIMD lane's worth of
//! the machine. The `blake3` crate's `hash_many`, the routine that hashes
//! the chunks of a long input in parallel, runs that chain for up to 16
//! inputs of equal length at once (AVX-512; 8 with AVX2, 4 with SSE4.1).
//! [`hash_all`] groups inputs by their number of blocks, runs each group's
//! blocks but the last through `hash_many`, and compresses each input's
//! last block alone with the flags that end the chunk and make it the
//! root, exactly as BLAKE3 hashes a one-chunk input. Inputs longer than a
//! chunk, or of a single block, are hashed one by one.
//!
//! `hash_many` is in the crate's undocumented `platform` module, which is
//! why the workspace pins `blake3` to one version; the tests below check
//! [`hash_all`] against `blake3::hash` at every length up to past a chunk.
//!
//! Invariant: `hash_all(prefix, inputs)[i] == BLAKE3(prefix || inputs[i])`
//! for every `i`, whatever the lengths.

use blake3::platform::Platform;

/// A 32-byte BLAKE3 hash.
pub type Hash = [u8; 32];

/// BLAKE3's block and chunk lengths, and the flags of its compression
/// function (BLAKE3 specification, §2.1 and §2.2), which its crate keeps
/// private.
const BLOCK_LEN: usize = 64;
const CHUNK_LEN: usize = 1024;
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const ROOT: u8 = 1 << 3;
/// BLAKE3's initial chaining value (that of SHA-256).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
/// Inputs hashed by one call of `hash_many`: the widest SIMD degree.
const BATCH: usize = 16;

/// `BLAKE3(prefix || input)` of each of `inputs`, in order, computed side
/// by side (see the module doc). `prefix` is at most one block.
pub fn hash_all(prefix: &[u8], inputs: &[&[u8]]) -> Vec<Hash> {
    debug_assert!(prefix.len() <= BLOCK_LEN);
    let one = |input: &[u8]| {
        let mut h = blake3::Hasher::new();
        h.update(prefix);
        h.update(input);
        *h.finalize().as_bytes()
    };
    let mut out = vec![[0u8; 32]; inputs.len()];
    // Each input's number of blocks before its last, which is what
    // `hash_many` takes; 0 marks an input hashed alone.
    let lead = |input: &[u8]| {
        let len = prefix.len() + input.len();
        if len > CHUNK_LEN {
            0
        } else {
            len.saturating_sub(1) / BLOCK_LEN
        }
    };
    let mut order: Vec<(usize, usize)> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| (lead(input), i))
        .collect();
    order.sort_unstable();
    let platform = Platform::detect();
    let mut scratch = Vec::new();
    for run in order.chunk_by(|a, b| a.0 == b.0) {
        let blocks = run[0].0;
        if blocks == 0 {
            for &(_, i) in run {
                out[i] = one(inputs[i]);
            }
            continue;
        }
        // Bytes of each input in its lead blocks; the rest, 1..=64 bytes
        // (`lead` left at least one), is its last block.
        let lead_len = blocks * BLOCK_LEN - prefix.len();
        for batch in run.chunks(BATCH) {
            scratch.clear();
            for &(_, i) in batch {
                scratch.extend_from_slice(prefix);
                scratch.extend_from_slice(&inputs[i][..lead_len]);
            }
            let mut cvs = [0u8; 32 * BATCH];
            lead_blocks(platform, blocks, &scratch, &mut cvs);
            for (cv_bytes, &(_, i)) in cvs.chunks_exact(32).zip(batch) {
                let mut cv = [0u32; 8];
                for (w, b) in cv.iter_mut().zip(cv_bytes.chunks_exact(4)) {
                    *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                let tail = &inputs[i][lead_len..];
                let mut block = [0u8; BLOCK_LEN];
                block[..tail.len()].copy_from_slice(tail);
                platform.compress_in_place(&mut cv, &block, tail.len() as u8, 0, CHUNK_END | ROOT);
                for (o, w) in out[i].chunks_exact_mut(4).zip(cv) {
                    o.copy_from_slice(&w.to_le_bytes());
                }
            }
        }
    }
    out
}

/// Runs `hash_many` over the inputs of `blocks` 64-byte blocks laid end to
/// end in `scratch`, leaving each one's chaining value (not yet ended, not
/// root) in `cvs`. `hash_many` takes the input length as a constant, so
/// each block count from 1 to 15 (a chunk is 16 blocks, the last of which
/// is never among these) has its own instance.
fn lead_blocks(platform: Platform, blocks: usize, scratch: &[u8], cvs: &mut [u8]) {
    fn many<const N: usize>(platform: Platform, scratch: &[u8], cvs: &mut [u8]) {
        let (inputs, _) = scratch.as_chunks::<N>();
        let inputs: Vec<&[u8; N]> = inputs.iter().collect();
        platform.hash_many(
            &inputs,
            &IV,
            0,
            blake3::IncrementCounter::No,
            0,
            CHUNK_START,
            0,
            cvs,
        );
    }
    macro_rules! dispatch {
        ($($b:literal)*) => {
            match blocks {
                $($b => many::<{ $b * BLOCK_LEN }>(platform, scratch, cvs),)*
                _ => unreachable!("an input of one chunk has at most 15 blocks before its last"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_by_one(prefix: &[u8], inputs: &[&[u8]]) -> Vec<Hash> {
        inputs
            .iter()
            .map(|i| *blake3::hash(&[prefix, i].concat()).as_bytes())
            .collect()
    }

    /// Bytes that differ from one input to the next, so that a lane
    /// mixed up with another shows.
    fn filler(len: usize, salt: usize) -> Vec<u8> {
        (0..len).map(|j| (j * 7 + salt * 131 + 3) as u8).collect()
    }

    #[test]
    fn side_by_side_equals_one_by_one_at_every_length() {
        // Past a chunk, through every block boundary, with a partial and
        // several whole batches of each length, behind prefixes of the
        // lengths the log uses (none, a Merkle node's tag, the entry
        // domain tag) and of a whole block.
        for prefix in [&b""[..], &[1u8], &[7u8; 24], &[9u8; 64]] {
            for len in 0..1_100 {
                for count in [1, 3, 16, 17, 40] {
                    let inputs: Vec<Vec<u8>> = (0..count).map(|k| filler(len, k)).collect();
                    let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
                    assert_eq!(
                        hash_all(prefix, &refs),
                        one_by_one(prefix, &refs),
                        "prefix {}, length {len}, {count} inputs",
                        prefix.len()
                    );
                }
            }
        }
        assert!(hash_all(b"x", &[]).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn mixed_lengths_keep_their_order(
            lens in proptest::collection::vec(0usize..1_200, 0..70),
            prefix_len in 0usize..=64,
        ) {
            let prefix = filler(prefix_len, 99);
            let inputs: Vec<Vec<u8>> = lens.iter().enumerate().map(|(k, &l)| filler(l, k)).collect();
            let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            proptest::prop_assert_eq!(hash_all(&prefix, &refs), one_by_one(&prefix, &refs));
        }
    }
}
