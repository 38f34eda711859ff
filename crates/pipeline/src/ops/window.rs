//! Tumbling and hopping windows, epoch-aligned. A hopping window's size is a
//! multiple of its slide (checked at creation); a tumbling window is a hopping one
//! whose slide is its size. Each key keeps one group per slice of `slide` ms, which
//! a record updates alone, and a window's value is its slices' merged when it
//! closes or EMIT CHANGES asks (as Flink's sliced windows do), not `size / slide`
//! updates per record. A record is late when the earliest window containing it has
//! closed (then every window of its slice has).
//!
//! State encoding (snapshot version 3): the slices (groups section of
//! [`Groups::encode`], id = key bytes + slice start), then the whole windows a
//! version 2 snapshot of a hopping query held that are still open (version 2 held
//! windows, not slices: each is merged with the later slices of its window). The
//! closing order is rebuilt from them.

use std::borrow::Cow;

use sql::expr::Input;
use sql::plan::{Aggregate, Emit};

use super::encode::Reader;
use super::group::{
    group_bytes, merge_into, pop_closed, split_window_id, window_id, Closing, Group, Groups,
};
use super::{Error, Fate, Map, Operator, Row, MAX_EVENT_TIME_MS};

pub(super) struct Sliced {
    groups: Groups,
    slide: i64,
    size: i64,
    /// Whole windows restored from a version 2 snapshot, by window id.
    legacy: Map<Vec<u8>, Group>,
    /// (end, start, key bytes) of every open window, to close in order.
    closing: Closing,
}

impl Sliced {
    pub fn new(plan: &Aggregate, slide: i64, size: i64) -> Sliced {
        Sliced {
            groups: Groups::new(plan),
            slide,
            size,
            legacy: Map::default(),
            closing: Closing::new(),
        }
    }

    /// The starts of the slices of the window starting at `start`.
    fn slices(&self, start: i64) -> impl Iterator<Item = i64> {
        let slide = self.slide;
        (0..self.size / slide).map(move |i| start + i * slide)
    }

    /// A closing window's value: its restored whole window, if any, merged with its
    /// slices in order. Its first slice, which no later window contains, is dropped.
    fn take_window(&mut self, key_bytes: &[u8], start: i64) -> Option<Group> {
        let id = window_id(key_bytes, start);
        self.groups.dirty.remove(&id);
        let mut window = self.legacy.remove(&id).inspect(|g| {
            self.groups.bytes -= group_bytes(&id, g);
        });
        for (i, slice) in self.slices(start).enumerate() {
            let id = window_id(key_bytes, slice);
            let part = if i == 0 {
                self.groups.take(&id)
            } else {
                self.groups.map.get(&id).cloned()
            };
            merge_into(&mut window, part);
        }
        window.map(|w| self.bounds(w, start))
    }

    /// The current value of an open window (EMIT CHANGES), by its id.
    fn current(&self, id: &[u8]) -> Option<Cow<'_, Group>> {
        if self.slide == self.size && self.legacy.is_empty() {
            return self.groups.map.get(id).map(Cow::Borrowed);
        }
        let (key_bytes, start) = split_window_id(id)?;
        let mut window = self.legacy.get(id).cloned();
        for slice in self.slices(start) {
            merge_into(
                &mut window,
                self.groups.map.get(&window_id(key_bytes, slice)).cloned(),
            );
        }
        window.map(|w| Cow::Owned(self.bounds(w, start)))
    }

    fn bounds(&self, mut window: Group, start: i64) -> Group {
        window.start = start;
        window.end = start + self.size;
        window
    }
}

