//! A small seeded generator, a keyed bijection and a keyed sample: enough for reproducible
//! shuffles and for the positions a harvest draws from each context.
//!
//! SplitMix64 (Steele, Lea & Flood 2014) passes BigCrush, is one multiply-xorshift chain
//! per draw and needs no dependency. The shuffles here need uniform, reproducible draws,
//! not cryptographic strength.

use crate::error::{Error, Result};

/// The SplitMix64 finaliser: a bijective mix of 64 bits.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Derive an independent 64-bit key from a seed and a list of labels (epoch, window, ...).
pub fn derive(seed: u64, labels: &[u64]) -> u64 {
    let mut k = mix64(seed ^ 0x6d6f_6e6f_6661_7374); // "monofast"
    for &label in labels {
        k = mix64(k ^ mix64(label.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    }
    k
}

pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in `[0, n)` by Lemire's multiply-shift with rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A keyed permutation of `[0, n)` evaluated pointwise in O(1) memory.
///
/// A balanced Feistel network on the smallest even bit width covering n is a bijection of
/// `[0, 2^bits)`; cycle-walking (re-applying it until the value lands below n) restricts
/// it to a bijection of `[0, n)`. Since 2^bits < 4n, the walk takes under 4 steps on
/// average. Compared with materialising a Fisher-Yates permutation this costs nothing to
/// set up, so the first batch of an epoch is ready at once whatever the dataset size
/// (Fisher-Yates over 10^8 rows takes ~1 s and 800 MB), and resuming at any row is free.
#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; ROUNDS],
}

/// Four rounds make a strong pseudo-random permutation from a pseudo-random round
/// function (Luby-Rackoff); two more cost ~5 ns a row and help tiny domains mix.
const ROUNDS: usize = 6;

impl Permutation {
    pub fn new(n: u64, key: u64) -> Self {
        let bits = if n <= 1 {
            2
        } else {
            64 - (n - 1).leading_zeros()
        };
        let half_bits = bits.div_ceil(2).max(1);
        let mut rng = SplitMix64::new(key);
        let keys = std::array::from_fn(|_| rng.next_u64());
        Permutation { n, half_bits, keys }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    #[inline]
    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for &k in &self.keys {
            let next = left ^ (mix64(right ^ k) & mask);
            left = right;
            right = next;
        }
        (left << self.half_bits) | right
    }

    /// The image of `i` (must be `< n`).
    #[inline]
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = i;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x;
            }
        }
    }
}

/// Positions drawn from each context by `sample_positions`: `rows x width`, row-major.
#[derive(Debug, PartialEq, Eq)]
pub struct Sample {
    pub width: usize,
    pub positions: Vec<i64>,
}

