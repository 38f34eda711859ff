//! What every layer shares that is about neither Kafka nor the network, so that there
//! is one way to do it: [`write_file_atomically`], the one durable write (temp file,
//! fsync, rename, fsync of the directory) behind every checkpoint and metadata file
//! of the storage, the broker and the gateway; and [`settings`], the one loader of
//! layered settings (defaults, config file, environment) of the broker and the
//! gateway; and [`LATENCY_BUCKETS_S`], the buckets of every latency histogram
//! `GET /metrics` shows.
//!
//! It may not depend on any other crate of the workspace, use the network or an async
//! runtime: the storage crate and the gateway (which must never link the broker or
//! storage) both build on it.

pub mod settings;

/// Upper bounds, in seconds, of the buckets of every latency histogram of
/// `GET /metrics` (Kafka requests, fsyncs, HTTP requests): one scale to compare them.
pub const LATENCY_BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Whether a write must be on stable storage before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and the directory after it: once the call
    /// returns `Ok`, the new contents survive a crash.
    Durable,
    /// No fsync: a crash may leave the old contents (never a mix, thanks to the
    /// rename). For files whose loss only costs work, such as a snapshot that a
    /// replay can rebuild.
    Lazy,
}

/// The name `path` is written under before it is renamed into place: the file name
/// with `.tmp` appended, in the same directory. A stray one is crash debris.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replaces `path` with `bytes` so that a reader, or a restart after a crash, sees the
/// old contents or the new ones, never a mix: write a temp file, fsync it, rename it
/// over `path`, fsync the directory (the fsyncs only when `Durable`).
///
/// A failed fsync is final for the bytes it covered (PostgreSQL's "fsyncgate": the
/// kernel may have dropped the dirty pages and will report the next fsync as a
/// success): the temp file is removed and never renamed, and the error returned, so
/// the caller acknowledges nothing; writing again starts from a new file. An error
/// from the directory fsync means the rename may not survive a crash: the caller must
/// treat the write as not done.
pub fn write_file_atomically(path: &Path, bytes: &[u8], durability: Durability) -> io::Result<()> {
    let temp = temp_path(path);
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        if durability == Durability::Durable {
            file.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(with_path(&temp, e));
    }
    std::fs::rename(&temp, path).map_err(|e| with_path(path, e))?;
    if durability == Durability::Durable {
        sync_parent_dir(path)?;
    }
    Ok(())
}

/// fsync of the directory holding `path`, which makes a creation, rename or removal
/// of `path` durable.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(dir, e))
}

/// The error with the path it concerns in its message.
fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_contents_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.json");
        for (bytes, durability) in [
            (&b"one"[..], Durability::Durable),
            (b"two!", Durability::Lazy),
        ] {
            write_file_atomically(&path, bytes, durability).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes);
            assert!(!temp_path(&path).exists());
        }
        assert_eq!(temp_path(&path), dir.path().join("meta.json.tmp"));
    }

    #[test]
    fn a_failed_write_keeps_the_old_contents_and_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.json");
        write_file_atomically(&path, b"old", Durability::Durable).unwrap();
        // The temp name is taken by a directory: creating the temp file fails.
        std::fs::create_dir(temp_path(&path)).unwrap();
        let err = write_file_atomically(&path, b"new", Durability::Durable).unwrap_err();
        assert!(err.to_string().contains("meta.json.tmp"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
