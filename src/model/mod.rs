//! The trained 3D side of Med3DInsight: the encoder-decoder backbone
//! ([`backbone`]: SwinUNETR with MONAI's parameter names, or an nnU-Net
//! U-Net with dynamic_network_architectures'), the plane-slice-aware
//! transformer, and helpers to move weights in and out as PyTorch state
//! dicts.
pub mod backbone;
pub mod nnunet;
pub mod psat;
pub mod state_dict;
pub mod swin;
pub mod swin_unetr;
pub mod torch_save;
