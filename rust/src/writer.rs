//! Writing an activation store, on a background thread, crash-safe and resumable.
//!
//! `append` copies a batch into an owned chunk and hands it to the writer thread through
//! a bounded queue, so the caller's next forward pass overlaps the disk writes; a full
//! queue blocks `append` (back-pressure instead of unbounded memory).
//!
//! Each shard is written under a temporary name (`.shard-00003.safetensors.tmp`): the
//! activations stream to disk as they arrive, the small metadata columns are kept in
//! memory and written after them, then the header, an fsync, the checksum, and a rename
//! to `shard-00003.safetensors`. After each rename the journal (`journal.json`, same
//! schema as the index) is rewritten atomically. `finish` writes `index.json` last and
//! removes the journal. A killed writer therefore leaves finished shards listed in the
//! journal plus at most one temporary file; reopening with `resume` keeps the journaled
//! shards whose checksums still match and deletes everything else, and the caller carries
//! on from `rows()`.
//!
//! Several processes (`torchrun` ranks) can write one store together: each opens a
//! `Part`, the shard numbers it owns, and writes those shards under their final names
//! with their own journal (`journal-00012.json`), finishing with a part record
//! (`part-00012.json`) instead of `index.json`. Once every part has finished,
//! `merge_parts` joins the records into the one `index.json` a reader expects; a store
//! written in parts is indistinguishable from one written by a single writer.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use serde_json::{Map, Value};

use crate::checksum;
use crate::error::{Error, Result};
use crate::format::{
    encode_header, shard_file_name, DType, Index, ShardIdentity, ShardLayout, ShardRecord,
    HEADER_BYTES, INDEX_FILE, JOURNAL_FILE,
};

/// What every shard of one store shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterSpec {
    pub dim: u64,
    pub dtype: DType,
    pub rows_per_shard: u64,
    /// Identifies what produced the rows (model checkpoint, layer, sampling); a resumed
    /// writer only keeps shards written with the same fingerprint.
    pub fingerprint: String,
}

/// One batch of rows, borrowed from the caller.
pub struct Rows<'a> {
    /// (rows, dim) activations in the store's dtype, as raw little-endian bytes.
    pub activations: &'a [u8],
    pub token_id: &'a [i32],
    pub source_id: &'a [u8],
    pub context_id: &'a [i32],
    pub position: &'a [i32],
}

struct Chunk {
    rows: u64,
    activations: Vec<u8>,
    token_id: Vec<i32>,
    source_id: Vec<u8>,
    context_id: Vec<i32>,
    position: Vec<i32>,
}

enum Msg {
    Rows(Chunk),
    Finish,
}

/// The shards `[start, end)` of a store written in parts: the first one starts at row
/// `start * rows_per_shard`, and every one but the store's last is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub start: u64,
    pub end: u64,
}

pub struct Writer {
    dir: PathBuf,
    spec: WriterSpec,
    part: Option<Part>,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<Index>>>,
    /// Global index of the next row (a part's first row plus the rows it holds).
    rows: u64,
    resumed_rows: u64,
}

/// The journal of a whole-store writer, or of the part starting at `part.start`.
fn journal_name(part: Option<Part>) -> String {
    match part {
        None => JOURNAL_FILE.to_string(),
        Some(p) => format!("journal-{:05}.json", p.start),
    }
}

/// What a finished part leaves for `merge_parts`.
pub fn part_file_name(start: u64) -> String {
    format!("part-{start:05}.json")
}

