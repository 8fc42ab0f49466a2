//! Deterministic input mutation for the bounded stable-Rust versions of the
//! fuzz targets: a small PRNG and the mutations libFuzzer's most useful ones
//! resemble (truncation, byte flips, header-region damage, insertions).
#![allow(dead_code)]

/// xorshift64*: small, deterministic, good enough to spread inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn any_f64(&mut self) -> f64 {
        match self.below(6) {
            0 => f64::from_bits(self.next()),
            1 => [0.0, -0.0, f64::NAN, f64::INFINITY, f64::MIN_POSITIVE, 1e308][self.below(6) as usize],
            _ => (self.unit() - 0.5) * 10f64.powi(self.below(8) as i32 - 2),
        }
    }
}

/// One mutant of `orig` (which must not be empty).
pub fn mutate(rng: &mut Rng, orig: &[u8]) -> Vec<u8> {
    let mut b = orig.to_vec();
    match rng.below(5) {
        0 => b.truncate(rng.below(b.len() as u64) as usize),
        1 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
        }
        2 => {
            // damage the header region, where lengths, dims and VRs live
            let end = b.len().min(2048) as u64;
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(end) as usize;
                b[i] = [0x00, 0xff, 0x7f, 0x80][rng.below(4) as usize];
            }
        }
        3 => {
            // one 16- or 32-bit field of the header region set to an extreme
            let end = b.len().min(600).saturating_sub(4) as u64;
            let i = rng.below(end) as usize;
            let v: [u8; 4] = [
                [0xff; 4],
                [0x7f, 0xff, 0xff, 0xff],
                [0xff, 0xff, 0xff, 0x7f],
                [0, 0, 0, 0],
            ][rng.below(4) as usize];
            let w = if rng.below(2) == 0 { 2 } else { 4 };
            if i + w <= b.len() {
                b[i..i + w].copy_from_slice(&v[..w]);
            }
        }
        _ => {
            let i = rng.below(b.len() as u64) as usize;
            let n = rng.below(64) as usize;
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(i..i, junk);
        }
    }
    b
}
