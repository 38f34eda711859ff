//! The event-time watermark of one operator: per source partition the highest event
//! time seen and whether the partition was declared idle; the watermark is the
//! lowest of the active partitions' highest (the highest of all when every one is
//! idle), minus the allowed lateness, and never goes back.
//!
//! No wall clock: idleness is decided where the records enter (stage 1, which sees
//! a partition deliver nothing for the idle timeout) and arrives here as a marker in
//! the data, so a replay of the same input makes the same decisions.

use std::collections::BTreeMap;

use super::encode::{self, Reader};

pub struct Watermark {
    pub lateness: i64,
    parts: BTreeMap<i32, Part>,
    current: Option<i64>,
}

struct Part {
    highest: Option<i64>,
    idle: bool,
}

impl Watermark {
    pub fn new(lateness: i64) -> Self {
        Watermark {
            lateness,
            parts: BTreeMap::new(),
            current: None,
        }
    }

    pub fn current(&self) -> Option<i64> {
        self.current
    }

    /// Only these partitions count from now on; a new one is active and holds the
    /// watermark back until it delivers or is declared idle.
    pub fn assign(&mut self, partitions: &[i32]) {
        self.parts.retain(|p, _| partitions.contains(p));
        for &p in partitions {
            self.parts.entry(p).or_insert(Part {
                highest: None,
                idle: false,
            });
        }
        self.recompute();
    }

    /// A partition delivered a record (one that does not move event time: late).
    pub fn touch(&mut self, partition: i32) {
        if let Some(part) = self.parts.get_mut(&partition) {
            part.idle = false;
        }
    }

    pub fn observe(&mut self, partition: i32, t: i64) {
        let part = self.parts.entry(partition).or_insert(Part {
            highest: None,
            idle: false,
        });
        part.idle = false;
        part.highest = Some(part.highest.map_or(t, |h| h.max(t)));
        self.recompute();
    }

    /// The partition delivered nothing for the idle timeout: it stops holding the
    /// watermark back until it delivers again.
    pub fn idle(&mut self, partition: i32) {
        if let Some(part) = self.parts.get_mut(&partition) {
            part.idle = true;
        }
        self.recompute();
    }

    fn recompute(&mut self) {
        let mut lowest_active: Option<i64> = None;
        let mut any_active = false;
        let mut highest_any: Option<i64> = None;
        for part in self.parts.values() {
            if let Some(h) = part.highest {
                highest_any = Some(highest_any.map_or(h, |m| m.max(h)));
            }
            if part.idle {
                continue;
            }
            any_active = true;
            match part.highest {
                // An active partition that has delivered nothing yet holds it back.
                None => return,
                Some(h) => lowest_active = Some(lowest_active.map_or(h, |m| m.min(h))),
            }
        }
        let base = if any_active {
            lowest_active
        } else {
            highest_any
        };
        if let Some(base) = base {
            let candidate = base.saturating_sub(self.lateness);
            self.current = Some(self.current.map_or(candidate, |c| c.max(candidate)));
        }
    }

    /// Version 2 of the operator snapshot: with each partition's idle flag.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode::opt_i64(out, self.current);
        out.extend_from_slice(&(self.parts.len() as u32).to_be_bytes());
        for (p, part) in &self.parts {
            out.extend_from_slice(&p.to_be_bytes());
            encode::opt_i64(out, part.highest);
            out.push(part.idle as u8);
        }
    }

    /// A restored watermark. Snapshots of version 1 kept no idle flags (the operator
    /// decided by the wall clock then): their partitions come back active.
    pub fn decode(r: &mut Reader<'_>, version: u8, lateness: i64) -> encode::Result<Watermark> {
        let current = r.opt_i64()?;
        let n = r.count()?;
        let mut parts = BTreeMap::new();
        for _ in 0..n {
            let p = r.u32()? as i32;
            let highest = r.opt_i64()?;
            let idle = match version {
                1 => false,
                _ => match r.u8()? {
                    0 => false,
                    1 => true,
                    f => return Err(format!("snapshot: bad idle flag {f}")),
                },
            };
            parts.insert(p, Part { highest, idle });
        }
        Ok(Watermark {
            lateness,
            parts,
            current,
        })
    }
}