/// For each context id, the `count` positions of `[skip, length)` with the smallest keys
/// `mix64(mix64(mix64(seed) ^ id) ^ position)`, in increasing order (all of them when
/// `count` exceeds the range).
///
/// Each row is a pure function of (seed, id), so a resumed harvest redraws exactly the
/// positions it lost whatever its batch layout. Within a row the keys are distinct (`mix64`
/// is a bijection and the positions differ), so the choice never depends on a tie-break.
/// Existing stores were sampled this way: a change to the keys would change which rows a
/// harvest writes, and a resumed harvest would mix two samplings in one store.
pub fn sample_positions(
    seed: u64,
    context_ids: &[u64],
    length: u64,
    count: u64,
    skip: u64,
) -> Result<Sample> {
    if length > i64::MAX as u64 {
        return Err(Error::invalid(format!(
            "length={length}: positions must fit in int64"
        )));
    }
    let span = length.saturating_sub(skip);
    let too_many = || {
        Error::invalid(format!(
            "{} contexts x {span} positions are too many to sample in memory",
            context_ids.len()
        ))
    };
    let span_len = usize::try_from(span).map_err(|_| too_many())?;
    let width = span_len.min(usize::try_from(count).unwrap_or(usize::MAX));
    let total = context_ids.len().checked_mul(width).ok_or_else(too_many)?;
    let mut keyed: Vec<(u64, u64)> = Vec::new(); // (key, position), one context at a time
    keyed.try_reserve_exact(span_len).map_err(|_| too_many())?;
    let mut positions: Vec<i64> = Vec::new();
    positions.try_reserve_exact(total).map_err(|_| too_many())?;
    let key = mix64(seed);
    for &id in context_ids {
        let context_key = mix64(key ^ id);
        keyed.clear();
        keyed.extend((skip..length).map(|p| (mix64(context_key ^ p), p)));
        if width < keyed.len() {
            keyed.select_nth_unstable(width); // the `width` smallest keys first, unordered
        }
        let chosen = &mut keyed[..width];
        chosen.sort_unstable_by_key(|&(_, p)| p);
        // `p < length <= i64::MAX`, checked above.
        positions.extend(chosen.iter().map(|&(_, p)| p as i64));
    }
    Ok(Sample { width, positions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [0u64, 1, 2, 3, 7, 8, 9, 100, 1000, 4097, 65_536, 100_003] {
            let p = Permutation::new(n, 42);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i) as usize;
                assert!(!seen[j], "n={n}: {j} twice");
                seen[j] = true;
            }
        }
    }

    #[test]
    fn permutation_depends_on_key_and_mixes() {
        let n = 10_000;
        let a: Vec<u64> = (0..n).map(|i| Permutation::new(n, 1).apply(i)).collect();
        let b: Vec<u64> = (0..n).map(|i| Permutation::new(n, 2).apply(i)).collect();
        assert_ne!(a, b);
        // Not close to the identity: few fixed points, and neighbours land far apart.
        let fixed = a
            .iter()
            .enumerate()
            .filter(|(i, &v)| *i as u64 == v)
            .count();
        assert!(fixed < 10, "{fixed} fixed points");
        let near = a.windows(2).filter(|w| w[0].abs_diff(w[1]) < 10).count();
        assert!(near < 50, "{near} adjacent pairs stay close");
        // The mean of the first half is near the middle (a biased map would not be).
        let mean = a[..(n / 2) as usize].iter().sum::<u64>() as f64 / (n / 2) as f64;
        assert!(
            (mean - n as f64 / 2.0).abs() < n as f64 * 0.03,
            "mean {mean}"
        );
    }

    #[test]
    fn mix64_is_splitmix64s_finaliser() {
        // Values of the reference finaliser; the harvest's positions are keyed on it.
        let out = [0, 1, 1 << 63, u64::MAX].map(mix64);
        assert_eq!(
            out,
            [
                0,
                6_238_072_747_940_578_789,
                2_720_858_781_877_447_050,
                13_029_008_266_876_403_067
            ]
        );
    }

    #[test]
    fn sampled_positions_are_sorted_distinct_and_keyed_on_the_context() {
        let ids: Vec<u64> = (100..140).collect();
        let sample = sample_positions(7, &ids, 256, 200, 1).unwrap();
        assert_eq!((sample.width, sample.positions.len()), (200, 40 * 200));
        let rows: Vec<&[i64]> = sample.positions.chunks(200).collect();
        for row in &rows {
            assert!(row.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
            assert!(row[0] >= 1 && row[199] < 256);
        }
        assert_ne!(rows[0], rows[1]);
        // Any batch layout draws the same rows.
        let (head, tail) = ids.split_at(13);
        let mut split = sample_positions(7, head, 256, 200, 1).unwrap().positions;
        split.extend(sample_positions(7, tail, 256, 200, 1).unwrap().positions);
        assert_eq!(split, sample.positions);
        assert_ne!(sample_positions(8, &ids, 256, 200, 1).unwrap(), sample);
    }

    #[test]
    fn sample_width_is_capped_by_the_range() {
        let all = sample_positions(3, &[0, 1], 8, 100, 2).unwrap();
        assert_eq!(all.width, 6);
        assert_eq!(all.positions, [2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6, 7]);
        let none = sample_positions(3, &[0, 1], 4, 3, 9).unwrap();
        assert_eq!((none.width, none.positions.len()), (0, 0));
        assert!(sample_positions(3, &[], 16, 4, 1)
            .unwrap()
            .positions
            .is_empty());
        assert!(matches!(
            sample_positions(3, &[0], u64::MAX, 4, 1),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            sample_positions(3, &[0], i64::MAX as u64, 4, 0),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn below_is_in_range_and_shuffle_permutes() {
        let mut rng = SplitMix64::new(7);
        for n in [1u64, 2, 3, 1000] {
            assert!((0..1000).all(|_| rng.below(n) < n));
        }
        let mut v: Vec<u32> = (0..1000).collect();
        rng.shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }
}
