//! The `sqlite` connector: rusqlite with its bundled SQLite, one connection on the
//! sink's thread, a batch in one `BEGIN IMMEDIATE` transaction (so two writers of one
//! file take turns). Values are bound as SQLite's own types: integers, reals, text,
//! booleans as 0/1, timestamps as epoch milliseconds, objects and arrays as JSON text.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::types::Value as Sql;
use rusqlite::{params_from_iter, Connection, ErrorCode};
use sql::plan::{ColumnType, Sink};

use super::{quote, Columns, Failure, Out, Position, Target};

pub(crate) struct Sqlite {
    path: String,
    table: String,
    create_table: bool,
    columns: Columns,
    conn: Option<Connection>,
    written: Vec<String>,
    insert: String,
}

fn failure(e: rusqlite::Error) -> Failure {
    let message = format!("SQLite: {e}");
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig) => {
            Failure::Rejected(message)
        }
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory,
        ) => Failure::Unavailable(message),
        _ => Failure::Config(message),
    }
}

fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Int | ColumnType::Timestamp | ColumnType::Bool => "INTEGER",
        ColumnType::Float => "REAL",
        ColumnType::Text => "TEXT",
        ColumnType::Json => "",
    }
}

fn value(v: Option<&serde_json::Value>) -> Sql {
    match v {
        None | Some(serde_json::Value::Null) => Sql::Null,
        Some(serde_json::Value::Bool(b)) => Sql::Integer(*b as i64),
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(i) => Sql::Integer(i),
            None => Sql::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Some(serde_json::Value::String(s)) => Sql::Text(s.clone()),
        Some(other) => Sql::Text(other.to_string()),
    }
}

impl Sqlite {
    pub fn new(path: &str, sink: &Sink, columns: Columns) -> Sqlite {
        Sqlite {
            path: path.to_string(),
            table: quote(&sink.table),
            create_table: sink.create_table,
            columns,
            conn: None,
            written: Vec::new(),
            insert: String::new(),
        }
    }

    fn conn(&self) -> Result<&Connection, Failure> {
        self.conn
            .as_ref()
            .ok_or_else(|| Failure::Unavailable("the SQLite file is not open".into()))
    }

    fn execute(&self, sql: &str) -> Result<(), Failure> {
        self.conn()?.execute_batch(sql).map_err(failure)
    }

    fn table_columns(conn: &Connection, table: &str) -> Result<Vec<String>, Failure> {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT name FROM pragma_table_info({})",
                sql_string(table)
            ))
            .map_err(failure)?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(failure)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(failure)?;
        Ok(names)
    }
}

/// `'text'` with quotes doubled: pragma_table_info takes the table's name unquoted.
fn sql_string(quoted_ident: &str) -> String {
    let name = quoted_ident.trim_matches('"').replace("\"\"", "\"");
    format!("'{}'", name.replace('\'', "''"))
}

impl Target for Sqlite {
    fn primary_key(&self) -> &[String] {
        &self.columns.primary_key
    }

    fn open(&mut self) -> Result<Vec<String>, Failure> {
        self.conn = None;
        let conn = Connection::open(&self.path).map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::CannotOpen) => {
                Failure::Config(format!("SQLite: cannot open '{}': {e}", self.path))
            }
            _ => failure(e),
        })?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(failure)?;
        // Durable at commit: WAL with full sync.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS freshet_offsets (
                 sink TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
                 origins TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (sink, partition))",
        )
        .map_err(failure)?;
        let mut table = Sqlite::table_columns(&conn, &self.table)?;
        if table.is_empty() {
            let Some(query) = self.columns.query.as_ref().filter(|_| self.create_table) else {
                return Err(Failure::Config(format!(
                    "table {} does not exist in '{}': create it, or set create_table = true",
                    self.table, self.path
                )));
            };
            conn.execute_batch(&self.columns.create_table(&self.table, query, sql_type))
                .map_err(failure)?;
            table = Sqlite::table_columns(&conn, &self.table)?;
        }
        let written: Vec<String> = match &self.columns.query {
            None => table.clone(),
            Some(query) => {
                for (name, _) in query {
                    if !table.contains(name) {
                        return Err(Failure::Config(format!(
                            "table {} has no column '{name}' (it has {})",
                            self.table,
                            table.join(", ")
                        )));
                    }
                }
                query.iter().map(|(n, _)| n.clone()).collect()
            }
        };
        let names: Vec<String> = written.iter().map(|n| quote(n)).collect();
        let marks = vec!["?"; names.len()].join(", ");
        let mut insert = format!(
            "INSERT INTO {} ({}) VALUES ({marks})",
            self.table,
            names.join(", ")
        );
        insert.push_str(&self.columns.on_conflict(written.iter()));
        // A statement that does not fit the table fails here, not on the first row.
        conn.prepare_cached(&insert).map_err(failure)?;
        self.insert = insert;
        self.written = written.clone();
        self.conn = Some(conn);
        Ok(written)
    }

    fn begin(&mut self) -> Result<(), Failure> {
        if self.conn.is_none() {
            self.open()?;
        }
        self.execute("BEGIN IMMEDIATE")
    }

    fn positions(
        &mut self,
        id: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Position>, Failure> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached("SELECT next_offset, origins FROM freshet_offsets WHERE sink = ?1 AND partition = ?2")
            .map_err(failure)?;
        let mut out = HashMap::new();
        for p in partitions {
            let mut rows = stmt.query(rusqlite::params![id, p]).map_err(failure)?;
            if let Some(row) = rows.next().map_err(failure)? {
                let next: i64 = row.get(0).map_err(failure)?;
                let origins: String = row.get(1).map_err(failure)?;
                out.insert(*p, Position::from_stored(next, &origins));
            }
        }
        Ok(out)
    }

    fn insert(&mut self, rows: &[Out<'_>]) -> Result<(), Failure> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&self.insert).map_err(failure)?;
        for row in rows {
            stmt.execute(params_from_iter(
                self.written.iter().map(|c| value(row.row.get(c))),
            ))
            .map_err(failure)?;
        }
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), Failure> {
        self.execute("SAVEPOINT freshet_rows")
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), Failure> {
        self.execute("ROLLBACK TO SAVEPOINT freshet_rows")
    }

    fn store(&mut self, id: &str, positions: &[(i32, &Position)]) -> Result<(), Failure> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO freshet_offsets (sink, partition, next_offset, origins) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (sink, partition) DO UPDATE SET next_offset = excluded.next_offset, origins = excluded.origins",
            )
            .map_err(failure)?;
        for (p, position) in positions {
            stmt.execute(rusqlite::params![
                id,
                p,
                position.next,
                position.origins_json()
            ])
            .map_err(failure)?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Failure> {
        self.execute("COMMIT")
    }

    fn rollback(&mut self) {
        if self.execute("ROLLBACK").is_err() {
            self.conn = None;
        }
    }
}
