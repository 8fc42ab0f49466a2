//! The trained 3D side of Med3DInsight: the encoder-decoder backbone
//! (SwinUNETR, with MONAI's parameter names), the plane-slice-aware
//! transformer, and helpers to move weights in and out as PyTorch state
//! dicts.
pub mod psat;
pub mod state_dict;
pub mod swin;
pub mod swin_unetr;
