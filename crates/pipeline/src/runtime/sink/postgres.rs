//! The `postgres` connector: tokio-postgres on the sink thread's own current-thread
//! runtime. Without a primary key a batch is one `COPY ... FROM STDIN` in text format,
//! PostgreSQL's bulk path (each value written as its column's type reads it: epoch
//! milliseconds as ISO-8601 for timestamps, objects and arrays as JSON text). With a
//! primary key, and for a single row (the row-by-row retry that finds a refused
//! one), it is one statement: the rows go as one JSON array parameter,
//! `json_to_recordset` turns it into rows and PostgreSQL casts each value to its
//! column's type; with a primary key, `INSERT ... ON CONFLICT DO UPDATE`.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::SinkExt;
use sql::plan::{ColumnType, Sink};
use tokio_postgres::{Client, NoTls, Statement};

use super::{quote, Columns, Failure, Fields, Out, Position, Target};

pub(crate) struct Postgres {
    url: String,
    table: String,
    create_table: bool,
    columns: Columns,
    rt: tokio::runtime::Runtime,
    conn: Option<Conn>,
    /// Statements without an answer worth waiting for (`BEGIN`, `SAVEPOINT`), sent
    /// ahead of the next statement in one round trip with it.
    ahead: String,
    /// The positions `store` was given, sent with `COMMIT`.
    store: Option<Stored>,
}

/// A sink's positions to store: its id, and per partition the next offset and the
/// origins' JSON.
struct Stored {
    id: String,
    partitions: Vec<i32>,
    next: Vec<i64>,
    origins: Vec<String>,
}

struct Conn {
    client: Client,
    /// The columns written, with their PostgreSQL types (`format_type`).
    written: Vec<(String, String)>,
    /// How each written column's values go into `COPY`.
    kinds: Vec<Kind>,
    /// `COPY table (columns) FROM STDIN`.
    copy: String,
    insert: Statement,
    lock: Statement,
    positions: Statement,
    store: Statement,
}

/// Serialises the sinks' `CREATE TABLE`s in a database (a transaction-level advisory
/// lock; the key is arbitrary, the same for every Freshet sink).
const DDL_LOCK: &str = "SELECT pg_advisory_xact_lock(7308604897068083830)";

/// `a.b` as `"a"."b"`.
fn quote_name(name: &str) -> String {
    name.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// How a failed call is treated: refused values, a definition that does not fit,
/// or a connection or server to retry.
fn failure(e: tokio_postgres::Error) -> Failure {
    let Some(db) = e.as_db_error() else {
        return Failure::Unavailable(format!("PostgreSQL: {e}"));
    };
    let message = format!("PostgreSQL: {} ({})", db.message(), db.code().code());
    match &db.code().code()[..2] {
        "22" | "23" => Failure::Rejected(message),
        "08" | "40" | "53" | "55" | "57" | "58" | "XX" => Failure::Unavailable(message),
        _ => Failure::Config(message),
    }
}

fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Int => "BIGINT",
        ColumnType::Float => "DOUBLE PRECISION",
        ColumnType::Bool => "BOOLEAN",
        ColumnType::Timestamp => "TIMESTAMPTZ",
        ColumnType::Text | ColumnType::Json => "TEXT",
    }
}

/// Whether values of static type `from` can go into a column of PostgreSQL type `to`
/// (`format_type`'s name); `Json` (unknown until a record arrives) always may.
fn fits(from: ColumnType, to: &str) -> bool {
    let numeric = [
        "smallint",
        "integer",
        "bigint",
        "numeric",
        "real",
        "double precision",
    ]
    .iter()
    .any(|n| to.starts_with(n));
    let time = Kind::of(to) == Kind::Time;
    match from {
        ColumnType::Bool => !numeric && !time,
        ColumnType::Int | ColumnType::Float | ColumnType::Timestamp => to != "boolean",
        ColumnType::Text | ColumnType::Json => true,
    }
}

/// How a column's values are written for `COPY`, from its PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// `timestamp...` or `date`: epoch milliseconds as ISO-8601.
    Time,
    /// `json` or `jsonb`: every value as JSON text.
    Json,
    /// Anything else: strings as they are, other values as JSON text.
    Plain,
}

impl Kind {
    fn of(db_type: &str) -> Kind {
        if db_type.starts_with("timestamp") || db_type == "date" {
            Kind::Time
        } else if db_type == "json" || db_type == "jsonb" {
            Kind::Json
        } else {
            Kind::Plain
        }
    }
}

