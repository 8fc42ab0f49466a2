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
pub mod run_block;
pub mod torch;

pub use device::DeviceChoice;

/// The process set-up every stage that trains or runs a network does
/// first, written once: libtorch's intra-op threads (0 leaves libtorch's
/// own choice), the device `device` stands for (`key` names the config key
/// in the log line and errors), and on the CPU the allocator setting of
/// [`memory::reuse_freed_memory`] unless `keep_freed_memory` is off.
pub fn start(threads: usize, device: DeviceChoice, key: &str, keep_freed_memory: bool) -> anyhow::Result<tch::Device> {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let dev = device.resolve(key)?;
    if !dev.is_cuda() && keep_freed_memory {
        memory::reuse_freed_memory();
    }
    Ok(dev)
}
