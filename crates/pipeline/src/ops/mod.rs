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

mod accumulate;
pub(crate) mod encode;
mod watermark;

use std::collections::BTreeSet;

use sql::expr::{Context, Input};
use sql::plan::{
    AggCall, AggFunc, Aggregate, Body, Emit, EventTime, Projection, Query, Settings, Window,
};
use sql::Value;

use accumulate::Acc;
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

/// Runs one query.
pub struct QueryOperator {
    query: Query,
    settings: Settings,
    agg: Option<Grouped>,
}

/// The state of a grouped query.
struct Grouped {
    plan: Aggregate,
    /// Open groups by id: key bytes, then for windows an 8-byte start. Tumbling and
    /// hopping windows hold one group per slice of `slide` ms (a tumbling window is
    /// its own slice), and a window's value is its slices' merged when it closes (as
    /// Flink's sliced windows do): a record updates one group, not `size / slide`.
    /// Sessions hold one group per session.
    groups: Map<Vec<u8>, Group>,
    /// Hopping windows restored from a version 2 snapshot, which held whole windows:
    /// each is merged into its window's value with the slices of later records.
    legacy: Map<Vec<u8>, Group>,
    /// Windowed: (end, start, key bytes) of every open window, to close in order.
    closing: BTreeSet<(i64, i64, Vec<u8>)>,
    /// Sessions: the starts of each key's open sessions.
    sessions: Map<Vec<u8>, Vec<i64>>,
    /// Ids changed since the last EMIT CHANGES.
    dirty: Set<Vec<u8>>,
    last_emit: Option<i64>,
    watermark: Watermark,
    bytes: i64,
    scratch: Vec<u8>,
    id: Vec<u8>,
}

#[derive(Clone)]
struct Group {
    keys: Vec<Value>,
    start: i64,
    end: i64,
    accs: Vec<Acc>,
}

const GROUP_OVERHEAD: i64 = 96;

/// The operators' snapshot format: 2 added each source partition's idle flag; 3 holds
/// a hopping window's slices instead of its windows, then the whole windows restored
/// from a version 2 snapshot that are still open (the operator reads 1 and 2 too).
const SNAPSHOT_VERSION: u8 = 3;

impl QueryOperator {
    pub fn new(query: &Query, settings: &Settings) -> Self {
        let agg = match &query.body {
            Body::Aggregate(plan) => Some(Grouped {
                plan: plan.clone(),
                groups: Map::default(),
                legacy: Map::default(),
                closing: BTreeSet::new(),
                sessions: Map::default(),
                dirty: Set::default(),
                last_emit: None,
                watermark: Watermark::new(settings.allowed_lateness_ms),
                bytes: 0,
                scratch: Vec::new(),
                id: Vec::new(),
            }),
            Body::Map(_) => None,
        };
        QueryOperator {
            query: query.clone(),
            settings: settings.clone(),
            agg,
        }
    }

    /// The source partitions this operator is fed.
    pub fn assign(&mut self, partitions: &[i32]) {
        if let Some(g) = &mut self.agg {
            g.watermark.assign(partitions);
        }
    }

    pub fn watermark(&self) -> Option<i64> {
        self.agg.as_ref().and_then(|g| g.watermark.current())
    }

    /// Approximate bytes of state held.
    pub fn state_bytes(&self) -> u64 {
        self.agg.as_ref().map_or(0, |g| g.bytes.max(0) as u64)
    }

