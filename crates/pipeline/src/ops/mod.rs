//! Operators: one [`QueryOperator`] per query of a pipeline. Pure: the runtime passes
//! records and markers in and takes rows out; state is snapshot to bytes and
//! restored from them. Which window a record counts in, whether it is late and when
//! a window closes depend on the input alone, never on the wall clock (which only
//! paces EMIT CHANGES), so a replay of the same input gives the same final rows.
//!
//! The semantics (docs/sql.md): the watermark is the lowest, over the active source
//! partitions, of the highest event time each has delivered, minus the allowed
//! lateness, and never goes back; a partition declared idle (by the runtime's first
//! stage, after the idle timeout without a record) stops holding it back. A window `[start, end)` closes when the watermark reaches `end`.
//! A record is late when a window it belongs to has closed (the earliest one
//! containing it; for sessions, when `t + gap <= watermark`): it is counted nowhere
//! and the runtime sends it to the late topic. A record is evaluated in full before
//! any state changes, so a rejected one changes nothing.
//!
//! [`QueryOperator`] does what every query shares (the filter, the event time, the
//! watermark, the snapshot's header) and hands each record to one [`Operator`]: one
//! file each, `select.rs` (no GROUP BY), `aggregate.rs` (GROUP BY without a window),
//! `window.rs` (tumbling and hopping), `session.rs`; `group.rs` holds what the
//! grouped ones share. Each operator's state is encoded next to it.

mod accumulate;
mod aggregate;
pub(crate) mod encode;
mod group;
mod select;
mod session;
mod watermark;
mod window;

use sql::expr::{Context, Input};
use sql::plan::{Body, EventTime, Query, Settings, Window};
use sql::Value;

use encode::Reader;
use watermark::Watermark;

/// One output record of a query, for its output topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Grouped queries: the group key (and window start); stateless queries: the
    /// input record's key.
    pub key: Option<Vec<u8>>,
    /// A JSON object whose fields are the select list's names (`SELECT *`: the input
    /// value as it was).
    pub value: Vec<u8>,
    /// `[start, end)` of the window, epoch ms.
    pub window: Option<(i64, i64)>,
    /// Whether this is the window's final value (always false without a window).
    pub is_final: bool,
    /// A grouped row whose `HAVING` or an output column failed to evaluate (a
    /// division by zero): it goes to the dead-letter topic with this message, not to
    /// the output.
    pub error: Option<String>,
}

/// What became of an input record that was not rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Counted (or filtered out, or projected).
    Done,
    /// Too late for its window: the runtime sends it to the late topic.
    Late,
}

/// How a grouped query's first stage routes a record ([`QueryOperator::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    /// Its event time, if it has one the query can read.
    pub time: Option<i64>,
    /// False when the filter is false for it: it changes no group.
    pub passes: bool,
    /// A stable hash of its group key (None when a key expression fails).
    pub key_hash: Option<u64>,
}

/// Why a record was not processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The record cannot be processed (bad event time, an expression's type error):
    /// it goes to the dead-letter topic with this message; no state changed.
    #[error("{0}")]
    Rejected(String),
    /// The state grew past `max-state-bytes`: the pipeline must stop.
    #[error("state of {used} bytes is over the limit of {limit}")]
    StateLimit { used: u64, limit: u64 },
}

/// The operators' maps and sets: keyed by bytes from records and looked up several
/// times per record, so with foldhash (seeded per process) rather than SipHash. No
/// output or snapshot depends on their order (both sort).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// What every operator does. Pure: records and the watermark in, rows out.
trait Operator: Send {
    /// One record the query's filter passed, with its event time (grouped queries;
    /// 0 for a stateless one) and the watermark before it. A rejected record changes
    /// nothing.
    fn process(
        &mut self,
        input: &Input<'_>,
        time: i64,
        watermark: Option<i64>,
        out: &mut Vec<Row>,
    ) -> Result<Fate, Error>;

    /// The watermark is `watermark`: emits and drops what it closed.
    fn on_watermark(&mut self, watermark: i64, out: &mut Vec<Row>);

    /// EMIT CHANGES: emits what changed, at most once per `interval_ms` of the wall
    /// clock `now_ms` (which decides nothing else).
    fn on_tick(&mut self, now_ms: i64, interval_ms: i64, out: &mut Vec<Row>);

    /// Appends the state to `out`.
    fn snapshot(&self, out: &mut Vec<u8>);

    /// Replaces the state with what [`Operator::snapshot`] wrote in snapshot format
    /// `version`, under `watermark`; never panics on garbage.
    fn restore(
        &mut self,
        r: &mut Reader<'_>,
        version: u8,
        watermark: Option<i64>,
    ) -> Result<(), String>;

