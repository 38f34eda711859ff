//! Errors a user sees for a pipeline file: where (line and column, 1-based) and what
//! to write instead.

/// A refused pipeline file. `line`/`column` are 1-based and point at the offending
/// token (0 when the error is about the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct SqlError {
    pub line: u64,
    pub column: u64,
    pub message: String,
}