    /// One input record. Appends output rows to `out`.
    pub fn process(&mut self, input: &Input<'_>, out: &mut Vec<Row>) -> Result<Fate, Error> {
        let ctx = Context::Input(input);
        let Some(g) = &mut self.agg else {
            return self.map(input, out).map(|()| Fate::Done);
        };
        let t = event_time(&self.query.source.event_time, input)?;
        let passes = match &self.query.filter {
            Some(f) => f
                .eval(&ctx)
                .map_err(|e| Error::Rejected(format!("WHERE: {e}")))?
                .is_true(),
            None => true,
        };
        if !passes {
            g.observe(input.partition, t, out);
            return Ok(Fate::Done);
        }
        // Everything evaluated before anything changes.
        let keys = g
            .plan
            .keys
            .iter()
            .map(|k| k.eval(&ctx))
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|e| Error::Rejected(format!("GROUP BY: {e}")))?;
        let mut args: Vec<Option<Option<Value>>> = Vec::with_capacity(g.plan.aggregates.len());
        for call in &g.plan.aggregates {
            args.push(eval_call(call, &ctx)?);
        }
        let key_bytes = {
            g.scratch.clear();
            for k in &keys {
                encode::value(&mut g.scratch, k);
            }
            g.scratch.clone()
        };
        let late = match g.plan.window {
            None => false,
            Some(w) => match g.watermark.current() {
                None => false,
                Some(wm) => match w {
                    Window::Tumble { size_ms } => t - t.rem_euclid(size_ms) + size_ms <= wm,
                    Window::Hop { slide_ms, size_ms } => {
                        first_hop_start(t, slide_ms, size_ms) + size_ms <= wm
                    }
                    Window::Session { gap_ms } => t.saturating_add(gap_ms) <= wm,
                },
            },
        };
        if late {
            g.watermark.touch(input.partition);
            return Ok(Fate::Late);
        }
        g.add(&keys, key_bytes, t, &args)?;
        g.observe(input.partition, t, out);
        let used = g.bytes.max(0) as u64;
        if used > self.settings.max_state_bytes {
            return Err(Error::StateLimit {
                used,
                limit: self.settings.max_state_bytes,
            });
        }
        Ok(Fate::Done)
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
        if let Some(g) = &self.agg {
            for k in &g.plan.keys {
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
        if let Some(g) = &mut self.agg {
            g.observe(partition, t, out);
        }
    }

    /// Source `partition` was declared idle: it stops holding the watermark back
    /// until it delivers again (windows this closes are appended to `out`).
    pub fn idle(&mut self, partition: i32, out: &mut Vec<Row>) {
        if let Some(g) = &mut self.agg {
            g.watermark.idle(partition);
            g.close(out);
        }
    }

    /// Emits due EMIT CHANGES rows (`now_ms`, the wall clock, paces them; it decides
    /// nothing else).
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Row>) {
        let interval = self.settings.emit_interval_ms;
        if let Some(g) = &mut self.agg {
            g.close(out);
            if g.plan.emit == Emit::Changes
                && !g.dirty.is_empty()
                && g.last_emit.is_none_or(|last| now_ms - last >= interval)
            {
                g.last_emit = Some(now_ms);
                let mut ids: Vec<Vec<u8>> = g.dirty.drain().collect();
                ids.sort();
                for id in ids {
                    if let Some(group) = g.current(&id) {
                        if let Some(row) = g.row(&group, false) {
                            out.push(row);
                        }
                    }
                }
            }
        }
    }

    fn map(&self, input: &Input<'_>, out: &mut Vec<Row>) -> Result<(), Error> {
        let ctx = Context::Input(input);
        if let Some(f) = &self.query.filter {
            if !f
                .eval(&ctx)
                .map_err(|e| Error::Rejected(format!("WHERE: {e}")))?
                .is_true()
            {
                return Ok(());
            }
        }
        let value = match &self.query.body {
            Body::Map(Projection::Columns(columns)) => {
                let mut values = Vec::with_capacity(columns.len());
                for (name, expr) in columns {
                    let v = expr
                        .eval(&ctx)
                        .map_err(|e| Error::Rejected(format!("{name}: {e}")))?;
                    values.push(v);
                }
                json_object(columns.iter().map(|(n, _)| n.as_str()).zip(values.iter()))
            }
            _ => input.raw.to_vec(),
        };
        out.push(Row {
            key: input.key.map(<[u8]>::to_vec),
            value,
            window: None,
            is_final: false,
            error: None,
        });
        Ok(())
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![SNAPSHOT_VERSION];
        let Some(g) = &self.agg else {
            return out;
        };
        g.watermark.encode(&mut out);
        for groups in [&g.groups, &g.legacy] {
            let mut ids: Vec<&Vec<u8>> = groups.keys().collect();
            ids.sort();
            out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
            for id in ids {
                encode_group(&mut out, id, &groups[id]);
            }
        }
        out
    }

