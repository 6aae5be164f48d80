//! Content checksums of files: XXH3-128 over a memory map.
//!
//! Used for the stage manifests (is an input unchanged?) and for shard integrity.
//! XXH3 runs at memory bandwidth (tens of GB/s), so hashing an output costs about
//! as much as reading it once from the page cache; SHA-256 would cost ~10x more and
//! buys nothing here since the threat is corruption, not an adversary.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::error::{Error, Result};

/// Hex digest of a byte slice (32 lowercase hex characters).
pub fn hash_bytes(data: &[u8]) -> String {
    format!("{:032x}", xxh3_128(data))
}

/// Hex digest of a whole file, read through a memory map (no copy into the heap).
pub fn hash_file(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        // Mapping an empty file fails on some platforms; its hash is the empty input's.
        return Ok(hash_bytes(&[]));
    }
    // SAFETY: the map is read-only and dropped before returning; a concurrent writer
    // could change the bytes under us, which at worst yields a hash that no longer
    // matches, never undefined behaviour in safe code that only reads u8s.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let mut state = Xxh3::new();
    // Chunked so the kernel can read ahead and drop pages behind us.
    for chunk in map.chunks(8 << 20) {
        state.update(chunk);
    }
    Ok(format!("{:032x}", state.digest128()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_hash_equals_bytes_hash() {
        let dir = std::env::temp_dir().join(format!("mf-checksum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.bin");
        let data: Vec<u8> = (0..20_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        assert_eq!(hash_file(&path).unwrap(), hash_bytes(&data));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_file_hashes() {
        let dir = std::env::temp_dir().join(format!("mf-checksum-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.bin");
        std::fs::File::create(&path).unwrap();
        assert_eq!(hash_file(&path).unwrap(), hash_bytes(b""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_io_error() {
        let err = hash_file(Path::new("/nonexistent/monofast/file")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
    }

    #[test]
    fn different_bytes_differ() {
        assert_ne!(hash_bytes(b"abc"), hash_bytes(b"abd"));
        assert_eq!(hash_bytes(b"abc").len(), 32);
    }
}
