//! Continuous SQL pipelines: the operators that turn records into results ([`ops`]:
//! pure, records and time in, rows out, state snapshots) and the runtime that feeds
//! them from Kafka topics (in two stages joined by a repartition topic, so that
//! several instances share the work) and checkpoints their state with the offsets it
//! reflects; and the sinks that write their rows into databases, webhooks and files.
//!
//! It owns execution of [`sql::Pipeline`] plans. It may not parse SQL (crate `sql`
//! does), and it is a Kafka client of the cluster: it reads and writes only through
//! the Kafka protocol, never through broker or storage internals, so it runs
//! unchanged against Apache Kafka or Redpanda.

pub mod ops;
pub mod runtime;
