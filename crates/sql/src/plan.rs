//! What a compiled pipeline file is: the settings and one [`Query`] per `INSERT`
//! statement. The runtime (crate `pipeline`) executes it; nothing here does I/O.

use serde::{Deserialize, Serialize};

use crate::expr::Expr;

/// A compiled pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub settings: Settings,
    /// One per `INSERT INTO`, in file order. Several may read the same source
    /// (one input, several outputs).
    pub queries: Vec<Query>,
    /// `CREATE SINK` statements into a database, in file order (a `kafka` sink is
    /// resolved to its topic and not kept). Left out of the JSON when empty, so the
    /// plans (and hashes) of files without sinks stay as they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<Sink>,
}

/// `CREATE SINK name WITH (connector = '...', ...)`: where the rows of the queries
/// that `INSERT INTO name` go (`docs/sql.md`, "Sinks").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sink {
    pub name: String,
    pub connector: Connector,
    /// The table written to (redis: the keys' prefix; empty for http and file).
    pub table: String,
    /// `primary_key = 'a, b'`: rows are upserts on these columns (required for a
    /// grouped query, whose rows update). Empty: plain inserts.
    pub primary_key: Vec<String>,
    /// `create_table = true`: create the table if missing, with types from the query.
    pub create_table: bool,
    /// `batch_rows`: at most this many rows per transaction.
    pub batch_rows: u32,
    /// `batch_interval`: a batch is written at the latest this long after its first
    /// row arrived.
    pub batch_interval_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Connector {
    /// `url = 'postgres://user:password@host:port/db'` (or a key=value string).
    Postgres { url: String },
    /// `path = 'file.db'`.
    Sqlite { path: String },
    /// `url = 'redis://[:password@]host:port[/db]'`: a hash per row at
    /// `table:key1:key2`; with `score = 'column'`, also the sorted set `table` of
    /// the rows (their primary key, or without one the row's JSON) ordered by that
    /// column.
    Redis {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        score: Option<String>,
    },
    /// `url = 'http://host:port/path'`: each batch POSTed as a JSON array
    /// (at-least-once, with an `Idempotency-Key`).
    Http {
        url: String,
        timeout_ms: i64,
        /// `ca = 'file.pem'`: https servers are also trusted when their certificate
        /// chains to one of these (besides Mozilla's roots).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca: Option<String>,
    },
    /// `path = 'dir'`: JSON lines in files of that directory, rolled by size and
    /// age (at-least-once).
    File {
        path: String,
        roll_bytes: u64,
        roll_interval_ms: i64,
    },
}

impl Connector {
    pub fn name(&self) -> &'static str {
        match self {
            Connector::Postgres { .. } => "postgres",
            Connector::Sqlite { .. } => "sqlite",
            Connector::Redis { .. } => "redis",
            Connector::Http { .. } => "http",
            Connector::File { .. } => "file",
        }
    }
}

/// What is statically known of an output column's type (for `create_table`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColumnType {
    Int,
    Float,
    Bool,
    Text,
    Timestamp,
    /// A JSON value of unknown type (a field of the input, `->`).
    Json,
}

/// The pipeline's settings: defaults, overridden by `SET 'key' = 'value';`
/// statements in the file (keys and value syntax in `docs/sql.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `allowed-lateness`: watermark = highest event time seen minus this.
    pub allowed_lateness_ms: i64,
    /// `idle-timeout`: a source partition that delivers nothing for this long (wall
    /// clock) stops holding the watermark back.
    pub idle_timeout_ms: i64,
    /// `emit-interval`: `EMIT CHANGES` emits a changed row at most this often.
    pub emit_interval_ms: i64,
    /// `checkpoint-interval`: how often state and source offsets are checkpointed.
    pub checkpoint_interval_ms: i64,
    /// `late-topic`: where records too late for their window go. `None`: the
    /// runtime's default name for the pipeline.
    pub late_topic: Option<String>,
    /// `dead-letter-topic`: where records that fail to parse or evaluate go.
    pub dead_letter_topic: Option<String>,
    /// `max-state-bytes`: past this the pipeline stops with an error.
    pub max_state_bytes: u64,
    /// `max-windows-per-record`: a `HOP` whose size / slide is larger is refused
    /// (each record updates that many windows). Left out of the JSON at its default,
    /// so existing plans keep their hash.
    #[serde(
        default = "default_windows_per_record",
        skip_serializing_if = "is_default_windows_per_record"
    )]
    pub max_windows_per_record: u64,
    /// `delivery-guarantee = 'exactly-once'`: each task writes its rows and its
    /// checkpoint in one Kafka transaction, committed at each checkpoint (Flink's
    /// Kafka sink `EXACTLY_ONCE`): read_committed readers see every row once, at
    /// the checkpoint interval's pace, and an instance that lost its task cannot
    /// emit anything. Default `at-least-once`: rows at once, a crash may repeat
    /// the rows since the last checkpoint (with the same values). Left out of the
    /// JSON when off, so existing plans keep their hash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exactly_once: bool,
}

