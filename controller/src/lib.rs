pub mod decisions;
mod mirror;
pub mod node;
pub mod records;
pub mod store;
