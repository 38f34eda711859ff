//! Zero-copy inspection of v2 record batches (magic 2), the only format Freshet
//! stores. The broker never decodes records: it reads the 61-byte batch header,
//! checks the CRC and stores the producer's bytes as they came, rewriting only the
//! base offset and partition leader epoch, which the CRC does not cover.
//!
//! Layout (big-endian):
//! ```text
//!  0 baseOffset i64 | 8 batchLength i32 | 12 partitionLeaderEpoch i32 | 16 magic i8
//! 17 crc u32 (CRC-32C of bytes 21..) | 21 attributes i16 | 23 lastOffsetDelta i32
//! 27 baseTimestamp i64 | 35 maxTimestamp i64 | 43 producerId i64 | 51 producerEpoch i16
//! 53 baseSequence i32 | 57 recordsCount i32 | 61 records...
//! ```

/// Bytes before `batchLength`'s count starts: base offset and the length itself.
pub const LOG_OVERHEAD: usize = 12;
/// Size of the fixed v2 batch header; no valid batch is shorter.
pub const BATCH_HEADER_BYTES: usize = 61;
/// The only record-batch format Freshet accepts.
pub const MAGIC_V2: i8 = 2;

const PARTITION_LEADER_EPOCH_AT: usize = 12;
/// The leading bytes of a batch that hold everything a broker rewrites when it
/// appends (base offset, length, partition leader epoch), none of them covered by
/// the CRC: a log writes a rewritten copy of these and the rest as sent.
pub const REWRITTEN_PREFIX_BYTES: usize = 16;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const CRC_COVERS_FROM: usize = 21;

const COMPRESSION_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_BIT: i16 = 0x08;
const TRANSACTIONAL_BIT: i16 = 0x10;
const CONTROL_BIT: i16 = 0x20;
/// Codecs 0..=4: none, gzip, snappy, lz4, zstd.
const MAX_COMPRESSION_CODEC: i16 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum BatchError {
    #[error("record batch truncated: {have} bytes, {need} needed")]
    Truncated { have: usize, need: usize },
    #[error("record batch length {0} is invalid")]
    BadLength(i32),
    #[error("record batch magic {0} is not supported (only v2)")]
    UnsupportedMagic(i8),
    #[error("record batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("record batch has {records} records but lastOffsetDelta {last_offset_delta}")]
    InconsistentCount {
        records: i32,
        last_offset_delta: i32,
    },
    #[error("record batch uses unknown compression codec {0}")]
    UnknownCompression(i16),
    #[error("{0} bytes follow the record batch")]
    TrailingBytes(usize),
}

/// The fixed header of a v2 record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

fn i16_at(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Size in bytes of the batch starting at `buf`, from its first 12 bytes.
/// `Ok(None)` if fewer than 12 bytes are there.
pub fn peek_total_bytes(buf: &[u8]) -> Result<Option<usize>, BatchError> {
    if buf.len() < LOG_OVERHEAD {
        return Ok(None);
    }
    let batch_length = i32_at(buf, 8);
    if batch_length < (BATCH_HEADER_BYTES - LOG_OVERHEAD) as i32 {
        return Err(BatchError::BadLength(batch_length));
    }
    Ok(Some(LOG_OVERHEAD + batch_length as usize))
}

impl BatchHeader {
    /// Reads the header at the start of `buf` (which may hold more than this batch).
    /// Checks only what the header alone can tell: length, magic, codec, counts.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::Truncated {
                have: buf.len(),
                need: BATCH_HEADER_BYTES,
            });
        }
        let batch_length = i32_at(buf, 8);
        peek_total_bytes(buf)?;
        let magic = buf[MAGIC_AT] as i8;
        if magic != MAGIC_V2 {
            return Err(BatchError::UnsupportedMagic(magic));
        }
        let header = BatchHeader {
            base_offset: i64_at(buf, 0),
            batch_length,
            partition_leader_epoch: i32_at(buf, PARTITION_LEADER_EPOCH_AT),
            magic,
            crc: u32::from_be_bytes(buf[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes")),
            attributes: i16_at(buf, 21),
            last_offset_delta: i32_at(buf, 23),
            base_timestamp: i64_at(buf, 27),
            max_timestamp: i64_at(buf, 35),
            producer_id: i64_at(buf, 43),
            producer_epoch: i16_at(buf, 51),
            base_sequence: i32_at(buf, 53),
            records_count: i32_at(buf, 57),
        };
        if header.compression() > MAX_COMPRESSION_CODEC {
            return Err(BatchError::UnknownCompression(header.compression()));
        }
        if header.records_count < 1 || header.last_offset_delta != header.records_count - 1 {
            return Err(BatchError::InconsistentCount {
                records: header.records_count,
                last_offset_delta: header.last_offset_delta,
            });
        }
        Ok(header)
    }

    /// Whole size of the batch in bytes, including base offset and length fields.
    pub fn total_bytes(&self) -> usize {
        LOG_OVERHEAD + self.batch_length as usize
    }
    pub fn last_offset(&self) -> i64 {
        self.base_offset + self.last_offset_delta as i64
    }
    pub fn compression(&self) -> i16 {
        self.attributes & COMPRESSION_MASK
    }
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & TIMESTAMP_TYPE_BIT != 0
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_BIT != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_BIT != 0
    }
    pub fn has_producer_id(&self) -> bool {
        self.producer_id >= 0
    }
}

