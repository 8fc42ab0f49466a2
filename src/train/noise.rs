//! Caption noise for the robustness experiment (issue 7): a fixed fraction
//! `pretrain.target_noise` of the usable slices get the target rows (every
//! target table) of a random other usable slice, as if their captions had
//! been swapped with those of random other slices.
//!
//! Which slices, and whose rows they get, are drawn from the seed alone
//! (stream `STREAM_NOISE`), once, when the dataset opens: the same slices
//! are noisy in every epoch and after a resume. Sources are read from the
//! clean tables, so a noisy slice never passes on another one's noise.
use anyhow::{bail, Result};

use super::targets::Target;
use crate::runtime::rng::{Rng, STREAM_NOISE};

/// One replaced slice: index row `row` now carries the targets of `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swap {
    pub row: usize,
    pub source: usize,
}

/// Number of noisy slices among `usable`: the fraction, rounded to nearest.
pub fn noisy_count(fraction: f64, usable: usize) -> usize {
    (fraction * usable as f64).round() as usize
}

/// The swaps for `fraction` of `usable` (index rows, ascending), drawn
/// from `seed`; sorted by row.
pub fn draw(seed: u64, fraction: f64, usable: &[usize]) -> Result<Vec<Swap>> {
    let n = usable.len();
    let k = noisy_count(fraction, n);
    if k == 0 {
        return Ok(Vec::new());
    }
    if n < 2 {
        bail!(
            "pretrain.target_noise = {fraction}: needs at least two usable slices to swap targets between, found {n}"
        );
    }
    let order = Rng::new(seed, STREAM_NOISE, 0).permutation(n);
    let mut swaps: Vec<Swap> = order[..k]
        .iter()
        .map(|&i| {
            let i = i as usize;
            // uniform over the n - 1 other slices
            let mut j = Rng::new(seed, STREAM_NOISE, 1 + i as u64).below(n as u64 - 1) as usize;
            if j >= i {
                j += 1;
            }
            Swap {
                row: usable[i],
                source: usable[j],
            }
        })
        .collect();
    swaps.sort_by_key(|s| s.row);
    Ok(swaps)
}

/// Copies each swap's source rows (from the clean tables) over its row.
pub fn apply(targets: &mut [Target], swaps: &[Swap]) {
    for t in targets {
        let clean = t.data.clone();
        let d = t.dim;
        for s in swaps {
            t.data[s.row * d..(s.row + 1) * d].copy_from_slice(&clean[s.source * d..(s.source + 1) * d]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(rows: usize) -> Vec<Target> {
        // row r of table t holds (t, r, r) so a row's origin can be read back
        ["text", "image"]
            .iter()
            .enumerate()
            .map(|(ti, name)| Target {
                name: name.to_string(),
                dim: 3,
                data: (0..rows).flat_map(|r| [ti as f32, r as f32, r as f32]).collect(),
            })
            .collect()
    }

    #[test]
    fn fraction_is_kept_and_rows_come_from_other_usable_slices() {
        let rows = 1000;
        // every third row unusable: sources must avoid them
        let usable: Vec<usize> = (0..rows).filter(|r| r % 3 != 1).collect();
        for fraction in [0.0, 0.1, 0.25, 0.5, 0.9] {
            let swaps = draw(7, fraction, &usable).unwrap();
            assert_eq!(swaps.len(), (fraction * usable.len() as f64).round() as usize);
            let mut noisy: Vec<usize> = swaps.iter().map(|s| s.row).collect();
            noisy.dedup();
            assert_eq!(noisy.len(), swaps.len(), "a slice was drawn twice");
            let mut t = tables(rows);
            apply(&mut t, &swaps);
            let clean = tables(rows);
            for r in 0..rows {
                let swap = swaps.iter().find(|s| s.row == r);
                for (ti, (tt, ct)) in t.iter().zip(&clean).enumerate() {
                    let got = &tt.data[r * 3..r * 3 + 3];
                    match swap {
                        None => assert_eq!(got, &ct.data[r * 3..r * 3 + 3], "clean row {r} changed"),
                        Some(s) => {
                            // the same source in every table, another usable slice
                            assert_eq!(got, [ti as f32, s.source as f32, s.source as f32]);
                            assert_ne!(s.source, r);
                            assert!(usable.contains(&s.source), "source {} is not usable", s.source);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn draws_are_fixed_by_the_seed_and_spread_over_sources() {
        let usable: Vec<usize> = (0..400).collect();
        let a = draw(3, 0.5, &usable).unwrap();
        assert_eq!(a, draw(3, 0.5, &usable).unwrap());
        assert_ne!(a, draw(4, 0.5, &usable).unwrap());
        // 200 sources drawn from 399 others: mostly distinct, not a shift
        let mut src: Vec<usize> = a.iter().map(|s| s.source).collect();
        src.sort_unstable();
        src.dedup();
        assert!(src.len() > 120, "{} distinct sources", src.len());
        assert!(a.iter().any(|s| s.source < s.row) && a.iter().any(|s| s.source > s.row));
    }

    #[test]
    fn one_usable_slice_cannot_be_swapped() {
        assert!(draw(0, 0.0, &[4]).unwrap().is_empty());
        let e = draw(0, 0.9, &[4]).unwrap_err();
        assert!(format!("{e:#}").contains("pretrain.target_noise"), "{e:#}");
    }
}
