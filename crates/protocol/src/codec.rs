//! Request decoding and response encoding. Wire types come from `kafka-protocol`;
//! this module adds the checks a server needs before it trusts them.

use std::ops::Range;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, FetchResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Decodable, Encodable};

/// The first eight bytes of every request: enough to route it, and to answer
/// ApiVersions even when the rest cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request of {0} bytes is shorter than a request header")]
    TooShort(usize),
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("malformed {api:?} v{version} request: {reason}")]
    Malformed {
        api: ApiKey,
        version: i16,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("cannot encode {api:?} v{version} response: {reason}")]
pub struct EncodeError {
    pub api: ApiKey,
    pub version: i16,
    pub reason: String,
}

/// A decoded request.
#[derive(Debug, Clone)]
pub struct Request {
    pub header: RequestHeader,
    pub api_key: ApiKey,
    pub body: RequestKind,
}

/// Reads api key, version and correlation id without decoding anything else.
pub fn peek_preamble(frame: &[u8]) -> Result<Preamble, DecodeError> {
    if frame.len() < 8 {
        return Err(DecodeError::TooShort(frame.len()));
    }
    Ok(Preamble {
        api_key: i16::from_be_bytes([frame[0], frame[1]]),
        api_version: i16::from_be_bytes([frame[2], frame[3]]),
        correlation_id: i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
    })
}

/// Decodes a whole request frame (without its size prefix). The caller has already
/// checked, from the preamble, that it serves this API at this version.
pub fn decode_request(frame: Bytes) -> Result<Request, DecodeError> {
    let preamble = peek_preamble(&frame)?;
    let api_key = ApiKey::try_from(preamble.api_key)
        .map_err(|_| DecodeError::UnknownApiKey(preamble.api_key))?;
    let version = preamble.api_version;
    let malformed = |e: anyhow::Error| DecodeError::Malformed {
        api: api_key,
        version,
        reason: e.to_string(),
    };
    let mut buf = frame;
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut buf, header_version).map_err(&malformed)?;
    let body = RequestKind::decode(api_key, &mut buf, version).map_err(&malformed)?;
    Ok(Request {
        header,
        api_key,
        body,
    })
}

/// Appends one framed response (size prefix, header, body) to `out`.
pub fn encode_response(
    correlation_id: i32,
    api_key: ApiKey,
    version: i16,
    body: &ResponseKind,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let err = |e: String| EncodeError {
        api: api_key,
        version,
        reason: e,
    };
    let start = out.len();
    out.put_i32(0); // size, patched below
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(out, api_key.response_header_version(version))
        .map_err(|e| err(e.to_string()))?;
    body.encode(out, version).map_err(|e| err(e.to_string()))?;
    let size = (out.len() - start - 4) as i32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(())
}

/// Record data at least this long is sent from the buffer that holds it rather
/// than copied into the encoded answer.
pub const SHARED_RECORDS_MIN_BYTES: usize = 4096;

/// One framed Fetch response (size prefix, header, body) as consecutive chunks to
/// be written in order: the fields are encoded into buffers of their own, and
/// each partition's record data of at least [`SHARED_RECORDS_MIN_BYTES`] is a
/// chunk of its own, the very `Bytes` the response holds (read from the segment
/// files), not a copy of it. Written with one vectored write, this is Kafka's
/// zero-copy fetch short of `sendfile`.
pub fn encode_fetch_response(
    correlation_id: i32,
    version: i16,
    body: &FetchResponse,
) -> Result<Vec<Bytes>, EncodeError> {
    let err = |e: anyhow::Error| EncodeError {
        api: ApiKey::Fetch,
        version,
        reason: e.to_string(),
    };
    let shared: Vec<&Bytes> = body
        .responses
        .iter()
        .flat_map(|t| &t.partitions)
        .filter_map(|p| p.records.as_ref())
        .filter(|r| r.len() >= SHARED_RECORDS_MIN_BYTES)
        .collect();
    let mut out = Chunked {
        done: vec![Bytes::new()], // the size prefix, once the size is known
        done_len: 0,
        current: BytesMut::new(),
        shared,
    };
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(&mut out, ApiKey::Fetch.response_header_version(version))
        .map_err(err)?;
    body.encode(&mut out, version).map_err(err)?;
    let size = out.offset();
    let size = i32::try_from(size).map_err(|_| EncodeError {
        api: ApiKey::Fetch,
        version,
        reason: format!("a response of {size} bytes is too large to frame"),
    })?;
    out.finish_chunk();
    let mut chunks = out.done;
    chunks[0] = Bytes::copy_from_slice(&size.to_be_bytes());
    Ok(chunks)
}

