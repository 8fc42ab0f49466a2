//! Shared runtime of the stages that run tensors (pretrain, embed,
//! finetune, evaluate): which device and why (`device`), what libtorch and
//! the GPU driver are (`torch`, read by `med3d doctor`), the boundary that
//! turns libtorch exceptions into errors (`guard`), the CPU allocator
//! setting (`memory`), the optimiser and learning-rate schedule (`optim`)
//! and the seeded random streams (`rng`).
pub mod device;
pub mod guard;
pub mod memory;
pub mod optim;
pub mod rng;
pub mod torch;

pub use device::DeviceChoice;
