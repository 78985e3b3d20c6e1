//! Placeholder: the batchctl end-to-end benchmark is being written.
fn main() {}
