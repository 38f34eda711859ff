//! File naming and the few filesystem idioms the log repeats: errors that carry the
//! path, deleting by rename-then-remove, and fsync of the directory.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Result, StorageError};

pub(crate) const LOG_SUFFIX: &str = "log";
pub(crate) const OFFSET_INDEX_SUFFIX: &str = "index";
pub(crate) const TIME_INDEX_SUFFIX: &str = "timeindex";
/// A file being written before it is renamed into place; stray ones are crash debris.
pub(crate) const TEMP_SUFFIX: &str = "tmp";
/// A file being deleted; stray ones are crash debris.
pub(crate) const DELETED_SUFFIX: &str = "deleted";
/// Segment files are named by base offset, zero-padded so names sort like offsets.
pub(crate) const BASE_OFFSET_DIGITS: usize = 20;

/// Writes `parts`, one after the other, at `position` in `file`: one `pwritev`
/// in the common case, more only if the kernel writes short.
pub(crate) fn write_all_vectored_at(file: &File, parts: &[&[u8]], position: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    let mut position = position;
    io::IoSlice::advance_slices(&mut slices, 0); // drop leading empty parts
    while !slices.is_empty() {
        let count = slices.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix (std documents
        // it), and `slices` holds `count` or more valid ones borrowed for the call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                slices.as_ptr().cast::<libc::iovec>(),
                count,
                position as libc::off_t,
            )
        };
        let n = match transferred(n, io::ErrorKind::WriteZero, "pwritev wrote nothing") {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        };
        position += n as u64;
        io::IoSlice::advance_slices(&mut slices, n as usize);
    }
    Ok(())
}

/// What a positioned read or write syscall's return value `n` says: the bytes it
/// moved, the OS error (`Interrupted` for the caller to retry), or, for 0, an
/// error of `zero` (the file ended, or nothing could be written).
pub(crate) fn transferred(n: isize, zero: io::ErrorKind, what: &str) -> io::Result<usize> {
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::new(zero, what.to_string())),
        n => Ok(n as usize),
    }
}

/// Maps an I/O error to [`StorageError::Io`] naming `path`.
pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn segment_path(dir: &Path, base_offset: i64, suffix: &str) -> PathBuf {
    dir.join(format!(
        "{base_offset:0width$}.{suffix}",
        width = BASE_OFFSET_DIGITS
    ))
}

/// The base offset in a segment file name such as `00000000000000000042.log`.
pub(crate) fn parse_base_offset(stem: &str) -> Option<i64> {
    if stem.len() != BASE_OFFSET_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse::<i64>().ok()
}

/// fsync of the directory, which makes file creations, renames and removals in it
/// durable. The directory is opened for it and closed after: a partition keeps no
/// descriptor of its directory (see the crate's note on descriptors).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    open_dir(dir)?.sync_all().map_err(io_error(dir))
}

/// The directory opened for an fsync.
pub(crate) fn open_dir(dir: &Path) -> Result<File> {
    File::open(dir).map_err(io_error(dir))
}

/// Deletes a file by renaming it to `.deleted` first, so that a crash midway leaves
/// a name that `open` recognises as debris rather than a damaged segment file.
/// A file that is already gone is not an error.
pub(crate) fn delete_file(path: &Path) -> Result<()> {
    let mut doomed = path.as_os_str().to_owned();
    doomed.push(".");
    doomed.push(DELETED_SUFFIX);
    let doomed = PathBuf::from(doomed);
    match std::fs::rename(path, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path)(e)),
    }
    remove_if_exists(&doomed)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_sort_like_offsets() {
        let dir = Path::new("/x");
        let a = segment_path(dir, 42, LOG_SUFFIX);
        let b = segment_path(dir, 1_000, LOG_SUFFIX);
        assert_eq!(a.file_name().unwrap(), "00000000000000000042.log");
        assert!(a < b);
        assert_eq!(parse_base_offset("00000000000000000042"), Some(42));
        assert_eq!(parse_base_offset("42"), None);
        assert_eq!(parse_base_offset("0000000000000000004x"), None);
        assert_eq!(
            parse_base_offset("99999999999999999999"),
            None,
            "beyond i64"
        );
    }

    #[test]
    fn vectored_write_lands_every_part_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("f"))
            .unwrap();
        // More parts than one pwritev takes, empty ones among them, at an offset.
        let parts: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 5) as usize])
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        write_all_vectored_at(&file, &refs, 7).unwrap();
        let written = std::fs::read(tmp.path().join("f")).unwrap();
        assert_eq!(&written[..7], &[0; 7]);
        assert_eq!(written[7..], parts.concat());
        write_all_vectored_at(&file, &[], 0).unwrap();
    }
}
