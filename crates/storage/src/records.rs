//! Walking the records of an uncompressed v2 batch, for timestamp lookups only
//! (nothing else in storage looks inside a batch). Each record is
//! `length varint | attributes i8 | timestampDelta varlong | offsetDelta varint | ...`
//! and `length` lets us skip the rest. Malformed bytes give `None`, never a panic.

use protocol::record_batch::{BatchHeader, BATCH_HEADER_BYTES};

/// A zigzag varint of at most `max_bytes` bytes starting at `*at`.
fn read_varint(buf: &[u8], at: &mut usize, max_bytes: usize) -> Option<i64> {
    let mut raw: u64 = 0;
    for i in 0..max_bytes {
        let byte = *buf.get(*at)?;
        *at += 1;
        raw |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    None
}

const VARINT_MAX_BYTES: usize = 5;
const VARLONG_MAX_BYTES: usize = 10;

/// Outcome of searching a batch's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordSearch {
    Found {
        offset: i64,
        timestamp_ms: i64,
    },
    /// The records parse but none qualifies.
    NoneInBatch,
    Malformed,
}

/// The first record of `batch` (uncompressed, header `header`) whose offset is at
/// least `min_offset` and whose timestamp is at least `target_ms`.
pub(crate) fn first_record_at_or_after(
    batch: &[u8],
    header: &BatchHeader,
    min_offset: i64,
    target_ms: i64,
) -> RecordSearch {
    walk(batch, header, min_offset, target_ms).unwrap_or(RecordSearch::Malformed)
}

fn walk(
    batch: &[u8],
    header: &BatchHeader,
    min_offset: i64,
    target_ms: i64,
) -> Option<RecordSearch> {
    debug_assert_eq!(header.compression(), 0);
    let records = batch.get(BATCH_HEADER_BYTES..)?;
    let mut at = 0usize;
    for _ in 0..header.records_count {
        let length = read_varint(records, &mut at, VARINT_MAX_BYTES)?;
        let length = usize::try_from(length).ok()?;
        let body_end = at.checked_add(length).filter(|end| *end <= records.len())?;
        let body = &records[at..body_end];
        let mut field = 1; // skip attributes
        let timestamp_delta = read_varint(body, &mut field, VARLONG_MAX_BYTES)?;
        let offset_delta = read_varint(body, &mut field, VARINT_MAX_BYTES)?;
        let offset = header.base_offset.checked_add(offset_delta)?;
        let timestamp = header.base_timestamp.checked_add(timestamp_delta)?;
        if offset > header.last_offset() {
            return None;
        }
        if offset >= min_offset && timestamp >= target_ms {
            return Some(RecordSearch::Found {
                offset,
                timestamp_ms: timestamp,
            });
        }
        at = body_end;
    }
    Some(RecordSearch::NoneInBatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::record_batch::build_simple_batch;

    #[test]
    fn varints_decode_zigzag() {
        let mut at = 0;
        assert_eq!(read_varint(&[0x01], &mut at, 5), Some(-1));
        let mut at = 0;
        assert_eq!(read_varint(&[0x96, 0x01], &mut at, 5), Some(75));
        assert_eq!(at, 2);
        let mut at = 0;
        assert_eq!(
            read_varint(&[0x80, 0x80], &mut at, 5),
            None,
            "runs off the end"
        );
        let mut at = 0;
        assert_eq!(read_varint(&[0xff; 6], &mut at, 5), None, "too long");
    }

    #[test]
    fn finds_records_in_simple_batch_and_survives_garbage() {
        let batch = build_simple_batch(500, &[b"a", b"b", b"c"]);
        let header = protocol::record_batch::validate(&batch).unwrap();
        assert_eq!(
            first_record_at_or_after(&batch, &header, 1, 500),
            RecordSearch::Found {
                offset: 1,
                timestamp_ms: 500
            }
        );
        assert_eq!(
            first_record_at_or_after(&batch, &header, 0, 501),
            RecordSearch::NoneInBatch
        );
        for cut in BATCH_HEADER_BYTES..batch.len() {
            // Cutting the records must give None or an answer, never a panic.
            let _ = first_record_at_or_after(&batch[..cut], &header, 2, 0);
        }
        let mut garbage = batch.clone();
        for byte in &mut garbage[BATCH_HEADER_BYTES..] {
            *byte = 0xff;
        }
        assert_eq!(
            first_record_at_or_after(&garbage, &header, 0, 0),
            RecordSearch::Malformed
        );
    }
}
