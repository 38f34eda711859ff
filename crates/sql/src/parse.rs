//! Text to plan: the file is tokenized once (sqlparser's tokenizer, with line and
//! column), cut into statements at `;`, `SET` statements and a closing `EMIT` clause
//! are read here, the rest of each statement is parsed by sqlparser, then validated
//! and planned.

use sqlparser::ast::{
    self, BinaryOperator, DataType, Expr as SqlExpr, FunctionArg, FunctionArgExpr,
    FunctionArguments, GroupByExpr, SelectItem, SetExpr, Spanned, Statement, TableFactor,
    TableObject, UnaryOperator,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use crate::expr::{BinOp, CastType, Expr, Func, Meta};
use crate::plan::*;
use crate::value::Value;
use crate::{Catalog, Pipeline, SqlError};

type Result<T> = std::result::Result<T, SqlError>;

fn error_at(at: Location, message: impl Into<String>) -> SqlError {
    SqlError {
        line: at.line.max(1),
        column: at.column.max(1),
        message: message.into(),
    }
}

fn error_on(node: &impl Spanned, message: impl Into<String>) -> SqlError {
    error_at(node.span().start, message)
}

pub(crate) fn compile(text: &str, catalog: &dyn Catalog) -> Result<Pipeline> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, text)
        .tokenize_with_location()
        .map_err(|e| SqlError {
            line: e.location.line.max(1),
            column: e.location.column.max(1),
            message: e.message.clone(),
        })?;
    let mut settings = Settings::default();
    let mut queries = Vec::new();
    let mut sinks: Vec<(Sink, Location)> = Vec::new();
    let mut kafka_sinks: Vec<(String, String)> = Vec::new();
    let mut statement: Vec<TokenWithSpan> = Vec::new();
    let mut all = tokens.into_iter().peekable();
    loop {
        let next = all.next();
        let end = matches!(
            next.as_ref().map(|t| &t.token),
            None | Some(Token::SemiColon)
        );
        if !end {
            if let Some(t) = next.clone() {
                statement.push(t);
            }
            continue;
        }
        let words: Vec<&TokenWithSpan> = statement
            .iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .collect();
        if let Some(first) = words.first() {
            if is_word(first, "SET") {
                set(&words, &mut settings)?;
            } else if is_word(first, "CREATE") && words.get(1).is_some_and(|w| is_word(w, "SINK")) {
                let (sink, at) = create_sink(&words)?;
                let name = match &sink {
                    SinkDef::Database(s) => &s.name,
                    SinkDef::Kafka { name, .. } => name,
                };
                if sinks.iter().any(|(s, _)| s.name == *name)
                    || kafka_sinks.iter().any(|(n, _)| n == name)
                {
                    return Err(error_at(at, format!("sink '{name}' is created twice")));
                }
                match sink {
                    SinkDef::Database(s) => sinks.push((s, at)),
                    SinkDef::Kafka { name, topic } => kafka_sinks.push((name, topic)),
                }
            } else {
                let (body, emit) = strip_emit(&statement);
                let mut parser = Parser::new(&dialect).with_tokens_with_locations(body);
                let parsed = parser
                    .parse_statement()
                    .map_err(|e| parser_error(&e.to_string(), first))?;
                queries.push((parsed, emit, first.span.start));
            }
        }
        statement.clear();
        if next.is_none() {
            break;
        }
    }
    if queries.is_empty() {
        return Err(SqlError {
            line: 1,
            column: 1,
            message: "no query: write INSERT INTO <output topic> SELECT ... FROM <source topic>;"
                .into(),
        });
    }
    let mut planned = Vec::new();
    for (statement, emit, at) in queries {
        let mut query = plan_statement(statement, emit, at, catalog)?;
        if let Body::Aggregate(Aggregate {
            window: Some(Window::Hop { slide_ms, size_ms }),
            ..
        }) = &query.body
        {
            let per_record = size_ms / slide_ms;
            if per_record as u64 > settings.max_windows_per_record {
                return Err(error_at(
                    at,
                    format!(
                        "HOP: each record would fall in {per_record} windows (size / slide), more than max-windows-per-record = {}: use a larger slide, or raise it (SET 'max-windows-per-record' = '...')",
                        settings.max_windows_per_record
                    ),
                ));
            }
        }
        if let Some(i) = sinks.iter().position(|(s, _)| s.name == query.output) {
            check_sink_query(&sinks[i].0, &query, at)?;
            query.sink = Some(i);
        } else if let Some(topic) = kafka_sinks.iter().find(|(n, _)| *n == query.output) {
            query.output = topic.1.clone();
        }
        planned.push(query);
    }
    Ok(Pipeline {
        settings,
        queries: planned,
        sinks: sinks.into_iter().map(|(s, _)| s).collect(),
    })
}

/// Sink options users may write (`docs/sql.md`).
const SINK_USAGE: &str = "write CREATE SINK name WITH (connector = 'postgres' | 'sqlite' | 'redis' | 'http' | 'file' | 'kafka', ...): postgres and redis take url and table (redis: and score = 'column' for a sorted set), sqlite path and table, http url (and timeout, and ca = 'file.pem' for https), file path (and roll_size, roll_interval), kafka topic; optional: primary_key = 'a, b', create_table = true, batch_rows = 1000, batch_interval = '100ms'";

