//! Reading an activation store: open `index.json`, memory-map and check every shard,
//! gather rows into caller buffers, verify checksums (the whole store in one pass, or each
//! shard once as a stream first reads it).
//!
//! Shards are only ever mapped, never read into the heap: the page cache holds the data
//! once for every process that reads it, and datasets larger than RAM still work.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use memmap2::{Advice, Mmap};
use xxhash_rust::xxh3::Xxh3;

use crate::checksum;
use crate::error::{Error, Result};
use crate::format::{parse_header, shard_file_name, DType, Index, ShardLayout, INDEX_FILE};

pub struct Shard {
    pub path: PathBuf,
    pub layout: ShardLayout,
    /// The mapped file, kept to notice a shard truncated after it was opened.
    file: File,
    map: Mmap,
}

/// An opened store: index plus one checked memory map per shard.
pub struct Store {
    pub dir: PathBuf,
    pub index: Index,
    pub dtype: DType,
    shards: Vec<Shard>,
    checks: Checks,
    /// The access advice the maps carry (`advise`), restored after a shard is hashed.
    advice: Mutex<Advice>,
}

/// Where one shard's checksum stands for this opened store.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Check {
    Unchecked,
    /// A thread is hashing it; the others wait on `Checks::changed` (or hash another).
    Running,
    Good,
    /// The error's reason (the path is the shard's).
    Bad(String),
}

/// The checksum state of every shard, shared by all streams of one opened store, so that
/// each shard is hashed at most once however many epochs and streams read it.
struct Checks {
    state: Mutex<Vec<Check>>,
    changed: Condvar,
    /// `state[i] == Good`, readable without the lock (the per-batch fast path).
    good: Vec<AtomicBool>,
    good_count: AtomicUsize,
}

impl Checks {
    fn new(n: usize) -> Checks {
        Checks {
            state: Mutex::new(vec![Check::Unchecked; n]),
            changed: Condvar::new(),
            good: (0..n).map(|_| AtomicBool::new(false)).collect(),
            good_count: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Check>> {
        // The state is only ever set whole, so a panic elsewhere never leaves it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Puts a claimed shard back to `Unchecked` if hashing it unwinds, so no one waits forever.
struct Claim<'a> {
    checks: &'a Checks,
    shard: usize,
    done: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.checks.lock()[self.shard] = Check::Unchecked;
            self.checks.changed.notify_all();
        }
    }
}

/// The error for a shard whose bytes no longer hash to the checksum `index.json` records.
fn checksum_mismatch(path: &Path, recorded: &str, actual: &str) -> Error {
    Error::corrupt(
        path,
        format!(
            "checksum mismatch: index.json records {recorded}, the file hashes to {actual} (its \
             bytes changed since the harvest); re-harvest the activations with \
             `monofast run --from activations`"
        ),
    )
}

/// The per-row metadata columns of a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaColumns {
    pub token_id: Vec<i32>,
    pub source_id: Vec<u8>,
    pub context_id: Vec<i32>,
    pub position: Vec<i32>,
    /// Global row index of each row.
    pub row: Vec<i64>,
}

impl MetaColumns {
    pub fn with_capacity(n: usize) -> MetaColumns {
        MetaColumns {
            token_id: Vec::with_capacity(n),
            source_id: Vec::with_capacity(n),
            context_id: Vec::with_capacity(n),
            position: Vec::with_capacity(n),
            row: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.row.len()
    }

    pub fn is_empty(&self) -> bool {
        self.row.is_empty()
    }
}

/// What `verify` checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub shards: u64,
    pub rows: u64,
    pub bytes: u64,
}

fn read_index(dir: &Path) -> Result<(Index, DType)> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        let err = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
        return Err(Error::io(dir, err));
    }
    let path = dir.join(INDEX_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    Index::parse(&bytes, &path)
}