/// The buffer [`encode_fetch_response`] encodes into: bytes put into it are copied
/// into `current`, except a slice that is exactly one of `shared`, which becomes a
/// chunk by reference (found by address: the encoder hands record data over as
/// the slice of the `Bytes` it holds). The messages never seek back (no gaps), so
/// `seek` and `range` only ever touch `current`.
struct Chunked<'a> {
    done: Vec<Bytes>,
    done_len: usize,
    current: BytesMut,
    shared: Vec<&'a Bytes>,
}

impl Chunked<'_> {
    fn finish_chunk(&mut self) {
        if !self.current.is_empty() {
            let chunk = self.current.split().freeze();
            self.done_len += chunk.len();
            self.done.push(chunk);
        }
    }
}

// SAFETY: every method hands on to `current`'s own `BufMut` implementation.
unsafe impl BufMut for Chunked<'_> {
    fn remaining_mut(&self) -> usize {
        self.current.remaining_mut()
    }
    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller's promise is about the bytes `chunk_mut` returned,
        // which are `current`'s.
        unsafe { self.current.advance_mut(cnt) }
    }
    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.current.chunk_mut()
    }
    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= SHARED_RECORDS_MIN_BYTES {
            let found = self
                .shared
                .iter()
                .position(|b| b.as_ptr() == src.as_ptr() && b.len() == src.len());
            if let Some(i) = found {
                let records = self.shared.swap_remove(i).clone();
                self.finish_chunk();
                self.done_len += records.len();
                self.done.push(records);
                return;
            }
        }
        self.current.put_slice(src);
    }
}

impl ByteBufMut for Chunked<'_> {
    fn offset(&self) -> usize {
        self.done_len + self.current.len()
    }
    fn seek(&mut self, offset: usize) {
        self.current.resize(offset.saturating_sub(self.done_len), 0);
    }
    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        let base = self.done_len;
        &mut self.current[r.start.saturating_sub(base)..r.end.saturating_sub(base)]
    }
}

/// A client's request frame: size prefix, header (`correlation_id`, `client_id`) and
/// body `request` at `version`.
pub fn encode_client_request<R: kafka_protocol::protocol::Request>(
    request: &R,
    version: i16,
    correlation_id: i32,
    client_id: &str,
) -> Result<Bytes, String> {
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(kafka_protocol::protocol::StrBytes::from_string(
            client_id.to_string(),
        )));
    let mut out = BytesMut::new();
    out.put_i32(0); // size, patched below
    header
        .encode(&mut out, R::header_version(version))
        .map_err(|e| e.to_string())?;
    request
        .encode(&mut out, version)
        .map_err(|e| e.to_string())?;
    let size = i32::try_from(out.len() - 4).map_err(|_| "request larger than 2 GiB".to_string())?;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Ok(out.freeze())
}

