//! Wharf replication: the sans-IO replica state machine (pull-based replication, high
//! watermark, ISR, acks, leader epochs). Not implemented yet: it arrives with the replication
//! issue. The crate exists so the workspace layout of DESIGN.md §2 holds from the start.
