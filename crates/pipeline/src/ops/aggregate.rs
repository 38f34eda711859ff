//! GROUP BY without a window: one group per key, kept for the life of the query;
//! its rows come from EMIT CHANGES (nothing ever closes).
//!
//! State encoding: the groups section of [`Groups::encode`], ids the key bytes.

use sql::expr::Input;
use sql::plan::Aggregate;

use super::encode::Reader;
use super::group::Groups;
use super::{Error, Fate, Operator, Row};

pub(super) struct Unwindowed {
    groups: Groups,
}

impl Unwindowed {
    pub fn new(plan: &Aggregate) -> Unwindowed {
        Unwindowed {
            groups: Groups::new(plan),
        }
    }
}

impl Operator for Unwindowed {
    fn process(
        &mut self,
        input: &Input<'_>,
        _time: i64,
        _watermark: Option<i64>,
        _out: &mut Vec<Row>,
    ) -> Result<Fate, Error> {
        let g = &mut self.groups;
        let e = g.evaluate(input)?;
        if g.has_min_max() {
            g.check(g.map.get(&e.key_bytes), &e.args)?;
        }
        g.upsert(&e.key_bytes, &e, input, i64::MIN, i64::MAX);
        g.mark(&e.key_bytes);
        g.recycle(e);
        Ok(Fate::Done)
    }

    fn on_watermark(&mut self, _watermark: i64, _out: &mut Vec<Row>) {}

    fn on_tick(&mut self, now_ms: i64, interval_ms: i64, out: &mut Vec<Row>) {
        self.groups.emit_held(now_ms, interval_ms, false, out);
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
        let mut restored = Groups::new(&self.groups.plan);
        restored.decode(r, |g, id, group| {
            g.map.insert(id, group);
            Ok(())
        })?;
        self.groups = restored;
        Ok(())
    }

    fn state_bytes(&self) -> i64 {
        self.groups.bytes
    }
}
