//! `freshet consume`: read records by assigning partitions directly (no consumer
//! group yet) and print each one through a format template.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext as _, Message, Offset, TopicPartitionList};

use super::{describe_code, describe_error, ConnectArgs, ToolContext};

/// Longest single wait in `poll`, so the stop conditions are checked regularly and
/// output is flushed soon after records stop arriving.
const POLL_WAIT_MAX: Duration = Duration::from_millis(100);

#[derive(clap::Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to consume from.
    topic: String,
    /// Start at the first record still in each partition (default: start at the end,
    /// printing only records produced from now on).
    #[arg(long, conflicts_with = "offset")]
    from_beginning: bool,
    /// Start at this offset in each partition; a negative N starts N records before
    /// the end.
    #[arg(long, allow_negative_numbers = true)]
    offset: Option<i64>,
    /// Stop after COUNT records.
    #[arg(short = 'n', long = "count", value_name = "COUNT")]
    count: Option<u64>,
    /// Consume only this partition (default: all partitions of the topic).
    #[arg(long)]
    partition: Option<i32>,
    /// Output template: %k key, %v value, %o offset, %p partition, %t timestamp (ms),
    /// %h headers (k=v,k=v), %% a percent sign; \n, \t, \r and \\ escapes.
    #[arg(long, default_value = "%v\\n", value_name = "FMT")]
    format: String,
    /// Stop once no record has arrived for MS milliseconds. With -n, stopping before
    /// COUNT records is an error.
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Stop once the end of every consumed partition has been reached.
    #[arg(short = 'e', long)]
    exit: bool,
}

pub fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let format = Template::parse(&args.format)?;
    if let Some(partition) = args.partition {
        if partition < 0 {
            bail!("--partition must not be negative, got {partition}");
        }
    }
    let start = match (args.from_beginning, args.offset) {
        (true, _) => Offset::Beginning,
        (false, Some(offset)) if offset >= 0 => Offset::Offset(offset),
        (false, Some(offset)) => Offset::OffsetTail(offset.unsigned_abs() as i64),
        (false, None) => Offset::End,
    };
    let config = args.connect.client_config(&[
        // librdkafka only lets a consumer assign partitions when it has a group id. The
        // group is never joined (no subscribe) and no offset is ever committed or read
        // from it, because every start position is explicit.
        ("group.id", "freshet-consume"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        (
            "enable.partition.eof",
            if args.exit { "true" } else { "false" },
        ),
        // An explicit --offset that is out of range is the user's mistake, not a cue to
        // silently jump elsewhere.
        (
            "auto.offset.reset",
            if args.offset.is_some() {
                "error"
            } else {
                "earliest"
            },
        ),
    ]);
    let consumer: BaseConsumer<ToolContext> =
        BaseConsumer::from_config_and_context(&config, args.connect.context())
            .context("cannot create Kafka consumer")?;

    let partitions = super::topic_partitions(consumer.client(), &args.topic, args.partition)
        .context("consume failed")?;
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        assignment
            .add_partition_offset(&args.topic, partition, start)
            .map_err(|err| anyhow!("consume failed: {}", describe_error(&err)))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|err| anyhow!("consume failed: {}", describe_error(&err)))?;

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match consume_loop(&consumer, &args, &format, partitions.len(), &mut out) {
        Err(err) if is_broken_pipe(&err) => Ok(()),
        Err(err) => {
            // Records printed before the failure are still worth having.
            let _ = out.flush();
            Err(err)
        }
        Ok(()) => match out.flush() {
            Err(err) if err.kind() == ErrorKind::BrokenPipe => Ok(()),
            flushed => flushed.context("cannot write stdout"),
        },
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|err| err.kind() == ErrorKind::BrokenPipe)
}

fn consume_loop(
    consumer: &BaseConsumer<ToolContext>,
    args: &ConsumeArgs,
    format: &Template,
    partition_count: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let idle_max = args.timeout_ms.map(Duration::from_millis);
    let mut consumed = 0u64;
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut last_record_at = Instant::now();
    loop {
        if args.count.is_some_and(|count| consumed >= count) {
            return Ok(());
        }
        if args.exit && at_end.len() == partition_count {
            return Ok(());
        }
        let mut wait = POLL_WAIT_MAX;
        if let Some(idle_max) = idle_max {
            let idle = last_record_at.elapsed();
            if idle >= idle_max {
                return match args.count {
                    Some(count) => Err(consumer.context().explain(format!(
                        "consume stopped: no record for {} ms, got {consumed} of {count} records",
                        idle_max.as_millis()
                    ))),
                    None => Ok(()),
                };
            }
            wait = wait.min(idle_max - idle);
        }
        match consumer.poll(wait) {
            None => out.flush()?,
            Some(Ok(message)) => {
                at_end.remove(&message.partition());
                format.write(&message, out)?;
                consumed += 1;
                last_record_at = Instant::now();
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(err)) if is_fatal(&err) => {
                if let (
                    KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset),
                    Some(offset),
                ) = (&err, args.offset)
                {
                    // With auto.offset.reset=error librdkafka reports the cluster's
                    // OFFSET_OUT_OF_RANGE under its own _AUTO_OFFSET_RESET code; name the
                    // Kafka error the cluster returned, as for every other failure.
                    bail!(
                        "consume failed: {} (--offset {offset} is outside a partition's log)",
                        describe_code(RDKafkaErrorCode::OffsetOutOfRange)
                    );
                }
                bail!("consume failed: {}", describe_error(&err));
            }
            Some(Err(err)) => {
                // Transient client-side trouble (a broker connection dropped, say):
                // librdkafka retries by itself; remember it in case we time out.
                consumer.context().error(err, "while consuming");
            }
        }
    }
}

