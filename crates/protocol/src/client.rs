//! One request and its answer over a blocking TCP connection: for the few requests
//! librdkafka does not offer (LeaveGroup of a static member, DescribeLogDirs). The
//! only I/O of this crate; plaintext listeners only.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::protocol::Request;

use crate::codec::{decode_client_response, encode_client_request};

/// A connection to `address` (`host:port`) whose reads and writes time out.
pub fn connect(address: &str, timeout: Duration) -> Result<TcpStream, String> {
    let addr = address
        .to_socket_addrs()
        .map_err(|e| format!("{address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address}: no address"))?;
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{address}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Sends `request` at `version` with correlation id `id` and reads its answer, of at
/// most `max_answer` bytes.
pub fn call<R: Request>(
    stream: &mut TcpStream,
    request: &R,
    version: i16,
    id: i32,
    client_id: &str,
    max_answer: usize,
) -> Result<R::Response, String> {
    let frame = encode_client_request(request, version, id, client_id)?;
    stream.write_all(&frame).map_err(|e| e.to_string())?;
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).map_err(|e| e.to_string())?;
    let size = i32::from_be_bytes(size);
    if size < 0 || size as usize > max_answer {
        return Err(format!("answer of {size} bytes"));
    }
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut body).map_err(|e| e.to_string())?;
    let (correlation, response) = decode_client_response::<R>(Bytes::from(body), version)?;
    if correlation != id {
        return Err(format!("answer to request {correlation}, not {id}"));
    }
    Ok(response)
}