/// `CREATE SINK name WITH (key = value, ...)`.
fn create_sink(words: &[&TokenWithSpan]) -> Result<(SinkDef, Location)> {
    let at = words[0].span.start;
    let name = match words.get(2).map(|t| &t.token) {
        Some(Token::Word(w)) => w.value.clone(),
        _ => {
            return Err(error_at(
                words.get(2).map_or(at, |t| t.span.start),
                format!("a sink needs a name: {SINK_USAGE}"),
            ))
        }
    };
    let with = words.get(3).is_some_and(|t| is_word(t, "WITH"));
    let paren = words.get(4).is_some_and(|t| t.token == Token::LParen);
    if !(with && paren) {
        return Err(error_at(
            words.get(3).map_or(at, |t| t.span.start),
            SINK_USAGE,
        ));
    }
    if words.last().is_none_or(|t| t.token != Token::RParen) {
        return Err(error_at(
            words.last().map_or(at, |t| t.span.start),
            format!("the options end with ')': {SINK_USAGE}"),
        ));
    }
    let mut options: Vec<(String, String, Location)> = Vec::new();
    for option in words[5..words.len() - 1].split(|t| t.token == Token::Comma) {
        let key_at = option.first().map_or(words[4].span.end, |t| t.span.start);
        let (key, value) = match option {
            [k, eq, v] if eq.token == Token::Eq => {
                let key = match &k.token {
                    Token::Word(w) => w.value.to_ascii_lowercase(),
                    Token::SingleQuotedString(s) => s.to_ascii_lowercase(),
                    _ => return Err(error_at(key_at, SINK_USAGE)),
                };
                let value = match &v.token {
                    Token::SingleQuotedString(s) => s.clone(),
                    Token::Number(n, _) => n.clone(),
                    Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_lowercase(),
                    _ => {
                        return Err(error_at(
                            v.span.start,
                            format!(
                                "option '{key}' takes a value in quotes, a number, true or false"
                            ),
                        ))
                    }
                };
                (key, value)
            }
            _ => {
                return Err(error_at(
                    key_at,
                    format!("an option is key = 'value': {SINK_USAGE}"),
                ))
            }
        };
        if options.iter().any(|(k, _, _)| *k == key) {
            return Err(error_at(key_at, format!("option '{key}' is given twice")));
        }
        options.push((key, value, key_at));
    }
    let take = |key: &str| {
        options
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, at)| (v.clone(), *at))
    };
    let need = |key: &str, connector: &str| {
        take(key)
            .map(|(v, _)| v)
            .ok_or_else(|| error_at(at, format!("a {connector} sink needs {key} = '...'")))
    };
    let known: &[&str] = &[
        "score",
        "ca",
        "timeout",
        "roll_size",
        "roll_interval",
        "connector",
        "url",
        "path",
        "table",
        "topic",
        "primary_key",
        "create_table",
        "batch_rows",
        "batch_interval",
    ];
    if let Some((k, _, kat)) = options
        .iter()
        .find(|(k, _, _)| !known.contains(&k.as_str()))
    {
        return Err(error_at(
            *kat,
            format!("unknown sink option '{k}': {SINK_USAGE}"),
        ));
    }
    let connector = need("connector", "")?;
    let connector = match connector.as_str() {
        "kafka" => {
            return Ok((
                SinkDef::Kafka {
                    name,
                    topic: need("topic", "kafka")?,
                },
                at,
            ))
        }
        "postgres" | "postgresql" => Connector::Postgres {
            url: need("url", "postgres")?,
        },
        "sqlite" => Connector::Sqlite {
            path: need("path", "sqlite")?,
        },
        "redis" => Connector::Redis {
            url: need("url", "redis")?,
            score: take("score").map(|(v, _)| v.trim().to_string()),
        },
        "http" => Connector::Http {
            url: need("url", "http")?,
            timeout_ms: duration_option(&take, "timeout", 10_000)?,
            ca: take("ca").map(|(v, _)| v),
        },
        "file" => Connector::File {
            path: need("path", "file")?,
            roll_bytes: match take("roll_size") {
                None => 64 << 20,
                Some((v, vat)) => parse_size(&v).filter(|n| *n > 0).ok_or_else(|| {
                    error_at(vat, format!("'{v}' is not a size: write e.g. '64MB'"))
                })?,
            },
            roll_interval_ms: duration_option(&take, "roll_interval", 3_600_000)?,
        },
        other => {
            return Err(error_at(
                take("connector").map_or(at, |(_, a)| a),
                format!("unknown connector '{other}': {SINK_USAGE}"),
            ))
        }
    };
    // Where rows go in the target: a table, or a key prefix for redis.
    let table = match connector {
        Connector::Http { .. } | Connector::File { .. } => String::new(),
        _ => need("table", connector.name())?,
    };
    let primary_key: Vec<String> = take("primary_key")
        .map(|(v, _)| {
            v.split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let create_table = match take("create_table") {
        None => false,
        Some((v, vat)) => match v.to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => return Err(error_at(vat, "create_table is true or false")),
        },
    };
    let batch_rows = match take("batch_rows") {
        None => 1000,
        Some((v, vat)) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
            .ok_or_else(|| error_at(vat, "batch_rows is a number from 1 to 1000000"))?,
    };
    let batch_interval_ms = duration_option(&take, "batch_interval", 100)?;
    match (&connector, take("score")) {
        (Connector::Redis { score: None, .. }, _) if primary_key.is_empty() => {
            return Err(error_at(
                at,
                "a redis sink writes a hash per row, keyed by its primary key (add primary_key = '...'), or the rows into a sorted set ordered by a column (add score = 'column')",
            ))
        }
        (Connector::Redis { score: Some(s), .. }, Some((_, sat))) if s.is_empty() => {
            return Err(error_at(sat, "score names a column of the select list"))
        }
        (Connector::Redis { .. }, _) | (_, None) => {}
        (_, Some((_, sat))) => {
            return Err(error_at(sat, "score is an option of redis sinks only"))
        }
    }
    if let (false, Some((_, cat))) = (matches!(connector, Connector::Http { .. }), take("ca")) {
        return Err(error_at(cat, "ca is an option of http sinks only"));
    }
    Ok((
        SinkDef::Database(Sink {
            name,
            connector,
            table,
            primary_key,
            create_table,
            batch_rows,
            batch_interval_ms,
        }),
        at,
    ))
}

/// A duration option of a sink (`'100ms'`, `'5s'`), or its default; at least 1 ms.
fn duration_option(
    take: &dyn Fn(&str) -> Option<(String, Location)>,
    key: &str,
    default: i64,
) -> Result<i64> {
    match take(key) {
        None => Ok(default),
        Some((v, at)) => Ok(parse_duration(&v)
            .ok_or_else(|| {
                error_at(
                    at,
                    format!("{key}: '{v}' is not a duration: write e.g. '100ms', '1s'"),
                )
            })?
            .max(1)),
    }
}

/// What a `CREATE SINK` statement defines.
enum SinkDef {
    /// Rows go to a table.
    Database(Sink),
    /// `connector = 'kafka'`: rows go to `topic`, as `INSERT INTO topic` would.
    Kafka { name: String, topic: String },
}

