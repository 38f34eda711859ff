//! The `http` connector (webhook): each batch is POSTed to `url` as a JSON array of
//! rows, with `Idempotency-Key: <sink topic>/<partition>:<first>-<last>[,...]` (the
//! offsets of the sink topic's records in it; one request per try, HTTP/1.1 over
//! plain TCP). At-least-once: a batch is POSTed again after a failure or a crash, with
//! the same key when it holds the same records.
//!
//! 2xx: delivered. 408, 429 and 5xx, a timeout or a refused connection: retried with
//! backoff. Any other 4xx: the rows are refused; each is POSTed alone and the ones
//! still refused go to the dead-letter topic with the status and body.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{Columns, Failure, Out, Position, Remembered, Target};

pub(crate) struct Http {
    url: String,
    timeout: Duration,
    id: String,
    remembered: Remembered,
    columns: Columns,
}

/// `http://host[:port]/path` split into ("host:port", "host", "/path").
fn parse(url: &str) -> Result<(String, String, String), Failure> {
    let rest = match url.strip_prefix("http://") {
        Some(rest) => rest,
        None if url.starts_with("https://") => return Err(Failure::Config(
            "https webhooks are not supported yet: use http:// (e.g. through a local TLS proxy)"
                .into(),
        )),
        None => {
            return Err(Failure::Config(format!(
                "url '{url}' is not http://host/path"
            )))
        }
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(Failure::Config(format!(
            "url '{url}': write http://host:port/path"
        )));
    }
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((address, authority.to_string(), path.to_string()))
}

impl Http {
    pub fn new(url: &str, timeout_ms: i64, columns: Columns) -> Http {
        Http {
            url: url.to_string(),
            timeout: Duration::from_millis(timeout_ms.max(1) as u64),
            id: String::new(),
            remembered: Remembered::default(),
            columns,
        }
    }

    /// One POST; the status and the start of the body.
    fn post(&self, body: &[u8], key: &str) -> Result<(u16, String), Failure> {
        let (address, host, path) = parse(&self.url)?;
        let unavailable = |e: std::io::Error| Failure::Unavailable(format!("webhook {host}: {e}"));
        let addr = address
            .to_socket_addrs()
            .map_err(unavailable)?
            .next()
            .ok_or_else(|| Failure::Unavailable(format!("webhook {host}: no address")))?;
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(unavailable)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(unavailable)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(unavailable)?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: freshet-sink\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(unavailable)?;
        stream.write_all(body).map_err(unavailable)?;
        // The status line and a little of the body: a webhook's answer is not kept.
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while answer.len() < 64 * 1024 {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(e) if answer.is_empty() => return Err(unavailable(e)),
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let status = text
            .strip_prefix("HTTP/1.")
            .and_then(|t| t.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| Failure::Unavailable(format!("webhook {host}: not an HTTP answer")))?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, body.chars().take(300).collect()))
    }
}

/// `partition:first-last` ranges of the rows, by partition.
fn key(id: &str, rows: &[Out<'_>]) -> String {
    let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for out in rows {
        let r = ranges
            .entry(out.partition)
            .or_insert((out.offset, out.offset));
        r.0 = r.0.min(out.offset);
        r.1 = r.1.max(out.offset);
    }
    let ranges: Vec<String> = ranges
        .iter()
        .map(|(p, (a, b))| format!("{p}:{a}-{b}"))
        .collect();
    format!("{id}/{}", ranges.join(","))
}

impl Target for Http {
    fn primary_key(&self) -> &[String] {
        &self.columns.primary_key
    }

    fn open(&mut self) -> Result<Vec<String>, Failure> {
        parse(&self.url)?;
        Ok(Vec::new())
    }

    fn begin(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    fn positions(
        &mut self,
        id: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Position>, Failure> {
        self.id = id.to_string();
        Ok(self.remembered.positions(partitions))
    }

    fn insert(&mut self, rows: &[Out<'_>]) -> Result<(), Failure> {
        let values: Vec<_> = rows.iter().map(|o| o.row).collect();
        let body = serde_json::to_vec(&values).map_err(|e| Failure::Rejected(e.to_string()))?;
        let (status, answer) = self.post(&body, &key(&self.id, rows))?;
        match status {
            200..=299 => Ok(()),
            408 | 429 | 500..=599 => Err(Failure::Unavailable(format!(
                "webhook answered {status}: {answer}"
            ))),
            _ => Err(Failure::Rejected(format!(
                "webhook answered {status}: {answer}"
            ))),
        }
    }

    fn savepoint(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    fn store(&mut self, _id: &str, positions: &[(i32, &Position)]) -> Result<(), Failure> {
        self.remembered.stage(positions);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Failure> {
        self.remembered.committed();
        Ok(())
    }

    fn rollback(&mut self) {
        self.remembered.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_keys() {
        assert_eq!(
            parse("http://127.0.0.1:8080/hook").unwrap(),
            (
                "127.0.0.1:8080".into(),
                "127.0.0.1:8080".into(),
                "/hook".into()
            )
        );
        assert_eq!(parse("http://example.org").unwrap().0, "example.org:80");
        assert!(matches!(parse("https://x/y"), Err(Failure::Config(_))));
        assert!(matches!(parse("ftp://x/y"), Err(Failure::Config(_))));
        let row = serde_json::Map::new();
        let rows = [
            Out {
                row: &row,
                partition: 1,
                offset: 7,
            },
            Out {
                row: &row,
                partition: 0,
                offset: 3,
            },
            Out {
                row: &row,
                partition: 1,
                offset: 9,
            },
        ];
        assert_eq!(key("t", &rows), "t/0:3-3,1:7-9");
    }
}
