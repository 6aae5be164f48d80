//! Batches from a store, in a seeded order, prefetched on background threads.
//!
//! The k-th batch of the stream is a pure function of the starting position, so worker
//! `j` of `T` simply computes batches `j, j + T, j + 2T, ...` and sends each into its own
//! bounded queue; the consumer takes batch k from queue `k % T`. Order is deterministic
//! whatever the thread timing, memory is bounded by the queue depth, and there is no
//! shared work queue to contend on. The consumer's position (epoch, rows consumed) is the
//! resumable state: restoring it restarts the workers there.
//!
//! With `verify`, a worker checks the XXH3 checksum of every shard a batch reads before
//! that batch leaves it, the first time the opened store is read there (`Store::
//! verify_shards`): a shard nobody has started is hashed by the worker that first needs
//! it, and a worker waiting for a shard another one is hashing hashes the next unchecked
//! shard of the stream instead. Hashing reads each shard once at memory speed, through
//! the map the copies then use (its pages are mapped in by then); once every shard is
//! checked, batches skip the checks. A shuffled first batch reads every shard, so there
//! the whole store is checked before it leaves. A bad shard stops the stream with a
//! `Corrupt` error naming it before any of its rows is handed out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use memmap2::Advice;

use crate::buffer::{AlignedBuf, Pool};
use crate::error::{Error, Result};
use crate::shuffle::{EpochOrder, Mode, RankSplit};
use crate::store::{MetaColumns, Store};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Rows per batch (the last batch of an epoch may be shorter unless `drop_last`).
    pub batch_size: u64,
    pub mode: Mode,
    pub seed: u64,
    pub rank: u64,
    pub world_size: u64,
    /// Read only rows `[0, rows)` of the store (e.g. leaving out a held-out tail); `None`
    /// reads them all. Epoch orders and the rank split are over these rows.
    pub rows: Option<u64>,
    /// Skip an epoch's short last batch.
    pub drop_last: bool,
    /// Stop after this many epochs (counted from epoch 0); `None` runs forever.
    pub epochs: Option<u64>,
    /// Widen fp16 / bf16 rows to fp32 while copying.
    pub to_f32: bool,
    /// Prefetch threads.
    pub threads: usize,
    /// Batches prepared ahead of the consumer, across all threads.
    pub prefetch: usize,
    /// Check each shard's checksum before the first batch holding its rows leaves.
    pub verify: bool,
}

/// Where the consumer stands: `row` rows of this rank's part of `epoch` are consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub row: u64,
}

pub struct Batch {
    /// `rows x dim` values, in the stored dtype or fp32 (`to_f32`); a pool buffer, so
    /// possibly longer than needed.
    pub data: AlignedBuf,
    pub rows: usize,
    pub meta: MetaColumns,
    pub epoch: u64,
    /// Position of the first row in this rank's part of the epoch.
    pub start: u64,
}

/// The batch sequence from a starting position: pure arithmetic.
#[derive(Clone, Copy, Debug)]
struct Plan {
    per_epoch: u64,
    batch_size: u64,
    drop_last: bool,
    epochs: Option<u64>,
    start: Position,
}

impl Plan {
    fn batches_from(&self, row: u64) -> u64 {
        let rest = self.per_epoch.saturating_sub(row);
        if self.drop_last {
            rest / self.batch_size
        } else {
            rest.div_ceil(self.batch_size)
        }
    }

    fn past_end(&self, epoch: u64) -> bool {
        self.epochs.is_some_and(|n| epoch >= n)
    }

    /// Batch `k` after the start: (epoch, first position, rows), or `None` past the end.
    fn nth(&self, k: u64) -> Option<(u64, u64, u64)> {
        let Position { epoch, row } = self.start;
        if self.past_end(epoch) {
            return None;
        }
        let first = self.batches_from(row);
        let (epoch, begin) = if k < first {
            (epoch, row + k * self.batch_size)
        } else {
            let per = self.batches_from(0);
            if per == 0 {
                return None;
            }
            let later = k - first;
            (epoch + 1 + later / per, (later % per) * self.batch_size)
        };
        if self.past_end(epoch) {
            return None;
        }
        Some((epoch, begin, self.batch_size.min(self.per_epoch - begin)))
    }