/// A query into a database sink: its columns hold the primary key, and a grouped
/// query (whose rows update) has one.
fn check_sink_query(sink: &Sink, query: &Query, at: Location) -> Result<()> {
    let grouped = matches!(query.body, Body::Aggregate(_));
    if grouped && sink.primary_key.is_empty() {
        return Err(error_at(
            at,
            format!(
                "sink '{}' receives the rows of a grouped query, which are updated as input arrives: declare the columns that identify a row, e.g. primary_key = '{}'",
                sink.name,
                query.columns().unwrap_or_default().iter().map(|(n, _)| n.as_str())
                    .filter(|n| *n != "window_end").take(2).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if let Some(columns) = query.columns() {
        for k in &sink.primary_key {
            if !columns.iter().any(|(n, _)| n == k) {
                return Err(error_at(
                    at,
                    format!(
                        "primary key column '{k}' of sink '{}' is not in the select list",
                        sink.name
                    ),
                ));
            }
        }
    } else if sink.create_table {
        return Err(error_at(at, format!("sink '{}' creates its table from the select list: name the columns instead of SELECT *", sink.name)));
    }
    Ok(())
}

fn is_word(t: &TokenWithSpan, word: &str) -> bool {
    matches!(&t.token, Token::Word(w) if w.value.eq_ignore_ascii_case(word) && w.quote_style.is_none())
}

/// sqlparser's message ends in "at Line: X, Column: Y".
fn parser_error(message: &str, first: &TokenWithSpan) -> SqlError {
    let message = message.trim_start_matches("sql parser error: ");
    if let Some(i) = message.rfind(" at Line: ") {
        let pos = &message[i + 10..];
        let mut parts = pos.split(", Column: ");
        let line = parts.next().and_then(|l| l.trim().parse().ok());
        let column = parts.next().and_then(|c| c.trim().parse().ok());
        if let (Some(line), Some(column)) = (line, column) {
            return SqlError {
                line,
                column,
                message: message[..i].to_string(),
            };
        }
    }
    error_at(first.span.start, message)
}

/// Cuts a trailing `EMIT CHANGES` / `EMIT FINAL` off a statement's tokens.
fn strip_emit(tokens: &[TokenWithSpan]) -> (Vec<TokenWithSpan>, Option<(Emit, Location)>) {
    let words: Vec<usize> = (0..tokens.len())
        .filter(|&i| !matches!(tokens[i].token, Token::Whitespace(_)))
        .collect();
    if words.len() >= 2 {
        let (a, b) = (
            &tokens[words[words.len() - 2]],
            &tokens[words[words.len() - 1]],
        );
        if is_word(a, "EMIT") {
            let emit = if is_word(b, "FINAL") {
                Some(Emit::Final)
            } else if is_word(b, "CHANGES") {
                Some(Emit::Changes)
            } else {
                None
            };
            if let Some(emit) = emit {
                return (
                    tokens[..words[words.len() - 2]].to_vec(),
                    Some((emit, a.span.start)),
                );
            }
        }
    }
    (tokens.to_vec(), None)
}

/// `SET 'key' = 'value'` (quotes optional).
fn set(words: &[&TokenWithSpan], settings: &mut Settings) -> Result<()> {
    let usage = "write SET 'key' = 'value'; (keys: allowed-lateness, idle-timeout, emit-interval, checkpoint-interval, late-topic, dead-letter-topic, max-state-bytes, max-windows-per-record, delivery-guarantee)";
    let text = |t: &TokenWithSpan| match &t.token {
        Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => Some(s.clone()),
        Token::Word(w) => Some(w.value.clone()),
        Token::Number(n, _) => Some(n.clone()),
        _ => None,
    };
    // Keys may be written bare with dashes: join the tokens before `=`.
    let eq = words
        .iter()
        .position(|t| matches!(t.token, Token::Eq))
        .ok_or_else(|| error_at(words[0].span.start, usage))?;
    let key: String = words[1..eq]
        .iter()
        .map(|t| text(t).unwrap_or_else(|| t.token.to_string()))
        .collect();
    let value_tokens = &words[eq + 1..];
    if key.is_empty() || value_tokens.is_empty() {
        return Err(error_at(words[0].span.start, usage));
    }
    let value: String = value_tokens
        .iter()
        .map(|t| text(t).unwrap_or_else(|| t.token.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let at = value_tokens[0].span.start;
    let duration = |v: &str| {
        parse_duration(v).ok_or_else(|| {
            error_at(
                at,
                format!("'{v}' is not a duration: write e.g. '500ms', '5s', '1m', '2h'"),
            )
        })
    };
    match key.to_ascii_lowercase().as_str() {
        "allowed-lateness" => settings.allowed_lateness_ms = duration(&value)?,
        "idle-timeout" => settings.idle_timeout_ms = duration(&value)?,
        "emit-interval" => settings.emit_interval_ms = duration(&value)?.max(1),
        "checkpoint-interval" => settings.checkpoint_interval_ms = duration(&value)?.max(10),
        "late-topic" => settings.late_topic = Some(value),
        "dead-letter-topic" => settings.dead_letter_topic = Some(value),
        "delivery-guarantee" => {
            settings.exactly_once = match value.to_ascii_lowercase().as_str() {
                "exactly-once" => true,
                "at-least-once" => false,
                _ => {
                    return Err(error_at(
                        at,
                        format!("'{value}' is not a delivery guarantee: write 'exactly-once' or 'at-least-once'"),
                    ))
                }
            }
        }
        "max-windows-per-record" => {
            settings.max_windows_per_record = value
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| error_at(at, format!("'{value}' is not a positive number")))?
        }
        "max-state-bytes" => {
            settings.max_state_bytes = parse_size(&value).ok_or_else(|| {
                error_at(
                    at,
                    format!(
                        "'{value}' is not a size: write e.g. '64MB', '1GiB' or a number of bytes"
                    ),
                )
            })?
        }
        other => {
            return Err(error_at(
                words[1].span.start,
                format!("unknown setting '{other}': {usage}"),
            ))
        }
    }
    Ok(())
}

/// `500ms`, `5s`, `1m`, `2h`, `1d`, or `5 seconds`.
pub fn parse_duration(text: &str) -> Option<i64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let unit = unit.trim();
    let scale = match unit {
        "ms" | "millisecond" | "milliseconds" => 1.0,
        "" | "s" | "sec" | "second" | "seconds" => 1000.0,
        "m" | "min" | "minute" | "minutes" => 60_000.0,
        "h" | "hour" | "hours" => 3_600_000.0,
        "d" | "day" | "days" => 86_400_000.0,
        _ => return None,
    };
    let ms = n * scale;
    (ms.is_finite() && (0.0..9.0e15).contains(&ms)).then_some(ms as i64)
}

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().ok()?;
    let scale: u64 = match t[split..].trim() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1024,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

struct Scope<'a> {
    /// Names the source may be referred to by (topic, alias).
    names: Vec<String>,
    columns: Option<Vec<String>>,
    topic: String,
    uses_json: bool,
    _catalog: &'a dyn Catalog,
}

fn plan_statement(
    statement: Statement,
    emit: Option<(Emit, Location)>,
    at: Location,
    catalog: &dyn Catalog,
) -> Result<Query> {
    let insert = match statement {
        Statement::Insert(insert) => insert,
        other => {
            return Err(error_on(
                &other,
                "only INSERT INTO <output topic> SELECT ... statements (and SET) are supported",
            ))
        }
    };
    let output = match &insert.table {
        TableObject::TableName(name) => object_name(name),
        other => return Err(error_on(other, "INSERT INTO needs a topic name")),
    };
    if !insert.columns.is_empty() {
        return Err(error_at(
            at,
            "INSERT INTO takes no column list: the select list's names are the output fields",
        ));
    }
    let query = insert
        .source
        .ok_or_else(|| error_at(at, "INSERT INTO needs a SELECT"))?;
    if query.with.is_some()
        || query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
    {
        return Err(error_on(
            &*query,
            "WITH, ORDER BY, LIMIT and FETCH are not supported on a stream",
        ));
    }
    let select = match *query.body {
        SetExpr::Select(select) => select,
        other => {
            return Err(error_on(
                &other,
                "only a plain SELECT is supported (no UNION, VALUES or subqueries)",
            ))
        }
    };
    if select.distinct.is_some() {
        return Err(error_on(
            &*select,
            "SELECT DISTINCT is not supported: use GROUP BY",
        ));
    }
    if select.from.len() != 1 || !select.from[0].joins.is_empty() {
        return Err(error_on(&*select, "exactly one source: FROM <topic> or FROM TUMBLE|HOP|SESSION(<topic>, ...); joins are not supported"));
    }
    let (topic, alias, window_args, factor_span) = match &select.from[0].relation {
        TableFactor::Table {
            name, alias, args, ..
        } => (
            object_name(name),
            alias.as_ref().map(|a| a.name.value.clone()),
            args.as_ref().map(|a| a.args.clone()),
            name.span().start,
        ),
        other => return Err(error_on(other, "FROM takes a topic or a window function")),
    };
    let (source_topic, window, time_arg) = match window_args {
        None => (topic, None, None),
        Some(args) => window_function(&topic, &args, factor_span)?,
    };
    let info = catalog.topic(&source_topic).ok_or_else(|| {
        error_at(
            factor_span,
            format!("unknown topic '{source_topic}': create it first, or check the name"),
        )
    })?;
    let mut names = vec![source_topic.clone()];
    names.extend(alias);
    let mut scope = Scope {
        names,
        columns: info.columns,
        topic: source_topic.clone(),
        uses_json: false,
        _catalog: catalog,
    };
    let event_time = match time_arg {
        None => EventTime::RecordTimestamp,
        Some(e) => match input_expr(&e, &mut scope)? {
            Expr::Meta(Meta::Timestamp) => EventTime::RecordTimestamp,
            other => EventTime::Column(other),
        },
    };
    let filter = select
        .selection
        .as_ref()
        .map(|w| input_expr(w, &mut scope))
        .transpose()?;
    let group_exprs: Vec<SqlExpr> = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs.clone(),
        other => {
            return Err(error_on(
                other,
                "GROUP BY ALL and grouping modifiers are not supported",
            ))
        }
    };
    let has_aggregate = select.projection.iter().any(|item| match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
            contains_aggregate(e)
        }
        _ => false,
    }) || select.having.as_ref().is_some_and(contains_aggregate);
    let grouped = has_aggregate || !group_exprs.is_empty() || window.is_some();
    let body = if !grouped {
        if let Some((Emit::Final, at)) = emit {
            return Err(error_at(at, "EMIT FINAL needs a window: use FROM TUMBLE(src, ts, INTERVAL '1' MINUTE) ... GROUP BY ..., or EMIT CHANGES"));
        }
        if select.having.is_some() {
            return Err(error_on(
                select
                    .having
                    .as_ref()
                    .unwrap_or(&SqlExpr::Value(ast::Value::Null.into())),
                "HAVING needs GROUP BY or an aggregate",
            ));
        }
        Body::Map(projection(&select.projection, &mut scope)?)
    } else {
        let emit = match emit {
            Some((Emit::Final, at)) if window.is_none() => {
                return Err(error_at(at, "EMIT FINAL needs a window: use FROM TUMBLE(src, ts, INTERVAL '1' MINUTE) ... GROUP BY ..., or EMIT CHANGES"))
            }
            Some((e, _)) => e,
            None => Emit::Changes,
        };
        Body::Aggregate(aggregate(&select, &group_exprs, window, emit, &mut scope)?)
    };
    let _ = &scope.topic;
    Ok(Query {
        output,
        source: Source {
            topic: source_topic,
            json: scope.uses_json,
            event_time,
        },
        filter,
        body,
        sink: None,
    })
}

