pub mod decisions;
pub mod records;
