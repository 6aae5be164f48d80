//! The on-disk format of an activation store: safetensors shards plus `index.json`.
//!
//! A store is a folder:
//!
//! ```text
//! index.json                 what the reader trusts: dim, dtype, rows, shard list + checksums
//! shard-00000.safetensors    rows [0, rows_per_shard)
//! shard-00001.safetensors    rows [rows_per_shard, 2 * rows_per_shard)
//! ...
//! ```
//!
//! Each shard is a plain safetensors file (any safetensors reader opens it) holding five
//! tensors of the same row count R, in this byte order:
//!
//! | tensor        | dtype            | shape  |
//! |---------------|------------------|--------|
//! | `activations` | F32 / F16 / BF16 | (R, D) |
//! | `context_id`  | I32              | (R,)   |
//! | `token_id`    | I32              | (R,)   |
//! | `position`    | I32              | (R,)   |
//! | `source_id`   | U8               | (R,)   |
//!
//! The JSON header is padded with spaces (allowed by the safetensors spec) so that the data
//! starts at byte 4096: the activations are page-aligned, which makes the row offsets of a
//! memory map simple and lets any tool map the big tensor with one offset. The header's
//! `__metadata__` repeats the format name, the shard number, its first row and the
//! writer's fingerprint, so a shard that strayed in from another store is recognised.
//! All numbers are little-endian, as safetensors requires.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("the shard format is little-endian; big-endian hosts are not supported");

/// Format name written into `index.json` and every shard header.
pub const FORMAT: &str = "monofast.activations/1";
/// Bytes before the data buffer: the 8-byte header length plus the space-padded JSON.
pub const HEADER_BYTES: u64 = 4096;
/// The largest header the reader accepts (safetensors' own readers cap it at 100 MB).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;
pub const INDEX_FILE: &str = "index.json";
/// Written after every finished shard while a writer runs; removed when `index.json` lands.
pub const JOURNAL_FILE: &str = "journal.json";
/// Bytes of per-row metadata: context_id, token_id, position (i32 each) and source_id (u8).
pub const META_ROW_BYTES: u64 = 13;

/// Element type of the activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Accepts the short names used in configs (`fp32`, `fp16`, `bf16`) and common aliases.
    pub fn parse(name: &str) -> Option<DType> {
        match name.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Some(DType::F32),
            "fp16" | "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "fp32",
            DType::F16 => "fp16",
            DType::BF16 => "bf16",
        }
    }

    /// The dtype code in a safetensors header.
    pub fn safetensors(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// The metadata columns after the activations, in file order: (name, safetensors dtype, bytes).
pub const META_COLUMNS: [(&str, &str, u64); 4] = [
    ("context_id", "I32", 4),
    ("token_id", "I32", 4),
    ("position", "I32", 4),
    ("source_id", "U8", 1),
];

/// Where each tensor of a shard lies, as absolute byte offsets into the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub rows: u64,
    pub dim: u64,
    pub dtype: DType,
    /// Absolute offsets of `activations`, `context_id`, `token_id`, `position`, `source_id`.
    pub activations: u64,
    pub context_id: u64,
    pub token_id: u64,
    pub position: u64,
    pub source_id: u64,
    /// Total file length.
    pub file_len: u64,
}

impl ShardLayout {
    /// The layout the writer produces for `rows` rows; `None` when the sizes overflow.
    pub fn new(rows: u64, dim: u64, dtype: DType) -> Option<ShardLayout> {
        let acts = rows.checked_mul(dim)?.checked_mul(dtype.size())?;
        let activations = HEADER_BYTES;
        let context_id = activations.checked_add(acts)?;
        let token_id = context_id.checked_add(rows.checked_mul(4)?)?;
        let position = token_id.checked_add(rows * 4)?;
        let source_id = position.checked_add(rows * 4)?;
        let file_len = source_id.checked_add(rows)?;
        Some(ShardLayout {
            rows,
            dim,
            dtype,
            activations,
            context_id,
            token_id,
            position,
            source_id,
            file_len,
        })
    }

    pub fn row_bytes(&self) -> u64 {
        self.dim * self.dtype.size()
    }

