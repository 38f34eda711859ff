//! What the grouped operators ([`super::aggregate`], [`super::window`],
//! [`super::session`]) share: their groups and what they hold, a record evaluated
//! before anything changes, the pacing of EMIT CHANGES, output rows, and a group's
//! snapshot form. Nothing here knows about windows beyond a group's bounds.

use std::borrow::Cow;

use sql::expr::{Context, Input};
use sql::plan::{AggCall, AggFunc, Aggregate, Emit};
use sql::Value;

use super::accumulate::Acc;
use super::encode::{self, Reader};
use super::{json_object, Error, Map, Row, Set};

/// One group: its key values, its bounds (a window, a slice of one, or a session;
/// `i64::MIN..i64::MAX` without a window) and one accumulator per aggregate call.
#[derive(Clone)]
pub(super) struct Group {
    pub keys: Vec<Value>,
    pub start: i64,
    pub end: i64,
    pub accs: Vec<Acc>,
}

/// Bytes a group costs beyond its id and accumulators (the map entry, the vectors).
const GROUP_OVERHEAD: i64 = 96;

/// The arguments of a record's aggregate calls: `None` when a call's FILTER drops
/// it, `Some(None)` for COUNT(*).
pub(super) type Args = Vec<Option<Option<Value>>>;

/// A record evaluated in full before any state changes. Its buffers are reused from
/// record to record ([`Groups::recycle`]).
#[derive(Default)]
pub(super) struct Evaluated {
    /// Empty when every key is a JSON field read straight into `key_bytes`: a
    /// group's keys are built only when a new group needs them ([`Groups::keys_of`]).
    pub keys: Vec<Value>,
    /// The keys' canonical bytes: the start of every group id.
    pub key_bytes: Vec<u8>,
    pub args: Args,
}

/// The groups of a grouped operator, by id: key bytes, then for windows an 8-byte
/// start.
pub(super) struct Groups {
    pub plan: Aggregate,
    pub map: Map<Vec<u8>, Group>,
    /// Ids of the rows EMIT CHANGES owes since it last emitted.
    pub dirty: Set<Vec<u8>>,
    last_emit: Option<i64>,
    /// Approximate bytes held, for `max-state-bytes`.
    pub bytes: i64,
    min_max: bool,
    scratch: Vec<u8>,
    /// A reusable buffer for ids.
    pub id: Vec<u8>,
    /// The buffers of the last record's [`Evaluated`], for the next.
    spare: Evaluated,
    /// Every GROUP BY key is a JSON field of the record.
    field_keys: bool,
}

impl Groups {
    pub fn new(plan: &Aggregate) -> Groups {
        let min_max = |c: &AggCall| matches!(c.func, AggFunc::Min | AggFunc::Max);
        Groups {
            plan: plan.clone(),
            map: Map::default(),
            dirty: Set::default(),
            last_emit: None,
            bytes: 0,
            min_max: plan.aggregates.iter().any(min_max),
            scratch: Vec::new(),
            id: Vec::new(),
            spare: Evaluated::default(),
            field_keys: plan
                .keys
                .iter()
                .all(|k| matches!(k, sql::expr::Expr::Field(_))),
        }
    }

    /// The group keys and aggregate arguments of a record (in the buffers of the last
    /// record [`Groups::recycle`]d, if any).
    pub fn evaluate(&mut self, input: &Input<'_>) -> Result<Evaluated, Error> {
        let ctx = Context::Input(input);
        let mut e = std::mem::take(&mut self.spare);
        e.keys.clear();
        e.key_bytes.clear();
        if self.field_keys {
            for k in &self.plan.keys {
                if let sql::expr::Expr::Field(path) = k {
                    encode::json(&mut e.key_bytes, input.field(path));
                }
            }
        } else {
            for k in &self.plan.keys {
                let key = k
                    .eval(&ctx)
                    .map_err(|e| Error::Rejected(format!("GROUP BY: {e}")))?;
                encode::value(&mut e.key_bytes, &key);
                e.keys.push(key);
            }
        }
        e.args.clear();
        for call in &self.plan.aggregates {
            e.args.push(eval_call(call, &ctx)?);
        }
        Ok(e)
    }

