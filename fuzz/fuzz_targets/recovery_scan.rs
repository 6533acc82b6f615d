//! See `wharf_fuzz::recovery_scan` for the input format and the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::recovery_scan::run(data));
