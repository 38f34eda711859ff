//! Walking the records of a v2 batch, for timestamp lookups only (nothing else in
//! storage looks inside a batch). A compressed batch is decompressed as a stream,
//! for this walk alone: the stored bytes are never rewritten, and no more than a
//! caller-given number of decompressed bytes is read, so a decompression bomb
//! costs bounded CPU and almost no memory.
//!
//! Each record is
//! `length varint | attributes i8 | timestampDelta varlong | offsetDelta varint | ...`;
//! only the fields up to the offset delta are read, `length` skips the rest.
//! Malformed bytes give [`RecordSearch::Unreadable`], never a panic.

use std::io::{self, BufRead, BufReader, Read};

use protocol::record_batch::{BatchHeader, BATCH_HEADER_BYTES};

const VARINT_MAX_BYTES: usize = 5;
const VARLONG_MAX_BYTES: usize = 10;

/// Kafka's codec ids (batch attributes bits 0..3).
const NONE: i16 = 0;
const GZIP: i16 = 1;
const SNAPPY: i16 = 2;
const LZ4: i16 = 3;
const ZSTD: i16 = 4;

/// Outcome of searching a batch's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordSearch {
    Found {
        offset: i64,
        timestamp_ms: i64,
    },
    /// The records parse but none qualifies.
    NoneInBatch,
    /// The records cannot be walked: corrupt, an unknown codec, or more than the
    /// allowed bytes once decompressed. Says why.
    Unreadable(String),
}

