//! The target embeddings pretraining aligns to, as the loader holds them
//! (shared by `data`, which reads them, and `noise`, which swaps rows).

/// One table of target embeddings, rows in index order.
#[derive(Debug)]
pub struct Target {
    /// `text` or `image`.
    pub name: String,
    pub dim: usize,
    pub data: Vec<f32>,
}