    /// Replaces the state with a snapshot's; never panics on garbage.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(format!("snapshot: unknown version {version}"));
        }
        let Some(g) = &mut self.agg else {
            return if r.done() {
                Ok(())
            } else {
                Err("snapshot: trailing bytes".into())
            };
        };
        let watermark = Watermark::decode(&mut r, version, g.watermark.lateness)?;
        let wm = watermark.current();
        let mut groups = Map::default();
        let mut legacy = Map::default();
        let mut closing = BTreeSet::new();
        let mut sessions: Map<Vec<u8>, Vec<i64>> = Map::default();
        let mut bytes_used = 0i64;
        // Version 2 held a hopping window's windows, 3 its slices then the windows
        // restored from a 2 still open.
        let hop =
            matches!(g.plan.window, Some(Window::Hop { slide_ms, size_ms }) if slide_ms != size_ms);
        let sections = if version >= 3 { 2 } else { 1 };
        for section in 0..sections {
            let whole_windows = hop && (version <= 2 || section == 1);
            let n = r.count()?;
            for _ in 0..n {
                let (id, group) = decode_group(&mut r, &g.plan)?;
                bytes_used += group_bytes(&id, &group);
                let into = match g.plan.window {
                    None => &mut groups,
                    Some(window) => {
                        let (key_bytes, start) =
                            split_window_id(&id).ok_or("snapshot: bad window id")?;
                        if start != group.start
                            || !(-MAX_EVENT_TIME_MS..=MAX_EVENT_TIME_MS).contains(&group.start)
                        {
                            return Err("snapshot: bad window start".into());
                        }
                        match window {
                            Window::Session { .. } => {
                                closing.insert((group.end, start, key_bytes.to_vec()));
                                sessions.entry(key_bytes.to_vec()).or_default().push(start);
                                &mut groups
                            }
                            Window::Tumble { size_ms } | Window::Hop { size_ms, .. } => {
                                let slide = g.slide();
                                let len = if whole_windows { size_ms } else { slide };
                                if start.rem_euclid(slide) != 0 || group.end != start + len {
                                    return Err("snapshot: bad window bounds".into());
                                }
                                if whole_windows {
                                    closing.insert((group.end, start, key_bytes.to_vec()));
                                    &mut legacy
                                } else {
                                    // The windows of the slice not closed yet.
                                    for s in hop_starts(start, slide, size_ms) {
                                        if wm.is_none_or(|w| s + size_ms > w) {
                                            closing.insert((s + size_ms, s, key_bytes.to_vec()));
                                        }
                                    }
                                    &mut groups
                                }
                            }
                        }
                    }
                };
                into.insert(id, group);
            }
        }
        if !r.done() {
            return Err("snapshot: trailing bytes".into());
        }
        g.watermark = watermark;
        g.groups = groups;
        g.legacy = legacy;
        g.closing = closing;
        g.sessions = sessions;
        g.dirty.clear();
        g.bytes = bytes_used;
        Ok(())
    }
}

/// One group of a snapshot: its id, keys, bounds and accumulators.
fn encode_group(out: &mut Vec<u8>, id: &[u8], group: &Group) {
    encode::bytes(out, id);
    out.extend_from_slice(&(group.keys.len() as u32).to_be_bytes());
    for k in &group.keys {
        encode::value(out, k);
    }
    encode::i64(out, group.start);
    encode::i64(out, group.end);
    out.extend_from_slice(&(group.accs.len() as u32).to_be_bytes());
    for acc in &group.accs {
        acc.encode(out);
    }
}