/// The first record of `batch` (header `header`, any codec) whose offset is at
/// least `min_offset` and whose timestamp is at least `target_ms`, reading at most
/// `max_decompressed_bytes` of records.
pub(crate) fn first_record_at_or_after(
    batch: &[u8],
    header: &BatchHeader,
    min_offset: i64,
    target_ms: i64,
    max_decompressed_bytes: u64,
) -> RecordSearch {
    let Some(records) = batch.get(BATCH_HEADER_BYTES..header.total_bytes()) else {
        return RecordSearch::Unreadable("batch shorter than its header says".into());
    };
    let search = |reader: &mut dyn Read| {
        let mut limited = reader.take(max_decompressed_bytes);
        let outcome = walk(
            &mut BufReader::new(&mut limited),
            header,
            min_offset,
            target_ms,
        );
        match outcome {
            Ok(search) => search,
            Err(_) if limited.limit() == 0 => RecordSearch::Unreadable(format!(
                "records exceed {max_decompressed_bytes} bytes decompressed"
            )),
            Err(e) => RecordSearch::Unreadable(e.to_string()),
        }
    };
    match header.compression() {
        NONE => search(&mut &records[..]),
        // Java's GZIPInputStream reads concatenated members; so do we.
        GZIP => search(&mut flate2::read::MultiGzDecoder::new(records)),
        SNAPPY => search(&mut XerialSnappy::new(records, max_decompressed_bytes)),
        LZ4 => search(&mut lz4_flex::frame::FrameDecoder::new(records)),
        ZSTD => match zstd::stream::read::Decoder::with_buffer(records) {
            Ok(mut decoder) => search(&mut decoder),
            Err(e) => RecordSearch::Unreadable(format!("zstd: {e}")),
        },
        codec => RecordSearch::Unreadable(format!("unknown compression codec {codec}")),
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn walk(
    records: &mut impl BufRead,
    header: &BatchHeader,
    min_offset: i64,
    target_ms: i64,
) -> io::Result<RecordSearch> {
    for _ in 0..header.records_count {
        let (length, _) = read_varint(records, VARINT_MAX_BYTES)?;
        let length = u64::try_from(length).map_err(|_| malformed("negative record length"))?;
        let mut attributes = [0u8; 1];
        records.read_exact(&mut attributes)?;
        let (timestamp_delta, t_bytes) = read_varint(records, VARLONG_MAX_BYTES)?;
        let (offset_delta, o_bytes) = read_varint(records, VARINT_MAX_BYTES)?;
        let read = 1 + t_bytes + o_bytes;
        let rest = length
            .checked_sub(read as u64)
            .ok_or_else(|| malformed("record shorter than its fields"))?;
        let offset = header
            .base_offset
            .checked_add(offset_delta)
            .filter(|o| *o <= header.last_offset())
            .ok_or_else(|| malformed("record offset outside its batch"))?;
        let timestamp = header
            .base_timestamp
            .checked_add(timestamp_delta)
            .ok_or_else(|| malformed("record timestamp overflows"))?;
        if offset >= min_offset && timestamp >= target_ms {
            return Ok(RecordSearch::Found {
                offset,
                timestamp_ms: timestamp,
            });
        }
        // Skip key, value and headers without holding them.
        let skipped = io::copy(&mut records.by_ref().take(rest), &mut io::sink())?;
        if skipped != rest {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(RecordSearch::NoneInBatch)
}

/// A zigzag varint of at most `max_bytes` bytes, and how many bytes it took.
fn read_varint(reader: &mut impl Read, max_bytes: usize) -> io::Result<(i64, usize)> {
    let mut raw: u64 = 0;
    for i in 0..max_bytes {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte)?;
        raw |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            return Ok((((raw >> 1) as i64) ^ -((raw & 1) as i64), i + 1));
        }
    }
    Err(malformed("varint too long"))
}

/// Kafka's snappy framing (from the Java client's snappy-java): a 16-byte header
/// (`\x82SNAPPY\0`, version, compatible version), then blocks of
/// `length i32 BE | raw snappy`. Without the header the whole payload is one raw
/// snappy block, as snappy-java also accepts.
struct XerialSnappy<'a> {
    input: &'a [u8],
    block: Vec<u8>,
    at: usize,
    /// Decompressed bytes still allowed; no block may claim more.
    budget: u64,
    raw: bool,
}

const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_BYTES: usize = 16;
/// A snappy element of n input bytes yields at most 64 output bytes for a 3-byte
/// copy (about 21x); a block claiming more than this cannot be honest, so its
/// claimed size is never allocated.
const SNAPPY_MAX_EXPANSION: u64 = 24;

impl<'a> XerialSnappy<'a> {
    fn new(input: &'a [u8], budget: u64) -> Self {
        let framed = input.len() >= XERIAL_HEADER_BYTES && input.starts_with(XERIAL_MAGIC);
        XerialSnappy {
            input: if framed {
                &input[XERIAL_HEADER_BYTES..]
            } else {
                input
            },
            block: Vec::new(),
            at: 0,
            budget,
            raw: !framed,
        }
    }

    /// Decompresses the next block into `self.block`; false at the end.
    fn next_block(&mut self) -> io::Result<bool> {
        if self.input.is_empty() {
            return Ok(false);
        }
        let compressed = if self.raw {
            std::mem::take(&mut self.input)
        } else {
            let Some((len, rest)) = self.input.split_first_chunk::<4>() else {
                return Err(malformed("snappy block length cut off"));
            };
            let len = u32::from_be_bytes(*len) as usize;
            if len > rest.len() {
                return Err(malformed("snappy block cut off"));
            }
            let (block, rest) = rest.split_at(len);
            self.input = rest;
            block
        };
        let claimed = snap::raw::decompress_len(compressed)
            .map_err(|e| malformed(&format!("snappy: {e}")))? as u64;
        let honest = (compressed.len() as u64)
            .saturating_mul(SNAPPY_MAX_EXPANSION)
            .saturating_add(64);
        if claimed > self.budget || claimed > honest {
            return Err(io::Error::other("snappy block larger than allowed"));
        }
        self.budget -= claimed;
        self.block.resize(claimed as usize, 0);
        let n = snap::raw::Decoder::new()
            .decompress(compressed, &mut self.block)
            .map_err(|e| malformed(&format!("snappy: {e}")))?;
        self.block.truncate(n);
        self.at = 0;
        Ok(true)
    }
}

impl Read for XerialSnappy<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.block.len() {
            if !self.next_block()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.block.len() - self.at);
        out[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::record_batch::build_simple_batch;

    const NO_LIMIT: u64 = u64::MAX;

    #[test]
    fn varints_decode_zigzag() {
        assert_eq!(read_varint(&mut &[0x01][..], 5).unwrap(), (-1, 1));
        assert_eq!(read_varint(&mut &[0x96, 0x01][..], 5).unwrap(), (75, 2));
        assert!(
            read_varint(&mut &[0x80, 0x80][..], 5).is_err(),
            "runs off the end"
        );
        assert!(read_varint(&mut &[0xff; 6][..], 5).is_err(), "too long");
    }

    #[test]
    fn finds_records_in_simple_batch_and_survives_garbage() {
        let batch = build_simple_batch(500, &[b"a", b"b", b"c"]);
        let header = protocol::record_batch::validate(&batch).unwrap();
        assert_eq!(
            first_record_at_or_after(&batch, &header, 1, 500, NO_LIMIT),
            RecordSearch::Found {
                offset: 1,
                timestamp_ms: 500
            }
        );
        assert_eq!(
            first_record_at_or_after(&batch, &header, 0, 501, NO_LIMIT),
            RecordSearch::NoneInBatch
        );
        for cut in BATCH_HEADER_BYTES..batch.len() {
            // Cutting the records must give an answer or Unreadable, never a panic.
            let _ = first_record_at_or_after(&batch[..cut], &header, 2, 0, NO_LIMIT);
        }
        let mut garbage = batch.clone();
        for byte in &mut garbage[BATCH_HEADER_BYTES..] {
            *byte = 0xff;
        }
        assert!(matches!(
            first_record_at_or_after(&garbage, &header, 0, 0, NO_LIMIT),
            RecordSearch::Unreadable(_)
        ));
        // The byte limit stops the walk before the record that would answer.
        assert!(matches!(
            first_record_at_or_after(&batch, &header, 2, 0, 8),
            RecordSearch::Unreadable(why) if why.contains("exceed 8 bytes")
        ));
    }

    #[test]
    fn snappy_blocks_claiming_more_than_they_can_hold_are_refused() {
        // A raw block whose length header claims 4 GiB from three bytes.
        let lying = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00, 0x00];
        let mut reader = XerialSnappy::new(&lying, NO_LIMIT);
        let mut out = [0u8; 16];
        assert!(reader.read(&mut out).is_err());
        let mut framed = XERIAL_MAGIC.to_vec();
        framed.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
        framed.extend_from_slice(&100u32.to_be_bytes()); // block longer than the input
        framed.extend_from_slice(&[0; 3]);
        let mut reader = XerialSnappy::new(&framed, NO_LIMIT);
        assert!(reader.read(&mut out).is_err());
    }
}
