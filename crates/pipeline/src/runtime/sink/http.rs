//! The `http` connector (webhook): each batch is POSTed to `url` as a JSON array of
//! rows, with `Idempotency-Key: <sink id>/<partition>:<first>-<last>[,...]` (the
//! offsets of the sink's input records in it: its topic's, or a fused sink's
//! source's; one request per try, HTTP/1.1 over
//! TCP, or TLS for `https://` (rustls: the server's certificate must chain to
//! Mozilla's roots or to a CA of the sink's `ca` file). At-least-once: a batch is POSTed again after a failure or a crash, with
//! the same key when it holds the same records.
//!
//! 2xx: delivered. 408, 429 and 5xx, a timeout or a refused connection: retried with
//! backoff. Any other 4xx: the rows are refused; each is POSTed alone and the ones
//! still refused go to the dead-letter topic with the status and body.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::{Columns, Failure, Out, Position, Remembered, Target};

pub(crate) struct Http {
    url: String,
    /// `ca`: a PEM file of more CAs to trust for https.
    ca: Option<String>,
    /// For https: built at `open`.
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    id: String,
    remembered: Remembered,
    columns: Columns,
}

/// A webhook's URL, taken apart.
#[derive(Debug, PartialEq)]
struct Url {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header: host, and port if the URL gave one.
    authority: String,
    /// The host alone (the name the server's certificate must carry).
    host: String,
    path: String,
    tls: bool,
}

/// `http[s]://host[:port]/path`.
fn parse(url: &str) -> Result<Url, Failure> {
    let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => {
            return Err(Failure::Config(format!(
                "url '{url}' is not http://host/path or https://host/path"
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
    let (address, host) = match authority.rsplit_once(':') {
        Some((host, p)) if p.parse::<u16>().is_ok() => (authority.to_string(), host),
        _ => (
            format!("{authority}:{}", if tls { 443 } else { 80 }),
            authority,
        ),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Url {
        address,
        authority: authority.to_string(),
        host,
        path: path.to_string(),
        tls,
    })
}

/// The TLS configuration of an https webhook: Mozilla's roots, and the CAs of the
/// `ca` PEM file if one is named.
fn tls_config(ca: Option<&str>) -> Result<Arc<rustls::ClientConfig>, Failure> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        let bad = |e: String| Failure::Config(format!("ca = '{path}': {e}"));
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad("no certificate in the file".into()));
        }
    }
    // ring, deprecated in rustls for lacking post-quantum key exchange: aws-lc-rs has
    // it, but building it needs cmake, which a fresh machine does not have.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connection to a webhook, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

impl Http {
    pub fn new(url: &str, timeout_ms: i64, ca: Option<String>, columns: Columns) -> Http {
        Http {
            url: url.to_string(),
            ca,
            tls: None,
            timeout: Duration::from_millis(timeout_ms.max(1) as u64),
            id: String::new(),
            remembered: Remembered::default(),
            columns,
        }
    }

    /// One POST; the status and the start of the body.
    fn post(&self, body: &[u8], key: &str) -> Result<(u16, String), Failure> {
        let Url {
            address,
            authority: host,
            host: name,
            path,
            tls,
        } = parse(&self.url)?;
        let unavailable = |e: std::io::Error| {
            // A certificate the roots do not vouch for says how to fix it.
            let hint = if e.to_string().contains("certificate") {
                " (a private CA? name its PEM file with ca = '...')"
            } else {
                ""
            };
            Failure::Unavailable(format!("webhook {host}: {e}{hint}"))
        };
        let addr = address
            .to_socket_addrs()
            .map_err(unavailable)?
            .next()
            .ok_or_else(|| Failure::Unavailable(format!("webhook {host}: no address")))?;
        let tcp = TcpStream::connect_timeout(&addr, self.timeout).map_err(unavailable)?;
        tcp.set_read_timeout(Some(self.timeout))
            .map_err(unavailable)?;
        tcp.set_write_timeout(Some(self.timeout))
            .map_err(unavailable)?;
        let mut stream = match (tls, &self.tls) {
            (false, _) => Conn::Plain(tcp),
            (true, Some(config)) => {
                let server = ServerName::try_from(name.clone())
                    .map_err(|e| Failure::Config(format!("url: host '{name}': {e}")))?;
                let connection = rustls::ClientConnection::new(config.clone(), server)
                    .map_err(|e| Failure::Unavailable(format!("webhook {host}: TLS: {e}")))?;
                Conn::Tls(Box::new(rustls::StreamOwned::new(connection, tcp)))
            }
            (true, None) => return Err(Failure::Unavailable("webhook: not opened".into())),
        };
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
        if parse(&self.url)?.tls && self.tls.is_none() {
            self.tls = Some(tls_config(self.ca.as_deref())?);
        }
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
            Url {
                address: "127.0.0.1:8080".into(),
                authority: "127.0.0.1:8080".into(),
                host: "127.0.0.1".into(),
                path: "/hook".into(),
                tls: false,
            }
        );
        assert_eq!(
            parse("http://example.org").unwrap().address,
            "example.org:80"
        );
        let https = parse("https://hooks.example.org/in").unwrap();
        assert_eq!(
            (https.address.as_str(), https.host.as_str(), https.tls),
            ("hooks.example.org:443", "hooks.example.org", true)
        );
        assert_eq!(parse("https://[::1]:8443/x").unwrap().host, "::1");
        assert!(matches!(parse("ftp://x/y"), Err(Failure::Config(_))));
        assert!(matches!(
            tls_config(Some("/nonexistent/ca.pem")),
            Err(Failure::Config(m)) if m.contains("ca = '/nonexistent/ca.pem'")
        ));
        let row = serde_json::Map::new();
        let rows = [
            Out {
                row: super::super::Fields::Object(&row),
                partition: 1,
                offset: 7,
            },
            Out {
                row: super::super::Fields::Object(&row),
                partition: 0,
                offset: 3,
            },
            Out {
                row: super::super::Fields::Object(&row),
                partition: 1,
                offset: 9,
            },
        ];
        assert_eq!(key("t", &rows), "t/0:3-3,1:7-9");
    }
}
