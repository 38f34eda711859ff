//! The `freshet` binary. `serve` runs the broker on its embedded storage; the other
//! subcommands are Kafka-protocol tools that work against any Kafka-compatible
//! cluster (they go through librdkafka, never through broker internals).

mod gateway;
mod perf;
mod pipeline;
mod serve;
mod tools;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "freshet",
    version,
    about = "A Kafka-compatible event-streaming platform in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Create, list, describe, delete topics and alter their configs.
    Topic(tools::topic::TopicArgs),
    /// Produce one record per stdin line.
    Produce(tools::produce::ProduceArgs),
    /// Consume records and print them.
    Consume(tools::consume::ConsumeArgs),
    /// List and describe consumer groups (members, lag) and reset their offsets.
    Group(tools::group::GroupArgs),
    /// The HTTP gateway alone, in front of any Kafka-compatible cluster.
    Gateway(gateway::GatewayArgs),
    /// Benchmarks: producer and consumer throughput, end-to-end latency.
    Perf(perf::PerfArgs),
    /// Continuous SQL pipelines: run one here, or manage a server's.
    Pipeline(pipeline::PipelineArgs),
}

/// Logs go to stderr; `FRESHET_LOG` (or `RUST_LOG`) sets the filter, default `info`.
pub(crate) fn init_logging() {
    let filter = std::env::var("FRESHET_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Topic(args) => tools::topic::run(args),
        Command::Produce(args) => tools::produce::run(args),
        Command::Consume(args) => tools::consume::run(args),
        Command::Group(args) => tools::group::run(args),
        Command::Gateway(args) => gateway::run(args),
        Command::Perf(args) => perf::run(args),
        Command::Pipeline(args) => pipeline::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("freshet: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