    /// A record's key values, for a new group: evaluated now when [`Self::evaluate`]
    /// read them straight into bytes.
    pub fn keys_of(&self, e: &Evaluated, input: &Input<'_>) -> Vec<Value> {
        if !self.field_keys {
            return e.keys.clone();
        }
        self.plan
            .keys
            .iter()
            .map(|k| match k {
                sql::expr::Expr::Field(path) => {
                    input.field(path).map_or(Value::Null, Value::from_json)
                }
                _ => unreachable!("field_keys: every key is a field"),
            })
            .collect()
    }

    /// Gives back a record's [`Evaluated`] once done with it: the next record's
    /// evaluation reuses its buffers.
    pub fn recycle(&mut self, e: Evaluated) {
        self.spare = e;
    }

    /// Sets `self.id` to the id of the window or slice of `key_bytes` at `start`.
    pub fn set_id(&mut self, key_bytes: &[u8], start: i64) {
        self.id.clear();
        self.id.extend_from_slice(key_bytes);
        self.id.extend_from_slice(&start.to_be_bytes());
    }

    /// Whether the query has MIN or MAX, the only calls that can refuse a value for
    /// what a group holds already.
    pub fn has_min_max(&self) -> bool {
        self.min_max
    }

    /// MIN/MAX type checks against an existing group.
    pub fn check(
        &self,
        group: Option<&Group>,
        args: &[Option<Option<Value>>],
    ) -> Result<(), Error> {
        if let Some(group) = group {
            for (acc, arg) in group.accs.iter().zip(args) {
                if let Some(Some(v)) = arg {
                    acc.check_against(v).map_err(Error::Rejected)?;
                }
            }
        }
        Ok(())
    }

    /// A new group with a record's values (its bytes count once it is inserted).
    pub fn new_group(
        &mut self,
        keys: Vec<Value>,
        start: i64,
        end: i64,
        args: &[Option<Option<Value>>],
    ) -> Group {
        let mut group = Group {
            keys,
            start,
            end,
            accs: self
                .plan
                .aggregates
                .iter()
                .map(|c| Acc::new(c.func))
                .collect(),
        };
        apply(&mut self.scratch, &mut group, args);
        group
    }

    /// Adds a record's values to a group held outside the map.
    pub fn add(&mut self, group: &mut Group, args: &[Option<Option<Value>>]) {
        apply(&mut self.scratch, group, args);
    }

    /// Adds a record (`e`, evaluated from `input`) to the group `id`, creating it;
    /// true when it is new.
    pub fn upsert(
        &mut self,
        id: &[u8],
        e: &Evaluated,
        input: &Input<'_>,
        start: i64,
        end: i64,
    ) -> bool {
        // One lookup for a group that exists, the common case.
        if let Some(group) = self.map.get_mut(id) {
            self.bytes += apply(&mut self.scratch, group, &e.args);
            return false;
        }
        let keys = self.keys_of(e, input);
        let group = self.new_group(keys, start, end, &e.args);
        self.insert(id.to_vec(), group);
        true
    }

    /// Adds a whole group, counting its bytes.
    pub fn insert(&mut self, id: Vec<u8>, group: Group) {
        self.bytes += group_bytes(&id, &group);
        self.map.insert(id, group);
    }

    /// Removes a group (and what EMIT CHANGES owed it).
    pub fn take(&mut self, id: &[u8]) -> Option<Group> {
        let group = self.map.remove(id)?;
        self.dirty.remove(id);
        self.bytes -= group_bytes(id, &group);
        Some(group)
    }

    /// EMIT CHANGES owes the row of `id`.
    pub fn mark(&mut self, id: &[u8]) {
        if self.plan.emit == Emit::Changes && !self.dirty.contains(id) {
            self.dirty.insert(id.to_vec());
        }
    }

    /// EMIT CHANGES: the ids whose rows are due, in order, when the interval has
    /// passed since the last emission (`now_ms`, the wall clock, paces it and decides
    /// nothing else).
    pub fn due(&mut self, now_ms: i64, interval_ms: i64) -> Vec<Vec<u8>> {
        if self.plan.emit != Emit::Changes
            || self.dirty.is_empty()
            || self
                .last_emit
                .is_some_and(|last| now_ms - last < interval_ms)
        {
            return Vec::new();
        }
        self.last_emit = Some(now_ms);
        let mut ids: Vec<Vec<u8>> = self.dirty.drain().collect();
        ids.sort();
        ids
    }