/// One row of `COPY`'s text format: the written columns' values (`None`: a missing
/// field), tab-separated, `\N` for NULL, each as its column's type reads it, as the
/// statement's casts would give it.
fn copy_row<'v>(
    out: &mut Vec<u8>,
    kinds: &[Kind],
    values: impl Iterator<Item = Option<&'v serde_json::Value>>,
) {
    use serde_json::Value;
    use std::io::Write as _;
    for (i, (kind, value)) in kinds.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        // Numbers and booleans need no escaping; written in place, not allocated.
        let _ = match (value, kind) {
            (None | Some(Value::Null), _) => out.write_all(b"\\N"),
            (Some(Value::Number(n)), Kind::Time) => match n.as_f64() {
                // Epoch milliseconds, as the statement's to_timestamp(ms / 1000).
                Some(ms) if ms.fract() == 0.0 && ms.abs() < 9.0e15 => {
                    out.write_all(sql::time::format_iso8601(ms as i64).as_bytes())
                }
                _ => write!(out, "{n}"),
            },
            (Some(Value::String(s)), Kind::Time | Kind::Plain) => {
                copy_text(out, s);
                Ok(())
            }
            (Some(Value::Number(n)), Kind::Plain) => write!(out, "{n}"),
            (Some(Value::Bool(b)), Kind::Plain) => {
                out.write_all(if *b { b"true" } else { b"false" })
            }
            (Some(v), _) => {
                copy_text(out, &v.to_string());
                Ok(())
            }
        };
    }
    out.push(b'\n');
}

/// Where each written column is among a query's output columns: looked up once per
/// query (its names, shared by its rows), not per row.
#[derive(Default)]
struct ColumnIndex {
    names: Option<*const String>,
    at: Vec<Option<usize>>,
}

impl ColumnIndex {
    fn values<'s, 'v: 's>(
        &'s mut self,
        written: &'s [(String, String)],
        row: Fields<'v>,
    ) -> Box<dyn Iterator<Item = Option<&'v serde_json::Value>> + 's> {
        match row {
            Fields::Object(map) => Box::new(written.iter().map(move |(n, _)| map.get(n))),
            Fields::Columns(names, values) => {
                if self.names != Some(names.as_ptr()) {
                    self.names = Some(names.as_ptr());
                    self.at = written
                        .iter()
                        .map(|(w, _)| names.iter().position(|n| n == w))
                        .collect();
                }
                Box::new(self.at.iter().map(move |i| i.map(|i| &values[i])))
            }
        }
    }
}