fn object_name(name: &ast::ObjectName) -> String {
    name.0
        .iter()
        .map(|p| match p {
            ast::ObjectNamePart::Identifier(i) => i.value.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn window_function(
    func: &str,
    args: &[FunctionArg],
    at: Location,
) -> Result<(String, Option<Window>, Option<SqlExpr>)> {
    let exprs: Vec<&SqlExpr> = args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
            _ => Err(error_at(
                at,
                format!("{func}(...): arguments are a topic, a time column and intervals"),
            )),
        })
        .collect::<Result<_>>()?;
    let upper = func.to_ascii_uppercase();
    let (want, usage) = match upper.as_str() {
        "TUMBLE" => (4, "TUMBLE(<topic>, <time column>, INTERVAL '1' MINUTE)"),
        "HOP" => (
            5,
            "HOP(<topic>, <time column>, <slide INTERVAL>, <size INTERVAL>)",
        ),
        "SESSION" => (4, "SESSION(<topic>, <time column>, <gap INTERVAL>)"),
        _ => {
            return Err(error_at(
                at,
                format!("unknown window function '{func}': use TUMBLE, HOP or SESSION"),
            ))
        }
    };
    if exprs.len() + 1 != want {
        return Err(error_at(
            at,
            format!("{upper} takes {} arguments: {usage}", want - 1),
        ));
    }
    let topic = match exprs[0] {
        SqlExpr::Identifier(i) => i.value.clone(),
        SqlExpr::CompoundIdentifier(parts) => parts
            .iter()
            .map(|p| p.value.clone())
            .collect::<Vec<_>>()
            .join("."),
        other => {
            return Err(error_on(
                other,
                format!("the first argument of {upper} is the source topic: {usage}"),
            ))
        }
    };
    let interval = |e: &SqlExpr| {
        interval_ms(e).filter(|ms| *ms > 0).ok_or_else(|| {
            error_on(
                e,
                format!("expected a positive INTERVAL, e.g. INTERVAL '5' MINUTE: {usage}"),
            )
        })
    };
    let window = match upper.as_str() {
        "TUMBLE" => Window::Tumble {
            size_ms: interval(exprs[2])?,
        },
        "HOP" => {
            let (slide_ms, size_ms) = (interval(exprs[2])?, interval(exprs[3])?);
            if size_ms % slide_ms != 0 {
                return Err(error_on(exprs[3], format!("HOP: the size ({size_ms} ms) must be a multiple of the slide ({slide_ms} ms)")));
            }
            Window::Hop { slide_ms, size_ms }
        }
        _ => Window::Session {
            gap_ms: interval(exprs[2])?,
        },
    };
    Ok((topic, Some(window), Some(exprs[1].clone())))
}

/// `INTERVAL '5' MINUTE`, `INTERVAL '5 minutes'`, `INTERVAL '500' MILLISECOND`.
fn interval_ms(e: &SqlExpr) -> Option<i64> {
    let SqlExpr::Interval(iv) = e else {
        return None;
    };
    let text = match &*iv.value {
        SqlExpr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) => s.clone(),
            ast::Value::Number(n, _) => n.to_string(),
            _ => return None,
        },
        _ => return None,
    };
    match &iv.leading_field {
        None => parse_duration(&text),
        Some(field) => {
            let unit = format!("{field:?}").to_ascii_lowercase();
            let unit = if unit.contains("milli") {
                "ms"
            } else if unit.starts_with("second") {
                "s"
            } else if unit.starts_with("minute") {
                "m"
            } else if unit.starts_with("hour") {
                "h"
            } else if unit.starts_with("day") {
                "d"
            } else {
                return None;
            };
            parse_duration(&format!("{}{unit}", text.trim()))
        }
    }
}

const AGGREGATES: [&str; 6] = ["count", "sum", "min", "max", "avg", "approx_count_distinct"];

fn function_name(f: &ast::Function) -> String {
    object_name(&f.name).to_ascii_lowercase()
}

fn contains_aggregate(e: &SqlExpr) -> bool {
    let mut found = false;
    visit(e, &mut |e| {
        if let SqlExpr::Function(f) = e {
            if AGGREGATES.contains(&function_name(f).as_str()) {
                found = true;
            }
        }
    });
    found
}