/// The number of a shard file name (`shard-00012.safetensors` -> 12).
fn shard_number(name: &str) -> Option<u64> {
    name.strip_prefix("shard-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

fn tmp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Write `bytes` to `path` through a temporary file, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(tmp_name(name));
    let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Make renames inside `dir` durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Is `name` one of the files a writer owns (shards, their temporaries, journal, index)?
fn owned_file(name: &str) -> bool {
    let owned = |n: &str| {
        let record = |prefix: &str| n.starts_with(prefix) && n.ends_with(".json");
        (n.starts_with("shard-") && n.ends_with(".safetensors"))
            || n == INDEX_FILE
            || n == JOURNAL_FILE
            || record("journal-")
            || record("part-")
    };
    owned(name)
        || (name.starts_with('.') && name.ends_with(".tmp") && owned(&name[1..name.len() - 4]))
}

/// Is `name` a file the writer of `part` may delete when it opens? A whole-store writer
/// owns every writer file; a part only its own shards, journal and record (and the part
/// starting at shard 0 also a stale `index.json` or whole-store journal).
fn removable(name: &str, part: Option<Part>) -> bool {
    let Some(p) = part else {
        return owned_file(name);
    };
    if !owned_file(name) {
        return false;
    }
    let inner = match name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) {
        Some(inner) => inner,
        None => name,
    };
    if let Some(number) = shard_number(inner) {
        return (p.start..p.end).contains(&number);
    }
    inner == journal_name(part)
        || inner == part_file_name(p.start)
        || (p.start == 0 && (inner == INDEX_FILE || inner == JOURNAL_FILE))
}

/// A journal or part record of `dir`, if readable.
fn read_record(path: &Path) -> Option<Index> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The journaled shards that are still intact, in order, stopping at the first bad one.
fn intact_prefix(dir: &Path, journal: &Index) -> Vec<ShardRecord> {
    let mut keep = Vec::new();
    for record in &journal.shards {
        let path = dir.join(&record.file);
        let size_ok = fs::metadata(&path)
            .map(|m| m.len() == record.bytes)
            .unwrap_or(false);
        if !size_ok || checksum::hash_file(&path).ok().as_deref() != Some(record.checksum.as_str())
        {
            break;
        }
        keep.push(record.clone());
    }
    keep
}

impl Writer {
    /// Open `dir` for writing. With `resume`, shards from an interrupted writer with the
    /// same spec are kept (see the module notes) and `rows()` says where to continue;
    /// otherwise, and for a different spec, every file a writer owns is removed first.
    pub fn open(dir: &Path, spec: WriterSpec, resume: bool, queue: usize) -> Result<Writer> {
        Writer::open_part(dir, spec, None, resume, queue)
    }

    /// Open the writer of one part of a store written by several processes (`None`: the
    /// whole store). A part's rows start at row `start * rows_per_shard`; with `resume`
    /// it keeps what an interrupted (or finished, not yet merged) writer of the same part
    /// wrote, and it deletes only files of its own part.
    pub fn open_part(
        dir: &Path,
        spec: WriterSpec,
        part: Option<Part>,
        resume: bool,
        queue: usize,
    ) -> Result<Writer> {
        if part.is_some_and(|p| p.start >= p.end) {
            return Err(Error::invalid(
                "a part needs at least one shard (start < end)",
            ));
        }
        if spec.dim == 0 || spec.rows_per_shard == 0 {
            return Err(Error::invalid("dim and rows_per_shard must be positive"));
        }
        if ShardLayout::new(spec.rows_per_shard, spec.dim, spec.dtype).is_none() {
            return Err(Error::invalid("rows_per_shard x dim overflows"));
        }
        // The header must fit its reserved page (a long fingerprint would not).
        let probe = ShardLayout::new(spec.rows_per_shard, spec.dim, spec.dtype).expect("checked");
        encode_header(
            &probe,
            &ShardIdentity {
                shard: u64::MAX,
                first_row: u64::MAX,
                fingerprint: spec.fingerprint.clone(),
            },
        )?;

        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut journal = Index::new(spec.dim, spec.dtype, spec.rows_per_shard, &spec.fingerprint);
        let journal_path = dir.join(journal_name(part));
        let first_shard = part.map_or(0, |p| p.start);
        if resume {
            let old = match part {
                None => fs::read(&journal_path)
                    .ok()
                    .and_then(|bytes| Index::parse(&bytes, &journal_path).ok())
                    .map(|(index, _)| index),
                // A part that finished but was never merged left its record instead.
                Some(p) => read_record(&journal_path)
                    .or_else(|| read_record(&dir.join(part_file_name(p.start)))),
            };
            if let Some(old) = old {
                let same = old.dim == spec.dim
                    && old.dtype == spec.dtype.name()
                    && old.rows_per_shard == spec.rows_per_shard
                    && old.fingerprint == spec.fingerprint;
                if same {
                    journal.shards = intact_prefix(dir, &old);
                    // Only this part's shards, numbered from its start, count.
                    let limit = part.map_or(u64::MAX, |p| p.end);
                    let in_order = journal.shards.iter().enumerate().take_while(|(i, s)| {
                        let number = first_shard + *i as u64;
                        number < limit && s.file == shard_file_name(number)
                    });
                    let keep = in_order.count();
                    journal.shards.truncate(keep);
                    journal.rows = journal.shards.iter().map(|s| s.rows).sum();
                }
            }
            // Only full shards can be continued: a short last shard means the earlier
            // writer finished, so its rows are complete but the next shard would not be
            // numbered right. Drop it and rewrite those rows.
            if journal
                .shards
                .last()
                .is_some_and(|s| s.rows != spec.rows_per_shard)
            {
                let last = journal.shards.pop().expect("non-empty");
                journal.rows -= last.rows;
            }
        }
        let kept: Vec<&str> = journal.shards.iter().map(|s| s.file.as_str()).collect();
        let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if removable(name, part) && !kept.contains(&name) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        write_atomic(&journal_path, &journal.to_json())?;
        sync_dir(dir);

        let resumed = journal.rows;
        let (tx, rx) = sync_channel(queue.max(1));
        let sink = Sink {
            dir: dir.to_path_buf(),
            spec: spec.clone(),
            part,
            journal,
            open: None,
        };
        let thread = std::thread::Builder::new()
            .name("monofast-writer".into())
            .spawn(move || sink.run(rx))
            .map_err(|e| Error::io(dir, e))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            rows: first_shard * spec.rows_per_shard + resumed,
            spec,
            part,
            tx: Some(tx),
            thread: Some(thread),
            resumed_rows: resumed,
        })
    }

    /// The global index of the caller's next row (rows on disk or queued, after the
    /// rows of the parts before this one).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Rows kept from an interrupted earlier writer.
    pub fn resumed_rows(&self) -> u64 {
        self.resumed_rows
    }

    pub fn spec(&self) -> &WriterSpec {
        &self.spec
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queue a batch. Blocks while the queue is full; returns the writer thread's error if
    /// it has failed (disk full, permissions).
    pub fn append(&mut self, rows: Rows<'_>) -> Result<()> {
        let n = rows.token_id.len();
        let row_bytes = (self.spec.dim * self.spec.dtype.size()) as usize;
        if rows.activations.len() != n * row_bytes {
            return Err(Error::invalid(format!(
                "activations hold {} bytes; {n} rows of {} x {} need {}",
                rows.activations.len(),
                self.spec.dim,
                self.spec.dtype.name(),
                n * row_bytes
            )));
        }
        for (name, len) in [
            ("source_id", rows.source_id.len()),
            ("context_id", rows.context_id.len()),
            ("position", rows.position.len()),
        ] {
            if len != n {
                return Err(Error::invalid(format!(
                    "{name} has {len} entries, token_id has {n}"
                )));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let chunk = Chunk {
            rows: n as u64,
            activations: rows.activations.to_vec(),
            token_id: rows.token_id.to_vec(),
            source_id: rows.source_id.to_vec(),
            context_id: rows.context_id.to_vec(),
            position: rows.position.to_vec(),
        };
        self.send(Msg::Rows(chunk))?;
        self.rows += n as u64;
        Ok(())
    }

    fn send(&mut self, msg: Msg) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Err(Error::invalid("the writer is closed"));
        };
        if tx.send(msg).is_err() {
            // The thread stopped early: its result holds the reason.
            self.tx = None;
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| Error::invalid("the writer thread stopped")));
        }
        Ok(())
    }

    fn join(&mut self) -> Result<Index> {
        let thread = self
            .thread
            .take()
            .ok_or_else(|| Error::invalid("the writer is closed"))?;
        thread
            .join()
            .unwrap_or_else(|_| Err(Error::invalid("the writer thread panicked")))
    }

    /// Write the last shard, then `index.json` with `extra` merged in (a part: its record
    /// for `merge_parts`, which takes the extra fields instead), and remove the journal.
    pub fn finish(&mut self, extra: Map<String, Value>) -> Result<Index> {
        if self.part.is_some() && !extra.is_empty() {
            return Err(Error::invalid(
                "a part's writer takes no extra index fields; give them to merge_parts",
            ));
        }
        self.send(Msg::Finish)?;
        self.tx = None;
        let mut index = self.join()?;
        add_extra(&mut index, extra)?;
        let record = match self.part {
            None => INDEX_FILE.to_string(),
            Some(p) => part_file_name(p.start),
        };
        write_atomic(&self.dir.join(record), &index.to_json())?;
        let journal = self.dir.join(journal_name(self.part));
        fs::remove_file(&journal).map_err(|e| Error::io(&journal, e))?;
        sync_dir(&self.dir);
        Ok(index)
    }

    /// Stop without finishing: the open temporary shard is deleted, finished shards and
    /// the journal stay for a later resume.
    pub fn abort(&mut self) {
        self.tx = None; // the thread sees the queue close without Finish
        let _ = self.join();
    }

    pub fn is_open(&self) -> bool {
        self.thread.is_some()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.abort();
        }
    }
}

