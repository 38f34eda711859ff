//! Operators: one [`QueryOperator`] per query of a pipeline. Pure: the runtime passes
//! records and the wall-clock time in and takes rows out; state is snapshot to bytes
//! and restored from them.

use sql::plan::{Query, Settings};

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
}

/// What became of an input record that was not rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Counted (or filtered out, or projected).
    Done,
    /// Too late for its window: the runtime sends it to the late topic.
    Late,
}

/// A record that cannot be processed (bad event time, an expression's type error):
/// the runtime sends it to the dead-letter topic with this message in a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Rejected(String),
    StateLimit { used: u64, limit: u64 },
}

/// Runs one query.
pub struct QueryOperator {
    _query: Query,
    _settings: Settings,
}

impl QueryOperator {
    pub fn new(query: &Query, settings: &Settings) -> Self {
        QueryOperator {
            _query: query.clone(),
            _settings: settings.clone(),
        }
    }
}

use sql::expr::Input;
impl QueryOperator {
    pub fn assign(&mut self, _p: &[i32], _now: i64) {}
    pub fn process(&mut self, _i: &Input, _now: i64, _out: &mut Vec<Row>) -> Result<Fate, Error> {
        Ok(Fate::Done)
    }
    pub fn tick(&mut self, _now: i64, _out: &mut Vec<Row>) {}
    pub fn watermark(&self) -> Option<i64> {
        None
    }
    pub fn state_bytes(&self) -> u64 {
        0
    }
    pub fn snapshot(&self) -> Vec<u8> {
        vec![]
    }
    pub fn restore(&mut self, _b: &[u8]) -> Result<(), String> {
        Ok(())
    }
}
