//! The `redis` connector: a hash per row at `TABLE:<primary key values joined by
//! ':'>` (replaced whole by each upsert: `DEL` then `HSET`), over RESP on one TCP
//! connection. With `score = 'column'`, the sorted set `TABLE` orders the rows by
//! that column (`ZADD`): its members are the primary keys (the hashes' suffixes), or
//! without a primary key the rows themselves as JSON (no hashes then; equal rows are
//! one member). A row whose score is not a number or a timestamp is refused (to the
//! dead-letter topic). Exactly once: a batch is `WATCH freshet_offsets`, the sink's
//! positions read from the hash `freshet_offsets` (field `<sink topic>/<partition>`,
//! value `<next offset> <origins JSON>`), then the rows and the new positions in one
//! `MULTI`/`EXEC`, which Redis applies whole or not at all (and not at all if another
//! writer moved the positions meanwhile). Durable as the server is configured
//! (`appendonly yes`, `appendfsync always` for no loss on a crash of Redis itself).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use sql::plan::Sink;

use super::{Columns, Failure, Out, Position, Target};

const POSITIONS: &str = "freshet_offsets";
/// Longest reply line or bulk string read (positions and `OK`s are small).
const MAX_REPLY: usize = 64 << 20;

pub(crate) struct Redis {
    url: String,
    prefix: String,
    /// The column that orders the sorted set `prefix`, if any.
    score: Option<String>,
    columns: Columns,
    conn: Option<Conn>,
    /// Commands of the current transaction, sent at commit.
    queued: Vec<Vec<Vec<u8>>>,
    savepoint: usize,
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

#[derive(Debug, PartialEq)]
enum Reply {
    Ok(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

fn unavailable(e: std::io::Error) -> Failure {
    Failure::Unavailable(format!("Redis: {e}"))
}

fn encode(command: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", command.len()).as_bytes());
    for arg in command {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn read_reply(r: &mut impl BufRead) -> Result<Reply, Failure> {
    let mut line = Vec::new();
    r.by_ref()
        .take(MAX_REPLY as u64)
        .read_until(b'\n', &mut line)
        .map_err(unavailable)?;
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(Failure::Unavailable(
            "Redis: connection closed or bad reply".into(),
        ));
    }
    let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let number = || {
        text.parse::<i64>()
            .map_err(|_| Failure::Unavailable(format!("Redis: bad reply length '{text}'")))
    };
    Ok(match line[0] {
        b'+' => Reply::Ok(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Int(number()?),
        b'$' => {
            let n = number()?;
            if n < 0 {
                Reply::Bulk(None)
            } else if n as usize > MAX_REPLY {
                return Err(Failure::Unavailable("Redis: reply too large".into()));
            } else {
                let mut data = vec![0u8; n as usize + 2];
                r.read_exact(&mut data).map_err(unavailable)?;
                data.truncate(n as usize);
                Reply::Bulk(Some(data))
            }
        }
        b'*' => {
            let n = number()?;
            if n < 0 {
                Reply::Array(None)
            } else {
                let mut items = Vec::new();
                for _ in 0..n.min(1 << 20) {
                    items.push(read_reply(r)?);
                }
                Reply::Array(Some(items))
            }
        }
        _ => return Err(Failure::Unavailable("Redis: bad reply".into())),
    })
}

/// A JSON value as Redis stores it: strings as they are, anything else as JSON.
fn text(v: &serde_json::Value) -> Vec<u8> {
    match v {
        serde_json::Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

/// A row's score for `ZADD`: a number as it is (timestamps are epoch milliseconds in
/// rows), an ISO-8601 string as epoch milliseconds; anything else refuses the row.
fn score(column: &str, v: Option<&serde_json::Value>) -> Result<String, Failure> {
    match v {
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(serde_json::Value::String(s)) => sql::time::parse_iso8601(s)
            .map(|ms| ms.to_string())
            .ok_or_else(|| {
                Failure::Rejected(format!(
                    "score column '{column}': {s:?} is not a number or an ISO-8601 time"
                ))
            }),
        other => Err(Failure::Rejected(format!(
            "score column '{column}' is {}, not a number",
            match other {
                None | Some(serde_json::Value::Null) => "NULL".to_string(),
                Some(v) => v.to_string(),
            }
        ))),
    }
}

/// (user, password) for AUTH.
type Auth = (String, String);

/// `redis://[user][:password@]host[:port][/db]` as (address, credentials, db).
fn parse(url: &str) -> Result<(String, Option<Auth>, Option<u32>), Failure> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| Failure::Config("url: write redis://[:password@]host:port[/db]".into()))?;
    let (authority, db) = match rest.split_once('/') {
        Some((a, "")) => (a, None),
        Some((a, d)) => (
            a,
            Some(
                d.parse::<u32>()
                    .map_err(|_| Failure::Config(format!("url: database '{d}' is not a number")))?,
            ),
        ),
        None => (rest, None),
    };
    let (auth, host) = match authority.rsplit_once('@') {
        Some((auth, host)) => {
            let (user, password) = auth.split_once(':').unwrap_or(("", auth));
            (Some((user.to_string(), password.to_string())), host)
        }
        None => (None, authority),
    };
    let host = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else {
        format!("{host}:6379")
    };
    Ok((host, auth, db))
}

impl Redis {
    pub fn new(url: &str, score: Option<String>, sink: &Sink, columns: Columns) -> Redis {
        Redis {
            url: url.to_string(),
            prefix: sink.table.clone(),
            score,
            columns,
            conn: None,
            queued: Vec::new(),
            savepoint: 0,
        }
    }

    /// Sends `commands` in one write and reads their replies.
    fn call(&mut self, commands: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>, Failure> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| Failure::Unavailable("Redis: not connected".into()))?;
        let mut out = Vec::new();
        for c in commands {
            encode(c, &mut out);
        }
        let result = conn
            .writer
            .write_all(&out)
            .map_err(unavailable)
            .and_then(|()| {
                commands
                    .iter()
                    .map(|_| read_reply(&mut conn.reader))
                    .collect::<Result<Vec<_>, _>>()
            });
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn one(&mut self, command: Vec<Vec<u8>>) -> Result<Reply, Failure> {
        match self.call(&[command])?.pop() {
            Some(Reply::Error(e)) => Err(Failure::Config(format!("Redis: {e}"))),
            Some(reply) => Ok(reply),
            None => Err(Failure::Unavailable("Redis: no reply".into())),
        }
    }
}

fn args(words: &[&str]) -> Vec<Vec<u8>> {
    words.iter().map(|w| w.as_bytes().to_vec()).collect()
}

impl Target for Redis {
    fn primary_key(&self) -> &[String] {
        &self.columns.primary_key
    }

    fn open(&mut self) -> Result<Vec<String>, Failure> {
        self.conn = None;
        if let (Some(score), Some(query)) = (&self.score, &self.columns.query) {
            if !query.iter().any(|(n, _)| n == score) {
                return Err(Failure::Config(format!(
                    "score = '{score}' is not a column of the query (it writes {})",
                    query
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let (address, auth, db) = parse(&self.url)?;
        let addr = address
            .to_socket_addrs()
            .map_err(unavailable)?
            .next()
            .ok_or_else(|| Failure::Unavailable(format!("Redis: no address for {address}")))?;
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unavailable)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(unavailable)?;
        stream.set_nodelay(true).map_err(unavailable)?;
        let writer = stream.try_clone().map_err(unavailable)?;
        self.conn = Some(Conn {
            reader: BufReader::new(stream),
            writer,
        });
        if let Some((user, password)) = auth {
            let mut command = args(&["AUTH"]);
            if !user.is_empty() {
                command.push(user.into_bytes());
            }
            command.push(password.into_bytes());
            self.one(command)?;
        }
        if let Some(db) = db {
            self.one(args(&["SELECT", &db.to_string()]))?;
        }
        self.one(args(&["PING"]))?;
        Ok(self
            .columns
            .query
            .as_ref()
            .map(|q| q.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default())
    }

    fn begin(&mut self) -> Result<(), Failure> {
        if self.conn.is_none() {
            self.open()?;
        }
        self.queued.clear();
        self.one(args(&["WATCH", POSITIONS]))?;
        Ok(())
    }

    fn positions(
        &mut self,
        id: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Position>, Failure> {
        let mut command = args(&["HMGET", POSITIONS]);
        command.extend(partitions.iter().map(|p| format!("{id}/{p}").into_bytes()));
        let Reply::Array(Some(values)) = self.one(command)? else {
            return Err(Failure::Unavailable("Redis: bad HMGET reply".into()));
        };
        let mut out = HashMap::new();
        for (p, v) in partitions.iter().zip(values) {
            if let Reply::Bulk(Some(v)) = v {
                let v = String::from_utf8_lossy(&v).into_owned();
                let (next, origins) = v.split_once(' ').unwrap_or((&v, "{}"));
                let next = next.parse().map_err(|_| {
                    Failure::Config(format!(
                        "Redis: {POSITIONS} field {id}/{p} is not a position"
                    ))
                })?;
                out.insert(*p, Position::from_stored(next, origins));
            }
        }
        Ok(out)
    }

    fn insert(&mut self, rows: &[Out<'_>]) -> Result<(), Failure> {
        for out in rows {
            if let Some(column) = &self.score {
                let score = score(column, out.row.get(column))?;
                let member = if self.columns.primary_key.is_empty() {
                    serde_json::to_vec(&out.row).map_err(|e| Failure::Rejected(e.to_string()))?
                } else {
                    let key: Vec<Vec<u8>> = self
                        .columns
                        .primary_key
                        .iter()
                        .map(|k| text(out.row.get(k).unwrap_or(&serde_json::Value::Null)))
                        .collect();
                    key.join(&b':')
                };
                self.queued.push(vec![
                    b"ZADD".to_vec(),
                    self.prefix.clone().into_bytes(),
                    score.into_bytes(),
                    member,
                ]);
                if self.columns.primary_key.is_empty() {
                    continue;
                }
            }
            let mut key = self.prefix.clone().into_bytes();
            for k in &self.columns.primary_key {
                key.push(b':');
                key.extend(text(out.row.get(k).unwrap_or(&serde_json::Value::Null)));
            }
            self.queued.push(vec![b"DEL".to_vec(), key.clone()]);
            let mut hset = vec![b"HSET".to_vec(), key];
            for (field, value) in out.row.iter() {
                if !value.is_null() {
                    hset.push(field.as_bytes().to_vec());
                    hset.push(text(value));
                }
            }
            if hset.len() > 2 {
                self.queued.push(hset);
            }
        }
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), Failure> {
        self.savepoint = self.queued.len();
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), Failure> {
        self.queued.truncate(self.savepoint);
        Ok(())
    }

    fn store(&mut self, id: &str, positions: &[(i32, &Position)]) -> Result<(), Failure> {
        let mut command = args(&["HSET", POSITIONS]);
        for (p, position) in positions {
            command.push(format!("{id}/{p}").into_bytes());
            command.push(format!("{} {}", position.next, position.origins_json()).into_bytes());
        }
        self.queued.push(command);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Failure> {
        let mut commands = vec![args(&["MULTI"])];
        commands.append(&mut self.queued);
        commands.push(args(&["EXEC"]));
        let replies = self.call(&commands)?;
        match replies.last() {
            Some(Reply::Array(Some(results))) => {
                if let Some(Reply::Error(e)) = results.iter().find(|r| matches!(r, Reply::Error(_)))
                {
                    return Err(Failure::Config(format!("Redis: {e}")));
                }
                Ok(())
            }
            // WATCH saw another writer move the positions: read them again.
            Some(Reply::Array(None)) => Err(Failure::Unavailable(
                "Redis: the sink's positions changed during the batch".into(),
            )),
            Some(Reply::Error(e)) => Err(Failure::Unavailable(format!("Redis: {e}"))),
            _ => Err(Failure::Unavailable("Redis: bad EXEC reply".into())),
        }
    }

    fn rollback(&mut self) {
        self.queued.clear();
        if self.one(args(&["UNWATCH"])).is_err() {
            self.conn = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a server sends, a reply or an error, never a panic.
        #[test]
        fn any_bytes_read_as_a_reply_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut input: &[u8] = &bytes;
            let _ = read_reply(&mut input);
        }

        /// What `encode` writes reads back as the same strings.
        #[test]
        fn commands_read_back(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..5)) {
            let mut out = Vec::new();
            encode(&args, &mut out);
            let mut input: &[u8] = &out;
            let want = Reply::Array(Some(args.into_iter().map(|a| Reply::Bulk(Some(a))).collect()));
            prop_assert_eq!(read_reply(&mut input).unwrap(), want);
        }
    }

    #[test]
    fn scores() {
        use serde_json::json;
        assert_eq!(score("s", Some(&json!(42))).unwrap(), "42");
        assert_eq!(score("s", Some(&json!(-1.5))).unwrap(), "-1.5");
        assert_eq!(
            score("s", Some(&json!("1970-01-01T00:00:01.500Z"))).unwrap(),
            "1500"
        );
        for bad in [
            None,
            Some(json!(null)),
            Some(json!("soon")),
            Some(json!([1])),
        ] {
            let err = score("s", bad.as_ref()).unwrap_err();
            assert!(
                matches!(&err, Failure::Rejected(m) if m.contains("score column 's'")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse("redis://127.0.0.1:7000/2").unwrap(),
            ("127.0.0.1:7000".into(), None, Some(2))
        );
        assert_eq!(
            parse("redis://:pw@h").unwrap(),
            ("h:6379".into(), Some((String::new(), "pw".into())), None)
        );
        assert!(matches!(parse("http://h"), Err(Failure::Config(_))));
    }

    #[test]
    fn replies_read_back_and_bad_bytes_are_errors() {
        let mut input: &[u8] =
            b"+OK\r\n:5\r\n$3\r\nabc\r\n$-1\r\n*2\r\n+QUEUED\r\n-ERR x\r\n*-1\r\n";
        assert_eq!(read_reply(&mut input).unwrap(), Reply::Ok("OK".into()));
        assert_eq!(read_reply(&mut input).unwrap(), Reply::Int(5));
        assert_eq!(
            read_reply(&mut input).unwrap(),
            Reply::Bulk(Some(b"abc".to_vec()))
        );
        assert_eq!(read_reply(&mut input).unwrap(), Reply::Bulk(None));
        assert_eq!(
            read_reply(&mut input).unwrap(),
            Reply::Array(Some(vec![
                Reply::Ok("QUEUED".into()),
                Reply::Error("ERR x".into())
            ]))
        );
        assert_eq!(read_reply(&mut input).unwrap(), Reply::Array(None));
        for bad in [
            &b""[..],
            b"?x\r\n",
            b"$99999999999\r\n",
            b":x\r\n",
            b"$5\r\nab",
        ] {
            let mut bad = bad;
            assert!(read_reply(&mut bad).is_err());
        }
    }
}
