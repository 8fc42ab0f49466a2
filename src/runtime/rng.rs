//! Counter-based randomness: every draw is a pure function of (seed,
//! stream, index), so the data order, slice choice, augmentation and the
//! dropout seed of micro-batch k are the same whether the run got there
//! straight or through a checkpoint. Nothing carries hidden state across
//! steps, which is why a checkpoint needs no RNG state beyond the seed and
//! the step.

/// Independent streams of draws.
pub const STREAM_INIT: u64 = 1;
pub const STREAM_ORDER: u64 = 2;
pub const STREAM_SLICE: u64 = 3;
pub const STREAM_AUGMENT: u64 = 4;
pub const STREAM_TORCH: u64 = 5;
pub const STREAM_NOISE: u64 = 6;

/// Fine-tuning's streams (its own process; numbers kept from its first
/// version so that runs stay reproducible): the network's initialisation,
/// libtorch's seed per step, the train/validation split, the case order per
/// epoch and each batch's augmentation.
pub const STREAM_FT_INIT: u64 = 1;
pub const STREAM_FT_TORCH: u64 = 2;
pub const STREAM_FT_SPLIT: u64 = 0x5417;
pub const STREAM_FT_ORDER: u64 = 0xe90c;
pub const STREAM_FT_AUGMENT: u64 = 0xd03b;

/// SplitMix64's finaliser: a bijective 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit value determined by (seed, stream, index).
pub fn derive(seed: u64, stream: u64, index: u64) -> u64 {
    mix64(mix64(mix64(seed ^ 0x6a09_e667_f3bc_c908).wrapping_add(stream)).wrapping_add(index))
}

/// A seed for libtorch's generator (non-negative i64).
pub fn torch_seed(seed: u64, stream: u64, index: u64) -> i64 {
    (derive(seed, stream, index) >> 1) as i64
}

/// SplitMix64 generator started from (seed, stream, index).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64, index: u64) -> Rng {
        Rng(derive(seed, stream, index))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [0, n) (n > 0), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Fisher-Yates permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_on_every_coordinate() {
        let a = derive(0, STREAM_SLICE, 5);
        assert_eq!(a, derive(0, STREAM_SLICE, 5));
        assert_ne!(a, derive(1, STREAM_SLICE, 5));
        assert_ne!(a, derive(0, STREAM_ORDER, 5));
        assert_ne!(a, derive(0, STREAM_SLICE, 6));
    }

    #[test]
    fn permutation_is_a_permutation_and_roughly_uniform() {
        let mut r = Rng::new(3, STREAM_ORDER, 0);
        let mut p = r.permutation(1000);
        p.sort_unstable();
        assert!(p.iter().enumerate().all(|(i, &v)| i as u32 == v));
        // position of element 0 over many shuffles of 4: each slot ~1/4
        let mut counts = [0usize; 4];
        for k in 0..4000 {
            let p = Rng::new(9, STREAM_ORDER, k).permutation(4);
            counts[p.iter().position(|&v| v == 0).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
        let mean: f64 = (0..10000).map(|_| r.uniform()).sum::<f64>() / 10000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