    /// Approximate bytes of state held.
    fn state_bytes(&self) -> i64;
}

/// Runs one query.
pub struct QueryOperator {
    query: Query,
    settings: Settings,
    /// Grouped queries: the watermark over the source partitions fed.
    watermark: Option<Watermark>,
    op: Box<dyn Operator>,
}

/// The operators' snapshot format: 2 added each source partition's idle flag; 3 holds
/// a tumbling or hopping window's slices instead of its windows, then the whole
/// windows restored from a version 2 snapshot still open (the operators read 1 and 2
/// too).
const SNAPSHOT_VERSION: u8 = 3;

impl QueryOperator {
    pub fn new(query: &Query, settings: &Settings) -> Self {
        let (watermark, op): (_, Box<dyn Operator>) = match &query.body {
            Body::Map(projection) => (None, Box::new(select::Select::new(projection))),
            Body::Aggregate(plan) => (
                Some(Watermark::new(settings.allowed_lateness_ms)),
                match plan.window {
                    None => Box::new(aggregate::Unwindowed::new(plan)),
                    Some(Window::Tumble { size_ms }) => {
                        Box::new(window::Sliced::new(plan, size_ms, size_ms))
                    }
                    Some(Window::Hop { slide_ms, size_ms }) => {
                        Box::new(window::Sliced::new(plan, slide_ms, size_ms))
                    }
                    Some(Window::Session { gap_ms }) => {
                        Box::new(session::Sessions::new(plan, gap_ms))
                    }
                },
            ),
        };
        QueryOperator {
            query: query.clone(),
            settings: settings.clone(),
            watermark,
            op,
        }
    }

    /// The source partitions this operator is fed.
    pub fn assign(&mut self, partitions: &[i32]) {
        if let Some(w) = &mut self.watermark {
            w.assign(partitions);
        }
    }

    pub fn watermark(&self) -> Option<i64> {
        self.watermark.as_ref().and_then(Watermark::current)
    }

    /// Approximate bytes of state held.
    pub fn state_bytes(&self) -> u64 {
        self.op.state_bytes().max(0) as u64
    }

    /// One input record. Appends output rows to `out`.
    pub fn process(&mut self, input: &Input<'_>, out: &mut Vec<Row>) -> Result<Fate, Error> {
        let grouped = self.watermark.is_some();
        let t = if grouped {
            event_time(&self.query.source.event_time, input)?
        } else {
            0
        };
        let passes = self.passes(input)?;
        let Some(watermark) = &mut self.watermark else {
            return if passes {
                self.op.process(input, t, None, out)
            } else {
                Ok(Fate::Done)
            };
        };
        if passes {
            let fate = self.op.process(input, t, watermark.current(), out)?;
            if fate == Fate::Late {
                watermark.touch(input.partition);
                return Ok(Fate::Late);
            }
        }
        self.observe(input.partition, t, out);
        if passes {
            let used = self.state_bytes();
            if used > self.settings.max_state_bytes {
                return Err(Error::StateLimit {
                    used,
                    limit: self.settings.max_state_bytes,
                });
            }
        }
        Ok(Fate::Done)
    }

    /// A stateless query with a select list, for a caller that writes the values
    /// themselves (a fused sink): the select list's values on `input` into `values`
    /// (cleared first), or false when `WHERE` drops the record. The errors are
    /// [`QueryOperator::process`]'s. None for `SELECT *` and grouped queries.
    pub fn project(
        &self,
        input: &Input<'_>,
        values: &mut Vec<sql::value::Value>,
    ) -> Option<Result<bool, Error>> {
        let Body::Map(sql::plan::Projection::Columns(columns)) = &self.query.body else {
            return None;
        };
        values.clear();
        Some((|| {
            if !self.passes(input)? {
                return Ok(false);
            }
            select::eval_columns(columns, input, values)?;
            Ok(true)
        })())
    }

    /// Whether `WHERE` keeps `input`.
    fn passes(&self, input: &Input<'_>) -> Result<bool, Error> {
        match &self.query.filter {
            Some(f) => Ok(f
                .eval(&Context::Input(input))
                .map_err(|e| Error::Rejected(format!("WHERE: {e}")))?
                .is_true()),
            None => Ok(true),
        }
    }

