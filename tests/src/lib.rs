//! Wharf's cross-crate tests: the deterministic replication simulator ([`sim`], run by
//! `tests/sim.rs` and the `sim` binary) and the style gates in `tests/tidy.rs`. Storage
//! crash-consistency tests live with the storage crate (`storage/tests/`), the DmaDisk suite and
//! the broker end-to-end tests with `core` (`core/tests/`).

pub mod sim;