    /// The output row of a group, if HAVING keeps it; `windowed` adds the bounds.
    pub fn row(&self, group: &Group, windowed: bool, is_final: bool) -> Option<Row> {
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

    /// The rows EMIT CHANGES owes, each from `current` (a group, or a window merged
    /// from its slices).
    pub fn emit<'a>(
        &'a self,
        ids: Vec<Vec<u8>>,
        windowed: bool,
        current: impl Fn(&[u8]) -> Option<Cow<'a, Group>>,
        out: &mut Vec<Row>,
    ) {
        for id in ids {
            if let Some(group) = current(&id) {
                if let Some(row) = self.row(&group, windowed, false) {
                    out.push(row);
                }
            }
        }
    }

    /// EMIT CHANGES for operators whose rows are their groups as held (no merge).
    pub fn emit_held(&mut self, now_ms: i64, interval_ms: i64, windowed: bool, out: &mut Vec<Row>) {
        let ids = self.due(now_ms, interval_ms);
        self.emit(ids, windowed, |id| self.map.get(id).map(Cow::Borrowed), out);
    }

    /// Writes a section of groups in id order (a snapshot's order is stable).
    pub fn encode(out: &mut Vec<u8>, groups: &Map<Vec<u8>, Group>) {
        let mut ids: Vec<&Vec<u8>> = groups.keys().collect();
        ids.sort();
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let group = &groups[id];
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
    }

    /// Reads a section [`Groups::encode`] wrote, checking it fits the query; each
    /// group goes to `place` (which says where, or refuses it), its bytes counted.
    pub fn decode(
        &mut self,
        r: &mut Reader<'_>,
        mut place: impl FnMut(&mut Groups, Vec<u8>, Group) -> Result<(), String>,
    ) -> Result<(), String> {
        let n = r.count()?;
        for _ in 0..n {
            let id = r.bytes()?.to_vec();
            let nk = r.count()?;
            if nk != self.plan.keys.len() {
                return Err("snapshot: group keys do not match the query".into());
            }
            let keys = (0..nk).map(|_| r.value()).collect::<Result<Vec<_>, _>>()?;
            let start = r.i64()?;
            let end = r.i64()?;
            let na = r.count()?;
            if na != self.plan.aggregates.len() {
                return Err("snapshot: aggregates do not match the query".into());
            }
            let accs = (0..na)
                .map(|_| Acc::decode(r))
                .collect::<Result<Vec<_>, _>>()?;
            let group = Group {
                keys,
                start,
                end,
                accs,
            };
            self.bytes += group_bytes(&id, &group);
            place(self, id, group)?;
        }
        Ok(())
    }
}

/// Adds a record's values to `group`; returns the change in bytes.
fn apply(scratch: &mut Vec<u8>, group: &mut Group, args: &[Option<Option<Value>>]) -> i64 {
    let mut delta = 0;
    for (acc, arg) in group.accs.iter_mut().zip(args) {
        if let Some(v) = arg {
            delta += acc.add(v.as_ref(), scratch);
        }
    }
    delta
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

/// The open windows (sessions) by (end, start, key bytes), to close in order.
pub(super) type Closing = std::collections::BTreeSet<(i64, i64, Vec<u8>)>;

/// The next window the watermark has closed: its start and key bytes.
pub(super) fn pop_closed(closing: &mut Closing, watermark: i64) -> Option<(i64, Vec<u8>)> {
    if closing.first()?.0 > watermark {
        return None;
    }
    closing
        .pop_first()
        .map(|(_, start, key_bytes)| (start, key_bytes))
}

/// Folds `part` into `window` (the first part becomes the window).
pub(super) fn merge_into(window: &mut Option<Group>, part: Option<Group>) {
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

/// Approximate bytes a group holds.
pub(super) fn group_bytes(id: &[u8], group: &Group) -> i64 {
    GROUP_OVERHEAD + 2 * id.len() as i64 + group.accs.iter().map(Acc::size).sum::<i64>()
}

/// The id of the window (or slice, or session) of `key_bytes` starting at `start`.
pub(super) fn window_id(key_bytes: &[u8], start: i64) -> Vec<u8> {
    let mut id = Vec::with_capacity(key_bytes.len() + 8);
    id.extend_from_slice(key_bytes);
    id.extend_from_slice(&start.to_be_bytes());
    id
}

/// A window id's key bytes and start.
pub(super) fn split_window_id(id: &[u8]) -> Option<(&[u8], i64)> {
    let at = id.len().checked_sub(8)?;
    let start = i64::from_be_bytes(id[at..].try_into().ok()?);
    Some((&id[..at], start))
}