    /// Offsets relative to the data buffer (what the safetensors header records).
    fn tensors(&self) -> [(&'static str, &'static str, Vec<u64>, u64, u64); 5] {
        let d = HEADER_BYTES;
        [
            (
                "activations",
                self.dtype.safetensors(),
                vec![self.rows, self.dim],
                self.activations - d,
                self.context_id - d,
            ),
            (
                "context_id",
                "I32",
                vec![self.rows],
                self.context_id - d,
                self.token_id - d,
            ),
            (
                "token_id",
                "I32",
                vec![self.rows],
                self.token_id - d,
                self.position - d,
            ),
            (
                "position",
                "I32",
                vec![self.rows],
                self.position - d,
                self.source_id - d,
            ),
            (
                "source_id",
                "U8",
                vec![self.rows],
                self.source_id - d,
                self.file_len - d,
            ),
        ]
    }
}

/// The identity a shard header carries in `__metadata__`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardIdentity {
    pub shard: u64,
    pub first_row: u64,
    pub fingerprint: String,
}

/// The first `HEADER_BYTES` of a shard: length prefix, JSON, space padding.
pub fn encode_header(layout: &ShardLayout, id: &ShardIdentity) -> Result<Vec<u8>> {
    let mut root = Map::new();
    let mut meta = Map::new();
    meta.insert("format".into(), Value::from(FORMAT));
    meta.insert("shard".into(), Value::from(id.shard.to_string()));
    meta.insert("first_row".into(), Value::from(id.first_row.to_string()));
    meta.insert("fingerprint".into(), Value::from(id.fingerprint.clone()));
    root.insert("__metadata__".into(), Value::Object(meta));
    for (name, dtype, shape, start, end) in layout.tensors() {
        let mut t = Map::new();
        t.insert("dtype".into(), Value::from(dtype));
        t.insert("shape".into(), Value::from(shape));
        t.insert("data_offsets".into(), Value::from(vec![start, end]));
        root.insert(name.into(), Value::Object(t));
    }
    let json =
        serde_json::to_vec(&Value::Object(root)).map_err(|e| Error::invalid(e.to_string()))?;
    let room = (HEADER_BYTES - 8) as usize;
    if json.len() > room {
        return Err(Error::invalid(format!(
            "shard header needs {} bytes, more than the {room} reserved; use a shorter fingerprint",
            json.len()
        )));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES as usize);
    out.extend_from_slice(&(room as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(HEADER_BYTES as usize, b' ');
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Parse and check a shard's header. `data` is the whole file (a memory map) so that the
/// declared sizes can be checked against its real length; `path` names it in errors.
///
/// Accepts any valid safetensors layout of the five tensors (any order, any header length),
/// not only the writer's, so files rewritten by other tools stay readable.
pub fn parse_header(data: &[u8], path: &Path) -> Result<(ShardLayout, ShardIdentity)> {
    let bad = |reason: String| Error::corrupt(path, reason);
    let file_len = data.len() as u64;
    if file_len < 8 {
        return Err(bad(format!(
            "truncated: {file_len} bytes, too short for a safetensors header"
        )));
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {n} is implausible (limit {MAX_HEADER_BYTES}); not a shard"
        )));
    }
    let data_start = 8 + n;
    if data_start > file_len {
        return Err(bad(format!(
            "truncated: header claims {n} bytes but the file has {file_len}"
        )));
    }
    let header = &data[8..data_start as usize];
    let root: BTreeMap<String, Value> = serde_json::from_slice(header)
        .map_err(|e| bad(format!("header is not valid safetensors JSON ({e})")))?;

    let mut identity = None;
    let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
    for (key, value) in root {
        if key == "__metadata__" {
            let meta: BTreeMap<String, String> = serde_json::from_value(value)
                .map_err(|e| bad(format!("__metadata__ must map strings to strings ({e})")))?;
            identity = Some(parse_identity(&meta).map_err(bad)?);
        } else {
            let info: TensorInfo = serde_json::from_value(value)
                .map_err(|e| bad(format!("tensor {key:?} has a malformed entry ({e})")))?;
            tensors.insert(key, info);
        }
    }
    let identity =
        identity.ok_or_else(|| bad("no __metadata__: not a monofast activation shard".into()))?;

    let acts = tensors
        .get("activations")
        .ok_or_else(|| bad("no 'activations' tensor".into()))?;
    let dtype = match acts.dtype.as_str() {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => {
            return Err(bad(format!(
                "activations have dtype {other}; expected F32, F16 or BF16"
            )))
        }
    };
    let (rows, dim) = match acts.shape[..] {
        [r, d] if d > 0 => (r, d),
        _ => {
            return Err(bad(format!(
                "activations have shape {:?}; expected (rows, dim)",
                acts.shape
            )))
        }
    };
    let mut expected: Vec<(&str, &str, Vec<u64>, u64)> = vec![(
        "activations",
        dtype.safetensors(),
        vec![rows, dim],
        dtype.size(),
    )];
    for (name, st, size) in META_COLUMNS {
        expected.push((name, st, vec![rows], size));
    }
    if tensors.len() != expected.len() {
        let extra: Vec<&String> = tensors
            .keys()
            .filter(|k| !expected.iter().any(|(n, ..)| n == k))
            .collect();
        return Err(bad(format!(
            "unexpected tensors {extra:?} or missing columns"
        )));
    }

    // Every tensor must have its shape and dtype, a byte range of exactly shape x itemsize,
    // and together the ranges must tile the data buffer with no gap or overlap.
    let buffer_len = file_len - data_start;
    let mut spans = Vec::with_capacity(expected.len());
    let mut starts = [0u64; 5];
    for (i, (name, st, shape, itemsize)) in expected.iter().enumerate() {
        let info = tensors
            .get(*name)
            .ok_or_else(|| bad(format!("no {name:?} tensor")))?;
        if info.dtype != *st || info.shape != *shape {
            return Err(bad(format!(
                "tensor {name:?} is {} {:?}; expected {st} {shape:?}",
                info.dtype, info.shape
            )));
        }
        let (start, end) = info.data_offsets;
        let size = shape
            .iter()
            .try_fold(*itemsize, |acc, &x| acc.checked_mul(x));
        if end < start || Some(end - start) != size {
            return Err(bad(format!(
                "tensor {name:?} has byte range [{start}, {end}) for shape {shape:?}"
            )));
        }
        if end > buffer_len {
            return Err(bad(format!(
                "truncated: tensor {name:?} ends at byte {} but the file has {file_len}",
                data_start.saturating_add(end)
            )));
        }
        spans.push((start, end));
        starts[i] = data_start + start;
    }
    spans.sort_unstable();
    let mut cursor = 0u64;
    for (start, end) in &spans {
        if *start != cursor {
            return Err(bad(format!(
                "tensor byte ranges leave a gap or overlap at byte {cursor}"
            )));
        }
        cursor = *end;
    }
    if cursor != buffer_len {
        return Err(bad(format!(
            "{} bytes after the last tensor (file is {file_len} bytes, tensors end at {})",
            buffer_len - cursor,
            data_start + cursor
        )));
    }
    let layout = ShardLayout {
        rows,
        dim,
        dtype,
        activations: starts[0],
        context_id: starts[1],
        token_id: starts[2],
        position: starts[3],
        source_id: starts[4],
        file_len,
    };
    Ok((layout, identity))
}