/// A client's answer to a request of type `R` at `version`: (correlation id, body),
/// from a frame without its size prefix.
pub fn decode_client_response<R: kafka_protocol::protocol::Request>(
    frame: Bytes,
    version: i16,
) -> Result<(i32, R::Response), String> {
    use kafka_protocol::protocol::HeaderVersion;
    let mut buf = frame;
    let header = ResponseHeader::decode(&mut buf, R::Response::header_version(version))
        .map_err(|e| e.to_string())?;
    let body = R::Response::decode(&mut buf, version).map_err(|e| e.to_string())?;
    Ok((header.correlation_id, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{ApiVersionsResponse, TopicName};
    use proptest::prelude::*;

    /// A client's LeaveGroup frame is what the broker's decoder reads, and the broker's
    /// answer reads back on the client's side.
    #[test]
    fn client_requests_and_answers_meet_the_server_codec() {
        use kafka_protocol::messages::leave_group_request::MemberIdentity;
        use kafka_protocol::messages::leave_group_response::MemberResponse;
        use kafka_protocol::messages::{GroupId, LeaveGroupRequest, LeaveGroupResponse};
        use kafka_protocol::protocol::StrBytes;
        let request = LeaveGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_members(vec![MemberIdentity::default()
                .with_group_instance_id(Some(StrBytes::from_static_str("p-host")))]);
        let frame = encode_client_request(&request, 3, 7, "c").unwrap();
        assert_eq!(
            i32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        let decoded = decode_request(frame.slice(4..)).unwrap();
        assert_eq!(
            (decoded.header.correlation_id, decoded.api_key),
            (7, ApiKey::LeaveGroup)
        );
        assert_eq!(decoded.body, RequestKind::LeaveGroup(request));
        let answer = LeaveGroupResponse::default().with_members(vec![MemberResponse::default()
            .with_group_instance_id(Some(StrBytes::from_static_str("p-host")))
            .with_error_code(25)]);
        let mut out = BytesMut::new();
        encode_response(
            7,
            ApiKey::LeaveGroup,
            3,
            &ResponseKind::LeaveGroup(answer.clone()),
            &mut out,
        )
        .unwrap();
        let (id, got) =
            decode_client_response::<LeaveGroupRequest>(out.freeze().slice(4..), 3).unwrap();
        assert_eq!((id, got), (7, answer));
        assert!(
            decode_client_response::<LeaveGroupRequest>(Bytes::from_static(b"\0\0"), 3).is_err()
        );
    }

    fn fetch_response(records: &[Bytes]) -> FetchResponse {
        let partitions = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                PartitionData::default()
                    .with_partition_index(i as i32)
                    .with_high_watermark(7)
                    .with_records(Some(r.clone()))
            })
            .collect();
        FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName("t".to_string().into()))
            .with_partitions(partitions)])
    }

    proptest! {
        /// The chunks, joined, are exactly what the copying encoder writes, and
        /// large record data is the response's own buffer, not a copy.
        #[test]
        fn fetch_chunks_join_to_the_copied_encoding(
            version in 4i16..=12,
            sizes in proptest::collection::vec(0usize..3 * SHARED_RECORDS_MIN_BYTES, 0..5),
        ) {
            let records: Vec<Bytes> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| Bytes::from(vec![i as u8 + 1; *n]))
                .collect();
            let body = fetch_response(&records);
            let chunks = encode_fetch_response(9, version, &body).unwrap();
            let mut copied = BytesMut::new();
            encode_response(9, ApiKey::Fetch, version, &ResponseKind::Fetch(body), &mut copied).unwrap();
            prop_assert_eq!(chunks.concat(), copied.to_vec());
            for r in records.iter().filter(|r| r.len() >= SHARED_RECORDS_MIN_BYTES) {
                prop_assert!(chunks.iter().any(|c| c.as_ptr() == r.as_ptr() && c.len() == r.len()));
            }
            let shared = chunks.iter().filter(|c| c.len() >= SHARED_RECORDS_MIN_BYTES
                && records.iter().any(|r| r.as_ptr() == c.as_ptr())).count();
            prop_assert_eq!(shared, records.iter().filter(|r| r.len() >= SHARED_RECORDS_MIN_BYTES).count());
        }
    }

    #[test]
    fn api_versions_v3_request_decodes() {
        // ApiVersions v3 as librdkafka sends it: header v2 with client id, then the
        // compact client software name and version and an empty tag buffer.
        let mut frame = vec![0, 18, 0, 3, 0, 0, 0, 7, 0, 4];
        frame.extend_from_slice(b"kcat");
        frame.push(0); // header tagged fields
        frame.push(6); // compact strings carry length + 1
        frame.extend_from_slice(b"rdkaf");
        frame.push(4);
        frame.extend_from_slice(b"2.0");
        frame.push(0);
        let req = decode_request(Bytes::from(frame)).unwrap();
        assert_eq!(req.api_key, ApiKey::ApiVersions);
        assert_eq!(req.header.correlation_id, 7);
        assert_eq!(req.header.client_id.as_deref(), Some("kcat"));
        match req.body {
            RequestKind::ApiVersions(v) => assert_eq!(v.client_software_name.as_str(), "rdkaf"),
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn api_versions_response_header_has_no_tagged_fields() {
        // KIP-511: ApiVersions responses always use header v0, even at v3.
        let mut out = BytesMut::new();
        let body = ResponseKind::ApiVersions(ApiVersionsResponse::default());
        encode_response(9, ApiKey::ApiVersions, 3, &body, &mut out).unwrap();
        let size = i32::from_be_bytes(out[0..4].try_into().unwrap()) as usize;
        assert_eq!(size, out.len() - 4);
        assert_eq!(&out[4..8], &9i32.to_be_bytes());
        // error code 0, then the compact array of api keys (empty = 1), throttle, tags
        assert_eq!(&out[8..], &[0, 0, 1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn huge_array_count_is_an_error_not_an_allocation() {
        // Metadata v0 whose topic array claims 54M entries in 5 bytes (upstream #152).
        let frame = Bytes::from_static(&[
            0, 3, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0x03, 0x3c, 0x0c, 0x00, 0xb6,
        ]);
        assert!(matches!(
            decode_request(frame),
            Err(DecodeError::Malformed { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_frames_never_panic(api_key in 0i16..80, version in -1i16..20, body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut frame = Vec::new();
            frame.extend_from_slice(&api_key.to_be_bytes());
            frame.extend_from_slice(&version.to_be_bytes());
            frame.extend_from_slice(&1i32.to_be_bytes());
            frame.extend_from_slice(&body);
            let _ = decode_request(Bytes::from(frame));
        }
    }
}