/// Merge `extra` into the index, refusing keys of the format itself.
fn add_extra(index: &mut Index, extra: Map<String, Value>) -> Result<()> {
    for (key, value) in extra {
        if matches!(
            key.as_str(),
            "format"
                | "dim"
                | "dtype"
                | "rows"
                | "rows_per_shard"
                | "fingerprint"
                | "columns"
                | "shards"
        ) {
            return Err(Error::invalid(format!(
                "extra index field {key:?} would replace a format field"
            )));
        }
        index.extra.insert(key, value);
    }
    Ok(())
}

/// Join the finished parts starting at shards `starts` (in order) into `index.json`, with
/// `extra` merged in, then remove the part records, journals and any shard no part
/// listed. Fails, writing nothing, when a part is missing or the parts do not tile the
/// store (shards numbered from 0 without a gap, every one full but the last).
pub fn merge_parts(dir: &Path, starts: &[u64], extra: Map<String, Value>) -> Result<Index> {
    let mut merged: Option<Index> = None;
    for &start in starts {
        let path = dir.join(part_file_name(start));
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let part: Index = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(&path, format!("not a valid part record ({e})")))?;
        let Some(index) = merged.as_mut() else {
            merged = Some(part);
            continue;
        };
        let same = index.dim == part.dim
            && index.dtype == part.dtype
            && index.rows_per_shard == part.rows_per_shard
            && index.fingerprint == part.fingerprint;
        if !same {
            return Err(Error::corrupt(
                &path,
                "written with another dim, dtype, shard size or fingerprint than the first part",
            ));
        }
        index.rows += part.rows;
        index.shards.extend(part.shards);
    }
    let mut index = merged.ok_or_else(|| Error::invalid("merge_parts needs at least one part"))?;
    add_extra(&mut index, extra)?;
    let bytes = index.to_json();
    let path = dir.join(INDEX_FILE);
    Index::parse(&bytes, &path)?;
    write_atomic(&path, &bytes)?;
    let kept: Vec<&str> = index.shards.iter().map(|s| s.file.as_str()).collect();
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if owned_file(name) && name != INDEX_FILE && !kept.contains(&name) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    sync_dir(dir);
    Ok(index)
}