fn parse_identity(meta: &BTreeMap<String, String>) -> std::result::Result<ShardIdentity, String> {
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        Some(f) => return Err(format!("format {f:?}; this reader understands {FORMAT:?}")),
        None => return Err("no format in __metadata__: not a monofast activation shard".into()),
    }
    let number = |key: &str| -> std::result::Result<u64, String> {
        meta.get(key)
            .ok_or_else(|| format!("__metadata__ has no {key:?}"))?
            .parse::<u64>()
            .map_err(|_| format!("__metadata__ {key:?} is not a number"))
    };
    Ok(ShardIdentity {
        shard: number("shard")?,
        first_row: number("first_row")?,
        fingerprint: meta.get("fingerprint").cloned().unwrap_or_default(),
    })
}

/// One shard as `index.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    /// XXH3-128 of the whole file, 32 lowercase hex characters.
    pub checksum: String,
}

/// `index.json` (and the writer's journal, which has the same shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub dim: u64,
    pub dtype: String,
    pub rows: u64,
    pub rows_per_shard: u64,
    pub fingerprint: String,
    pub columns: BTreeMap<String, String>,
    pub shards: Vec<ShardRecord>,
    /// Anything else the harvest records (GPT checkpoint, layer, contexts): kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The dtype names of every column, as `index.json` lists them.