/// `s` escaped for `COPY`'s text format.
fn copy_text(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

impl Postgres {
    pub fn new(url: &str, sink: &Sink, columns: Columns) -> Postgres {
        Postgres {
            url: url.to_string(),
            table: quote_name(&sink.table),
            create_table: sink.create_table,
            columns,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds"),
            conn: None,
            ahead: String::new(),
            store: None,
        }
    }

    /// `sql` goes ahead of the next statement, in its round trip.
    fn send_ahead(&mut self, sql: &str) {
        self.ahead.push_str(sql);
        self.ahead.push(';');
    }

    /// Runs `call` on the connection, preceded in the same round trip by what was
    /// sent ahead (requests of futures polled together are pipelined; answers come in
    /// order, and the first error is the one returned).
    fn call<'c, T, F>(
        rt: &tokio::runtime::Runtime,
        conn: &'c Conn,
        ahead: String,
        call: impl FnOnce(&'c Client) -> F,
    ) -> Result<T, Failure>
    where
        F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        rt.block_on(async {
            if ahead.is_empty() {
                return call(&conn.client).await;
            }
            let (first, then) =
                futures_util::future::join(conn.client.batch_execute(&ahead), call(&conn.client))
                    .await;
            first?;
            then
        })
        .map_err(failure)
    }

    fn connect(&mut self) -> Result<Vec<String>, Failure> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| Failure::Config(format!("url: {e}")))?;
        config.connect_timeout(Duration::from_secs(5));
        config.application_name("freshet-sink");
        let rt = &self.rt;
        let (client, connection) = rt.block_on(config.connect(NoTls)).map_err(failure)?;
        rt.spawn(async move {
            let _ = connection.await;
        });
        // CREATE TABLE IF NOT EXISTS is not safe against itself: two sinks creating
        // the same table at once get a unique violation or "already exists". The
        // sinks of a database take one advisory lock for their DDL.
        rt.block_on(client.batch_execute(&format!(
            "SET TIME ZONE 'UTC';
             BEGIN; {DDL_LOCK};
             CREATE TABLE IF NOT EXISTS freshet_offsets (
                 sink TEXT NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL,
                 origins TEXT NOT NULL DEFAULT '{{}}', PRIMARY KEY (sink, partition));
             COMMIT"
        )))
        .map_err(failure)?;
        let describe = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0
             AND NOT a.attisdropped ORDER BY a.attnum";
        let mut table: Vec<(String, String)> = rt
            .block_on(client.query(describe, &[&self.table]))
            .map_err(failure)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if table.is_empty() {
            let Some(query) = self.columns.query.as_ref().filter(|_| self.create_table) else {
                return Err(Failure::Config(format!(
                    "table {} does not exist: create it, or set create_table = true",
                    self.table
                )));
            };
            let create = self.columns.create_table(&self.table, query, sql_type);
            rt.block_on(client.batch_execute(&format!("BEGIN; {DDL_LOCK}; {create}; COMMIT")))
                .map_err(failure)?;
            table = rt
                .block_on(client.query(describe, &[&self.table]))
                .map_err(failure)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        }
        let written: Vec<(String, String)> = match &self.columns.query {
            None => table.clone(),
            Some(query) => {
                let mut written = Vec::new();
                for (name, t) in query {
                    let Some((_, db_type)) = table.iter().find(|(n, _)| n == name) else {
                        return Err(Failure::Config(format!(
                            "table {} has no column '{name}' (it has {})",
                            self.table,
                            table
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    };
                    if !fits(*t, db_type) {
                        return Err(Failure::Config(format!(
                            "column '{name}' of table {} is {db_type}, the query gives it {t:?} values",
                            self.table
                        )));
                    }
                    written.push((name.clone(), db_type.clone()));
                }
                written
            }
        };
        let names: Vec<String> = written.iter().map(|(n, _)| quote(n)).collect();
        let values: Vec<String> = written
            .iter()
            .map(|(n, t)| {
                let v = format!("r.{}", quote(n));
                if Kind::of(t) == Kind::Time {
                    format!(
                        "(CASE json_typeof({v}) WHEN 'number' THEN to_timestamp(({v} #>> '{{}}')::float8 / 1000) ELSE ({v} #>> '{{}}')::timestamptz END)::{t}"
                    )
                } else if Kind::of(t) == Kind::Json {
                    format!("(CASE json_typeof({v}) WHEN 'null' THEN NULL ELSE {v} END)::{t}")
                } else {
                    format!("({v} #>> '{{}}')::{t}")
                }
            })
            .collect();
        let record: Vec<String> = names.iter().map(|n| format!("{n} json")).collect();
        let mut insert = format!(
            "INSERT INTO {} ({}) SELECT {} FROM json_to_recordset($1::text::json) AS r({})",
            self.table,
            names.join(", "),
            values.join(", "),
            record.join(", ")
        );
        insert.push_str(&self.columns.on_conflict(written.iter().map(|(n, _)| n)));
        let insert = rt.block_on(client.prepare(&insert)).map_err(failure)?;
        let lock = rt
            .block_on(client.prepare(
                "INSERT INTO freshet_offsets (sink, partition, next_offset)
                 SELECT $1, p, 0 FROM unnest($2::int4[]) AS p ON CONFLICT DO NOTHING",
            ))
            .map_err(failure)?;
        let positions = rt
            .block_on(client.prepare(
                "SELECT partition, next_offset, origins FROM freshet_offsets
                 WHERE sink = $1 AND partition = ANY($2::int4[]) FOR UPDATE",
            ))
            .map_err(failure)?;
        let store = rt
            .block_on(client.prepare(
                "UPDATE freshet_offsets SET next_offset = x.n, origins = x.o
                 FROM unnest($2::int4[], $3::int8[], $4::text[]) AS x(p, n, o)
                 WHERE sink = $1 AND partition = x.p",
            ))
            .map_err(failure)?;
        let copy = format!("COPY {} ({}) FROM STDIN", self.table, names.join(", "));
        self.conn = Some(Conn {
            client,
            kinds: written.iter().map(|(_, t)| Kind::of(t)).collect(),
            written: written.clone(),
            copy,
            insert,
            lock,
            positions,
            store,
        });
        Ok(written.into_iter().map(|(n, _)| n).collect())
    }

    /// The rows in one `COPY`: a refused value fails it whole, as the statement would.
    fn copy(&mut self, rows: &[Out<'_>]) -> Result<(), Failure> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Failure::Unavailable("not connected to PostgreSQL".into()))?;
        // Sent in chunks as they are written, so PostgreSQL reads one while the next
        // is formatted.
        const CHUNK_ROWS: usize = 512;
        let mut index = ColumnIndex::default();
        let ahead = std::mem::take(&mut self.ahead);
        let sink = Self::call(&self.rt, conn, ahead, |c| {
            c.copy_in::<_, bytes::Bytes>(&conn.copy)
        })?;
        self.rt
            .block_on(async {
                futures_util::pin_mut!(sink);
                for chunk in rows.chunks(CHUNK_ROWS) {
                    let mut text = Vec::with_capacity(chunk.len() * 128);
                    for row in chunk {
                        let values = index.values(&conn.written, row.row);
                        copy_row(&mut text, &conn.kinds, values);
                    }
                    sink.feed(bytes::Bytes::from(text)).await?;
                }
                sink.finish().await
            })
            .map_err(failure)?;
        Ok(())
    }

    fn execute(&mut self, sql: &str) -> Result<(), Failure> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Failure::Unavailable("not connected to PostgreSQL".into()))?;
        let ahead = std::mem::take(&mut self.ahead);
        Self::call(&self.rt, conn, ahead, |c| c.batch_execute(sql))
    }
}