/// CRC-32C over the part of the batch the v2 CRC covers (attributes onwards).
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_COVERS_FROM..])
}

/// Validates that `batch` is exactly one well-formed v2 batch with a correct CRC.
pub fn validate(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    let total = header.total_bytes();
    if batch.len() < total {
        return Err(BatchError::Truncated {
            have: batch.len(),
            need: total,
        });
    }
    if batch.len() > total {
        return Err(BatchError::TrailingBytes(batch.len() - total));
    }
    let computed = compute_crc(batch);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    Ok(header)
}

/// Splits a concatenation of batches (a produce request's `records`, a segment's
/// bytes) into whole batches. Each item is header-parsed, not CRC-checked.
pub fn batches(buf: &[u8]) -> Batches<'_> {
    Batches { rest: buf }
}

pub struct Batches<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let result = BatchHeader::parse(self.rest).and_then(|header| {
            let total = header.total_bytes();
            if self.rest.len() < total {
                return Err(BatchError::Truncated {
                    have: self.rest.len(),
                    need: total,
                });
            }
            let (batch, rest) = self.rest.split_at(total);
            self.rest = rest;
            Ok((header, batch))
        });
        if result.is_err() {
            self.rest = &[];
        }
        Some(result)
    }
}

/// Rewrites the base offset; the CRC does not cover it.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[0..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Rewrites the partition leader epoch; the CRC does not cover it.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[PARTITION_LEADER_EPOCH_AT..PARTITION_LEADER_EPOCH_AT + 4]
        .copy_from_slice(&epoch.to_be_bytes());
}

/// Builds an uncompressed v2 batch of `values` (no keys, no headers), for tests and
/// tools that need a valid batch without a client library.
pub fn build_simple_batch(base_timestamp: i64, values: &[&[u8]]) -> Vec<u8> {
    assert!(!values.is_empty(), "a batch holds at least one record");
    let records: Vec<(Option<&[u8]>, &[u8])> = values.iter().map(|v| (None, *v)).collect();
    build_batch(0, base_timestamp, (-1, -1, -1), &records)
}

/// What a control batch marks: the end of a producer's transaction in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    Abort,
    Commit,
}

/// The transaction marker a coordinator writes to each partition of a transaction
/// it ends: a transactional control batch of one record whose key is (version 0,
/// type: 0 abort, 1 commit) and whose value is (version 0, coordinator epoch), as
/// Kafka's `EndTransactionMarker` writes it.
pub fn build_control_batch(
    producer_id: i64,
    producer_epoch: i16,
    marker: ControlType,
    coordinator_epoch: i32,
    timestamp: i64,
) -> Vec<u8> {
    let mut key = 0i16.to_be_bytes().to_vec();
    key.extend_from_slice(&(marker as i16).to_be_bytes());
    let mut value = 0i16.to_be_bytes().to_vec();
    value.extend_from_slice(&coordinator_epoch.to_be_bytes());
    build_batch(
        TRANSACTIONAL_BIT | CONTROL_BIT,
        timestamp,
        (producer_id, producer_epoch, -1),
        &[(Some(&key), &value)],
    )
}

