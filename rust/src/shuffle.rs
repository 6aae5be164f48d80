//! The order in which an epoch visits rows, as a pure function of (seed, epoch, position).
//!
//! Because the order is a function and not a materialised list, resuming at any row
//! costs nothing, ranks can compute their parts independently, and prefetch threads can
//! work on different batches without coordination.
//!
//! - `Sequential`: row i at position i (analysis passes, evaluation).
//! - `Exact`: a keyed bijection of all rows (see `rng::Permutation`): every row once per
//!   epoch, batches mix rows from every shard.
//! - `Block`: for data far larger than RAM. Rows are cut into blocks of `block_rows`
//!   contiguous rows; the blocks are shuffled, grouped into windows of `window_blocks`
//!   blocks, and the rows of each window are shuffled together. Reading touches one window
//!   at a time, so the disk sees long sequential reads; the window is the shuffle buffer.

use crate::error::{Error, Result};
use crate::rng::{derive, Permutation, SplitMix64};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sequential,
    Exact,
    Block { block_rows: u64, window_blocks: u64 },
}

impl Mode {
    pub fn parse(name: &str, block_rows: u64, window_blocks: u64) -> Result<Mode> {
        match name {
            "none" | "sequential" => Ok(Mode::Sequential),
            "exact" => Ok(Mode::Exact),
            "block" => {
                if block_rows == 0 || window_blocks == 0 {
                    return Err(Error::invalid(
                        "block shuffle needs block_rows >= 1 and window_blocks >= 1",
                    ));
                }
                Ok(Mode::Block {
                    block_rows,
                    window_blocks,
                })
            }
            other => Err(Error::invalid(format!(
                "shuffle={other:?}; choose exact, block or none"
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Sequential => "none",
            Mode::Exact => "exact",
            Mode::Block { .. } => "block",
        }
    }
}

/// The visiting order of one epoch over `n` rows.
pub enum EpochOrder {
    Sequential,
    Exact(Permutation),
    Block(BlockOrder),
}

impl EpochOrder {
    pub fn new(mode: Mode, n: u64, seed: u64, epoch: u64) -> EpochOrder {
        let key = derive(seed, &[epoch]);
        match mode {
            Mode::Sequential => EpochOrder::Sequential,
            Mode::Exact => EpochOrder::Exact(Permutation::new(n, key)),
            Mode::Block {
                block_rows,
                window_blocks,
            } => EpochOrder::Block(BlockOrder::new(n, block_rows, window_blocks, key)),
        }
    }

    /// Append the rows at positions `[start, start + count)` to `out`.
    pub fn fill(&self, start: u64, count: u64, out: &mut Vec<u64>) {
        match self {
            EpochOrder::Sequential => out.extend(start..start + count),
            EpochOrder::Exact(p) => out.extend((start..start + count).map(|i| p.apply(i))),
            EpochOrder::Block(b) => b.fill(start, count, out),
        }
    }

    pub fn as_block(&self) -> Option<&BlockOrder> {
        match self {
            EpochOrder::Block(b) => Some(b),
            _ => None,
        }
    }
}

pub struct BlockOrder {
    block_rows: u64,
    window_blocks: usize,
    /// Block ids in visiting order.
    blocks: Vec<u64>,
    /// `cum[j]`: rows in `blocks[..j]` (only the last block of the data may be short).
    cum: Vec<u64>,
    key: u64,
}

impl BlockOrder {
    fn new(n: u64, block_rows: u64, window_blocks: u64, key: u64) -> BlockOrder {
        let n_blocks = n.div_ceil(block_rows);
        let mut blocks: Vec<u64> = (0..n_blocks).collect();
        SplitMix64::new(key).shuffle(&mut blocks);
        let mut cum = Vec::with_capacity(blocks.len() + 1);
        cum.push(0);
        let mut total = 0;
        for &b in &blocks {
            total += block_rows.min(n - b * block_rows);
            cum.push(total);
        }
        let window_blocks = window_blocks.min(n_blocks.max(1)) as usize;
        BlockOrder {
            block_rows,
            window_blocks,
            blocks,
            cum,
            key,
        }
    }

    pub fn windows(&self) -> usize {
        self.blocks.len().div_ceil(self.window_blocks)
    }

    /// The position range `[start, end)` of window `w`.
    fn window_span(&self, w: usize) -> (u64, u64) {
        let first = w * self.window_blocks;
        let last = ((w + 1) * self.window_blocks).min(self.blocks.len());
        (self.cum[first], self.cum[last])
    }

    /// The window holding epoch position `i`.
    pub fn window_of(&self, i: u64) -> usize {
        self.block_at(i) / self.window_blocks
    }

    /// Index into `blocks` of the block holding position `i`.
    fn block_at(&self, i: u64) -> usize {
        self.cum.partition_point(|&c| c <= i) - 1
    }

    /// The row ranges `[start, end)` that window `w` reads, for read-ahead advice.
    pub fn window_rows(&self, w: usize) -> Vec<(u64, u64)> {
        let first = w * self.window_blocks;
        let last = ((w + 1) * self.window_blocks).min(self.blocks.len());
        (first..last)
            .map(|j| {
                let start = self.blocks[j] * self.block_rows;
                (start, start + (self.cum[j + 1] - self.cum[j]))
            })
            .collect()
    }

    fn fill(&self, start: u64, count: u64, out: &mut Vec<u64>) {
        let mut i = start;
        let end = start + count;
        while i < end {
            let w = self.window_of(i);
            let (w_start, w_end) = self.window_span(w);
            let perm = Permutation::new(w_end - w_start, derive(self.key, &[w as u64]));
            let stop = end.min(w_end);
            for pos in i..stop {
                let q = w_start + perm.apply(pos - w_start);
                let j = self.block_at(q);
                out.push(self.blocks[j] * self.block_rows + (q - self.cum[j]));
            }
            i = stop;
        }
    }
}

/// The part of each epoch one rank reads: `rows_per_rank` consecutive positions of the
/// shared order, starting at `rank * rows_per_rank`. Ranks are disjoint and equal; the
/// `n % world_size` positions at the end of each epoch are left out (different rows each
/// epoch, since the order changes), as DistributedSampler does with `drop_last=True`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankSplit {
    pub rank: u64,
    pub world_size: u64,
    pub rows_per_rank: u64,
}

impl RankSplit {
    pub fn new(n: u64, rank: u64, world_size: u64) -> Result<RankSplit> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::invalid(format!(
                "rank={rank}, world_size={world_size}: need 0 <= rank < world_size"
            )));
        }
        Ok(RankSplit {
            rank,
            world_size,
            rows_per_rank: n / world_size,
        })
    }

    /// The epoch position of this rank's `i`-th row.
    pub fn position(&self, i: u64) -> u64 {
        self.rank * self.rows_per_rank + i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(mode: Mode, n: u64, seed: u64, e: u64) -> Vec<u64> {
        let mut out = Vec::new();
        EpochOrder::new(mode, n, seed, e).fill(0, n, &mut out);
        out
    }

    fn assert_permutation(rows: &[u64], n: u64) {
        let mut sorted = rows.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn every_mode_visits_each_row_once() {
        let modes = [
            Mode::Sequential,
            Mode::Exact,
            Mode::Block {
                block_rows: 1,
                window_blocks: 1,
            },
            Mode::Block {
                block_rows: 7,
                window_blocks: 3,
            },
            Mode::Block {
                block_rows: 64,
                window_blocks: 100,
            },
        ];
        for mode in modes {
            for n in [0u64, 1, 2, 5, 63, 64, 65, 1000] {
                assert_permutation(&epoch(mode, n, 9, 0), n);
            }
        }
    }

    #[test]
    fn orders_are_seeded_and_change_per_epoch() {
        for mode in [
            Mode::Exact,
            Mode::Block {
                block_rows: 10,
                window_blocks: 4,
            },
        ] {
            assert_eq!(epoch(mode, 500, 1, 0), epoch(mode, 500, 1, 0));
            assert_ne!(epoch(mode, 500, 1, 0), epoch(mode, 500, 2, 0));
            assert_ne!(epoch(mode, 500, 1, 0), epoch(mode, 500, 1, 1));
        }
    }

    #[test]
    fn fill_is_position_pure() {
        // Any split of the epoch into pieces gives the same sequence (what resume relies on).
        for mode in [
            Mode::Exact,
            Mode::Block {
                block_rows: 6,
                window_blocks: 2,
            },
        ] {
            let whole = epoch(mode, 97, 3, 5);
            let order = EpochOrder::new(mode, 97, 3, 5);
            let mut pieces = Vec::new();
            for (start, count) in [(0, 10), (10, 1), (11, 40), (51, 46)] {
                order.fill(start, count, &mut pieces);
            }
            assert_eq!(whole, pieces);
        }
    }

    #[test]
    fn block_windows_read_contiguous_blocks() {
        let (n, block_rows, window_blocks) = (1000u64, 50u64, 4u64);
        let order = EpochOrder::new(
            Mode::Block {
                block_rows,
                window_blocks,
            },
            n,
            4,
            0,
        );
        let b = order.as_block().unwrap();
        let rows = epoch(
            Mode::Block {
                block_rows,
                window_blocks,
            },
            n,
            4,
            0,
        );
        assert_eq!(b.windows(), 5);
        for (w, chunk) in rows
            .chunks((block_rows * window_blocks) as usize)
            .enumerate()
        {
            let ranges = b.window_rows(w);
            assert_eq!(ranges.len(), 4);
            // Every row of the window comes from the window's blocks...
            assert!(chunk
                .iter()
                .all(|r| ranges.iter().any(|(s, e)| s <= r && r < e)));
            // ...and the window is shuffled, not read in order.
            assert!(chunk.windows(2).filter(|p| p[1] == p[0] + 1).count() < chunk.len() / 4);
            assert_eq!(b.window_of(w as u64 * 200), w);
        }
    }

    #[test]
    fn rank_split_is_disjoint_and_equal() {
        for n in [0u64, 1, 10, 11, 1001] {
            for world in 1..=5u64 {
                let order = epoch(Mode::Exact, n, 8, 0);
                let mut seen = std::collections::HashSet::new();
                for rank in 0..world {
                    let split = RankSplit::new(n, rank, world).unwrap();
                    assert_eq!(split.rows_per_rank, n / world);
                    for i in 0..split.rows_per_rank {
                        assert!(seen.insert(order[split.position(i) as usize]));
                    }
                }
                assert_eq!(seen.len() as u64, n - n % world);
            }
        }
        assert!(RankSplit::new(10, 2, 2).is_err());
        assert!(RankSplit::new(10, 0, 0).is_err());
    }
}
