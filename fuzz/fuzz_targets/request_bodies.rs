//! See `wharf_fuzz::request_bodies` for the input format and the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::request_bodies::run(data));
