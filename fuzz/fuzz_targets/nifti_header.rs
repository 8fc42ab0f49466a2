//! `parse_header` on any bytes: never panics, and what it accepts yields a
//! shape, affine, scaling and byte count without panicking either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use med3dinsight::volume::{affine, nifti};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = nifti::parse_header(data) {
        let shape = h.shape();
        assert_eq!(shape.len() as i64, h.dim[0]);
        assert!(shape.iter().all(|&d| d >= 1));
        let a = h.affine();
        let _ = affine::axcodes(&a);
        let _ = affine::inv_affine(&a);
        let _ = h.scaling();
        if let Ok(dt) = h.data_type() {
            if let Ok(n) = nifti::data_nbytes(&h, dt) {
                assert!(n <= isize::MAX as usize);
            }
        }
    }
});
