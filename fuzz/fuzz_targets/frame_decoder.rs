//! See `wharf_fuzz::frame_decoder` for the input format and the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::frame_decoder::run(data));