    /// The position after consuming up to `row` of `epoch`, moved to the next epoch when
    /// no batch is left in this one.
    fn normalise(&self, epoch: u64, row: u64) -> Position {
        if self.batches_from(row) == 0 {
            Position {
                epoch: epoch + 1,
                row: 0,
            }
        } else {
            Position { epoch, row }
        }
    }
}

struct Workers {
    stop: Arc<AtomicBool>,
    queues: Vec<Receiver<Result<Batch>>>,
    threads: Vec<JoinHandle<()>>,
    /// Batches received so far from this set of workers.
    taken: u64,
    plan: Plan,
}

pub struct Stream {
    store: Arc<Store>,
    cfg: StreamConfig,
    /// Rows an epoch orders (`cfg.rows`, else the whole store).
    rows: u64,
    split: RankSplit,
    pool: Arc<Pool>,
    pos: Position,
    workers: Option<Workers>,
    /// The shards this stream reads, in the order it first needs them (empty without
    /// `verify`): what a worker waiting for another's check hashes meanwhile.
    ahead: Arc<[usize]>,
}

impl Stream {
    pub fn new(store: Arc<Store>, cfg: StreamConfig) -> Result<Stream> {
        if cfg.batch_size == 0 {
            return Err(Error::invalid("batch_size must be at least 1"));
        }
        if cfg.threads == 0 || cfg.threads > 64 {
            return Err(Error::invalid(format!(
                "threads={}; use 1 to 64",
                cfg.threads
            )));
        }
        let rows = cfg.rows.unwrap_or(store.rows());
        if rows > store.rows() {
            return Err(Error::invalid(format!(
                "rows={rows} but the store holds {}",
                store.rows()
            )));
        }
        let split = RankSplit::new(rows, cfg.rank, cfg.world_size)?;
        let out_row = store.dim()
            * if cfg.to_f32 {
                4
            } else {
                store.dtype.size() as usize
            };
        let batch_bytes = out_row
            .checked_mul(cfg.batch_size as usize)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| Error::invalid("batch_size x dim is too large"))?;
        // Buffers in flight: the queues, one being filled per thread, and a few the
        // consumer still holds.
        let pool = Pool::new(batch_bytes, cfg.prefetch + 2 * cfg.threads + 4);
        store.advise(match cfg.mode {
            Mode::Exact => Advice::Random,
            Mode::Sequential => Advice::Sequential,
            Mode::Block { .. } => Advice::Normal,
        });
        let ahead: Arc<[usize]> = if cfg.verify && rows > 0 {
            // A sequential rank reads its own stretch of rows; the shuffles read them all.
            let (first, end) = match cfg.mode {
                Mode::Sequential if split.rows_per_rank > 0 => (
                    split.position(0),
                    split.position(split.rows_per_rank - 1) + 1,
                ),
                Mode::Sequential => (0, 0),
                _ => (0, rows),
            };
            if first < end {
                (store.shard_of(first)..=store.shard_of(end - 1)).collect()
            } else {
                Arc::from(Vec::new())
            }
        } else {
            Arc::from(Vec::new())
        };
        let mut stream = Stream {
            store,
            cfg,
            rows,
            split,
            pool,
            pos: Position { epoch: 0, row: 0 },
            workers: None,
            ahead,
        };
        stream.pos = stream
            .plan_from(Position { epoch: 0, row: 0 })
            .normalise(0, 0);
        Ok(stream)
    }

    fn plan_from(&self, start: Position) -> Plan {
        Plan {
            per_epoch: self.split.rows_per_rank,
            batch_size: self.cfg.batch_size,
            drop_last: self.cfg.drop_last,
            epochs: self.cfg.epochs,
            start,
        }
    }

    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Rows of one epoch this rank reads.
    pub fn rows_per_epoch(&self) -> u64 {
        self.split.rows_per_rank
    }

    /// Batches in one whole epoch for this rank.
    pub fn batches_per_epoch(&self) -> u64 {
        self.plan_from(Position { epoch: 0, row: 0 })
            .batches_from(0)
    }

    pub fn state(&self) -> Position {
        self.pos
    }

    /// Continue from `pos` (rows are counted within this rank's part of the epoch).
    pub fn restore(&mut self, pos: Position) -> Result<()> {
        if pos.row > self.split.rows_per_rank {
            return Err(Error::invalid(format!(
                "state row {} is past the {} rows of this rank's epoch",
                pos.row, self.split.rows_per_rank
            )));
        }
        self.shutdown();
        self.pos = self.plan_from(pos).normalise(pos.epoch, pos.row);
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        let plan = self.plan_from(self.pos);
        let threads = self.cfg.threads;
        let depth = self.cfg.prefetch.div_ceil(threads).max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let advised = Arc::new(AtomicU64::new(u64::MAX));
        let mut queues = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for j in 0..threads {
            let (tx, rx) = sync_channel(depth);
            let worker = Worker {
                store: Arc::clone(&self.store),
                pool: Arc::clone(&self.pool),
                rows: self.rows,
                split: self.split,
                mode: self.cfg.mode,
                seed: self.cfg.seed,
                to_f32: self.cfg.to_f32,
                verify: self.cfg.verify,
                ahead: Arc::clone(&self.ahead),
                plan,
                first: j as u64,
                step: threads as u64,
                stop: Arc::clone(&stop),
                advised: Arc::clone(&advised),
            };
            let handle = std::thread::Builder::new()
                .name(format!("monofast-stream-{j}"))
                .spawn(move || worker.run(tx))
                .map_err(|e| Error::io(&self.store.dir, e))?;
            queues.push(rx);
            handles.push(handle);
        }
        self.workers = Some(Workers {
            stop,
            queues,
            threads: handles,
            taken: 0,
            plan,
        });
        Ok(())
    }

    /// The next batch, or `None` when the configured epochs are done. Blocks until the
    /// prefetch threads have it ready.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.workers.is_none() {
            if self.plan_from(self.pos).nth(0).is_none() {
                return Ok(None);
            }
            self.start()?;
        }
        let workers = self.workers.as_mut().expect("started");
        let queue = &workers.queues[(workers.taken % workers.queues.len() as u64) as usize];
        match queue.recv() {
            Ok(Ok(batch)) => {
                workers.taken += 1;
                self.pos = workers
                    .plan
                    .normalise(batch.epoch, batch.start + batch.rows as u64);
                Ok(Some(batch))
            }
            Ok(Err(err)) => {
                self.shutdown();
                Err(err)
            }
            Err(_) => {
                // The worker ran past the end of the plan and closed its queue.
                self.shutdown();
                Ok(None)
            }
        }
    }

    /// Stop and join the prefetch threads (restarted lazily by `next_batch`).
    pub fn shutdown(&mut self) {
        if let Some(workers) = self.workers.take() {
            workers.stop.store(true, Ordering::Relaxed);
            drop(workers.queues); // unblocks workers waiting on a full queue
            for handle in workers.threads {
                let _ = handle.join();
            }
        }
    }

    /// Rows at arbitrary global indices, gathered into a fresh buffer.
    pub fn take(store: &Store, rows: &[i64], to_f32: bool) -> Result<(AlignedBuf, MetaColumns)> {
        store.check_rows(rows)?;
        let out_row = store.dim()
            * if to_f32 {
                4
            } else {
                store.dtype.size() as usize
            };
        let mut buf = AlignedBuf::new(rows.len() * out_row);
        let mut meta = MetaColumns::with_capacity(rows.len());
        let rows: Vec<u64> = rows.iter().map(|&r| r as u64).collect();
        store.gather(&rows, buf.as_mut_slice(), to_f32, &mut meta);
        Ok((buf, meta))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    store: Arc<Store>,
    pool: Arc<Pool>,
    rows: u64,
    split: RankSplit,
    mode: Mode,
    seed: u64,
    to_f32: bool,
    verify: bool,
    ahead: Arc<[usize]>,
    plan: Plan,
    first: u64,
    step: u64,
    stop: Arc<AtomicBool>,
    /// (epoch << 32 | window) of the last block-shuffle window given read-ahead advice.
    advised: Arc<AtomicU64>,
}