    /// What the first stage of a grouped query needs to route `input` to the task
    /// that holds its group's state, without changing anything.
    pub fn route(&self, input: &Input<'_>) -> Routing {
        let ctx = Context::Input(input);
        let time = event_time(&self.query.source.event_time, input).ok();
        // An error passes: the task evaluates it again and rejects the record.
        let passes = match &self.query.filter {
            Some(f) => f.eval(&ctx).map_or(true, |v| v.is_true()),
            None => true,
        };
        let mut key = Vec::new();
        let mut ok = true;
        if let Body::Aggregate(plan) = &self.query.body {
            for k in &plan.keys {
                match k.eval(&ctx) {
                    Ok(v) => encode::value(&mut key, &v),
                    Err(_) => ok = false,
                }
            }
        }
        Routing {
            time,
            passes,
            key_hash: ok.then(|| encode::hash(&key)),
        }
    }

    /// Another record of source `partition` had event time `t`: the watermark moves
    /// as if this operator had read it (windows it closes are appended to `out`).
    pub fn observe(&mut self, partition: i32, t: i64, out: &mut Vec<Row>) {
        if let Some(w) = &mut self.watermark {
            w.observe(partition, t);
            self.close(out);
        }
    }

    /// Source `partition` was declared idle: it stops holding the watermark back
    /// until it delivers again (windows this closes are appended to `out`).
    pub fn idle(&mut self, partition: i32, out: &mut Vec<Row>) {
        if let Some(w) = &mut self.watermark {
            w.idle(partition);
            self.close(out);
        }
    }

    /// Emits due EMIT CHANGES rows (`now_ms`, the wall clock, paces them; it decides
    /// nothing else).
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Row>) {
        self.close(out);
        self.op.on_tick(now_ms, self.settings.emit_interval_ms, out);
    }

    fn close(&mut self, out: &mut Vec<Row>) {
        if let Some(wm) = self.watermark() {
            self.op.on_watermark(wm, out);
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![SNAPSHOT_VERSION];
        if let Some(w) = &self.watermark {
            w.encode(&mut out);
        }
        self.op.snapshot(&mut out);
        out
    }

    /// Replaces the state with a snapshot's; never panics on garbage.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(format!("snapshot: unknown version {version}"));
        }
        let watermark = match &self.watermark {
            Some(w) => Some(Watermark::decode(&mut r, version, w.lateness)?),
            None => None,
        };
        self.op.restore(
            &mut r,
            version,
            watermark.as_ref().and_then(Watermark::current),
        )?;
        if !r.done() {
            return Err("snapshot: trailing bytes".into());
        }
        if watermark.is_some() {
            self.watermark = watermark;
        }
        Ok(())
    }
}

/// Event times a query accepts, epoch ms: ±100,000,000 days, the range of an
/// ECMAScript `Date`. Window arithmetic adds and subtracts sizes and lateness (each
/// under 9e15 ms, `sql::parse::parse_duration`), which cannot overflow an i64 within
/// it; a record outside it goes to the dead-letter topic.
pub const MAX_EVENT_TIME_MS: i64 = 8_640_000_000_000_000;

/// The record's event time, epoch ms.
fn event_time(source: &EventTime, input: &Input<'_>) -> Result<i64, Error> {
    let t = match source {
        EventTime::RecordTimestamp => input.timestamp,
        EventTime::Column(expr) => column_time(expr, input)?,
    };
    if !(-MAX_EVENT_TIME_MS..=MAX_EVENT_TIME_MS).contains(&t) {
        return Err(Error::Rejected(format!(
            "event time {t} is out of range: epoch milliseconds within ±{MAX_EVENT_TIME_MS} (±100,000,000 days)"
        )));
    }
    Ok(t)
}

fn column_time(expr: &sql::expr::Expr, input: &Input<'_>) -> Result<i64, Error> {
    let bad = |what: String| {
        Error::Rejected(format!(
            "event time column: expected epoch milliseconds or an ISO-8601 string, got {what}"
        ))
    };
    match expr
        .eval(&Context::Input(input))
        .map_err(|e| bad(e.to_string()))?
    {
        Value::Int(ms) | Value::Timestamp(ms) => Ok(ms),
        Value::Float(f) if f.is_finite() && f.abs() < 9.0e15 => Ok(f as i64),
        Value::Str(s) => sql::time::parse_iso8601(&s).ok_or_else(|| bad(format!("{s:?}"))),
        other => Err(bad(accumulate::describe(&other))),
    }
}

/// A JSON object with the fields in the given order.
fn json_object<'a>(fields: impl Iterator<Item = (&'a str, &'a Value)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(b'{');
    for (i, (name, value)) in fields.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut out, name);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, &value.to_json());
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests;