/// Calls `f` on `e` and every sub-expression we plan.
fn visit(e: &SqlExpr, f: &mut dyn FnMut(&SqlExpr)) {
    f(e);
    match e {
        SqlExpr::BinaryOp { left, right, .. } => {
            visit(left, f);
            visit(right, f);
        }
        SqlExpr::UnaryOp { expr, .. }
        | SqlExpr::Nested(expr)
        | SqlExpr::IsNull(expr)
        | SqlExpr::IsNotNull(expr)
        | SqlExpr::Cast { expr, .. } => visit(expr, f),
        SqlExpr::Like { expr, pattern, .. } | SqlExpr::ILike { expr, pattern, .. } => {
            visit(expr, f);
            visit(pattern, f);
        }
        SqlExpr::Between {
            expr, low, high, ..
        } => {
            visit(expr, f);
            visit(low, f);
            visit(high, f);
        }
        SqlExpr::In {
            expr,
            target: ast::InTarget::List(list),
            ..
        } => {
            visit(expr, f);
            list.iter().for_each(|x| visit(x, f));
        }
        SqlExpr::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            if let Some(o) = operand {
                visit(o, f);
            }
            for c in conditions {
                visit(&c.condition, f);
                visit(&c.result, f);
            }
            if let Some(x) = else_result {
                visit(x, f);
            }
        }
        SqlExpr::Function(func) => {
            if let FunctionArguments::List(list) = &func.args {
                for a in &list.args {
                    if let FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) = a {
                        visit(x, f);
                    }
                }
            }
        }
        _ => {}
    }
}

fn projection(items: &[SelectItem], scope: &mut Scope<'_>) -> Result<Projection> {
    if items.len() == 1 && matches!(items[0], SelectItem::Wildcard(_)) {
        return Ok(Projection::Star);
    }
    let mut columns = Vec::new();
    for (name, e) in named_items(items, "SELECT * must be alone; otherwise list the columns")? {
        columns.push((name, input_expr(e, scope)?));
    }
    dedupe_names(&mut columns);
    Ok(Projection::Columns(columns))
}

/// The select list's expressions with their output names; `refusal` for a wildcard.
fn named_items<'e>(items: &'e [SelectItem], refusal: &str) -> Result<Vec<(String, &'e SqlExpr)>> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (e, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
            other => return Err(error_on(other, refusal)),
        };
        out.push((alias.unwrap_or_else(|| output_name(e, i)), e));
    }
    Ok(out)
}

fn output_name(e: &SqlExpr, i: usize) -> String {
    match e {
        SqlExpr::Identifier(id) => id.value.clone(),
        SqlExpr::CompoundIdentifier(parts) => {
            parts.last().map_or(format!("col{i}"), |p| p.value.clone())
        }
        SqlExpr::Function(f) => function_name(f),
        SqlExpr::Nested(inner) => output_name(inner, i),
        _ => format!("col{}", i + 1),
    }
}

fn dedupe_names(columns: &mut [(String, Expr)]) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for (name, _) in columns.iter_mut() {
        let n = seen.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            *name = format!("{name}_{n}");
        }
    }
}

fn is_window_bound(e: &SqlExpr) -> Option<usize> {
    match e {
        SqlExpr::Identifier(i) if i.value.eq_ignore_ascii_case("window_start") => Some(0),
        SqlExpr::Identifier(i) if i.value.eq_ignore_ascii_case("window_end") => Some(1),
        _ => None,
    }
}

fn aggregate(
    select: &ast::Select,
    group: &[SqlExpr],
    window: Option<Window>,
    emit: Emit,
    scope: &mut Scope<'_>,
) -> Result<Aggregate> {
    let mut keys = Vec::new();
    let mut key_sources: Vec<&SqlExpr> = Vec::new();
    let mut bounds = [false, false];
    for g in group {
        match is_window_bound(g) {
            Some(b) if window.is_some() => bounds[b] = true,
            Some(_) => {
                return Err(error_on(
                    g,
                    "window_start/window_end need a window: FROM TUMBLE|HOP|SESSION(...)",
                ))
            }
            None => {
                // GROUP BY 1: the select list's first item.
                let g = match g {
                    SqlExpr::Value(v) => match &v.value {
                        ast::Value::Number(n, _) => {
                            let i: usize = n.parse().unwrap_or(0);
                            match select.projection.get(i.wrapping_sub(1)) {
                                Some(SelectItem::UnnamedExpr(e))
                                | Some(SelectItem::ExprWithAlias { expr: e, .. }) => e,
                                _ => {
                                    return Err(error_on(
                                        g,
                                        format!("GROUP BY {n}: no such select-list item"),
                                    ))
                                }
                            }
                        }
                        _ => g,
                    },
                    _ => g,
                };
                if contains_aggregate(g) {
                    return Err(error_on(g, "GROUP BY cannot hold an aggregate"));
                }
                key_sources.push(g);
                keys.push(input_expr(g, scope)?);
            }
        }
    }
    if window.is_some() && !(bounds[0] && bounds[1]) {
        return Err(error_on(
            &select.group_by,
            "a windowed query must GROUP BY window_start, window_end (and its keys)",
        ));
    }
    let mut planner = RowPlanner {
        keys: key_sources,
        aggregates: Vec::new(),
        windowed: window.is_some(),
        select,
    };
    let mut columns = Vec::new();
    let pending = named_items(
        &select.projection,
        "SELECT * cannot be used with GROUP BY: list the keys and aggregates",
    )?;
    for (name, e) in pending {
        columns.push((name, planner.row_expr(e, scope)?));
    }
    dedupe_names(&mut columns);
    let having = select
        .having
        .as_ref()
        .map(|h| planner.row_expr(h, scope))
        .transpose()?;
    let n_keys = keys.len();
    let aggregates = planner
        .aggregates
        .into_iter()
        .map(|(_, call)| call)
        .collect::<Vec<_>>();
    // Window slots come after the aggregates; the planner used placeholders.
    let window_slot = n_keys + aggregates.len();
    let fix = |e: Expr| relocate(e, window_slot);
    Ok(Aggregate {
        window,
        keys,
        aggregates,
        having: having.map(fix),
        columns: columns.into_iter().map(|(n, e)| (n, fix(e))).collect(),
        emit,
    })
}

/// Placeholder slots for window_start/window_end while aggregates are still being
/// numbered.
const WINDOW_START: usize = usize::MAX - 1;
const WINDOW_END: usize = usize::MAX;

fn relocate(e: Expr, window_slot: usize) -> Expr {
    let r = |e: Box<Expr>| Box::new(relocate(*e, window_slot));
    match e {
        Expr::Slot(WINDOW_START) => Expr::Slot(window_slot),
        Expr::Slot(WINDOW_END) => Expr::Slot(window_slot + 1),
        Expr::Binary(a, op, b) => Expr::Binary(r(a), op, r(b)),
        Expr::Not(a) => Expr::Not(r(a)),
        Expr::Neg(a) => Expr::Neg(r(a)),
        Expr::IsNull { expr, negated } => Expr::IsNull {
            expr: r(expr),
            negated,
        },
        Expr::Like {
            expr,
            pattern,
            negated,
            case_insensitive,
        } => Expr::Like {
            expr: r(expr),
            pattern: r(pattern),
            negated,
            case_insensitive,
        },
        Expr::Regex {
            expr,
            pattern,
            negated,
        } => Expr::Regex {
            expr: r(expr),
            pattern,
            negated,
        },
        Expr::InList {
            expr,
            list,
            negated,
        } => Expr::InList {
            expr: r(expr),
            list: list.into_iter().map(|x| relocate(x, window_slot)).collect(),
            negated,
        },
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => Expr::Between {
            expr: r(expr),
            low: r(low),
            high: r(high),
            negated,
        },
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => Expr::Case {
            operand: operand.map(r),
            whens: whens
                .into_iter()
                .map(|(a, b)| (relocate(a, window_slot), relocate(b, window_slot)))
                .collect(),
            otherwise: otherwise.map(r),
        },
        Expr::Cast(a, t) => Expr::Cast(r(a), t),
        Expr::Call(f, args) => Expr::Call(
            f,
            args.into_iter().map(|x| relocate(x, window_slot)).collect(),
        ),
        Expr::JsonGet { base, key, text } => Expr::JsonGet {
            base: r(base),
            key: r(key),
            text,
        },
        other => other,
    }
}