/// The marker a control batch carries, from its first record's key; `None` when
/// `batch` is not a control batch or its record is not a marker this broker knows
/// (Kafka has other control types, e.g. KRaft's, which no partition here holds).
pub fn control_type(batch: &[u8]) -> Option<ControlType> {
    let header = BatchHeader::parse(batch).ok()?;
    if !header.is_control() || header.compression() != 0 {
        return None;
    }
    let mut at = BATCH_HEADER_BYTES;
    let varint = |at: &mut usize| -> Option<i64> {
        let (value, used) = get_varint(batch.get(*at..)?)?;
        *at += used;
        Some(value)
    };
    varint(&mut at)?; // record length
    at += 1; // record attributes
    varint(&mut at)?; // timestamp delta
    varint(&mut at)?; // offset delta
    if varint(&mut at)? != 4 {
        return None; // key length
    }
    let key = batch.get(at..at + 4)?;
    match (i16_at(key, 0), i16_at(key, 2)) {
        (0, 0) => Some(ControlType::Abort),
        (0, 1) => Some(ControlType::Commit),
        _ => None,
    }
}

/// One uncompressed v2 batch of `(key, value)` records at offset 0, with the
/// given attributes and `(producer id, epoch, base sequence)`.
fn build_batch(
    attributes: i16,
    base_timestamp: i64,
    (producer_id, producer_epoch, base_sequence): (i64, i16, i32),
    records_in: &[(Option<&[u8]>, &[u8])],
) -> Vec<u8> {
    let mut records = Vec::new();
    for (i, (key, value)) in records_in.iter().enumerate() {
        let mut body = Vec::new();
        body.push(0u8); // record attributes
        put_varint(&mut body, 0); // timestamp delta
        put_varint(&mut body, i as i64); // offset delta
        match key {
            None => put_varint(&mut body, -1),
            Some(key) => {
                put_varint(&mut body, key.len() as i64);
                body.extend_from_slice(key);
            }
        }
        put_varint(&mut body, value.len() as i64);
        body.extend_from_slice(value);
        put_varint(&mut body, 0); // no headers
        put_varint(&mut records, body.len() as i64);
        records.extend_from_slice(&body);
    }
    let count = records_in.len();
    let mut batch = Vec::with_capacity(BATCH_HEADER_BYTES + records.len());
    batch.extend_from_slice(&0i64.to_be_bytes());
    batch.extend_from_slice(
        &((BATCH_HEADER_BYTES - LOG_OVERHEAD + records.len()) as i32).to_be_bytes(),
    );
    batch.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    batch.push(MAGIC_V2 as u8);
    batch.extend_from_slice(&0u32.to_be_bytes()); // crc, set below
    batch.extend_from_slice(&attributes.to_be_bytes());
    batch.extend_from_slice(&((count - 1) as i32).to_be_bytes());
    batch.extend_from_slice(&base_timestamp.to_be_bytes());
    batch.extend_from_slice(&base_timestamp.to_be_bytes());
    batch.extend_from_slice(&producer_id.to_be_bytes());
    batch.extend_from_slice(&producer_epoch.to_be_bytes());
    batch.extend_from_slice(&base_sequence.to_be_bytes());
    batch.extend_from_slice(&(count as i32).to_be_bytes());
    batch.extend_from_slice(&records);
    let crc = compute_crc(&batch);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    batch
}

/// Sets producer id, epoch and base sequence and recomputes the CRC, which covers
/// them. For tests and tools that build batches without a client library.
pub fn set_producer(batch: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) {
    batch[43..51].copy_from_slice(&producer_id.to_be_bytes());
    batch[51..53].copy_from_slice(&producer_epoch.to_be_bytes());
    batch[53..57].copy_from_slice(&base_sequence.to_be_bytes());
    let crc = compute_crc(batch);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Reads a zig-zag varint at the start of `buf`: the value and the bytes it took;
/// `None` when `buf` ends first or the varint is longer than 10 bytes.
pub fn get_varint(buf: &[u8]) -> Option<(i64, usize)> {
    let mut raw = 0u64;
    for (i, byte) in buf.iter().take(10).enumerate() {
        raw |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((((raw >> 1) as i64) ^ -((raw & 1) as i64), i + 1));
        }
    }
    None
}