/// Map shard `i` and check it against the index: size, header, identity.
fn open_shard(dir: &Path, i: usize, index: &Index, dtype: DType) -> Result<Shard> {
    let record = &index.shards[i];
    let path = dir.join(&record.file);
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    if len != record.bytes {
        let what = if len < record.bytes {
            "truncated"
        } else {
            "wrong size"
        };
        return Err(Error::corrupt(
            &path,
            format!(
                "{what}: {len} bytes but index.json records {}; re-harvest the activations \
                 with `monofast run --from activations`",
                record.bytes
            ),
        ));
    }
    if len == 0 {
        return Err(Error::corrupt(&path, "truncated: empty file"));
    }
    // SAFETY: the map is read-only. If another process truncates the file while it is
    // mapped, reads past the new end fault (SIGBUS), as with any memory-mapped reader;
    // the store's files are written once and never modified in place.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let (layout, identity) = parse_header(&map, &path)?;
    let mismatch = |what: String| Error::corrupt(&path, format!("mismatched shard: {what}"));
    if layout.rows != record.rows {
        return Err(mismatch(format!(
            "holds {} rows, index.json records {}",
            layout.rows, record.rows
        )));
    }
    if layout.dim != index.dim || layout.dtype != dtype {
        return Err(mismatch(format!(
            "rows are {} x {}, index.json says {} x {}",
            layout.dim,
            layout.dtype.name(),
            index.dim,
            dtype.name()
        )));
    }
    let first_row = i as u64 * index.rows_per_shard;
    if identity.shard != i as u64 || identity.first_row != first_row {
        return Err(mismatch(format!(
            "its header says shard {} from row {}, index.json puts it at shard {i} from row {first_row}",
            identity.shard, identity.first_row
        )));
    }
    if identity.fingerprint != index.fingerprint {
        return Err(mismatch(format!(
            "written by another harvest (fingerprint {:?}, index.json {:?})",
            identity.fingerprint, index.fingerprint
        )));
    }
    Ok(Shard {
        path,
        layout,
        file,
        map,
    })
}

impl Store {
    /// Open a store folder. A missing folder or file is an `Io` error; anything wrong
    /// inside a file (truncated, bad header, mismatched shard) a `Corrupt` one naming it.
    /// Checksums are not read here (that is `verify`, or `verify_shards` as a stream first
    /// reads each shard), so opening costs one header read per shard whatever the size.
    pub fn open(dir: &Path) -> Result<Store> {
        let (index, dtype) = read_index(dir)?;
        let shards = (0..index.shards.len())
            .map(|i| open_shard(dir, i, &index, dtype))
            .collect::<Result<Vec<_>>>()?;
        let checks = Checks::new(shards.len());
        Ok(Store {
            dir: dir.to_path_buf(),
            index,
            dtype,
            shards,
            checks,
            advice: Mutex::new(Advice::Normal),
        })
    }

    /// Whether every shard's checksum was checked and matched.
    #[inline]
    pub fn all_verified(&self) -> bool {
        self.checks.good_count.load(Ordering::Acquire) == self.shards.len()
    }

    /// Whether shard `i`'s checksum was checked and matched.
    #[inline]
    pub fn shard_verified(&self, i: usize) -> bool {
        self.checks.good[i].load(Ordering::Acquire)
    }

    /// The shard holding global row `row`.
    #[inline]
    pub fn shard_of(&self, row: u64) -> usize {
        (row / self.index.rows_per_shard) as usize
    }

