//! The pipeline dialect: SQL text in, a [`plan::Pipeline`] out, and the evaluation of
//! its expressions ([`expr::Expr::eval`]) over one input record or one aggregated row.
//!
//! It owns parsing (with the `sqlparser` crate), validation against a [`Catalog`] (the
//! topics and, where known, their columns), planning, the [`value::Value`] type and
//! expression semantics (NULL handling, casts, functions). The dialect is documented
//! in `docs/sql.md`.
//!
//! It may not do I/O, read a clock or depend on an async runtime or on any other crate
//! of the workspace: the pipeline runtime (crate `pipeline`) gives it text and
//! records and takes plans and values back.

pub mod error;
pub mod expr;
mod functions;
pub mod plan;
pub mod time;
pub mod value;

mod parse;

pub use error::SqlError;
pub use plan::Pipeline;
pub use value::Value;

/// What the planner may ask about the cluster, answered by the runtime beforehand
/// (the planner itself does no I/O).
pub trait Catalog {
    /// `None`: no such topic (an error at creation for a source).
    fn topic(&self, name: &str) -> Option<TopicInfo>;
}

/// What is known of a topic.
#[derive(Debug, Clone, Default)]
pub struct TopicInfo {
    /// The top-level fields of its JSON values when known (a registered schema, or
    /// the union of the fields of a sample of its records); `None` when nothing is
    /// known (an empty topic), in which case any column is accepted.
    pub columns: Option<Vec<String>>,
}

/// Parses, validates and plans a pipeline file: `SET` statements and one or more
/// `INSERT INTO <topic> SELECT ...` statements, each optionally closed by
/// `EMIT CHANGES` or `EMIT FINAL`.
pub fn compile(text: &str, catalog: &dyn Catalog) -> Result<Pipeline, SqlError> {
    parse::compile(text, catalog)
}

#[cfg(test)]
mod tests;