/// A worker's shard checks: the shards of the batch at hand (reused), and whether every
/// shard the stream reads is checked already (or nothing is to be checked).
struct Checks {
    need: Vec<usize>,
    done: bool,
}

impl Worker {
    fn run(self, tx: SyncSender<Result<Batch>>) {
        let mut order: Option<(u64, EpochOrder)> = None;
        let mut rows = Vec::new();
        let mut checks = Checks {
            need: Vec::new(),
            done: !self.verify,
        };
        let mut k = self.first;
        while !self.stop.load(Ordering::Relaxed) {
            let Some((epoch, begin, count)) = self.plan.nth(k) else {
                return;
            };
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((
                    epoch,
                    EpochOrder::new(self.mode, self.rows, self.seed, epoch),
                ));
            }
            let (_, epoch_order) = order.as_ref().expect("set above");
            let batch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.make_batch(epoch_order, epoch, begin, count, &mut rows, &mut checks)
            }))
            .unwrap_or_else(|_| Err(Error::invalid("a stream thread panicked; this is a bug")));
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
            k += self.step;
        }
    }

    fn make_batch(
        &self,
        order: &EpochOrder,
        epoch: u64,
        begin: u64,
        count: u64,
        rows: &mut Vec<u64>,
        checks: &mut Checks,
    ) -> Result<Batch> {
        rows.clear();
        let first = self.split.position(begin);
        order.fill(first, count, rows);
        if !checks.done {
            // Before any row is copied: the checks map the shards in for the copy.
            let need = &mut checks.need;
            need.clear();
            need.extend(rows.iter().map(|&r| self.store.shard_of(r)));
            need.sort_unstable();
            need.dedup();
            self.store.verify_shards(need, &self.ahead, &self.stop)?;
            checks.done = self.ahead.iter().all(|&i| self.store.shard_verified(i));
        }
        if let Some(blocks) = order.as_block() {
            self.advise_windows(blocks, epoch, first, first + count);
        }
        let mut data = self.pool.get();
        let mut meta = MetaColumns::with_capacity(rows.len());
        self.store
            .gather(rows, data.as_mut_slice(), self.to_f32, &mut meta);
        Ok(Batch {
            data,
            rows: rows.len(),
            meta,
            epoch,
            start: begin,
        })
    }

    /// Ask the kernel to read the window this batch reads and the next one, in long
    /// sequential requests, once per window.
    fn advise_windows(
        &self,
        blocks: &crate::shuffle::BlockOrder,
        epoch: u64,
        first: u64,
        end: u64,
    ) {
        let last_window = blocks.window_of(end - 1);
        for w in blocks.window_of(first)..=(last_window + 1).min(blocks.windows().saturating_sub(1))
        {
            let key = (epoch << 32) | w as u64;
            let prev = self.advised.load(Ordering::Relaxed);
            if prev != u64::MAX && prev >= key {
                continue;
            }
            if self
                .advised
                .compare_exchange(prev, key, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                for (start, stop) in blocks.window_rows(w) {
                    self.store.will_need(start, stop);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::DType;
    use crate::writer::{Rows, Writer, WriterSpec};
    use std::path::{Path, PathBuf};

    fn build(name: &str, n: u64, rows_per_shard: u64) -> (PathBuf, Arc<Store>) {
        let dir = std::env::temp_dir().join(format!("mf-stream-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = WriterSpec {
            dim: 2,
            dtype: DType::BF16,
            rows_per_shard,
            fingerprint: String::new(),
        };
        let mut w = Writer::open(&dir, spec, false, 2).unwrap();
        let acts: Vec<u8> = (0..n)
            .flat_map(|r| {
                let v = half::bf16::from_f32(r as f32).to_bits().to_le_bytes();
                [v[0], v[1], v[0], v[1]]
            })
            .collect();
        let ids: Vec<i32> = (0..n as i32).collect();
        let src = vec![1u8; n as usize];
        w.append(Rows {
            activations: &acts,
            token_id: &ids,
            source_id: &src,
            context_id: &ids,
            position: &ids,
        })
        .unwrap();
        w.finish(Default::default()).unwrap();
        let store = Arc::new(Store::open(&dir).unwrap());
        (dir, store)
    }

    fn cfg(batch_size: u64, mode: Mode) -> StreamConfig {
        StreamConfig {
            batch_size,
            mode,
            seed: 5,
            rank: 0,
            world_size: 1,
            rows: None,
            drop_last: false,
            epochs: Some(1),
            to_f32: true,
            threads: 3,
            prefetch: 4,
            verify: true,
        }
    }

    fn drain(stream: &mut Stream) -> Vec<i64> {
        let mut rows = Vec::new();
        while let Some(b) = stream.next_batch().unwrap() {
            let values = &b.data.as_ptr();
            let floats = unsafe { std::slice::from_raw_parts(values.cast::<f32>(), b.rows * 2) };
            for (i, &r) in b.meta.row.iter().enumerate() {
                assert_eq!(
                    floats[2 * i],
                    half::bf16::from_f32(r as f32).to_f32(),
                    "data matches its row"
                );
                assert_eq!(b.meta.token_id[i] as i64, r);
            }
            rows.extend(&b.meta.row);
        }
        rows
    }

    #[test]
    fn every_row_once_per_epoch_in_every_mode() {
        let (dir, store) = build("once", 250, 64);
        for mode in [
            Mode::Exact,
            Mode::Sequential,
            Mode::Block {
                block_rows: 16,
                window_blocks: 3,
            },
        ] {
            let mut s = Stream::new(Arc::clone(&store), cfg(32, mode)).unwrap();
            assert_eq!(s.batches_per_epoch(), 8);
            let mut rows = drain(&mut s);
            rows.sort_unstable();
            assert_eq!(rows, (0..250).collect::<Vec<_>>());
            assert_eq!(s.state(), Position { epoch: 1, row: 0 });
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn restore_resumes_at_the_exact_row() {
        let (dir, store) = build("resume", 300, 100);
        let mut c = cfg(25, Mode::Exact);
        c.epochs = Some(2);
        let whole = drain(&mut Stream::new(Arc::clone(&store), c.clone()).unwrap());
        let mut s = Stream::new(Arc::clone(&store), c.clone()).unwrap();
        let mut seen = Vec::new();
        for _ in 0..15 {
            seen.extend(s.next_batch().unwrap().unwrap().meta.row);
        }
        let state = s.state();
        assert_eq!(state, Position { epoch: 1, row: 75 });
        drop(s);
        let mut t = Stream::new(Arc::clone(&store), c).unwrap();
        t.restore(state).unwrap();
        seen.extend(drain(&mut t));
        assert_eq!(seen, whole);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ranks_split_and_drop_last() {
        let (dir, store) = build("ranks", 103, 50);
        let mut all = Vec::new();
        for rank in 0..4 {
            let mut c = cfg(10, Mode::Exact);
            c.rank = rank;
            c.world_size = 4;
            c.drop_last = true;
            let mut s = Stream::new(Arc::clone(&store), c).unwrap();
            assert_eq!(s.rows_per_epoch(), 25);
            assert_eq!(s.batches_per_epoch(), 2);
            let rows = drain(&mut s);
            assert_eq!(rows.len(), 20);
            all.extend(rows);
        }
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_row_limit_leaves_the_tail_out_and_still_splits_by_rank() {
        let (dir, store) = build("limit", 103, 50);
        let mut all = Vec::new();
        for rank in 0..2 {
            let mut c = cfg(8, Mode::Exact);
            c.rank = rank;
            c.world_size = 2;
            c.rows = Some(80);
            let mut s = Stream::new(Arc::clone(&store), c).unwrap();
            assert_eq!(s.rows_per_epoch(), 40);
            all.extend(drain(&mut s));
        }
        all.sort_unstable();
        assert_eq!(all, (0..80).collect::<Vec<_>>());
        let mut c = cfg(8, Mode::Exact);
        c.rows = Some(104);
        assert!(matches!(
            Stream::new(Arc::clone(&store), c),
            Err(Error::Invalid(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Flip one byte in the middle of shard `i`'s data (after the header), in place.
    fn flip_middle(store: &Store, i: usize) -> PathBuf {
        use std::io::{Read, Seek, SeekFrom, Write};
        let path = store.shards()[i].path.clone();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let data = store.shards()[i].layout.activations;
        let middle = data + (file.metadata().unwrap().len() - data) / 2;
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(middle)).unwrap();
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(middle)).unwrap();
        file.write_all(&[byte[0] ^ 0x10]).unwrap();
        path
    }

    /// Rows of every batch, values unchecked (for stores with a byte changed).
    fn rows_of(stream: &mut Stream) -> Vec<i64> {
        let mut rows = Vec::new();
        while let Some(b) = stream.next_batch().unwrap() {
            rows.extend(&b.meta.row);
        }
        rows
    }

    /// Rows of every batch up to the error (which must come), and the error.
    fn until_error(stream: &mut Stream) -> (Vec<i64>, Error) {
        let mut rows = Vec::new();
        loop {
            match stream.next_batch() {
                Ok(Some(b)) => rows.extend(&b.meta.row),
                Ok(None) => panic!("the stream ended without an error"),
                Err(err) => return (rows, err),
            }
        }
    }

    fn modes() -> [Mode; 3] {
        [
            Mode::Exact,
            Mode::Sequential,
            Mode::Block {
                block_rows: 16,
                window_blocks: 3,
            },
        ]
    }

    #[test]
    fn a_flipped_byte_stops_the_stream_before_any_row_of_its_shard() {
        for mode in modes() {
            let (dir, store) = build(&format!("flip-{}", mode.name()), 400, 100);
            let path = flip_middle(&store, 2);
            let mut s = Stream::new(Arc::clone(&store), cfg(16, mode)).unwrap();
            let (rows, err) = until_error(&mut s);
            assert!(rows.iter().all(|r| !(200..300).contains(r)), "{mode:?}");
            let text = err.to_string();
            assert!(matches!(err, Error::Corrupt { .. }), "{text}");
            assert!(text.starts_with(&path.display().to_string()), "{text}");
            assert!(
                text.contains("checksum mismatch: index.json records"),
                "{text}"
            );
            assert!(text.contains("monofast run --from activations"), "{text}");
            if mode == Mode::Sequential {
                // Storage order: the two good shards before it were read first.
                assert_eq!(rows, (0..192).collect::<Vec<_>>());
            }
            // Asking again gives the same error, without hashing the shard again.
            assert!(matches!(s.next_batch(), Err(Error::Corrupt { .. })));
            let mut off = cfg(16, mode);
            off.verify = false;
            let mut all = rows_of(&mut Stream::new(Arc::clone(&store), off).unwrap());
            all.sort_unstable();
            assert_eq!(all, (0..400).collect::<Vec<_>>());
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn shards_are_checked_once_per_opened_store() {
        let (dir, store) = build("once-checked", 300, 100);
        let mut c = cfg(32, Mode::Exact);
        c.epochs = Some(2);
        let mut s = Stream::new(Arc::clone(&store), c.clone()).unwrap();
        assert!(!store.all_verified());
        s.next_batch().unwrap().unwrap();
        assert!(store.all_verified(), "the first batch reads every shard");
        // Bytes changed after the check are not seen by later epochs or streams of this
        // opened store (they are by a fresh open).
        flip_middle(&store, 1);
        rows_of(&mut s);
        assert_eq!(s.state(), Position { epoch: 2, row: 0 });
        rows_of(&mut Stream::new(Arc::clone(&store), c.clone()).unwrap());
        let fresh = Arc::new(Store::open(&dir).unwrap());
        let (rows, err) = until_error(&mut Stream::new(fresh, c).unwrap());
        assert!(rows.is_empty());
        assert!(err.to_string().contains("shard-00001"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sequential_reads_check_shards_as_they_come() {
        let (dir, store) = build("as-they-come", 1000, 100);
        let mut c = cfg(10, Mode::Sequential);
        c.threads = 1;
        c.prefetch = 1;
        let mut s = Stream::new(Arc::clone(&store), c.clone()).unwrap();
        s.next_batch().unwrap().unwrap();
        let checked = (0..10).filter(|&i| store.shard_verified(i)).count();
        assert!(
            checked < 10,
            "only the shards read so far (and a few ahead) are checked"
        );
        drain(&mut s);
        assert!(store.all_verified());
        // A rank of a sequential stream checks only its own stretch.
        let fresh = Arc::new(Store::open(&dir).unwrap());
        c.rank = 1;
        c.world_size = 2;
        c.threads = 3;
        let rows = drain(&mut Stream::new(Arc::clone(&fresh), c).unwrap());
        assert_eq!(rows, (500..1000).collect::<Vec<_>>());
        assert!((0..5).all(|i| !fresh.shard_verified(i)));
        assert!((5..10).all(|i| fresh.shard_verified(i)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shard_truncated_after_opening_is_named_not_a_crash() {
        let (dir, store) = build("truncated", 300, 100);
        let path = store.shards()[1].path.clone();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        for mode in modes() {
            let mut s = Stream::new(Arc::clone(&store), cfg(16, mode)).unwrap();
            let (rows, err) = until_error(&mut s);
            assert!(rows.iter().all(|r| !(100..200).contains(r)), "{mode:?}");
            let text = err.to_string();
            assert!(text.starts_with(&path.display().to_string()), "{text}");
            assert!(text.contains("truncated"), "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stop_leaves_the_shard_for_a_later_check() {
        let (dir, store) = build("stop", 300, 100);
        let stop = AtomicBool::new(true);
        let err = store.verify_shards(&[0, 1], &[0, 1, 2], &stop).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)));
        assert!(!store.shard_verified(0) && !store.shard_verified(1));
        stop.store(false, Ordering::Relaxed);
        store.verify_shards(&[0, 1], &[], &stop).unwrap();
        assert!(store.shard_verified(0) && store.shard_verified(1) && !store.all_verified());
        // Many threads after the same shards: each is hashed once, all of them agree.
        flip_middle(&store, 2);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    let err = store.verify_shards(&[0, 1, 2], &[2], &stop).unwrap_err();
                    assert!(err.to_string().contains("shard-00002"), "{err}");
                });
            }
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn take_checks_bounds() {
        let (dir, store) = build("take", 10, 4);
        let (buf, meta) = Stream::take(&store, &[9, 0, 4], false).unwrap();
        assert_eq!(meta.row, vec![9, 0, 4]);
        assert_eq!(buf.len(), 3 * 2 * 2);
        assert!(matches!(
            Stream::take(&store, &[10], false),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            Stream::take(&store, &[-1], false),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            Store::open(Path::new("/nonexistent/mf")),
            Err(Error::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