    /// Check the checksums of shards `need` (indices), each at most once for this opened
    /// store: the ones no thread has started are hashed here, the ones another thread is
    /// hashing are waited for, and while waiting this thread hashes the first unstarted
    /// shard of `ahead` (the shards the caller reads, in the order it first needs them).
    /// Returns the error of the first bad shard of `need`, every time it is asked again.
    /// Setting `stop` makes it give up soon (an `Invalid` error; shards it was hashing are
    /// left for a later read).
    pub fn verify_shards(&self, need: &[usize], ahead: &[usize], stop: &AtomicBool) -> Result<()> {
        if need.iter().all(|&i| self.shard_verified(i)) {
            return Ok(());
        }
        let checks = &self.checks;
        let mut state = checks.lock();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(stopped());
            }
            let mut waiting = false;
            let mut claim = None;
            for &i in need {
                match &state[i] {
                    Check::Bad(reason) => {
                        return Err(Error::corrupt(&self.shards[i].path, reason.clone()))
                    }
                    Check::Unchecked if claim.is_none() => claim = Some(i),
                    Check::Running => waiting = true,
                    _ => {}
                }
            }
            if claim.is_none() {
                if !waiting {
                    return Ok(());
                }
                claim = ahead
                    .iter()
                    .copied()
                    .find(|&i| state[i] == Check::Unchecked);
            }
            let Some(i) = claim else {
                // Woken when any check ends; the timeout only bounds how late `stop` is seen.
                state = checks
                    .changed
                    .wait_timeout(state, std::time::Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            };
            state[i] = Check::Running;
            drop(state);
            let mut claimed = Claim {
                checks,
                shard: i,
                done: false,
            };
            let outcome = self.check_shard(i, stop);
            state = checks.lock();
            claimed.done = true;
            let verdict = match outcome {
                Ok(()) => {
                    checks.good[i].store(true, Ordering::Release);
                    checks.good_count.fetch_add(1, Ordering::AcqRel);
                    Check::Good
                }
                Err(Error::Corrupt { reason, .. }) => Check::Bad(reason),
                // An I/O error (or a stop) says nothing about the bytes: a later read tries
                // again.
                Err(other) => {
                    state[i] = Check::Unchecked;
                    checks.changed.notify_all();
                    return Err(other);
                }
            };
            state[i] = verdict;
            checks.changed.notify_all();
        }
    }

    /// Hash shard `i` through its map (which also maps its pages in for the reads that
    /// follow) and compare with `index.json`.
    fn check_shard(&self, i: usize, stop: &AtomicBool) -> Result<()> {
        let shard = &self.shards[i];
        let record = &self.index.shards[i];
        let len = shard
            .file
            .metadata()
            .map_err(|e| Error::io(&shard.path, e))?
            .len();
        if len != record.bytes {
            // Changed since the store was opened: reading the map past the new end would fault.
            return Err(Error::corrupt(
                &shard.path,
                format!(
                    "truncated or rewritten while open: {len} bytes but index.json records {}; \
                     re-harvest the activations with `monofast run --from activations`",
                    record.bytes
                ),
            ));
        }
        // Sequential advice while hashing, so that a shard not in the page cache is read in
        // long read-ahead requests (under an exact shuffle's `Random` advice, each page fault
        // would read one page); the stream's advice is restored after.
        let _ = shard.map.advise(Advice::Sequential);
        let mut state = Xxh3::new();
        let mut stopped_early = false;
        for chunk in shard.map.chunks(8 << 20) {
            if stop.load(Ordering::Relaxed) {
                stopped_early = true;
                break;
            }
            state.update(chunk);
        }
        {
            let advice = self.advice.lock().unwrap_or_else(|e| e.into_inner());
            let _ = shard.map.advise(*advice);
        }
        if stopped_early {
            return Err(stopped());
        }
        let actual = format!("{:032x}", state.digest128());
        if actual != record.checksum {
            return Err(checksum_mismatch(&shard.path, &record.checksum, &actual));
        }
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.index.rows
    }

    pub fn dim(&self) -> usize {
        self.index.dim as usize
    }

    /// Bytes of one stored activation row.
    pub fn row_bytes(&self) -> usize {
        self.dim() * self.dtype.size() as usize
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    #[inline]
    fn locate(&self, row: u64) -> (&Shard, u64) {
        let rps = self.index.rows_per_shard;
        (&self.shards[(row / rps) as usize], row % rps)
    }

    /// The stored bytes of one activation row.
    #[inline]
    pub fn row(&self, row: u64) -> &[u8] {
        let (shard, local) = self.locate(row);
        let rb = shard.layout.row_bytes();
        let start = (shard.layout.activations + local * rb) as usize;
        &shard.map[start..start + rb as usize]
    }

    /// Check that every row index is in range (before handing work to threads).
    pub fn check_rows(&self, rows: &[i64]) -> Result<()> {
        let n = self.rows();
        match rows.iter().find(|&&r| r < 0 || r as u64 >= n) {
            Some(bad) => Err(Error::OutOfRange(format!(
                "row {bad} is out of range for {n} rows"
            ))),
            None => Ok(()),
        }
    }

    /// Copy `rows` (all `< rows()`) into `out`, stored dtype or converted to fp32, and
    /// append their metadata to `meta`. `out` holds at least `rows.len()` output rows.
    pub fn gather(&self, rows: &[u64], out: &mut [u8], to_f32: bool, meta: &mut MetaColumns) {
        let dim = self.dim();
        let out_row = if to_f32 { dim * 4 } else { self.row_bytes() };
        for &r in rows.iter().take(PREFETCH_ROWS) {
            self.prefetch(r);
        }
        for (j, &r) in rows.iter().enumerate() {
            if let Some(&ahead) = rows.get(j + PREFETCH_ROWS) {
                self.prefetch(ahead);
            }
            let src = self.row(r);
            let dst = &mut out[j * out_row..(j + 1) * out_row];
            if !to_f32 || self.dtype == DType::F32 {
                dst.copy_from_slice(src);
            } else {
                convert_to_f32(self.dtype, src, dst);
            }
            self.push_meta(r, meta);
        }
    }

    /// Start loading a row and its metadata into cache. A random row is a fresh 3 KiB
    /// stretch the hardware prefetcher has not seen, so each copy would otherwise wait
    /// on ~50 cache misses one after another; asking a few rows ahead overlaps them.
    #[inline]
    fn prefetch(&self, r: u64) {
        let (shard, local) = self.locate(r);
        let l = &shard.layout;
        let rb = l.row_bytes();
        let base = shard.map.as_ptr();
        let start = (l.activations + local * rb) as usize;
        for offset in (0..rb as usize).step_by(64) {
            prefetch_line(base.wrapping_add(start + offset));
        }
        for column in [l.context_id, l.token_id, l.position] {
            prefetch_line(base.wrapping_add((column + local * 4) as usize));
        }
        prefetch_line(base.wrapping_add((l.source_id + local) as usize));
    }

    fn push_meta(&self, r: u64, meta: &mut MetaColumns) {
        let (shard, local) = self.locate(r);
        let m = &shard.map;
        let l = &shard.layout;
        let i32_at = |base: u64| {
            let o = (base + local * 4) as usize;
            i32::from_le_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]])
        };
        meta.context_id.push(i32_at(l.context_id));
        meta.token_id.push(i32_at(l.token_id));
        meta.position.push(i32_at(l.position));
        meta.source_id.push(m[(l.source_id + local) as usize]);
        meta.row.push(r as i64);
    }

    /// Ask the kernel to read rows `[start, end)` ahead (block shuffle prefetch).
    pub fn will_need(&self, start: u64, end: u64) {
        let rps = self.index.rows_per_shard;
        let mut r = start;
        while r < end {
            let (shard, local) = self.locate(r);
            let stop = end.min((r / rps + 1) * rps);
            let rb = shard.layout.row_bytes();
            let offset = (shard.layout.activations + local * rb) as usize;
            let len = ((stop - r) * rb) as usize;
            // Advice is a hint; a kernel that refuses it only loses read-ahead.
            let _ = shard.map.advise_range(Advice::WillNeed, offset, len);
            r = stop;
        }
    }

    /// Advise every shard map (e.g. `Random` for an exact shuffle, so page faults do not
    /// drag in 128 KiB of read-ahead for each 3 KiB row of a cold file).
    pub fn advise(&self, advice: Advice) {
        let mut current = self.advice.lock().unwrap_or_else(|e| e.into_inner());
        *current = advice;
        for shard in &self.shards {
            let _ = shard.map.advise(advice);
        }
    }
}

