//! A fused sink: every query into it is stateless and reads one source, so the sink
//! reads that source itself and runs the queries on each record, instead of stage 1
//! writing their rows to the sink's topic for the sink to read back. One read of the
//! source instead of a produce and two reads: the sink's positions are the source's
//! offsets, stored with the rows as before, and a replay gives the same rows (the
//! queries are stateless), so exactly once holds as for the sink's topic.
//!
//! The rows of one source record are numbered (`Record::part`) and always go into
//! one batch together, so a position (the next source offset) never falls inside a
//! record.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::message::{OwnedMessage, Timestamp};
use rdkafka::Message;
use sql::expr::Input;

use super::super::{dead_letter_input, input_headers, read_json, Origin, Shared};
use super::{Body, Record};
use crate::ops::{self, QueryOperator, Row};
use crate::runtime::Error;

pub(super) struct Fused {
    /// The source's index in the prepared pipeline's sources.
    source: usize,
    topic: String,
    queries: Vec<Query>,
    needs_json: bool,
    /// Whether this sink sends a source record that is not JSON to the dead-letter
    /// topic: only when no stage reads the source, and only the first fused sink of
    /// it, so each such record is dead-lettered once.
    dead_letters: bool,
    fields: Vec<serde_json::Value>,
    values: Vec<sql::value::Value>,
    rows: Vec<Row>,
}

/// A query into the sink.
struct Query {
    /// Its index in the plan.
    index: usize,
    op: QueryOperator,
    /// The names of its select list (None for `SELECT *`).
    names: Option<Arc<[String]>>,
}

impl Fused {
    /// The fused reader of sink `index`, or None when the sink reads its topic.
    pub fn new(shared: &Shared<'_>, index: usize) -> Option<Fused> {
        let layout = &shared.layout;
        let source = layout.fused[index]?;
        let plan = &shared.prepared.plan;
        let topic = shared.prepared.sources[source].0.clone();
        let queries: Vec<_> = plan
            .queries
            .iter()
            .enumerate()
            .filter(|(_, q)| q.sink == Some(index))
            .map(|(i, q)| {
                let names = q
                    .columns()
                    .map(|cs| cs.into_iter().map(|(n, _)| n).collect::<Arc<[String]>>());
                Query {
                    index: i,
                    op: QueryOperator::new(q, &plan.settings),
                    names,
                }
            })
            .collect();
        let read_by_tasks = plan
            .queries
            .iter()
            .enumerate()
            .any(|(i, q)| layout.direct[i] && q.source.topic == topic);
        let first_fused = layout.fused.iter().position(|f| *f == Some(source)) == Some(index);
        Some(Fused {
            source,
            needs_json: queries.iter().any(|q| plan.queries[q.index].source.json),
            queries,
            dead_letters: !layout.stage1_reads[source] && !read_by_tasks && first_fused,
            topic,
            fields: Vec::new(),
            values: Vec::new(),
            rows: Vec::new(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Runs the queries on one source record: its rows go into `batch` (or one
    /// `Body::Skip` when it gives none, so its position still moves).
    pub fn read(
        &mut self,
        shared: &Shared<'_>,
        message: &impl Message,
        batch: &mut Vec<Record>,
    ) -> Result<(), Error> {
        let stats = shared.stats;
        stats.record_in();
        let (partition, offset) = (message.partition(), message.offset());
        let timestamp = message.timestamp().to_millis().unwrap_or(0);
        let skip = |dead_lettered| Record {
            partition,
            offset,
            part: 0,
            body: Body::Skip { dead_lettered },
            message: None,
            key: None,
            timestamp,
            origin: None,
        };
        let source = Origin {
            topic: &self.topic,
            partition,
            offset,
        };
        if self.needs_json
            && !read_json(
                shared,
                &shared.producer,
                message,
                &source,
                self.source,
                self.dead_letters,
                &mut self.fields,
            )?
        {
            batch.push(skip(self.dead_letters));
            return Ok(());
        }
        let json = match self.needs_json {
            true => shared.json_fields[self.source].json(&self.fields),
            false => sql::expr::Json::NULL,
        };
        let headers = input_headers(shared, message);
        let input = Input {
            json,
            raw: message.payload().unwrap_or_default(),
            key: message.key(),
            timestamp,
            partition,
            offset,
            headers: &headers,
        };
        let mut part = 0u32;
        let mut dead_lettered = false;
        for Query { index, op, names } in &mut self.queries {
            let done = match (op.project(&input, &mut self.values), names) {
                (Some(Ok(passes)), Some(names)) => {
                    if passes {
                        let values = self.values.drain(..).map(|v| v.into_json()).collect();
                        batch.push(Record {
                            part,
                            body: Body::Columns(names.clone(), values),
                            key: input.key.map(<[u8]>::to_vec),
                            ..skip(false)
                        });
                        part += 1;
                    }
                    Ok(())
                }
                (Some(Err(e)), _) => Err(e),
                // SELECT *: the value as it was.
                _ => op.process(&input, &mut self.rows).map(|_| ()),
            };
            match done {
                Ok(()) => {}
                Err(ops::Error::Rejected(reason)) => {
                    // An output column failed (a division by zero): the source record
                    // to the dead-letter topic, once, as stage 1 does.
                    if !dead_lettered {
                        let query = &shared.prepared.plan.queries[*index].output;
                        dead_letter_input(
                            shared,
                            &shared.producer,
                            message,
                            &source,
                            &reason,
                            Some(query),
                        )?;
                        dead_lettered = true;
                    }
                    continue;
                }
                Err(ops::Error::StateLimit { used, limit }) => {
                    return Err(Error::StateLimit { used, limit })
                }
            }
            for row in self.rows.drain(..) {
                let body = Body::of(&row.value);
                batch.push(Record {
                    part,
                    body,
                    message: Some(OwnedMessage::new(
                        Some(row.value),
                        row.key,
                        self.topic.clone(),
                        Timestamp::CreateTime(timestamp),
                        partition,
                        offset,
                        None,
                    )),
                    ..skip(false)
                });
                part += 1;
            }
        }
        stats
            .records_out
            .fetch_add(u64::from(part), Ordering::Relaxed);
        if part == 0 {
            batch.push(skip(dead_lettered));
        } else if dead_lettered {
            // The flush before the position is stored covers the copy.
            batch.push(Record { part, ..skip(true) });
        }
        Ok(())
    }
}
