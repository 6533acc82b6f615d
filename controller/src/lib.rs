pub mod decisions;
mod mirror;
pub mod records;
pub mod store;
