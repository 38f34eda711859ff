//! SESSION windows: per key, a record opens `[t, t + gap)` and merges every session
//! of its key that overlaps it into one. A session closes when the watermark
//! reaches its end; a record is late when `t + gap <= watermark`.
//!
//! State encoding: the groups section of [`Groups::encode`], one group per open
//! session, id = key bytes + start; the closing order and each key's sessions are
//! rebuilt from it.

use sql::expr::Input;
use sql::plan::Aggregate;

use super::encode::Reader;
use super::group::{merge_into, pop_closed, split_window_id, window_id, Closing, Group, Groups};
use super::{Error, Fate, Map, Operator, Row, MAX_EVENT_TIME_MS};

pub(super) struct Sessions {
    groups: Groups,
    gap: i64,
    /// (end, start, key bytes) of every open session, to close in order.
    closing: Closing,
    /// The starts of each key's open sessions.
    starts: Map<Vec<u8>, Vec<i64>>,
}

impl Sessions {
    pub fn new(plan: &Aggregate, gap: i64) -> Sessions {
        Sessions {
            groups: Groups::new(plan),
            gap,
            closing: Closing::new(),
            starts: Map::default(),
        }
    }

    fn remove(&mut self, key_bytes: &[u8], start: i64) -> Option<Group> {
        let group = self.groups.take(&window_id(key_bytes, start))?;
        self.closing
            .remove(&(group.end, group.start, key_bytes.to_vec()));
        if let Some(starts) = self.starts.get_mut(key_bytes) {
            starts.retain(|s| *s != group.start);
            if starts.is_empty() {
                self.starts.remove(key_bytes);
            }
        }
        Some(group)
    }
}

impl Operator for Sessions {
    fn process(
        &mut self,
        input: &Input<'_>,
        t: i64,
        watermark: Option<i64>,
        _out: &mut Vec<Row>,
    ) -> Result<Fate, Error> {
        let e = self.groups.evaluate(input)?;
        let end = t.saturating_add(self.gap);
        if watermark.is_some_and(|wm| end <= wm) {
            return Ok(Fate::Late);
        }
        let keys = self.groups.keys_of(&e, input);
        let key_bytes = e.key_bytes;
        let overlapping: Vec<i64> = self
            .starts
            .get(&key_bytes)
            .map(|starts| {
                starts
                    .iter()
                    .copied()
                    .filter(|&s| {
                        self.groups
                            .map
                            .get(&window_id(&key_bytes, s))
                            .is_some_and(|g| t < g.end && end > g.start)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if self.groups.has_min_max() {
            for &s in &overlapping {
                let id = window_id(&key_bytes, s);
                self.groups.check(self.groups.map.get(&id), &e.args)?;
            }
        }
        // Merge the overlapping sessions into one.
        let (mut start, mut stop) = (t, end);
        let mut merged = None;
        for s in overlapping {
            if let Some(old) = self.remove(&key_bytes, s) {
                start = start.min(old.start);
                stop = stop.max(old.end);
                merge_into(&mut merged, Some(old));
            }
        }
        let session = match merged {
            Some(mut m) => {
                self.groups.add(&mut m, &e.args);
                m.keys = keys;
                m.start = start;
                m.end = stop;
                m
            }
            None => self.groups.new_group(keys, start, stop, &e.args),
        };
        let id = window_id(&key_bytes, start);
        self.groups.mark(&id);
        self.groups.insert(id, session);
        self.starts
            .entry(key_bytes.clone())
            .or_default()
            .push(start);
        self.closing.insert((stop, start, key_bytes));
        Ok(Fate::Done)
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Vec<Row>) {
        while let Some((start, key_bytes)) = pop_closed(&mut self.closing, watermark) {
            if let Some(group) = self.remove(&key_bytes, start) {
                if let Some(row) = self.groups.row(&group, true, true) {
                    out.push(row);
                }
            }
        }
    }

    fn on_tick(&mut self, now_ms: i64, interval_ms: i64, out: &mut Vec<Row>) {
        self.groups.emit_held(now_ms, interval_ms, true, out);
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        Groups::encode(out, &self.groups.map);
    }

    fn restore(
        &mut self,
        r: &mut Reader<'_>,
        _version: u8,
        _wm: Option<i64>,
    ) -> Result<(), String> {
        let mut restored = Sessions::new(&self.groups.plan, self.gap);
        let (closing, starts) = (&mut restored.closing, &mut restored.starts);
        restored.groups.decode(r, |g, id, group| {
            let (key_bytes, start) = split_window_id(&id).ok_or("snapshot: bad window id")?;
            if start != group.start
                || !(-MAX_EVENT_TIME_MS..=MAX_EVENT_TIME_MS).contains(&start)
                || group.end < start
            {
                return Err("snapshot: bad session bounds".into());
            }
            closing.insert((group.end, start, key_bytes.to_vec()));
            starts.entry(key_bytes.to_vec()).or_default().push(start);
            g.map.insert(id, group);
            Ok(())
        })?;
        *self = restored;
        Ok(())
    }

    fn state_bytes(&self) -> i64 {
        self.groups.bytes
    }
}
