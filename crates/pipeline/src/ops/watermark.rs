//! The event-time watermark of one operator: per source partition the highest event
//! time seen and when it last delivered (wall clock); the watermark is the lowest of
//! the active partitions' highest, minus the allowed lateness, and never goes back.

use std::collections::BTreeMap;

use super::encode::{self, Reader};

pub struct Watermark {
    pub lateness: i64,
    pub idle: i64,
    parts: BTreeMap<i32, Part>,
    current: Option<i64>,
}

struct Part {
    highest: Option<i64>,
    active_ms: i64,
}

impl Watermark {
    pub fn new(lateness: i64, idle: i64) -> Self {
        Watermark {
            lateness,
            idle,
            parts: BTreeMap::new(),
            current: None,
        }
    }

    pub fn current(&self) -> Option<i64> {
        self.current
    }

    /// Only these partitions count from now on; each one's idle clock starts now.
    pub fn assign(&mut self, partitions: &[i32], now_ms: i64) {
        self.parts.retain(|p, _| partitions.contains(p));
        for &p in partitions {
            let part = self.parts.entry(p).or_insert(Part {
                highest: None,
                active_ms: now_ms,
            });
            part.active_ms = now_ms;
        }
        self.recompute(now_ms);
    }

    /// A partition delivered a record (one that does not move event time: late).
    pub fn touch(&mut self, partition: i32, now_ms: i64) {
        if let Some(part) = self.parts.get_mut(&partition) {
            part.active_ms = now_ms;
        }
    }

    pub fn observe(&mut self, partition: i32, t: i64, now_ms: i64) {
        let part = self.parts.entry(partition).or_insert(Part {
            highest: None,
            active_ms: now_ms,
        });
        part.active_ms = now_ms;
        part.highest = Some(part.highest.map_or(t, |h| h.max(t)));
        self.recompute(now_ms);
    }

    pub fn recompute(&mut self, now_ms: i64) {
        let mut lowest_active: Option<i64> = None;
        let mut any_active = false;
        let mut highest_any: Option<i64> = None;
        for part in self.parts.values() {
            if let Some(h) = part.highest {
                highest_any = Some(highest_any.map_or(h, |m| m.max(h)));
            }
            if now_ms - part.active_ms >= self.idle {
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

    pub fn encode(&self, out: &mut Vec<u8>) {
        encode::opt_i64(out, self.current);
        out.extend_from_slice(&(self.parts.len() as u32).to_be_bytes());
        for (p, part) in &self.parts {
            out.extend_from_slice(&p.to_be_bytes());
            encode::opt_i64(out, part.highest);
        }
    }

    /// A restored watermark: every partition's idle clock starts at its next
    /// `assign`.
    pub fn decode(r: &mut Reader<'_>, lateness: i64, idle: i64) -> encode::Result<Watermark> {
        let current = r.opt_i64()?;
        let n = r.count()?;
        let mut parts = BTreeMap::new();
        for _ in 0..n {
            let p = r.u32()? as i32;
            let highest = r.opt_i64()?;
            parts.insert(
                p,
                Part {
                    highest,
                    active_ms: i64::MIN / 2,
                },
            );
        }
        Ok(Watermark {
            lateness,
            idle,
            parts,
            current,
        })
    }
}