struct OpenShard {
    number: u64,
    tmp: PathBuf,
    file: File,
    rows: u64,
    token_id: Vec<i32>,
    source_id: Vec<u8>,
    context_id: Vec<i32>,
    position: Vec<i32>,
}

/// The writer thread's state.
struct Sink {
    dir: PathBuf,
    spec: WriterSpec,
    part: Option<Part>,
    journal: Index,
    open: Option<OpenShard>,
}

impl Sink {
    fn run(mut self, rx: Receiver<Msg>) -> Result<Index> {
        let result = self.serve(&rx);
        if let Some(shard) = self.open.take() {
            // Aborted or failed: the half-written shard must not survive.
            drop(shard.file);
            let _ = fs::remove_file(&shard.tmp);
        }
        result
    }

    fn serve(&mut self, rx: &Receiver<Msg>) -> Result<Index> {
        loop {
            match rx.recv() {
                Ok(Msg::Rows(chunk)) => self.write_chunk(chunk)?,
                Ok(Msg::Finish) => {
                    if self.open.as_ref().is_some_and(|s| s.rows > 0) {
                        self.close_shard()?;
                    }
                    return Ok(self.journal.clone());
                }
                Err(_) => return Err(Error::invalid("writer aborted")),
            }
        }
    }

    fn start_shard(&mut self) -> Result<()> {
        let number = self.part.map_or(0, |p| p.start) + self.journal.shards.len() as u64;
        if let Some(p) = self.part.filter(|p| number >= p.end) {
            return Err(Error::invalid(format!(
                "the part of shards {}..{} is full; it was given more rows than they hold",
                p.start, p.end
            )));
        }
        let tmp = self.dir.join(tmp_name(&shard_file_name(number)));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        // The header is written last, when the row count is known; reserve its page.
        file.seek(SeekFrom::Start(HEADER_BYTES))
            .map_err(|e| Error::io(&tmp, e))?;
        let cap = self.spec.rows_per_shard.min(1 << 20) as usize;
        self.open = Some(OpenShard {
            number,
            tmp,
            file,
            rows: 0,
            token_id: Vec::with_capacity(cap),
            source_id: Vec::with_capacity(cap),
            context_id: Vec::with_capacity(cap),
            position: Vec::with_capacity(cap),
        });
        Ok(())
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        let row_bytes = (self.spec.dim * self.spec.dtype.size()) as usize;
        let mut done = 0u64;
        while done < chunk.rows {
            if self.open.is_none() {
                self.start_shard()?;
            }
            let shard = self.open.as_mut().expect("opened above");
            let take = (self.spec.rows_per_shard - shard.rows).min(chunk.rows - done);
            let (a, b) = (done as usize, (done + take) as usize);
            shard
                .file
                .write_all(&chunk.activations[a * row_bytes..b * row_bytes])
                .map_err(|e| Error::io(&shard.tmp, e))?;
            shard.token_id.extend_from_slice(&chunk.token_id[a..b]);
            shard.source_id.extend_from_slice(&chunk.source_id[a..b]);
            shard.context_id.extend_from_slice(&chunk.context_id[a..b]);
            shard.position.extend_from_slice(&chunk.position[a..b]);
            shard.rows += take;
            done += take;
            if shard.rows == self.spec.rows_per_shard {
                self.close_shard()?;
            }
        }
        Ok(())
    }

