//! Building blocks of SwinUNETR, split along MONAI's own seam: the Swin
//! transformer encoder (`transformer`) and the UNETR convolution blocks
//! (`unetr_blocks`), over a few torch.nn layers with PyTorch's names and
//! initialisation (`layers`). The assembled network is
//! [`crate::model::swin_unetr::SwinUnetr`].
pub mod config;
pub mod layers;
pub mod transformer;
pub mod unetr_blocks;
