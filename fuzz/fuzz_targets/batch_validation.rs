//! See `wharf_fuzz::batch_validation` for the input format and the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::batch_validation::run(data));
