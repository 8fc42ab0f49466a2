//! nnU-Net v2's U-Nets (`dynamic_network_architectures`), built from the
//! `architecture` of a plans file: [`spec`] reads the description,
//! [`net`] (from `blocks`) builds the network under PyTorch's state-dict keys, [`plans`]
//! reads a plans file's configuration.
mod blocks;
pub mod net;
pub mod plans;
pub mod spec;

pub use net::{ConvUnet, UnetOutput};
pub use spec::{NetClass, UnetSpec};
