//! ISA-L and zlib-rs on the same fuzz bytes, read through a small output
//! buffer: both inflate to the same bytes or both refuse. A disagreement, a
//! panic or an allocation past libFuzzer's limit is a finding.
#![no_main]
use std::io::Read;

use libfuzzer_sys::fuzz_target;
use med3dinsight::volume::gzip::{self, Inflater};

fn inflate(data: &[u8], which: Inflater) -> Result<Vec<u8>, ()> {
    let mut r = gzip::decoder_with(data, which);
    let mut out = Vec::new();
    let mut buf = [0u8; 4093];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return Err(()),
        }
        if out.len() > 16 << 20 {
            return Err(());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    assert!(gzip::isal_available(), "ISA-L is not available");
    let a = inflate(data, Inflater::Isal);
    let b = inflate(data, Inflater::Zlib);
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert!(x == y, "the inflaters give different bytes"),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "ISA-L {:?} but zlib-rs {:?}",
            a.as_ref().map(|v| v.len()),
            b.as_ref().map(|v| v.len())
        ),
    }
});