struct RowPlanner<'s> {
    keys: Vec<&'s SqlExpr>,
    aggregates: Vec<(String, AggCall)>,
    windowed: bool,
    select: &'s ast::Select,
}

impl RowPlanner<'_> {
    fn row_expr(&mut self, e: &SqlExpr, scope: &mut Scope<'_>) -> Result<Expr> {
        if let Some(i) = self.keys.iter().position(|k| same(k, e)) {
            return Ok(Expr::Slot(i));
        }
        if let Some(b) = is_window_bound(e) {
            if !self.windowed {
                return Err(error_on(
                    e,
                    "window_start/window_end need a window: FROM TUMBLE|HOP|SESSION(...)",
                ));
            }
            return Ok(Expr::Slot(if b == 0 { WINDOW_START } else { WINDOW_END }));
        }
        if let SqlExpr::Function(f) = e {
            let name = function_name(f);
            if AGGREGATES.contains(&name.as_str()) {
                let call = aggregate_call(f, &name, scope)?;
                let id = format!("{call:?}");
                let slot = match self.aggregates.iter().position(|(i, _)| *i == id) {
                    Some(i) => i,
                    None => {
                        self.aggregates.push((id, call));
                        self.aggregates.len() - 1
                    }
                };
                return Ok(Expr::Slot(self.keys.len() + slot));
            }
        }
        if let SqlExpr::Identifier(_)
        | SqlExpr::CompoundIdentifier(_)
        | SqlExpr::CompoundFieldAccess { .. } = e
        {
            // An alias of a grouped select item (GROUP BY alias).
            if let Some(i) = self.keys.iter().position(|k| {
                self.select.projection.iter().any(|item| matches!(item, SelectItem::ExprWithAlias { expr, alias } if same(expr, k) && matches!(e, SqlExpr::Identifier(id) if id.value == alias.value)))
            }) {
                return Ok(Expr::Slot(i));
            }
            return Err(error_on(
                e,
                format!("column `{e}` must appear in GROUP BY or be used in an aggregate"),
            ));
        }
        // Anything else: plan its parts in row context.
        let mut inner = RowContext {
            planner: self,
            scope,
        };
        plan_expr(e, &mut inner)
    }
}

/// Equality of two SQL expressions as written, ignoring positions and spacing: keywords,
/// function names and unquoted identifiers compare case-insensitively, quoted
/// identifiers and literals exactly (`'Unknown'` is not `'UNKNOWN'`, `"userId"` is not
/// `"userid"`).
fn same(a: &SqlExpr, b: &SqlExpr) -> bool {
    let tokens = |e: &SqlExpr| {
        Tokenizer::new(&PostgreSqlDialect {}, &e.to_string())
            .tokenize()
            .map(|t| {
                t.into_iter()
                    .filter(|t| !matches!(t, Token::Whitespace(_)))
                    .collect::<Vec<_>>()
            })
    };
    match (tokens(a), tokens(b)) {
        (Ok(x), Ok(y)) => {
            x.len() == y.len()
                && x.iter().zip(&y).all(|pair| match pair {
                    (Token::Word(v), Token::Word(w)) => {
                        v.quote_style == w.quote_style
                            && if v.quote_style.is_none() {
                                v.value.eq_ignore_ascii_case(&w.value)
                            } else {
                                v.value == w.value
                            }
                    }
                    (t, u) => t == u,
                })
        }
        _ => a.to_string() == b.to_string(),
    }
}

fn aggregate_call(f: &ast::Function, name: &str, scope: &mut Scope<'_>) -> Result<AggCall> {
    if f.over.is_some() {
        return Err(error_on(
            f,
            "window functions (OVER) are not supported: use a window in FROM",
        ));
    }
    let (args, distinct) = match &f.args {
        FunctionArguments::List(list) => (
            &list.args[..],
            matches!(
                list.duplicate_treatment,
                Some(ast::DuplicateTreatment::Distinct)
            ),
        ),
        FunctionArguments::None => (&[][..], false),
        FunctionArguments::Subquery(_) => return Err(error_on(f, "subqueries are not supported")),
    };
    let star = matches!(args, [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]);
    let func = match (name, distinct, star) {
        ("count", false, true) => AggFunc::Count,
        ("count", false, false) => AggFunc::Count,
        ("count", true, false) => AggFunc::CountDistinct,
        ("sum", false, false) => AggFunc::Sum,
        ("min", false, false) => AggFunc::Min,
        ("max", false, false) => AggFunc::Max,
        ("avg", false, false) => AggFunc::Avg,
        ("approx_count_distinct", false, false) => AggFunc::ApproxCountDistinct,
        _ => return Err(error_on(f, format!("{}: write COUNT(*), COUNT(x), COUNT(DISTINCT x), SUM(x), MIN(x), MAX(x), AVG(x) or APPROX_COUNT_DISTINCT(x)", name.to_uppercase()))),
    };
    let arg = if star {
        None
    } else {
        match args {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(x))] => {
                if contains_aggregate(x) {
                    return Err(error_on(x, "aggregates cannot be nested"));
                }
                Some(input_expr(x, scope)?)
            }
            _ => {
                return Err(error_on(
                    f,
                    format!("{} takes one argument", name.to_uppercase()),
                ))
            }
        }
    };
    let filter = f
        .filter
        .as_ref()
        .map(|w| input_expr(w, scope))
        .transpose()?;
    Ok(AggCall { func, arg, filter })
}

/// How identifiers and aggregates are planned in one context.
trait Leaves {
    fn leaf(&mut self, e: &SqlExpr) -> Result<Option<Expr>>;
}

struct InputContext<'a, 'b> {
    scope: &'a mut Scope<'b>,
}

struct RowContext<'a, 'p, 'b> {
    planner: &'a mut RowPlanner<'p>,
    scope: &'a mut Scope<'b>,
}

impl Leaves for RowContext<'_, '_, '_> {
    fn leaf(&mut self, e: &SqlExpr) -> Result<Option<Expr>> {
        match e {
            SqlExpr::Identifier(_)
            | SqlExpr::CompoundIdentifier(_)
            | SqlExpr::CompoundFieldAccess { .. }
            | SqlExpr::Function(_) => {
                if let SqlExpr::Function(f) = e {
                    if !AGGREGATES.contains(&function_name(f).as_str())
                        && !self.planner.keys.iter().any(|k| same(k, e))
                    {
                        return Ok(None);
                    }
                }
                self.planner.row_expr(e, self.scope).map(Some)
            }
            _ if self.planner.keys.iter().any(|k| same(k, e)) => {
                self.planner.row_expr(e, self.scope).map(Some)
            }
            _ => Ok(None),
        }
    }
}