fn decode_group(r: &mut Reader<'_>, plan: &Aggregate) -> Result<(Vec<u8>, Group), String> {
    let id = r.bytes()?.to_vec();
    let nk = r.count()?;
    if nk != plan.keys.len() {
        return Err("snapshot: group keys do not match the query".into());
    }
    let keys = (0..nk).map(|_| r.value()).collect::<Result<Vec<_>, _>>()?;
    let start = r.i64()?;
    let end = r.i64()?;
    let na = r.count()?;
    if na != plan.aggregates.len() {
        return Err("snapshot: aggregates do not match the query".into());
    }
    let accs = (0..na)
        .map(|_| Acc::decode(r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        id,
        Group {
            keys,
            start,
            end,
            accs,
        },
    ))
}

/// Evaluates one aggregate call's FILTER and argument: `None` when the FILTER drops
/// the row, `Some(None)` for COUNT(*).
fn eval_call(call: &AggCall, ctx: &Context<'_>) -> Result<Option<Option<Value>>, Error> {
    if let Some(f) = &call.filter {
        if !f
            .eval(ctx)
            .map_err(|e| Error::Rejected(format!("FILTER: {e}")))?
            .is_true()
        {
            return Ok(None);
        }
    }
    match &call.arg {
        None => Ok(Some(None)),
        Some(arg) => {
            let v = arg.eval(ctx).map_err(|e| Error::Rejected(e.to_string()))?;
            Acc::check(call.func, &v).map_err(Error::Rejected)?;
            Ok(Some(Some(v)))
        }
    }
}

/// The earliest hop window start containing `t` (epoch-aligned): the first multiple
/// of `slide` above `t - size`.
fn first_hop_start(t: i64, slide: i64, size: i64) -> i64 {
    (t - size).div_euclid(slide) * slide + slide
}

