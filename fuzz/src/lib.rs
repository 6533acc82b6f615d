//! Wharf's fuzz targets, as plain functions so the same code runs under libFuzzer
//! (`fuzz_targets/*.rs`, through cargo-fuzz), in the corpus generator (`examples/gen_corpus.rs`)
//! and in the replay tests (`tests/replay.rs`, which run every committed corpus and regression
//! input on stable Rust without libFuzzer).
//!
//! Each target's module documents its input format and the invariants it asserts beyond "no
//! panic".

/// The wire protocol, compiled from `core/src/protocol` itself. It is a pure codec (rkyv,
/// crc32c, futures-lite, thiserror); depending on the `wharf` crate instead would build glommio,
/// tracing, clap, prometheus and the rest of the broker with fuzzing instrumentation on every CI
/// run, for no coverage gain. If the protocol ever uses another module of the `wharf` crate,
/// this include fails to compile, loudly.
#[path = "../../core/src/protocol/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
pub mod protocol;

pub mod batch_validation;
pub mod frame_decoder;
pub mod recovery_scan;
pub mod request_bodies;
pub mod seeds;

/// Reads a little-endian integer at `at`, or 0 past the end (input formats are forgiving: any
/// byte string is a valid input).
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    for (i, byte) in raw.iter_mut().enumerate() {
        *byte = bytes.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(raw)
}

pub(crate) fn le_u16(bytes: &[u8], at: usize) -> u16 {
    let lo = bytes.get(at).copied().unwrap_or(0);
    let hi = bytes.get(at + 1).copied().unwrap_or(0);
    u16::from_le_bytes([lo, hi])
}