    /// Metadata, header, fsync, checksum, rename, journal.
    fn close_shard(&mut self) -> Result<()> {
        let mut shard = self.open.take().expect("a shard is open");
        let layout =
            ShardLayout::new(shard.rows, self.spec.dim, self.spec.dtype).expect("checked at open");
        let id = ShardIdentity {
            shard: shard.number,
            first_row: shard.number * self.spec.rows_per_shard,
            fingerprint: self.spec.fingerprint.clone(),
        };
        let tmp = shard.tmp.clone();
        let io = |e| Error::io(&tmp, e);
        let mut tail = Vec::with_capacity(shard.rows as usize * 13);
        for column in [&shard.context_id, &shard.token_id, &shard.position] {
            column
                .iter()
                .for_each(|v| tail.extend_from_slice(&v.to_le_bytes()));
        }
        tail.extend_from_slice(&shard.source_id);
        shard.file.write_all(&tail).map_err(io)?;
        shard.file.seek(SeekFrom::Start(0)).map_err(io)?;
        shard
            .file
            .write_all(&encode_header(&layout, &id)?)
            .map_err(io)?;
        shard.file.sync_all().map_err(io)?;
        drop(shard.file);
        let bytes = fs::metadata(&tmp).map_err(io)?.len();
        if bytes != layout.file_len {
            return Err(Error::corrupt(
                &tmp,
                format!("wrote {bytes} bytes, expected {}", layout.file_len),
            ));
        }
        // Re-reading the file we just wrote comes from the page cache at memory speed.
        let checksum = checksum::hash_file(&tmp)?;
        let name = shard_file_name(shard.number);
        let path = self.dir.join(&name);
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        self.journal.shards.push(ShardRecord {
            file: name,
            rows: shard.rows,
            bytes,
            checksum,
        });
        self.journal.rows += shard.rows;
        write_atomic(
            &self.dir.join(journal_name(self.part)),
            &self.journal.to_json(),
        )?;
        sync_dir(&self.dir);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{verify, MetaColumns, Store};

    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mf-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn spec(rows_per_shard: u64) -> WriterSpec {
        WriterSpec {
            dim: 3,
            dtype: DType::F32,
            rows_per_shard,
            fingerprint: "fp".into(),
        }
    }

    /// Append rows [start, end) whose values encode the row number.
    fn append_range(w: &mut Writer, start: u64, end: u64) {
        let acts: Vec<u8> = (start..end)
            .flat_map(|r| (0..3).flat_map(move |c| ((r * 10 + c) as f32).to_le_bytes()))
            .collect();
        let ids: Vec<i32> = (start..end).map(|r| r as i32).collect();
        let src: Vec<u8> = (start..end).map(|r| (r % 2) as u8).collect();
        w.append(Rows {
            activations: &acts,
            token_id: &ids,
            source_id: &src,
            context_id: &ids,
            position: &ids,
        })
        .unwrap();
    }

    fn check_rows(store: &Store, n: u64) {
        assert_eq!(store.rows(), n);
        let rows: Vec<u64> = (0..n).collect();
        let mut out = vec![0u8; n as usize * 12];
        let mut meta = MetaColumns::default();
        store.gather(&rows, &mut out, false, &mut meta);
        for r in 0..n as usize {
            let v = f32::from_le_bytes(out[r * 12 + 4..r * 12 + 8].try_into().unwrap());
            assert_eq!(v, (r * 10 + 1) as f32);
            assert_eq!(meta.token_id[r], r as i32);
            assert_eq!(meta.source_id[r], (r % 2) as u8);
        }
    }

    #[test]
    fn writes_rotates_and_reads_back() {
        let dir = temp_dir("writer");
        let mut w = Writer::open(&dir, spec(4), false, 2).unwrap();
        append_range(&mut w, 0, 3);
        append_range(&mut w, 3, 10);
        append_range(&mut w, 10, 10);
        let index = w.finish(Map::new()).unwrap();
        assert_eq!(index.rows, 10);
        assert_eq!(
            index.shards.iter().map(|s| s.rows).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert!(!dir.join(JOURNAL_FILE).exists());
        check_rows(&Store::open(&dir).unwrap(), 10);
        assert_eq!(verify(&dir).unwrap().shards, 3);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_keeps_finished_shards_only() {
        let dir = temp_dir("resume");
        let mut w = Writer::open(&dir, spec(4), false, 2).unwrap();
        append_range(&mut w, 0, 10);
        w.abort(); // as if killed: two shards done, rows 8..10 were in the open shard
        assert!(!dir.join(INDEX_FILE).exists());
        assert!(fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .ends_with(".tmp")));

        let mut w = Writer::open(&dir, spec(4), true, 2).unwrap();
        assert_eq!(w.rows(), 8);
        append_range(&mut w, 8, 13);
        w.finish(Map::new()).unwrap();
        check_rows(&Store::open(&dir).unwrap(), 13);

        // A different spec starts over.
        let other = WriterSpec {
            fingerprint: "other".into(),
            ..spec(4)
        };
        let w = Writer::open(&dir, other, true, 2).unwrap();
        assert_eq!(w.rows(), 0);
        drop(w);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_drops_a_damaged_shard_and_what_follows() {
        let dir = temp_dir("resume-bad");
        let mut w = Writer::open(&dir, spec(2), false, 2).unwrap();
        append_range(&mut w, 0, 7);
        w.abort();
        let victim = dir.join(shard_file_name(1));
        let mut bytes = fs::read(&victim).unwrap();
        bytes[HEADER_BYTES as usize] ^= 0xff;
        fs::write(&victim, bytes).unwrap();
        let w = Writer::open(&dir, spec(2), true, 2).unwrap();
        assert_eq!(w.rows(), 2);
        assert!(!dir.join(shard_file_name(2)).exists());
        drop(w);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn part(start: u64, end: u64) -> Option<Part> {
        Some(Part { start, end })
    }

    #[test]
    fn parts_written_apart_merge_into_one_store() {
        let dir = temp_dir("parts");
        // Shards of 4 rows: the second part (shards 2..4) finishes first, as ranks may.
        let mut b = Writer::open_part(&dir, spec(4), part(2, 4), false, 2).unwrap();
        assert_eq!(b.rows(), 8);
        append_range(&mut b, 8, 13);
        let mut a = Writer::open_part(&dir, spec(4), part(0, 2), false, 2).unwrap();
        append_range(&mut a, 0, 8);
        a.abort();
        b.finish(Map::new()).unwrap();
        assert!(dir.join(part_file_name(2)).exists() && !dir.join("journal-00002.json").exists());

        let mut a = Writer::open_part(&dir, spec(4), part(0, 2), true, 2).unwrap();
        assert_eq!((a.rows(), a.resumed_rows()), (8, 8));
        a.finish(Map::new()).unwrap();
        let mut extra = Map::new();
        extra.insert("gpt".into(), Value::from(1));
        let index = merge_parts(&dir, &[0, 2], extra).unwrap();
        assert_eq!(index.rows, 13);
        assert_eq!(index.extra["gpt"], Value::from(1));
        check_rows(&Store::open(&dir).unwrap(), 13);
        assert_eq!(verify(&dir).unwrap().shards, 4);
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".json"))
            .collect();
        assert_eq!(names, vec![INDEX_FILE.to_string()]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_part_refuses_rows_past_its_last_shard() {
        let dir = temp_dir("part-full");
        let mut w = Writer::open_part(&dir, spec(4), part(0, 1), false, 2).unwrap();
        append_range(&mut w, 0, 5);
        let err = w.finish(Map::new()).unwrap_err();
        assert!(err.to_string().contains("is full"), "{err}");
        assert!(Writer::open_part(&dir, spec(4), part(1, 1), false, 2).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_part_resumes_alone_and_leaves_other_parts_alone() {
        let dir = temp_dir("part-resume");
        let mut a = Writer::open_part(&dir, spec(2), part(0, 3), false, 2).unwrap();
        append_range(&mut a, 0, 6);
        a.finish(Map::new()).unwrap();
        let mut b = Writer::open_part(&dir, spec(2), part(3, 5), false, 2).unwrap();
        append_range(&mut b, 6, 9);
        b.abort(); // killed: shard 3 is done, row 8 was in the open shard
        let mut b = Writer::open_part(&dir, spec(2), part(3, 5), true, 2).unwrap();
        assert_eq!((b.rows(), b.resumed_rows()), (8, 2));
        append_range(&mut b, 8, 9);
        b.finish(Map::new()).unwrap();
        assert!(
            dir.join(shard_file_name(0)).exists(),
            "the other part's shards stay"
        );
        merge_parts(&dir, &[0, 3], Map::new()).unwrap();
        check_rows(&Store::open(&dir).unwrap(), 9);
        // A missing part is named and nothing is written.
        fs::remove_file(dir.join(INDEX_FILE)).unwrap();
        let err = merge_parts(&dir, &[0, 3], Map::new()).unwrap_err();
        assert!(err.to_string().contains("part-00000.json"), "{err}");
        assert!(!dir.join(INDEX_FILE).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_appends_are_rejected() {
        let dir = temp_dir("bad-append");
        let mut w = Writer::open(&dir, spec(4), false, 2).unwrap();
        let err = w
            .append(Rows {
                activations: &[0u8; 11],
                token_id: &[0],
                source_id: &[0],
                context_id: &[0],
                position: &[0],
            })
            .unwrap_err();
        assert!(matches!(err, Error::Invalid(_)));
        let err = w
            .append(Rows {
                activations: &[0u8; 12],
                token_id: &[0],
                source_id: &[],
                context_id: &[0],
                position: &[0],
            })
            .unwrap_err();
        assert!(err.to_string().contains("source_id"));
        drop(w);
        fs::remove_dir_all(&dir).unwrap();
    }
}
