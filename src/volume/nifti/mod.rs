//! NIfTI-1 and NIfTI-2 reading: single files (.nii, .nii.gz) and header/image
//! pairs (.hdr/.img, optionally gzipped), either byte order, every real
//! numeric datatype. The affine follows nibabel's `img.affine` (sform when
//! its code is set, else qform, else the pixdim-based fallback) and scaling
//! follows nibabel's rule (scl_slope of 0, NaN or Inf means "no scaling").
//!
//! Our own parser rather than the `nifti` crate: that crate reads NIfTI-1
//! only, and the header parser is small enough to own, fuzz and give errors
//! that name the field that is wrong.
//!
//! Split so each part can be read and tested alone: `header` (fields, the
//! affine, the scaling rule), `data` (voxel bytes to f32), `read` (files,
//! pairs, gzip, streaming) and `write` (the NIfTI-1 writer). Callers go
//! through the re-exports below, so the split is not part of the API.
mod data;
mod header;
mod read;
mod write;

pub use data::{data_nbytes, decode, decode_c_order_into, decode_into, DataType};
pub use header::{parse_header, NiftiHeader};
pub use read::{read, read_as, read_header, Layout, NiftiImage};
pub use write::write_nifti1;
