//! Wharf's cross-crate tests. Today: the style gates in `tests/tidy.rs`. The deterministic
//! simulator and the end-to-end tests against real `wharf` processes arrive with the broker and
//! replication issues. Storage crash-consistency tests live with the storage crate
//! (`storage/tests/`), and the DmaDisk suite with `core` (`core/tests/dma_log.rs`).