/// Rows prefetched ahead of the copy; 4 measured best of 2/4/8 (random fp32 rows of 768).
const PREFETCH_ROWS: usize = 8;

#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T1);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Widen one row of 16-bit floats to fp32.
fn convert_to_f32(dtype: DType, src: &[u8], dst: &mut [u8]) {
    // SAFETY: every bit pattern is a valid u16 / f32; `align_to` only hands back the
    // correctly aligned middle part.
    let (pre, halves, _) = unsafe { src.align_to::<u16>() };
    let (dpre, out, _) = unsafe { dst.align_to_mut::<f32>() };
    if pre.is_empty() && dpre.is_empty() && halves.len() == out.len() {
        match dtype {
            // bf16 is the top half of an fp32: a shift, which the compiler vectorises.
            DType::BF16 => out
                .iter_mut()
                .zip(halves)
                .for_each(|(o, &h)| *o = f32::from_bits((h as u32) << 16)),
            // F16C (or the software path on CPUs without it), chosen at run time by `half`.
            DType::F16 => halves.reinterpret_cast::<f16>().convert_to_f32_slice(out),
            DType::F32 => unreachable!("fp32 rows are copied"),
        }
        return;
    }
    // A foreign file with odd offsets: slow but correct.
    for (k, o) in dst.chunks_exact_mut(4).enumerate() {
        let bits = u16::from_le_bytes([src[2 * k], src[2 * k + 1]]);
        let value = match dtype {
            DType::BF16 => f32::from_bits((bits as u32) << 16),
            _ => f16::from_bits(bits).to_f32(),
        };
        o.copy_from_slice(&value.to_le_bytes());
    }
}

/// Check every shard of a store in order, structure first and then its checksum; the
/// first bad shard is returned as a `Corrupt` error naming it.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let (index, dtype) = read_index(dir)?;
    let mut bytes = 0;
    for i in 0..index.shards.len() {
        let shard = open_shard(dir, i, &index, dtype)?;
        drop(shard);
        let record = &index.shards[i];
        let path = dir.join(&record.file);
        let actual = checksum::hash_file(&path)?;
        if actual != record.checksum {
            return Err(checksum_mismatch(&path, &record.checksum, &actual));
        }
        bytes += record.bytes;
    }
    Ok(VerifyReport {
        shards: index.shards.len() as u64,
        rows: index.rows,
        bytes,
    })
}

fn stopped() -> Error {
    Error::invalid("the stream was stopped while checking shards")
}

/// The path of shard `i` in `dir` (for messages and tests).
pub fn shard_path(dir: &Path, i: u64) -> PathBuf {
    dir.join(shard_file_name(i))
}