pub fn column_dtypes(dtype: DType) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("activations".to_string(), dtype.name().to_string());
    for (name, st, _) in META_COLUMNS {
        out.insert(
            name.to_string(),
            if st == "U8" { "uint8" } else { "int32" }.to_string(),
        );
    }
    out
}

pub fn shard_file_name(shard: u64) -> String {
    format!("shard-{shard:05}.safetensors")
}

impl Index {
    pub fn new(dim: u64, dtype: DType, rows_per_shard: u64, fingerprint: &str) -> Index {
        Index {
            format: FORMAT.to_string(),
            dim,
            dtype: dtype.name().to_string(),
            rows: 0,
            rows_per_shard,
            fingerprint: fingerprint.to_string(),
            columns: column_dtypes(dtype),
            shards: Vec::new(),
            extra: Map::new(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("an index always serialises");
        out.push(b'\n');
        out
    }

    /// Parse and check an index: the shard list must add up and follow the naming rule.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<(Index, DType)> {
        let bad = |reason: String| Error::corrupt(path, reason);
        let index: Index = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a valid activation index ({e})")))?;
        if index.format != FORMAT {
            return Err(bad(format!(
                "format {:?}; this reader understands {FORMAT:?}",
                index.format
            )));
        }
        let dtype = DType::parse(&index.dtype).ok_or_else(|| {
            bad(format!(
                "dtype {:?}; expected fp32, fp16 or bf16",
                index.dtype
            ))
        })?;
        if index.dim == 0 || index.rows_per_shard == 0 {
            return Err(bad("dim and rows_per_shard must be positive".into()));
        }
        if ShardLayout::new(index.rows_per_shard, index.dim, dtype).is_none() {
            return Err(bad("rows_per_shard x dim overflows".into()));
        }
        let mut total = 0u64;
        let last = index.shards.len().saturating_sub(1);
        for (i, shard) in index.shards.iter().enumerate() {
            if shard.file != shard_file_name(i as u64) {
                return Err(bad(format!(
                    "shard {i} is named {:?}; expected {:?}",
                    shard.file,
                    shard_file_name(i as u64)
                )));
            }
            let full = shard.rows == index.rows_per_shard;
            if shard.rows == 0 || shard.rows > index.rows_per_shard || (i < last && !full) {
                return Err(bad(format!(
                    "{} holds {} rows; every shard but the last holds rows_per_shard = {} (the last 1..={})",
                    shard.file, shard.rows, index.rows_per_shard, index.rows_per_shard
                )));
            }
            if shard.checksum.len() != 32 || !shard.checksum.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(bad(format!(
                    "{} has checksum {:?}; expected 32 hex digits",
                    shard.file, shard.checksum
                )));
            }
            total = total
                .checked_add(shard.rows)
                .ok_or_else(|| bad("row count overflows".into()))?;
        }
        if total != index.rows {
            return Err(bad(format!(
                "rows = {} but the shards hold {total}",
                index.rows
            )));
        }
        Ok((index, dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn sample_file(rows: u64, dim: u64, dtype: DType) -> Vec<u8> {
        let layout = ShardLayout::new(rows, dim, dtype).unwrap();
        let id = ShardIdentity {
            shard: 3,
            first_row: 300,
            fingerprint: "abc".into(),
        };
        let mut data = encode_header(&layout, &id).unwrap();
        data.resize(layout.file_len as usize, 7);
        data
    }

    #[test]
    fn header_round_trips() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (rows, dim) in [(1, 1), (5, 3), (100, 768)] {
                let data = sample_file(rows, dim, dtype);
                let (layout, id) = parse_header(&data, Path::new("x")).unwrap();
                assert_eq!(layout, ShardLayout::new(rows, dim, dtype).unwrap());
                assert_eq!(
                    id,
                    ShardIdentity {
                        shard: 3,
                        first_row: 300,
                        fingerprint: "abc".into()
                    }
                );
                assert_eq!(layout.activations, HEADER_BYTES);
            }
        }
    }

    #[test]
    fn truncation_is_named() {
        let data = sample_file(10, 4, DType::F32);
        for cut in [0, 5, 8, 100, 4096, data.len() - 1] {
            let err = parse_header(&data[..cut], Path::new("s.safetensors")).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("s.safetensors") && matches!(err, Error::Corrupt { .. }),
                "{text}"
            );
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(parse_header(&longer, Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("after the last tensor"));
    }

    #[test]
    fn index_checks_shards() {
        let mut index = Index::new(4, DType::BF16, 10, "f");
        for (i, rows) in [10u64, 10, 3].iter().enumerate() {
            index.shards.push(ShardRecord {
                file: shard_file_name(i as u64),
                rows: *rows,
                bytes: 0,
                checksum: "0".repeat(32),
            });
            index.rows += rows;
        }
        index.extra.insert("layer".into(), Value::from(1));
        let (back, dtype) = Index::parse(&index.to_json(), Path::new("index.json")).unwrap();
        assert_eq!(back, index);
        assert_eq!(dtype, DType::BF16);

        let mut short = index.clone();
        short.shards[1].rows = 9;
        short.rows -= 1;
        assert!(Index::parse(&short.to_json(), Path::new("i")).is_err());
        let mut escape = index.clone();
        escape.shards[0].file = "../etc/passwd".into();
        assert!(Index::parse(&escape.to_json(), Path::new("i")).is_err());
        let mut sum = index.clone();
        sum.rows += 1;
        assert!(Index::parse(&sum.to_json(), Path::new("i")).is_err());
    }

    /// A bounded mutation fuzzer over the header and index parsers: flipped bits, cut
    /// lengths, spliced JSON. Nothing may panic; every failure must be a `Corrupt` error.
    #[test]
    fn fuzz_parsers_never_panic() {
        let mut rng = SplitMix64::new(0x5eed);
        let seeds = [
            sample_file(3, 2, DType::F32),
            sample_file(1, 5, DType::BF16),
        ];
        let mut index = Index::new(2, DType::F32, 3, "f");
        index.shards.push(ShardRecord {
            file: shard_file_name(0),
            rows: 3,
            bytes: 0,
            checksum: "a".repeat(32),
        });
        index.rows = 3;
        let index_json = index.to_json();
        let tokens: [&[u8]; 8] = [
            b"{",
            b"}",
            b"\"",
            b"[",
            b"]",
            b"18446744073709551615",
            b"-1",
            b"\"shape\"",
        ];
        for round in 0..20_000u64 {
            let base: &[u8] = if round % 3 == 2 {
                &index_json
            } else {
                &seeds[(round % 2) as usize]
            };
            let mut data = base.to_vec();
            for _ in 0..1 + rng.below(4) {
                let pos = rng.below(data.len() as u64 + 1) as usize;
                match rng.below(4) {
                    0 if pos < data.len() => data[pos] ^= 1 << rng.below(8),
                    1 => data.truncate(pos),
                    2 => {
                        let tok = tokens[rng.below(tokens.len() as u64) as usize];
                        data.splice(pos..pos, tok.iter().copied());
                    }
                    _ if pos < data.len() => data[pos] = rng.next_u64() as u8,
                    _ => {}
                }
            }
            let result = std::panic::catch_unwind(|| {
                if round % 3 == 2 {
                    Index::parse(&data, Path::new("i")).map(|_| ())
                } else {
                    parse_header(&data, Path::new("s")).map(|_| ())
                }
            });
            match result {
                Ok(Ok(())) | Ok(Err(Error::Corrupt { .. })) => {}
                Ok(Err(other)) => panic!("round {round}: wrong error kind {other:?}"),
                Err(_) => panic!("round {round}: parser panicked on {data:?}"),
            }
        }
    }
}