const DEFAULT_WINDOWS_PER_RECORD: u64 = 1000;

fn default_windows_per_record() -> u64 {
    DEFAULT_WINDOWS_PER_RECORD
}

fn is_default_windows_per_record(n: &u64) -> bool {
    *n == DEFAULT_WINDOWS_PER_RECORD
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            allowed_lateness_ms: 5_000,
            idle_timeout_ms: 30_000,
            emit_interval_ms: 1_000,
            checkpoint_interval_ms: 1_000,
            late_topic: None,
            dead_letter_topic: None,
            max_state_bytes: 256 << 20,
            max_windows_per_record: DEFAULT_WINDOWS_PER_RECORD,
            exactly_once: false,
        }
    }
}

/// One `INSERT INTO output SELECT ... FROM source ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    /// The topic written to.
    pub output: String,
    pub source: Source,
    /// `WHERE`, over the input record (`Expr` in input context).
    pub filter: Option<Expr>,
    pub body: Body,
    /// The index in `Pipeline::sinks` of the sink `output` names, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<usize>,
}

/// Where a query's records must be brought before its operator sees them: the
/// plan's say on repartitioning. The runtime reads a source of one partition in
/// place whatever this says (every record is already in one place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Stateless: each record is processed where it is read.
    None,
    /// Grouped by the record key alone: producers put each key in one partition
    /// already (Kafka Streams' co-partitioning), so each source partition is a task
    /// of its own, read in place.
    InPlace,
    /// Grouped by anything else: each record goes to the repartition partition of
    /// its group key's hash, which one task owns.
    ByGroupKey,
}

impl Query {
    /// Where the query's records must be repartitioned ([`Exchange`]).
    pub fn exchange(&self) -> Exchange {
        match &self.body {
            Body::Map(_) => Exchange::None,
            Body::Aggregate(a) if a.keys == [Expr::Meta(crate::expr::Meta::Key)] => {
                Exchange::InPlace
            }
            Body::Aggregate(_) => Exchange::ByGroupKey,
        }
    }

    /// The output columns' names and what is known of their types; `None` for
    /// `SELECT *`.
    pub fn columns(&self) -> Option<Vec<(String, ColumnType)>> {
        match &self.body {
            Body::Map(Projection::Star) => None,
            Body::Map(Projection::Columns(columns)) => Some(
                columns
                    .iter()
                    .map(|(n, e)| (n.clone(), e.static_type(&[])))
                    .collect(),
            ),
            Body::Aggregate(a) => {
                let mut slots: Vec<ColumnType> =
                    a.keys.iter().map(|k| k.static_type(&[])).collect();
                slots.extend(a.aggregates.iter().map(|c| {
                    match c.func {
                        AggFunc::Count | AggFunc::CountDistinct | AggFunc::ApproxCountDistinct => {
                            ColumnType::Int
                        }
                        AggFunc::Sum | AggFunc::Avg => ColumnType::Float,
                        AggFunc::Min | AggFunc::Max => c
                            .arg
                            .as_ref()
                            .map_or(ColumnType::Json, |e| e.static_type(&[])),
                    }
                }));
                slots.extend([ColumnType::Timestamp, ColumnType::Timestamp]);
                Some(
                    a.columns
                        .iter()
                        .map(|(n, e)| (n.clone(), e.static_type(&slots)))
                        .collect(),
                )
            }
        }
    }

    /// The top-level JSON fields of the source value that this query reads.
    pub fn json_fields(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        self.expressions(|e: &Expr| e.top_level_fields(&mut out));
        out
    }