/// Every hop window start containing `t`, ascending.
fn hop_starts(t: i64, slide: i64, size: i64) -> impl Iterator<Item = i64> {
    let first = first_hop_start(t, slide, size);
    let last = t - t.rem_euclid(slide);
    (0..)
        .map(move |i| first + i * slide)
        .take_while(move |s| *s <= last)
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

impl Grouped {
    /// Adds an evaluated record to its groups (windows).
    fn add(
        &mut self,
        keys: &[Value],
        key_bytes: Vec<u8>,
        t: i64,
        args: &[Option<Option<Value>>],
    ) -> Result<(), Error> {
        match self.plan.window {
            None => {
                let id = key_bytes;
                if self.has_min_max() {
                    self.check(self.groups.get(&id), args)?;
                }
                self.upsert(&id, keys, i64::MIN, i64::MAX, args);
                if self.plan.emit == Emit::Changes && !self.dirty.contains(&id) {
                    self.dirty.insert(id);
                }
            }
            Some(Window::Tumble { size_ms } | Window::Hop { size_ms, .. }) => {
                let slide = self.slide();
                let slice = t - t.rem_euclid(slide);
                // MIN/MAX refuse a value another slice of one of its windows (or a
                // restored whole window) cannot compare with: the slices from the
                // first window's start to the last window's end.
                if self.has_min_max() {
                    let mut s = slice - size_ms + slide;
                    while s < slice + size_ms {
                        self.set_id(&key_bytes, s);
                        self.check(self.groups.get(&self.id), args)?;
                        s += slide;
                    }
                    for start in hop_starts(t, slide, size_ms) {
                        self.set_id(&key_bytes, start);
                        self.check(self.legacy.get(&self.id), args)?;
                    }
                }
                self.set_id(&key_bytes, slice);
                let id = std::mem::take(&mut self.id);
                self.upsert(&id, keys, slice, slice + slide, args);
                self.id = id;
                if self.plan.emit == Emit::Changes {
                    for start in hop_starts(t, slide, size_ms) {
                        self.set_id(&key_bytes, start);
                        if !self.dirty.contains(&self.id) {
                            self.dirty.insert(self.id.clone());
                        }
                    }
                }
            }
            Some(Window::Session { gap_ms }) => {
                let end = t.saturating_add(gap_ms);
                let overlapping: Vec<i64> = self
                    .sessions
                    .get(&key_bytes)
                    .map(|starts| {
                        starts
                            .iter()
                            .copied()
                            .filter(|&s| {
                                let id = window_id(&key_bytes, s);
                                self.groups
                                    .get(&id)
                                    .is_some_and(|g| t < g.end && end > g.start)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if self.has_min_max() {
                    for &s in &overlapping {
                        self.check(self.groups.get(&window_id(&key_bytes, s)), args)?;
                    }
                }
                // Merge the overlapping sessions into one.
                let (mut start, mut stop) = (t, end);
                let mut accs: Vec<Acc> = self
                    .plan
                    .aggregates
                    .iter()
                    .map(|c| Acc::new(c.func))
                    .collect();
                for s in overlapping {
                    let id = window_id(&key_bytes, s);
                    if let Some(old) = self.remove(&id) {
                        start = start.min(old.start);
                        stop = stop.max(old.end);
                        for (a, o) in accs.iter_mut().zip(old.accs) {
                            self.bytes += a.merge(o);
                        }
                    }
                }
                let id = window_id(&key_bytes, start);
                self.bytes += GROUP_OVERHEAD + 2 * id.len() as i64;
                self.sessions
                    .entry(key_bytes.clone())
                    .or_default()
                    .push(start);
                self.closing.insert((stop, start, key_bytes));
                self.groups.insert(
                    id.clone(),
                    Group {
                        keys: keys.to_vec(),
                        start,
                        end: stop,
                        accs,
                    },
                );
                let group = self.groups.get_mut(&id).expect("just inserted");
                for (acc, arg) in group.accs.iter_mut().zip(args) {
                    if let Some(v) = arg {
                        self.bytes += acc.add(v.as_ref(), &mut self.scratch);
                    }
                }
                if self.plan.emit == Emit::Changes {
                    self.dirty.insert(id);
                }
            }
        }
        Ok(())
    }

    fn set_id(&mut self, key_bytes: &[u8], start: i64) {
        self.id.clear();
        self.id.extend_from_slice(key_bytes);
        self.id.extend_from_slice(&start.to_be_bytes());
    }

    /// Tumbling and hopping windows: the length of a slice (a tumbling window is one
    /// slice; a hopping window's size is a multiple of its slide, checked at creation).
    fn slide(&self) -> i64 {
        match self.plan.window {
            Some(Window::Tumble { size_ms }) => size_ms,
            Some(Window::Hop { slide_ms, .. }) => slide_ms,
            _ => unreachable!("slices are for tumbling and hopping windows"),
        }
    }

    /// Only MIN and MAX can refuse a value for what a group holds already.
    fn has_min_max(&self) -> bool {
        let min_max = |c: &AggCall| matches!(c.func, AggFunc::Min | AggFunc::Max);
        self.plan.aggregates.iter().any(min_max)
    }

    /// MIN/MAX type checks against an existing group.
    fn check(&self, group: Option<&Group>, args: &[Option<Option<Value>>]) -> Result<(), Error> {
        if let Some(group) = group {
            for (acc, arg) in group.accs.iter().zip(args) {
                if let Some(Some(v)) = arg {
                    acc.check_against(v).map_err(Error::Rejected)?;
                }
            }
        }
        Ok(())
    }

    /// Adds to a group (an unwindowed group or a slice), creating it, and for a
    /// slice the closing entries of the windows it is in, when new.
    fn upsert(
        &mut self,
        id: &[u8],
        keys: &[Value],
        start: i64,
        end: i64,
        args: &[Option<Option<Value>>],
    ) {
        // One lookup for a group that exists, the common case.
        if let Some(group) = self.groups.get_mut(id) {
            for (acc, arg) in group.accs.iter_mut().zip(args) {
                if let Some(v) = arg {
                    self.bytes += acc.add(v.as_ref(), &mut self.scratch);
                }
            }
        } else {
            self.bytes += GROUP_OVERHEAD + 2 * id.len() as i64;
            if let Some(Window::Tumble { size_ms } | Window::Hop { size_ms, .. }) = self.plan.window
            {
                let key_bytes = &id[..id.len() - 8];
                for s in hop_starts(start, self.slide(), size_ms) {
                    self.closing.insert((s + size_ms, s, key_bytes.to_vec()));
                }
            }
            let mut accs: Vec<Acc> = self
                .plan
                .aggregates
                .iter()
                .map(|c| Acc::new(c.func))
                .collect();
            for (acc, arg) in accs.iter_mut().zip(args) {
                if let Some(v) = arg {
                    self.bytes += acc.add(v.as_ref(), &mut self.scratch);
                }
            }
            self.groups.insert(
                id.to_vec(),
                Group {
                    keys: keys.to_vec(),
                    start,
                    end,
                    accs,
                },
            );
        }
    }

    fn remove(&mut self, id: &[u8]) -> Option<Group> {
        let group = self.groups.remove(id)?;
        let key_bytes = &id[..id.len().saturating_sub(8)];
        self.closing
            .remove(&(group.end, group.start, key_bytes.to_vec()));
        if let Some(starts) = self.sessions.get_mut(key_bytes) {
            starts.retain(|s| *s != group.start);
            if starts.is_empty() {
                self.sessions.remove(key_bytes);
            }
        }
        self.dirty.remove(id);
        self.bytes -= group_bytes(id, &group);
        Some(group)
    }

    /// Notes an event time from `partition`, then closes what the watermark passed.
    fn observe(&mut self, partition: i32, t: i64, out: &mut Vec<Row>) {
        self.watermark.observe(partition, t);
        self.close(out);
    }

    /// Emits and drops every window whose end the watermark reached, in order of
    /// (end, start, key).
    fn close(&mut self, out: &mut Vec<Row>) {
        let Some(wm) = self.watermark.current() else {
            return;
        };
        while self.closing.first().is_some_and(|(end, _, _)| *end <= wm) {
            let Some((_, start, key_bytes)) = self.closing.pop_first() else {
                break;
            };
            let group = match self.plan.window {
                Some(Window::Session { .. }) => self.remove(&window_id(&key_bytes, start)),
                _ => self.take_window(&key_bytes, start),
            };
            if let Some(group) = group {
                if let Some(row) = self.row(&group, true) {
                    out.push(row);
                }
            }
        }
    }

    /// A closing tumbling or hopping window's value: its restored whole window, if
    /// any, merged with its slices in order. The slices no later window contains
    /// (those before `start + slide`) are dropped.
    fn take_window(&mut self, key_bytes: &[u8], start: i64) -> Option<Group> {
        let id = window_id(key_bytes, start);
        self.dirty.remove(&id);
        let mut window = self.legacy.remove(&id).inspect(|g| {
            self.bytes -= group_bytes(&id, g);
        });
        for (i, slice) in self.slices(start).enumerate() {
            let id = window_id(key_bytes, slice);
            let part = if i == 0 {
                self.groups.remove(&id).inspect(|g| {
                    self.bytes -= group_bytes(&id, g);
                })
            } else {
                self.groups.get(&id).cloned()
            };
            merge_into(&mut window, part);
        }
        window.map(|mut w| {
            w.start = start;
            w.end = start + self.window_size();
            w
        })
    }

    /// The current value of an open window (EMIT CHANGES), by its id.
    fn current(&self, id: &[u8]) -> Option<std::borrow::Cow<'_, Group>> {
        use std::borrow::Cow;
        match self.plan.window {
            None | Some(Window::Session { .. }) => self.groups.get(id).map(Cow::Borrowed),
            Some(Window::Tumble { .. }) if self.legacy.is_empty() => {
                self.groups.get(id).map(Cow::Borrowed)
            }
            Some(_) => {
                let (key_bytes, start) = split_window_id(id)?;
                let mut window = self.legacy.get(id).cloned();
                for slice in self.slices(start) {
                    merge_into(
                        &mut window,
                        self.groups.get(&window_id(key_bytes, slice)).cloned(),
                    );
                }
                window.map(|mut w| {
                    w.start = start;
                    w.end = start + self.window_size();
                    Cow::Owned(w)
                })
            }
        }
    }

    /// The starts of the slices of the window starting at `start`.
    fn slices(&self, start: i64) -> impl Iterator<Item = i64> {
        let slide = self.slide();
        (0..self.window_size() / slide).map(move |i| start + i * slide)
    }

    fn window_size(&self) -> i64 {
        match self.plan.window {
            Some(Window::Tumble { size_ms } | Window::Hop { size_ms, .. }) => size_ms,
            _ => unreachable!("slices are for tumbling and hopping windows"),
        }
    }

    /// The output row of a group, if HAVING keeps it.
    fn row(&self, group: &Group, is_final: bool) -> Option<Row> {
        let windowed = self.plan.window.is_some();
        let mut slots: Vec<Value> = Vec::with_capacity(group.keys.len() + group.accs.len() + 2);
        slots.extend(group.keys.iter().cloned());
        slots.extend(group.accs.iter().map(Acc::result));
        if windowed {
            slots.push(Value::Timestamp(group.start));
            slots.push(Value::Timestamp(group.end));
        }
        let ctx = Context::Row(&slots);
        let mut error = None;
        if let Some(h) = &self.plan.having {
            match h.eval(&ctx) {
                Ok(v) if v.is_true() => {}
                Ok(_) => return None,
                Err(e) => error = Some(format!("HAVING: {e}")),
            }
        }
        let values: Vec<Value> = self
            .plan
            .columns
            .iter()
            .map(|(name, e)| {
                e.eval(&ctx).unwrap_or_else(|e| {
                    error.get_or_insert_with(|| format!("{name}: {e}"));
                    Value::Null
                })
            })
            .collect();
        let value = json_object(
            self.plan
                .columns
                .iter()
                .map(|(n, _)| n.as_str())
                .zip(values.iter()),
        );
        let mut key: Vec<serde_json::Value> = group.keys.iter().map(Value::to_json).collect();
        if windowed {
            key.push(serde_json::Value::from(group.start));
        }
        Some(Row {
            key: Some(serde_json::to_vec(&key).unwrap_or_default()),
            value,
            window: windowed.then_some((group.start, group.end)),
            is_final: is_final && windowed,
            error,
        })
    }
}

/// Folds `part` into `window` (the first part becomes the window).
fn merge_into(window: &mut Option<Group>, part: Option<Group>) {
    let Some(part) = part else { return };
    match window {
        None => *window = Some(part),
        Some(w) => {
            for (a, o) in w.accs.iter_mut().zip(part.accs) {
                a.merge(o);
            }
        }
    }
}

fn group_bytes(id: &[u8], group: &Group) -> i64 {
    GROUP_OVERHEAD + 2 * id.len() as i64 + group.accs.iter().map(Acc::size).sum::<i64>()
}

fn split_window_id(id: &[u8]) -> Option<(&[u8], i64)> {
    let at = id.len().checked_sub(8)?;
    let start = i64::from_be_bytes(id[at..].try_into().ok()?);
    Some((&id[..at], start))
}

fn window_id(key_bytes: &[u8], start: i64) -> Vec<u8> {
    let mut id = Vec::with_capacity(key_bytes.len() + 8);
    id.extend_from_slice(key_bytes);
    id.extend_from_slice(&start.to_be_bytes());
    id
}

#[cfg(test)]
mod tests;