/// Marks a batch transactional and recomputes the CRC. For tests and tools that
/// build batches without a client library.
pub fn set_transactional(batch: &mut [u8]) {
    let attributes = i16_at(batch, 21) | TRANSACTIONAL_BIT;
    batch[21..23].copy_from_slice(&attributes.to_be_bytes());
    let crc = compute_crc(batch);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Appends `value` as a zig-zag varint (the record fields' encoding).
pub fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_batches_carry_their_marker() {
        for marker in [ControlType::Abort, ControlType::Commit] {
            let batch = build_control_batch(7, 3, marker, 0, 1_000);
            let header = validate(&batch).unwrap();
            assert!(header.is_control() && header.is_transactional());
            assert_eq!((header.producer_id, header.producer_epoch), (7, 3));
            assert_eq!(header.records_count, 1);
            assert_eq!(control_type(&batch), Some(marker));
        }
        assert_eq!(control_type(&build_simple_batch(0, &[b"x"])), None);
    }

    proptest! {
        #[test]
        fn varints_read_back(value in any::<i64>(), tail in proptest::collection::vec(any::<u8>(), 0..4)) {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            let used = buf.len();
            buf.extend_from_slice(&tail);
            prop_assert_eq!(get_varint(&buf), Some((value, used)));
            prop_assert_eq!(get_varint(&buf[..used - 1]), None);
        }

        #[test]
        fn control_type_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = control_type(&bytes);
            let mut batch = build_control_batch(1, 0, ControlType::Commit, 0, 0);
            let n = batch.len();
            for (i, b) in bytes.iter().enumerate() {
                batch[(61 + i) % n] ^= b;
            }
            let _ = control_type(&batch);
        }
    }

    #[test]
    fn simple_batch_validates_and_survives_offset_rewrite() {
        let mut batch = build_simple_batch(1_000, &[b"a", b"bc", b"def"]);
        let header = validate(&batch).unwrap();
        assert_eq!(header.records_count, 3);
        assert_eq!(header.last_offset_delta, 2);
        set_base_offset(&mut batch, 42);
        set_partition_leader_epoch(&mut batch, 7);
        let header = validate(&batch).unwrap();
        assert_eq!(
            (
                header.base_offset,
                header.last_offset(),
                header.partition_leader_epoch
            ),
            (42, 44, 7)
        );
    }

    #[test]
    fn flipped_payload_bit_fails_crc() {
        let mut batch = build_simple_batch(1, &[b"hello"]);
        let last = batch.len() - 2;
        batch[last] ^= 1;
        assert!(matches!(
            validate(&batch),
            Err(BatchError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn iterates_concatenated_batches_and_reports_torn_tail() {
        let a = build_simple_batch(1, &[b"x"]);
        let b = build_simple_batch(2, &[b"y", b"z"]);
        let mut both = [a.clone(), b.clone()].concat();
        let items: Vec<_> = batches(&both).map(|r| r.unwrap().1.len()).collect();
        assert_eq!(items, vec![a.len(), b.len()]);
        both.truncate(both.len() - 1);
        let results: Vec<_> = batches(&both).collect();
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(BatchError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = validate(&bytes);
            let _ = batches(&bytes).count();
            let _ = peek_total_bytes(&bytes);
        }

        #[test]
        fn any_single_byte_corruption_is_detected(idx in 0usize..1000, bit in 0u8..8) {
            let batch = build_simple_batch(5, &[b"some value", b"another"]);
            let idx = idx % batch.len();
            // Base offset (0..8) and leader epoch (12..16) are not covered by the CRC.
            prop_assume!(!(0..8).contains(&idx) && !(12..16).contains(&idx));
            let mut bad = batch.clone();
            bad[idx] ^= 1 << bit;
            prop_assert!(validate(&bad).is_err());
        }
    }
}
