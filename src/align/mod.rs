//! Alignment of the 3D model's plane-slice embeddings with the frozen 2D
//! embeddings: optimal-transport plans and the losses built on them.
pub mod ot;
pub mod pot_fused;