impl Target for Postgres {
    fn primary_key(&self) -> &[String] {
        &self.columns.primary_key
    }

    fn open(&mut self) -> Result<Vec<String>, Failure> {
        self.conn = None;
        self.ahead.clear();
        self.store = None;
        self.connect()
    }

    /// Sent with the positions' lock and read: a batch's transaction costs two round
    /// trips besides its rows (`BEGIN`, lock, read; `store`, `COMMIT`), not seven.
    fn begin(&mut self) -> Result<(), Failure> {
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            self.open()?;
        }
        self.ahead.clear();
        self.store = None;
        self.send_ahead("BEGIN");
        Ok(())
    }

    fn positions(
        &mut self,
        id: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Position>, Failure> {
        let rt = &self.rt;
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Failure::Unavailable("not connected to PostgreSQL".into()))?;
        let partitions = partitions.to_vec();
        let ahead = std::mem::take(&mut self.ahead);
        let (locked, rows) = Self::call(rt, conn, ahead, |c| async {
            Ok(futures_util::future::join(
                c.execute(&conn.lock, &[&id, &partitions]),
                c.query(&conn.positions, &[&id, &partitions]),
            )
            .await)
        })?;
        locked.map_err(failure)?;
        let rows = rows.map_err(failure)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, i32>(0),
                    Position::from_stored(r.get(1), r.get(2)),
                )
            })
            .collect())
    }

    fn insert(&mut self, rows: &[Out<'_>]) -> Result<(), Failure> {
        if self.columns.primary_key.is_empty() && rows.len() > 1 {
            return self.copy(rows);
        }
        let rows: Vec<_> = rows.iter().map(|o| o.row).collect();
        let json = serde_json::to_string(&rows).map_err(|e| Failure::Rejected(e.to_string()))?;
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Failure::Unavailable("not connected to PostgreSQL".into()))?;
        let ahead = std::mem::take(&mut self.ahead);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&json];
        Self::call(&self.rt, conn, ahead, |c| c.execute(&conn.insert, &params))?;
        Ok(())
    }

    /// Sent with the rows.
    fn savepoint(&mut self) -> Result<(), Failure> {
        self.send_ahead("SAVEPOINT freshet_rows");
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), Failure> {
        self.execute("ROLLBACK TO SAVEPOINT freshet_rows")
    }

    /// Sent with `COMMIT`.
    fn store(&mut self, id: &str, positions: &[(i32, &Position)]) -> Result<(), Failure> {
        let partitions: Vec<i32> = positions.iter().map(|(p, _)| *p).collect();
        let next: Vec<i64> = positions.iter().map(|(_, p)| p.next).collect();
        let origins: Vec<String> = positions.iter().map(|(_, p)| p.origins_json()).collect();
        self.store = Some(Stored {
            id: id.to_string(),
            partitions,
            next,
            origins,
        });
        Ok(())
    }

    /// The positions stored and the transaction committed in one round trip. A failed
    /// store aborts the transaction, and PostgreSQL answers its `COMMIT` with a
    /// rollback, not an error: the store's own error is the one that counts.
    fn commit(&mut self) -> Result<(), Failure> {
        let Some(Stored {
            id,
            partitions,
            next,
            origins,
        }) = self.store.take()
        else {
            return self.execute("COMMIT");
        };
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Failure::Unavailable("not connected to PostgreSQL".into()))?;
        let ahead = std::mem::take(&mut self.ahead);
        let (stored, committed) = Self::call(&self.rt, conn, ahead, |c| async {
            Ok(futures_util::future::join(
                c.execute(&conn.store, &[&id, &partitions, &next, &origins]),
                c.batch_execute("COMMIT"),
            )
            .await)
        })?;
        stored.map_err(failure)?;
        committed.map_err(failure)
    }

    /// Two connections: a batch's rows go in while the batch before commits (its
    /// WAL flush), and two batches' rows may go in at once.
    fn in_flight(&self) -> usize {
        2
    }

    fn rollback(&mut self) {
        self.ahead.clear();
        self.store = None;
        if self.execute("ROLLBACK").is_err() {
            // The connection is gone or confused: start a new one next time.
            self.conn = None;
        }
    }
}