impl Leaves for InputContext<'_, '_> {
    fn leaf(&mut self, e: &SqlExpr) -> Result<Option<Expr>> {
        let parts: Vec<String> = match e {
            SqlExpr::Identifier(i) => vec![i.value.clone()],
            SqlExpr::CompoundIdentifier(parts) => parts.iter().map(|p| p.value.clone()).collect(),
            SqlExpr::CompoundFieldAccess { root, access_chain } => {
                let mut parts = match &**root {
                    SqlExpr::Identifier(i) => vec![i.value.clone()],
                    SqlExpr::CompoundIdentifier(ps) => ps.iter().map(|p| p.value.clone()).collect(),
                    // A keyword such as `user` parses as a call without parentheses.
                    SqlExpr::Function(f) if matches!(f.args, FunctionArguments::None) => {
                        vec![object_name(&f.name)]
                    }
                    _ => return Ok(None),
                };
                for access in access_chain {
                    match access {
                        ast::AccessExpr::Dot(SqlExpr::Identifier(i)) => parts.push(i.value.clone()),
                        _ => {
                            return Err(error_on(
                                e,
                                "use a.b.c for nested fields, or -> / ->> for JSON access",
                            ))
                        }
                    }
                }
                parts
            }
            SqlExpr::Function(f) if AGGREGATES.contains(&function_name(f).as_str()) => {
                return Err(error_on(
                    e,
                    "aggregates belong in the select list or HAVING of a grouped query",
                ))
            }
            _ => return Ok(None),
        };
        let mut parts = parts;
        if parts.len() > 1 && self.scope.names.iter().any(|n| *n == parts[0]) {
            parts.remove(0);
        }
        let meta = match parts[0].to_ascii_lowercase().as_str() {
            "_key" => Some(Meta::Key),
            "_value" => Some(Meta::Value),
            "_timestamp" => Some(Meta::Timestamp),
            "_partition" => Some(Meta::Partition),
            "_offset" => Some(Meta::Offset),
            _ => None,
        };
        if let (Some(meta), 1) = (meta, parts.len()) {
            return Ok(Some(Expr::Meta(meta)));
        }
        if let Some(columns) = &self.scope.columns {
            if !columns.contains(&parts[0]) {
                let closest = columns.iter().min_by_key(|c| edit_distance(c, &parts[0]));
                let hint = match closest {
                    Some(c) if edit_distance(c, &parts[0]) <= 3 => format!("; did you mean `{c}`?"),
                    _ => String::new(),
                };
                return Err(error_on(
                    e,
                    format!(
                        "unknown column `{}` in topic '{}' (its records have: {}){hint}",
                        parts[0],
                        self.scope.topic,
                        columns.join(", ")
                    ),
                ));
            }
        }
        self.scope.uses_json = true;
        Ok(Some(Expr::Field(parts)))
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + (ca != cb) as usize)
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

fn input_expr(e: &SqlExpr, scope: &mut Scope<'_>) -> Result<Expr> {
    plan_expr(e, &mut InputContext { scope })
}

fn plan_expr(e: &SqlExpr, ctx: &mut dyn Leaves) -> Result<Expr> {
    if let Some(leaf) = ctx.leaf(e)? {
        return Ok(leaf);
    }
    let b = |x: &SqlExpr, ctx: &mut dyn Leaves| plan_expr(x, ctx).map(Box::new);
    Ok(match e {
        SqlExpr::Value(v) => Expr::Literal(literal(&v.value).ok_or_else(|| error_on(e, format!("unsupported literal {v}")))?),
        SqlExpr::Interval(_) => Expr::Literal(Value::Int(interval_ms(e).ok_or_else(|| error_on(e, "unsupported INTERVAL: write e.g. INTERVAL '5' MINUTE"))?)),
        SqlExpr::Nested(x) => plan_expr(x, ctx)?,
        SqlExpr::BinaryOp { left, op, right } => {
            let op2 = match op {
                BinaryOperator::Plus => BinOp::Add,
                BinaryOperator::Minus => BinOp::Sub,
                BinaryOperator::Multiply => BinOp::Mul,
                BinaryOperator::Divide => BinOp::Div,
                BinaryOperator::Modulo => BinOp::Mod,
                BinaryOperator::Eq => BinOp::Eq,
                BinaryOperator::NotEq => BinOp::Ne,
                BinaryOperator::Lt => BinOp::Lt,
                BinaryOperator::LtEq => BinOp::Le,
                BinaryOperator::Gt => BinOp::Gt,
                BinaryOperator::GtEq => BinOp::Ge,
                BinaryOperator::And => BinOp::And,
                BinaryOperator::Or => BinOp::Or,
                BinaryOperator::StringConcat => BinOp::Concat,
                BinaryOperator::PGRegexMatch
                | BinaryOperator::PGRegexIMatch
                | BinaryOperator::PGRegexNotMatch
                | BinaryOperator::PGRegexNotIMatch => {
                    let insensitive = matches!(op, BinaryOperator::PGRegexIMatch | BinaryOperator::PGRegexNotIMatch);
                    let negated = matches!(op, BinaryOperator::PGRegexNotMatch | BinaryOperator::PGRegexNotIMatch);
                    return Ok(Expr::Regex { expr: b(left, ctx)?, pattern: pattern(right, insensitive)?, negated });
                }
                BinaryOperator::Arrow | BinaryOperator::LongArrow => {
                    return Ok(Expr::JsonGet { base: b(left, ctx)?, key: b(right, ctx)?, text: matches!(op, BinaryOperator::LongArrow) })
                }
                other => return Err(error_on(e, format!("operator {other} is not supported"))),
            };
            Expr::Binary(b(left, ctx)?, op2, b(right, ctx)?)
        }
        SqlExpr::UnaryOp { op, expr } => match op {
            UnaryOperator::Not => Expr::Not(b(expr, ctx)?),
            UnaryOperator::Minus => Expr::Neg(b(expr, ctx)?),
            UnaryOperator::Plus => plan_expr(expr, ctx)?,
            other => return Err(error_on(e, format!("operator {other} is not supported"))),
        },
        SqlExpr::IsNull(x) => Expr::IsNull { expr: b(x, ctx)?, negated: false },
        SqlExpr::IsNotNull(x) => Expr::IsNull { expr: b(x, ctx)?, negated: true },
        SqlExpr::IsTrue(x) => Expr::Binary(b(x, ctx)?, BinOp::Eq, Box::new(Expr::Literal(Value::Bool(true)))),
        SqlExpr::IsFalse(x) => Expr::Binary(b(x, ctx)?, BinOp::Eq, Box::new(Expr::Literal(Value::Bool(false)))),
        SqlExpr::Like { negated, expr, pattern, escape_char: None, any: false } => {
            Expr::Like { expr: b(expr, ctx)?, pattern: b(pattern, ctx)?, negated: *negated, case_insensitive: false }
        }
        SqlExpr::ILike { negated, expr, pattern, escape_char: None, any: false } => {
            Expr::Like { expr: b(expr, ctx)?, pattern: b(pattern, ctx)?, negated: *negated, case_insensitive: true }
        }
        SqlExpr::In { expr, target: ast::InTarget::List(list), negated, .. } => Expr::InList {
            expr: b(expr, ctx)?,
            list: list.iter().map(|x| plan_expr(x, ctx)).collect::<Result<_>>()?,
            negated: *negated,
        },
        SqlExpr::Between { expr, negated, low, high } => {
            Expr::Between { expr: b(expr, ctx)?, low: b(low, ctx)?, high: b(high, ctx)?, negated: *negated }
        }
        SqlExpr::Case { operand, conditions, else_result, .. } => Expr::Case {
            operand: operand.as_ref().map(|o| b(o, ctx)).transpose()?,
            whens: conditions
                .iter()
                .map(|c| Ok((plan_expr(&c.condition, ctx)?, plan_expr(&c.result, ctx)?)))
                .collect::<Result<_>>()?,
            otherwise: else_result.as_ref().map(|x| b(x, ctx)).transpose()?,
        },
        SqlExpr::Cast { expr, data_type, .. } => Expr::Cast(b(expr, ctx)?, cast_type(data_type).ok_or_else(|| {
            error_on(e, format!("cannot CAST to {data_type}: use BIGINT, INT, DOUBLE, FLOAT, VARCHAR, TEXT, STRING, BOOLEAN or TIMESTAMP"))
        })?),
        SqlExpr::Substring { expr, substring_from, substring_for, .. } => {
            let mut args = vec![plan_expr(expr, ctx)?];
            args.push(match substring_from {
                Some(f) => plan_expr(f, ctx)?,
                None => Expr::Literal(Value::Int(1)),
            });
            if let Some(n) = substring_for {
                args.push(plan_expr(n, ctx)?);
            }
            Expr::Call(Func::Substring, args)
        }
        SqlExpr::Trim { expr, trim_where: None, trim_what: None, .. } => Expr::Call(Func::Trim, vec![plan_expr(expr, ctx)?]),
        SqlExpr::Extract { field, expr, .. } => Expr::Call(
            Func::Extract,
            vec![Expr::Literal(Value::Str(field.to_string().to_ascii_lowercase())), plan_expr(expr, ctx)?],
        ),
        SqlExpr::Ceil { expr, .. } => Expr::Call(Func::Ceil, vec![plan_expr(expr, ctx)?]),
        SqlExpr::Floor { expr, .. } => Expr::Call(Func::Floor, vec![plan_expr(expr, ctx)?]),
        SqlExpr::Function(f) => scalar_function(f, e, ctx)?,
        SqlExpr::Subquery(_) | SqlExpr::Exists { .. } | SqlExpr::In { .. } => {
            return Err(error_on(e, "subqueries are not supported"))
        }
        other => return Err(error_on(e, format!("`{other}` is not supported here (see docs/sql.md for what is)"))),
    })
}

fn scalar_function(f: &ast::Function, e: &SqlExpr, ctx: &mut dyn Leaves) -> Result<Expr> {
    if f.over.is_some() {
        return Err(error_on(
            e,
            "window functions (OVER) are not supported: use a window in FROM",
        ));
    }
    let name = function_name(f);
    let args: Vec<&SqlExpr> = match &f.args {
        FunctionArguments::List(list) => list
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => Ok(x),
                _ => Err(error_on(e, format!("{name}: unsupported argument"))),
            })
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    if name == "header" {
        return match args.as_slice() {
            [SqlExpr::Value(v)] => match &v.value {
                ast::Value::SingleQuotedString(s) => Ok(Expr::Header(s.clone())),
                _ => Err(error_on(e, "header('name') takes a string literal")),
            },
            _ => Err(error_on(e, "header('name') takes a string literal")),
        };
    }
    if name == "regexp_like" {
        let insensitive =
            match args.as_slice() {
                [_, _] => false,
                [_, _, flags] => match string_literal(flags).as_deref() {
                    Some("i") => true,
                    Some("c") => false,
                    _ => return Err(error_on(
                        *flags,
                        "regexp_like flags: write 'i' (case-insensitive) or 'c' (case-sensitive)",
                    )),
                },
                _ => {
                    return Err(error_on(
                        e,
                        "regexp_like takes (text, 'pattern') or (text, 'pattern', 'i')",
                    ))
                }
            };
        return Ok(Expr::Regex {
            expr: Box::new(plan_expr(args[0], ctx)?),
            pattern: pattern(args[1], insensitive)?,
            negated: false,
        });
    }
    let (func, arity): (Func, std::ops::RangeInclusive<usize>) = match name.as_str() {
        "lower" => (Func::Lower, 1..=1),
        "upper" => (Func::Upper, 1..=1),
        "length" | "char_length" | "character_length" => (Func::Length, 1..=1),
        "substring" | "substr" => (Func::Substring, 2..=3),
        "concat" => (Func::Concat, 1..=64),
        "coalesce" => (Func::Coalesce, 1..=64),
        "nullif" => (Func::NullIf, 2..=2),
        "trim" => (Func::Trim, 1..=1),
        "replace" => (Func::Replace, 3..=3),
        "abs" => (Func::Abs, 1..=1),
        "round" => (Func::Round, 1..=2),
        "floor" => (Func::Floor, 1..=1),
        "ceil" | "ceiling" => (Func::Ceil, 1..=1),
        "to_timestamp" => (Func::ToTimestamp, 1..=1),
        "epoch_ms" => (Func::EpochMs, 1..=1),
        "date_trunc" => (Func::DateTrunc, 2..=2),
        other => {
            return Err(error_on(
                e,
                format!("unknown function `{other}` (docs/sql.md lists the functions)"),
            ))
        }
    };
    if !arity.contains(&args.len()) {
        return Err(error_on(
            e,
            format!(
                "{name} takes {} to {} arguments, not {}",
                arity.start(),
                arity.end(),
                args.len()
            ),
        ));
    }
    Ok(Expr::Call(
        func,
        args.into_iter()
            .map(|a| plan_expr(a, ctx))
            .collect::<Result<_>>()?,
    ))
}