/// Errors that will not go away by waiting end the tool: the topic or partition is
/// gone or forbidden, the start offset is out of range (we asked for that to be an
/// error), or a batch cannot be decoded. Everything else (a dropped connection, a
/// broker that is not there yet, and any complaint from the group coordinator, which
/// this tool never uses beyond librdkafka's need for a group id) is retried by
/// librdkafka and only remembered for the message if we time out.
fn is_fatal(err: &KafkaError) -> bool {
    match err {
        KafkaError::MessageConsumptionFatal(_) => true,
        KafkaError::MessageConsumption(code) => matches!(
            code,
            RDKafkaErrorCode::OffsetOutOfRange
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::UnsupportedCompressionType
                | RDKafkaErrorCode::AutoOffsetReset
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::BadMessage
                | RDKafkaErrorCode::BadCompression
                | RDKafkaErrorCode::Fatal
        ),
        _ => false,
    }
}

/// A parsed `--format` template.
#[derive(Debug, PartialEq)]
struct Template {
    pieces: Vec<Piece>,
}

#[derive(Debug, PartialEq)]
enum Piece {
    Literal(Vec<u8>),
    Key,
    Value,
    Offset,
    Partition,
    Timestamp,
    Headers,
}

impl Template {
    fn parse(text: &str) -> anyhow::Result<Template> {
        let mut pieces = Vec::new();
        let mut literal = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            let field = match c {
                '%' => match chars.next() {
                    Some('k') => Piece::Key,
                    Some('v') => Piece::Value,
                    Some('o') => Piece::Offset,
                    Some('p') => Piece::Partition,
                    Some('t') => Piece::Timestamp,
                    Some('h') => Piece::Headers,
                    Some('%') => {
                        literal.push(b'%');
                        continue;
                    }
                    Some(other) => {
                        bail!("--format: unknown field %{other} (use %k %v %o %p %t %h or %%)")
                    }
                    None => bail!("--format: lone % at the end (use %% for a percent sign)"),
                },
                '\\' => {
                    let escaped = match chars.next() {
                        Some('n') => b'\n',
                        Some('t') => b'\t',
                        Some('r') => b'\r',
                        Some('\\') => b'\\',
                        Some(other) => {
                            bail!("--format: unknown escape \\{other} (use \\n \\t \\r or \\\\)")
                        }
                        None => bail!("--format: lone \\ at the end (use \\\\ for a backslash)"),
                    };
                    literal.push(escaped);
                    continue;
                }
                other => {
                    let mut buf = [0u8; 4];
                    literal.extend_from_slice(other.encode_utf8(&mut buf).as_bytes());
                    continue;
                }
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(field);
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Template { pieces })
    }

    fn write(&self, message: &BorrowedMessage<'_>, out: &mut impl Write) -> std::io::Result<()> {
        for piece in &self.pieces {
            match piece {
                Piece::Literal(bytes) => out.write_all(bytes)?,
                Piece::Key => out.write_all(message.key().unwrap_or_default())?,
                Piece::Value => out.write_all(message.payload().unwrap_or_default())?,
                Piece::Offset => write!(out, "{}", message.offset())?,
                Piece::Partition => write!(out, "{}", message.partition())?,
                Piece::Timestamp => {
                    write!(out, "{}", message.timestamp().to_millis().unwrap_or(-1))?
                }
                Piece::Headers => {
                    if let Some(headers) = message.headers() {
                        for (i, header) in headers.iter().enumerate() {
                            if i > 0 {
                                out.write_all(b",")?;
                            }
                            out.write_all(header.key.as_bytes())?;
                            out.write_all(b"=")?;
                            out.write_all(header.value.unwrap_or_default())?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Piece, Template};

    #[test]
    fn template_parses_fields_escapes_and_literals() {
        let template = Template::parse("%k=%v\\t%%%o\\n").unwrap();
        assert_eq!(
            template.pieces,
            vec![
                Piece::Key,
                Piece::Literal(b"=".to_vec()),
                Piece::Value,
                Piece::Literal(b"\t%".to_vec()),
                Piece::Offset,
                Piece::Literal(b"\n".to_vec()),
            ]
        );
        assert_eq!(
            Template::parse("é%p%t%h").unwrap().pieces,
            vec![
                Piece::Literal("é".as_bytes().to_vec()),
                Piece::Partition,
                Piece::Timestamp,
                Piece::Headers,
            ]
        );
    }

    #[test]
    fn template_rejects_unknown_fields_and_escapes() {
        assert!(Template::parse("%x").is_err());
        assert!(Template::parse("%").is_err());
        assert!(Template::parse("\\q").is_err());
        assert!(Template::parse("\\").is_err());
    }
}
