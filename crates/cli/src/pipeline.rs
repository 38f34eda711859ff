//! `freshet pipeline`: run a pipeline here against any Kafka-compatible cluster
//! (`run`), or manage the pipelines a Freshet server runs, over its HTTP API
//! (`create`, `list`, `describe`, `pause`, `resume`, `delete`).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use pipeline::runtime::{Stats, Status};

#[derive(clap::Args)]
pub struct PipelineArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run a pipeline in this process until SIGINT/SIGTERM. The same NAME on several
    /// processes is the same pipeline.
    Run {
        name: String,
        file: std::path::PathBuf,
        /// Bootstrap brokers, host:port,...
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Extra librdkafka properties, key=value (repeatable).
        #[arg(short = 'X', value_name = "KEY=VALUE")]
        properties: Vec<String>,
        /// This instance's name among the pipeline's instances (default: the host
        /// name). The pipeline's consumers are static members (KIP-345) with
        /// `group.instance.id` = NAME-INSTANCE: a process restarted after a crash takes
        /// its own place back at once, without waiting for the session to time out.
        /// Two instances on one machine need different names. `-X
        /// group.instance.id=...` overrides it.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Define (or redefine) a pipeline on a Freshet server: it runs there, and resumes
    /// after a restart.
    Create {
        name: String,
        file: std::path::PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
    },
    /// The pipelines a server knows, with their status.
    List {
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
    },
    /// One pipeline: status, source lag, records in/out, watermark, late and
    /// dead-lettered counts, last error.
    Describe {
        name: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
    },
    /// Stop a pipeline on every server and keep its definition (its groups are left;
    /// records wait in its sources).
    Pause {
        name: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
    },
    /// Run a paused pipeline again, from its checkpoints.
    Resume {
        name: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
    },
    /// Stop a pipeline and forget its definition.
    Delete {
        name: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
    },
}

pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    match args.command {
        Command::Run {
            name,
            file,
            brokers,
            properties,
            instance,
        } => run_here(&name, &file, &brokers, &properties, instance),
        Command::Create { name, file, http } => {
            let sql =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            print_answer(request(&http, "PUT", &format!("/pipelines/{name}"), &sql)?)
        }
        Command::List { http } => {
            let (status, body) = request(&http, "GET", "/pipelines", b"")?;
            if status != 200 {
                return print_answer((status, body));
            }
            let list: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
            println!(
                "{:<24} {:<9} {:>12} {:>12} {:>8} {:>8} {:>10}",
                "NAME", "STATUS", "IN", "OUT", "LATE", "DEAD", "LAG"
            );
            for p in list {
                let n = |k: &str| p[k].as_i64().map_or("-".to_string(), |v| v.to_string());
                println!(
                    "{:<24} {:<9} {:>12} {:>12} {:>8} {:>8} {:>10}",
                    p["name"].as_str().unwrap_or(""),
                    p["status"].as_str().unwrap_or(""),
                    n("records_in"),
                    n("records_out"),
                    n("late"),
                    n("dead_lettered"),
                    n("source_lag"),
                );
            }
            Ok(())
        }
        Command::Describe { name, http } => {
            print_answer(request(&http, "GET", &format!("/pipelines/{name}"), b"")?)
        }
        Command::Pause { name, http } => print_answer(request(
            &http,
            "PUT",
            &format!("/pipelines/{name}/pause"),
            b"",
        )?),
        Command::Resume { name, http } => print_answer(request(
            &http,
            "PUT",
            &format!("/pipelines/{name}/resume"),
            b"",
        )?),
        Command::Delete { name, http } => {
            let (status, body) = request(&http, "DELETE", &format!("/pipelines/{name}"), b"")?;
            if status == 204 {
                println!("deleted pipeline {name}");
                return Ok(());
            }
            print_answer((status, body))
        }
    }
}

fn run_here(
    name: &str,
    file: &std::path::Path,
    brokers: &str,
    properties: &[String],
    instance: Option<String>,
) -> anyhow::Result<()> {
    crate::init_logging();
    let sql =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    for property in properties {
        let (key, value) = property
            .split_once('=')
            .with_context(|| format!("-X {property}: expected KEY=VALUE"))?;
        client.set(key, value);
    }
    if client.get("group.instance.id").is_none() {
        let instance = instance.unwrap_or_else(pipeline::runtime::host_name);
        client.set("group.instance.id", format!("{name}-{instance}"));
    }
    // Refuse a bad file at once, with its line and column; the first run uses what
    // this compiled.
    let first = match pipeline::runtime::prepare(name, &sql, &client) {
        Ok(prepared) => Some(prepared),
        Err(err) if err.is_transient() => None,
        Err(err) => bail!("{err}"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let signal_stop = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(crate::serve::shutdown_signal());
                signal_stop.store(true, Ordering::Relaxed);
            }
        })?;
    let stats = Stats::new();
    println!("pipeline {name} running against {brokers}");
    let _ = std::io::stdout().flush();
    gateway::pipelines::supervise(name, &sql, &client, &stats, &stop, first);
    if *stats.status.lock().unwrap_or_else(|e| e.into_inner()) == Status::Failed {
        let error = stats
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        bail!("{}", error.unwrap_or_else(|| "the pipeline failed".into()));
    }
    println!("{}", serde_json::to_string(&stats.describe())?);
    Ok(())
}

/// Prints a JSON answer; a refusal becomes the error (with line and column for SQL).
fn print_answer((status, body): (u16, Vec<u8>)) -> anyhow::Result<()> {
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    if (200..300).contains(&status) {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let message = json["message"]
        .as_str()
        .map_or_else(|| json.to_string(), str::to_string);
    match (json["line"].as_u64(), json["column"].as_u64()) {
        (Some(line), Some(column)) => bail!("line {line}, column {column}: {message}"),
        _ => bail!("HTTP {status}: {message}"),
    }
}

/// One HTTP/1.1 request to the server's gateway (`host:port`), `Connection: close`.
fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(addr)
        .with_context(|| format!("cannot reach the Freshet HTTP API at {addr}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("malformed HTTP answer")?;
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status line")?;
    let mut body = answer[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || size > data.len() {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}
