//! Text to plan: tokens and statements from `sqlparser`, then validation and
//! planning of each statement.

use crate::{Catalog, Pipeline, SqlError};

pub(crate) fn compile(_text: &str, _catalog: &dyn Catalog) -> Result<Pipeline, SqlError> {
    Err(SqlError {
        line: 0,
        column: 0,
        message: "not yet implemented".into(),
    })
}
