//! Positioned reads of batches from a segment file, in chunks, so that walking the
//! headers of many small batches costs one syscall per chunk rather than one per
//! batch. Nothing here trusts the bytes: every header is parsed with the protocol
//! crate's checks and every length is bounded by the end of the segment.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use protocol::record_batch::{self, BatchError, BatchHeader, BATCH_HEADER_BYTES};

use crate::fsutil::io_error;
use crate::Result;

/// Chunk for walking headers: a few typical small batches per read.
pub(crate) const HEADER_CHUNK_BYTES: usize = 8 * 1024;
/// Chunk for reading whole batches to CRC-check or decode them.
pub(crate) const BATCH_CHUNK_BYTES: usize = 1024 * 1024;

/// A window over `[0, end_bytes)` of a segment file.
pub(crate) struct SegmentReader<'a> {
    file: &'a File,
    path: &'a Path,
    end_bytes: u64,
    chunk_bytes: usize,
    buf: Vec<u8>,
    buf_start: u64,
}

/// What is at a position of a segment.
#[derive(Debug)]
pub(crate) enum Step {
    /// The position is the end of the segment.
    End,
    /// A batch whose header parses and whose length fits in the segment.
    Batch(BatchHeader),
    /// Torn or corrupt bytes.
    Bad(BatchError),
}

impl<'a> SegmentReader<'a> {
    pub fn new(file: &'a File, path: &'a Path, end_bytes: u64, chunk_bytes: usize) -> Self {
        SegmentReader {
            file,
            path,
            end_bytes,
            chunk_bytes,
            buf: Vec::new(),
            buf_start: 0,
        }
    }

    /// The bytes `[position, position + len)`, which must lie before the end.
    pub fn bytes(&mut self, position: u64, len: usize) -> Result<&[u8]> {
        let end = position + len as u64;
        assert!(
            end <= self.end_bytes,
            "read [{position}, {end}) past segment end {}",
            self.end_bytes
        );
        let buffered = position >= self.buf_start && end <= self.buf_start + self.buf.len() as u64;
        if !buffered {
            let remaining = usize::try_from(self.end_bytes - position).unwrap_or(usize::MAX);
            let read_len = len.max(self.chunk_bytes.min(remaining));
            self.buf.resize(read_len, 0);
            self.buf_start = position;
            if let Err(e) = self.file.read_exact_at(&mut self.buf, position) {
                self.buf.clear();
                return Err(io_error(self.path)(e));
            }
        }
        let from = (position - self.buf_start) as usize;
        Ok(&self.buf[from..from + len])
    }

    /// Parses the batch header at `position`.
    pub fn header_at(&mut self, position: u64) -> Result<Step> {
        assert!(position <= self.end_bytes);
        let remaining = self.end_bytes - position;
        if remaining == 0 {
            return Ok(Step::End);
        }
        if remaining < BATCH_HEADER_BYTES as u64 {
            return Ok(Step::Bad(BatchError::Truncated {
                have: remaining as usize,
                need: BATCH_HEADER_BYTES,
            }));
        }
        let header = match BatchHeader::parse(self.bytes(position, BATCH_HEADER_BYTES)?) {
            Ok(header) => header,
            Err(e) => return Ok(Step::Bad(e)),
        };
        let total_bytes = header.total_bytes() as u64;
        if total_bytes > remaining {
            return Ok(Step::Bad(BatchError::Truncated {
                have: usize::try_from(remaining).unwrap_or(usize::MAX),
                need: header.total_bytes(),
            }));
        }
        Ok(Step::Batch(header))
    }

    /// The whole batch at `position` (whose header is `header`).
    pub fn batch_at(&mut self, position: u64, header: &BatchHeader) -> Result<&[u8]> {
        self.bytes(position, header.total_bytes())
    }

    /// CRC-checks the whole batch at `position`.
    pub fn validate_at(
        &mut self,
        position: u64,
        header: &BatchHeader,
    ) -> Result<std::result::Result<(), BatchError>> {
        let batch = self.batch_at(position, header)?;
        Ok(record_batch::validate(batch).map(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::record_batch::build_simple_batch;
    use std::io::Write;

    #[test]
    fn walks_headers_across_chunks_and_reports_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let batches: Vec<Vec<u8>> = (0..50)
            .map(|i| build_simple_batch(i, &[&vec![b'x'; i as usize * 7]]))
            .collect();
        let mut file = File::create(&path).unwrap();
        for batch in &batches {
            file.write_all(batch).unwrap();
        }
        file.write_all(&batches[0][..30]).unwrap();
        let file = File::open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        // A chunk smaller than a header forces reads that straddle chunk borders.
        for chunk in [16, 100, HEADER_CHUNK_BYTES] {
            let mut reader = SegmentReader::new(&file, &path, len, chunk);
            let mut position = 0;
            for (i, batch) in batches.iter().enumerate() {
                let Step::Batch(header) = reader.header_at(position).unwrap() else {
                    panic!("batch {i}")
                };
                assert_eq!(header.base_timestamp, i as i64);
                assert!(reader.validate_at(position, &header).unwrap().is_ok());
                assert_eq!(
                    reader.batch_at(position, &header).unwrap(),
                    batch.as_slice()
                );
                position += header.total_bytes() as u64;
            }
            assert!(matches!(
                reader.header_at(position).unwrap(),
                Step::Bad(BatchError::Truncated { have: 30, .. })
            ));
            let mut short = SegmentReader::new(&file, &path, position, chunk);
            assert!(matches!(short.header_at(position).unwrap(), Step::End));
        }
    }
}