fn string_literal(e: &SqlExpr) -> Option<String> {
    match e {
        SqlExpr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The pattern of a regular-expression match: a string literal, compiled now.
fn pattern(e: &SqlExpr, insensitive: bool) -> Result<crate::expr::Pattern> {
    let text = string_literal(e).ok_or_else(|| {
        error_on(
            e,
            "a regular expression must be a string literal, e.g. '^rizz'",
        )
    })?;
    let text = if insensitive {
        format!("(?i){text}")
    } else {
        text
    };
    crate::expr::Pattern::new(&text).map_err(|m| error_on(e, m))
}

fn literal(v: &ast::Value) -> Option<Value> {
    Some(match v {
        ast::Value::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Float(n.parse().ok()?),
        },
        ast::Value::SingleQuotedString(s) => Value::Str(s.clone()),
        ast::Value::Boolean(b) => Value::Bool(*b),
        ast::Value::Null => Value::Null,
        _ => return None,
    })
}

fn cast_type(t: &DataType) -> Option<CastType> {
    let name = t.to_string().to_ascii_uppercase();
    let base = name.split('(').next().unwrap_or("").trim().to_string();
    Some(match base.as_str() {
        "BIGINT" | "INT" | "INTEGER" | "SMALLINT" | "INT8" | "INT4" => CastType::Int,
        "DOUBLE" | "DOUBLE PRECISION" | "FLOAT" | "REAL" | "FLOAT8" | "NUMERIC" | "DECIMAL" => {
            CastType::Float
        }
        "VARCHAR" | "TEXT" | "STRING" | "CHAR" | "CHARACTER VARYING" => CastType::Text,
        "BOOLEAN" | "BOOL" => CastType::Bool,
        "TIMESTAMP" | "TIMESTAMPTZ" | "TIMESTAMP WITH TIME ZONE" => CastType::Timestamp,
        _ => return None,
    })
}