    /// Whether any expression reads a header (`header('x')`): the runtime reads a
    /// record's headers only then.
    pub fn reads_headers(&self) -> bool {
        let mut reads = false;
        self.expressions(|e: &Expr| e.walk(&mut |e| reads |= matches!(e, Expr::Header(_))));
        reads
    }

    /// Calls `add` on each top-level expression the query evaluates per record.
    fn expressions(&self, mut add: impl FnMut(&Expr)) {
        if let Some(f) = &self.filter {
            add(f);
        }
        if let EventTime::Column(e) = &self.source.event_time {
            add(e);
        }
        match &self.body {
            Body::Map(Projection::Star) => {}
            Body::Map(Projection::Columns(columns)) => columns.iter().for_each(|(_, e)| add(e)),
            Body::Aggregate(a) => {
                a.keys.iter().for_each(&mut add);
                for call in &a.aggregates {
                    call.arg.iter().chain(&call.filter).for_each(&mut add);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub topic: String,
    /// Whether any expression reads the value as JSON (a field, `->`, `*`). When
    /// false the value is only ever read raw (`_value`) and need not parse.
    pub json: bool,
    /// Where event time comes from.
    pub event_time: EventTime,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventTime {
    /// The record's timestamp (`_timestamp`): the default without a window, and for
    /// a window whose time column is `_timestamp`.
    RecordTimestamp,
    /// A column (the window function's time column) in input context; its value is
    /// epoch milliseconds (a number) or an ISO-8601 string. A record whose value is
    /// neither (or NULL) goes to the dead-letter topic.
    Column(Expr),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// A stateless query: filter, project, route. One output record per input
    /// record that passes the filter.
    Map(Projection),
    /// `GROUP BY` (with or without a window) and aggregates.
    Aggregate(Aggregate),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Projection {
    /// `SELECT *`: the input value as it is.
    Star,
    /// Named columns, in select-list order, in input context.
    Columns(Vec<(String, Expr)>),
}

/// A grouped query. Output columns and `HAVING` are expressions in *row* context,
/// over slots: `0..keys.len()` are the group keys' values, then one slot per entry
/// of `aggregates`, then `window_start` and `window_end` (both `Value::Timestamp`,
/// present only with a window).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub window: Option<Window>,
    /// `GROUP BY` expressions in input context, without `window_start` and
    /// `window_end` (which a windowed query must group by).
    pub keys: Vec<Expr>,
    pub aggregates: Vec<AggCall>,
    pub having: Option<Expr>,
    /// The select list, in order, in row context.
    pub columns: Vec<(String, Expr)>,
    pub emit: Emit,
}

impl Aggregate {
    /// The slot of `window_start` (and `+ 1` of `window_end`).
    pub fn window_slot(&self) -> usize {
        self.keys.len() + self.aggregates.len()
    }
}

/// Windows on event time. Bounds are epoch milliseconds, start inclusive, end
/// exclusive; tumbling and hopping windows are aligned to the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Window {
    Tumble { size_ms: i64 },
    Hop { slide_ms: i64, size_ms: i64 },
    Session { gap_ms: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Emit {
    /// Updated rows at most every `emit_interval_ms`, and a final row when a window
    /// closes. The default.
    Changes,
    /// One row per window, when it closes. Only with a window.
    Final,
}

/// One aggregate call of the select list or `HAVING`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggCall {
    pub func: AggFunc,
    /// The argument in input context; `None` for `COUNT(*)`.
    pub arg: Option<Expr>,
    /// `FILTER (WHERE ...)` in input context.
    pub filter: Option<Expr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggFunc {
    /// `COUNT(*)` (arg `None`) or `COUNT(x)`: rows where x is not NULL. `Int`.
    Count,
    /// Exact `COUNT(DISTINCT x)` of non-NULL values. `Int`.
    CountDistinct,
    /// `APPROX_COUNT_DISTINCT(x)`: HyperLogLog, bounded memory per group. `Int`.
    ApproxCountDistinct,
    /// `SUM(x)`: `Int` while every input is an integer, else `Float`; NULL when
    /// there was no non-NULL input.
    Sum,
    Min,
    Max,
    /// `AVG(x)`: `Float`, NULL without non-NULL input.
    Avg,
}