impl Operator for Sliced {
    fn process(
        &mut self,
        input: &Input<'_>,
        t: i64,
        watermark: Option<i64>,
        _out: &mut Vec<Row>,
    ) -> Result<Fate, Error> {
        let (slide, size) = (self.slide, self.size);
        let e = self.groups.evaluate(input)?;
        if watermark.is_some_and(|wm| first_hop_start(t, slide, size) + size <= wm) {
            self.groups.recycle(e);
            return Ok(Fate::Late);
        }
        let slice = t - t.rem_euclid(slide);
        let g = &mut self.groups;
        // MIN/MAX refuse a value another slice of one of its windows (or a restored
        // whole window) cannot compare with: the slices from the first window's
        // start to the last window's end.
        if g.has_min_max() {
            let mut s = slice - size + slide;
            while s < slice + size {
                g.set_id(&e.key_bytes, s);
                g.check(g.map.get(&g.id), &e.args)?;
                s += slide;
            }
            for start in hop_starts(t, slide, size) {
                g.set_id(&e.key_bytes, start);
                g.check(self.legacy.get(&g.id), &e.args)?;
            }
        }
        g.set_id(&e.key_bytes, slice);
        let id = std::mem::take(&mut g.id);
        if g.upsert(&id, &e, input, slice, slice + slide) {
            // A new slice: the windows it is in.
            for s in hop_starts(slice, slide, size) {
                self.closing.insert((s + size, s, e.key_bytes.clone()));
            }
        }
        g.id = id;
        if g.plan.emit == Emit::Changes {
            for start in hop_starts(t, slide, size) {
                g.set_id(&e.key_bytes, start);
                let id = std::mem::take(&mut g.id);
                g.mark(&id);
                g.id = id;
            }
        }
        g.recycle(e);
        Ok(Fate::Done)
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Vec<Row>) {
        while let Some((start, key_bytes)) = pop_closed(&mut self.closing, watermark) {
            if let Some(window) = self.take_window(&key_bytes, start) {
                if let Some(row) = self.groups.row(&window, true, true) {
                    out.push(row);
                }
            }
        }
    }

    fn on_tick(&mut self, now_ms: i64, interval_ms: i64, out: &mut Vec<Row>) {
        let ids = self.groups.due(now_ms, interval_ms);
        self.groups.emit(ids, true, |id| self.current(id), out);
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        Groups::encode(out, &self.groups.map);
        Groups::encode(out, &self.legacy);
    }

    fn restore(&mut self, r: &mut Reader<'_>, version: u8, wm: Option<i64>) -> Result<(), String> {
        let (slide, size) = (self.slide, self.size);
        let mut restored = Sliced::new(&self.groups.plan, slide, size);
        // Version 2 held a hopping window's windows, 3 its slices and then the
        // windows restored from a 2 still open. A tumbling window is its own slice.
        let sections = if version >= 3 { 2 } else { 1 };
        for section in 0..sections {
            let whole = slide != size && (version <= 2 || section == 1);
            let (closing, legacy) = (&mut restored.closing, &mut restored.legacy);
            restored.groups.decode(r, |g, id, group| {
                let (key_bytes, start) = split_window_id(&id).ok_or("snapshot: bad window id")?;
                let len = if whole { size } else { slide };
                if start != group.start
                    || !(-MAX_EVENT_TIME_MS..=MAX_EVENT_TIME_MS).contains(&start)
                    || start.rem_euclid(slide) != 0
                    || group.end != start + len
                {
                    return Err("snapshot: bad window bounds".into());
                }
                if whole {
                    closing.insert((group.end, start, key_bytes.to_vec()));
                    legacy.insert(id, group);
                } else {
                    // The windows of the slice not closed yet.
                    for s in hop_starts(start, slide, size) {
                        if wm.is_none_or(|w| s + size > w) {
                            closing.insert((s + size, s, key_bytes.to_vec()));
                        }
                    }
                    g.map.insert(id, group);
                }
                Ok(())
            })?;
        }
        *self = restored;
        Ok(())
    }

    fn state_bytes(&self) -> i64 {
        self.groups.bytes
    }
}

/// The earliest window start containing `t` (epoch-aligned): the first multiple of
/// `slide` above `t - size`.
fn first_hop_start(t: i64, slide: i64, size: i64) -> i64 {
    (t - size).div_euclid(slide) * slide + slide
}

/// Every window start containing `t`, ascending.
fn hop_starts(t: i64, slide: i64, size: i64) -> impl Iterator<Item = i64> {
    let first = first_hop_start(t, slide, size);
    let last = t - t.rem_euclid(slide);
    (0..)
        .map(move |i| first + i * slide)
        .take_while(move |s| *s <= last)
}
