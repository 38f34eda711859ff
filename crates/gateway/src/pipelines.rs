//! Pipelines managed over HTTP: `PUT/GET/DELETE /pipelines/{name}`, `GET /pipelines`,
//! `PUT /pipelines/{name}/pause` and `/resume` (as Kafka Connect pauses a connector).
//!
//! Definitions (name → SQL text, or `{"sql", "paused": true}` while paused; a null
//! value deletes) live in the cluster, in the
//! `pipeline_topic` shared topic, so every gateway in front of the cluster knows them
//! and a restart resumes them. A gateway with `run_pipelines` runs every defined
//! pipeline in a thread of its own (the `pipeline` crate's runtime, a Kafka client of
//! the cluster like the rest of the gateway): several gateways running the same
//! pipeline are the same pipeline. A run that fails for a reason worth retrying (the
//! cluster away) is retried every second; one that cannot succeed (the SQL no longer
//! compiles, the state limit) stays failed with its error until redefined.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use pipeline::runtime::{self, Stats, Status};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::shared::{Event, SharedTopic, Start};
use crate::{ApiError, Gateway, GatewayConfig};

/// The defined pipelines, and the runs of this gateway.
pub struct Pipelines {
    client: ClientConfig,
    run: bool,
    max: usize,
    topic: Arc<SharedTopic>,
    producer: FutureProducer,
    defined: Arc<Runs>,
}

/// The definitions this gateway knows, and their runs here.
#[derive(Default)]
struct Runs {
    entries: Mutex<HashMap<String, Entry>>,
    /// Held through each [`apply`]: the follower of the shared topic and a PUT apply
    /// the same definition concurrently, and each must see what the other did, or both
    /// start a run and one of them is orphaned (running, never stopped, a second member
    /// of the pipeline's groups).
    changing: Mutex<()>,
}

impl Runs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Entry {
    sql: String,
    paused: bool,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pipelines {
    pub fn open(config: &GatewayConfig) -> anyhow::Result<Arc<Pipelines>> {
        let client = config.client();
        let defined: Arc<Runs> = Arc::default();
        let producer: FutureProducer = client
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000")
            .create()?;
        let follower = defined.clone();
        let (run, run_client) = (config.run_pipelines, client.clone());
        let topic = SharedTopic::follow(
            &client,
            &config.pipeline_topic,
            -1,
            Start::Beginning,
            "gateway-pipelines",
            move |event| {
                if let Event::Record { key, value } = event {
                    let Ok(name) = std::str::from_utf8(key) else {
                        return;
                    };
                    let definition = value.map(Definition::decode);
                    apply(&follower, &run_client, run, name, definition);
                }
            },
        )?;
        Ok(Arc::new(Pipelines {
            client,
            run: config.run_pipelines,
            max: config.max_pipelines,
            topic,
            producer,
            defined,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.defined.lock()
    }

    /// Stops every run (each writes a last checkpoint) and the follower.
    pub fn stop_all(&self) {
        self.topic.stop();
        let threads: Vec<_> = self
            .lock()
            .values_mut()
            .filter_map(|e| {
                e.stop.store(true, Ordering::Relaxed);
                e.thread.take()
            })
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }

    /// How many pipelines are defined.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn describe(&self, name: &str) -> Option<serde_json::Value> {
        self.lock().get(name).map(|e| describe(name, e))
    }
}

impl Pipelines {
    /// Adds each pipeline's figures (those `describe` shows) to a scrape's registry:
    /// records in and out, late and dead-lettered records, checkpoints, state bytes,
    /// source lag, watermark; per sink its rows and lag. At most `max_pipelines`
    /// pipelines, so the label cardinality is bounded.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        use std::sync::atomic::Ordering::Relaxed;
        type Labels = Vec<(&'static str, String)>;
        type Read<T> = fn(&Stats) -> T;
        let counters: [(&str, &str, Read<u64>); 5] = [
            ("records_in", "Source records a pipeline read", |s| s.records_in.load(Relaxed)),
            ("records_out", "Rows a pipeline wrote to its outputs and sinks' topics", |s| s.records_out.load(Relaxed)),
            ("late_records", "Records too late for their window, copied to the late topic", |s| s.late.load(Relaxed)),
            ("dead_lettered_records", "Records sent to the dead-letter topic (not JSON, an expression's error, a row a sink's database refused)", |s| s.dead_lettered.load(Relaxed)),
            ("checkpoints", "Checkpoints a pipeline wrote", |s| s.checkpoints.load(Relaxed)),
        ];
        let gauges: [(&str, &str, Read<Option<i64>>); 4] = [
            (
                "state_bytes",
                "Bytes of state a pipeline's operators hold here",
                |s| Some(s.state_bytes.load(Relaxed) as i64),
            ),
            (
                "source_lag",
                "Source records not read yet (over the partitions held here)",
                |s| {
                    let (a, b) = (s.lag.load(Relaxed), s.task_lag.load(Relaxed));
                    (a >= 0 || b >= 0).then(|| a.max(0) + b.max(0))
                },
            ),
            (
                "watermark_ms",
                "The lowest event-time watermark of a pipeline's windowed queries, epoch ms",
                |s| Some(s.watermark.load(Relaxed)).filter(|w| *w != i64::MIN),
            ),
            (
                "running",
                "1 while a pipeline runs here, 0 when stopped or failed",
                |s| {
                    Some(i64::from(
                        *s.status.lock().unwrap_or_else(|e| e.into_inner()) == Status::Running,
                    ))
                },
            ),
        ];
        let defined = self.lock();
        let mut names: Vec<&String> = defined.keys().collect();
        names.sort();
        let pipeline = registry.sub_registry_with_prefix("pipeline");
        for (name, help, read) in counters {
            let family: Family<Labels, Counter> = Family::default();
            for n in &names {
                let labels = vec![("pipeline", n.to_string())];
                family
                    .get_or_create(&labels)
                    .inc_by(read(&defined[*n].stats));
            }
            pipeline.register(name, help, family);
        }
        for (name, help, read) in gauges {
            let family: Family<Labels, Gauge> = Family::default();
            for n in &names {
                if let Some(v) = read(&defined[*n].stats) {
                    family
                        .get_or_create(&vec![("pipeline", n.to_string())])
                        .set(v);
                }
            }
            pipeline.register(name, help, family);
        }
        let rows: Family<Labels, Counter> = Family::default();
        let lag: Family<Labels, Gauge> = Family::default();
        for n in &names {
            let sinks = defined[*n]
                .stats
                .sinks
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (sink, s) in sinks.iter() {
                let labels = vec![("pipeline", n.to_string()), ("sink", sink.clone())];
                rows.get_or_create(&labels).inc_by(s.rows);
                if s.lag >= 0 {
                    lag.get_or_create(&labels).set(s.lag);
                }
            }
        }
        let sink = registry.sub_registry_with_prefix("sink");
        sink.register("rows", "Rows a sink applied to its target", rows);
        sink.register(
            "lag",
            "Rows of a sink's topic not applied to its target yet (over the partitions held here)",
            lag,
        );
    }
}

fn describe(name: &str, entry: &Entry) -> serde_json::Value {
    // Never the password of a sink's URL.
    let sql = pipeline::runtime::sink::redact(&entry.sql);
    let mut out = serde_json::json!({ "name": name, "sql": sql });
    if let (Some(out), serde_json::Value::Object(stats)) =
        (out.as_object_mut(), entry.stats.describe())
    {
        out.extend(stats);
    }
    out
}

/// A pipeline's definition as the shared topic holds it.
#[derive(Debug, Clone, PartialEq)]
struct Definition {
    sql: String,
    paused: bool,
}

impl Definition {
    /// SQL text while it runs (what every earlier version wrote), a JSON object while
    /// paused; SQL never starts with `{`.
    fn encode(&self) -> String {
        if self.paused {
            serde_json::json!({"sql": self.sql, "paused": true}).to_string()
        } else {
            self.sql.clone()
        }
    }

    fn decode(value: &[u8]) -> Definition {
        #[derive(serde::Deserialize)]
        struct Paused {
            sql: String,
            #[serde(default)]
            paused: bool,
        }
        match serde_json::from_slice::<Paused>(value) {
            Ok(p) if value.first() == Some(&b'{') => Definition {
                sql: p.sql,
                paused: p.paused,
            },
            _ => Definition {
                sql: String::from_utf8_lossy(value).into_owned(),
                paused: false,
            },
        }
    }
}

/// Makes this gateway's runs follow a definition (`None`: deleted).
fn apply(
    defined: &Runs,
    client: &ClientConfig,
    run: bool,
    name: &str,
    definition: Option<Definition>,
) {
    let _changing = defined.changing.lock().unwrap_or_else(|e| e.into_inner());
    let old = {
        let mut defined = defined.lock();
        if let (Some(old), Some(new)) = (defined.get(name), &definition) {
            if old.sql == new.sql && old.paused == new.paused {
                return;
            }
        }
        defined.remove(name)
    };
    if let Some(mut old) = old {
        old.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = old.thread.take() {
            // Outside the lock: the run writes its last checkpoint first.
            let _ = thread.join();
        }
    }
    let Some(Definition { sql, paused }) = definition else {
        return;
    };
    let stats = Stats::new();
    let stop = Arc::new(AtomicBool::new(false));
    if paused {
        stats.set_status(Status::Paused);
    }
    let thread = if run && !paused {
        let (name, sql, client, stats, stop) = (
            name.to_string(),
            sql.clone(),
            client.clone(),
            stats.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name(format!("pipeline-{name}"))
            .spawn(move || supervise(&name, &sql, &client, &stats, &stop, None))
            .ok()
    } else {
        None
    };
    defined.lock().insert(
        name.to_string(),
        Entry {
            sql,
            paused,
            stats,
            stop,
            thread,
        },
    );
}

/// Runs a pipeline until stopped, retrying transient failures every second. `first`:
/// the definition already prepared (compiled against the cluster), for the first run.
pub fn supervise(
    name: &str,
    sql: &str,
    client: &ClientConfig,
    stats: &Stats,
    stop: &AtomicBool,
    mut first: Option<runtime::Prepared>,
) {
    while !stop.load(Ordering::Relaxed) {
        let prepared = match first.take() {
            Some(p) => Ok(p),
            None => runtime::prepare(name, sql, client),
        };
        let result = prepared.and_then(|p| runtime::run(&p, stats, stop));
        match result {
            Ok(()) => return,
            Err(err) => {
                let error = pipeline::runtime::sink::redact(&err.to_string());
                tracing::warn!(pipeline = name, %error, "pipeline stopped");
                stats.set_error(&error);
                stats.set_status(Status::Failed);
                if !err.is_transient() {
                    return;
                }
            }
        }
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    stats.set_status(Status::Stopped);
}

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/pipelines", get(list))
        .route("/pipelines/{name}", get(get_one).put(put).delete(delete))
        .route("/pipelines/{name}/pause", axum::routing::put(pause))
        .route("/pipelines/{name}/resume", axum::routing::put(resume))
}

async fn list(State(gateway): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let pipelines = &gateway.pipelines;
    let defined = pipelines.lock();
    let mut names: Vec<&String> = defined.keys().collect();
    names.sort();
    Json(serde_json::Value::Array(
        names
            .into_iter()
            .map(|n| describe(n, &defined[n]))
            .collect(),
    ))
}

async fn get_one(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    gateway
        .pipelines
        .describe(&name)
        .map(Json)
        .ok_or_else(|| not_found(&name))
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(3, format!("Pipeline '{name}' not found."))
}

/// Compiles the definition against the cluster (the errors a user must see now),
/// stores it, and starts it here at once.
async fn put(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let pipelines = gateway.pipelines.clone();
    let sql = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("the pipeline definition must be UTF-8 SQL text"))?;
    let existed = {
        let defined = pipelines.lock();
        if !defined.contains_key(&name) && defined.len() >= pipelines.max {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                0,
                format!(
                    "{} pipelines are defined, the limit (max_pipelines)",
                    pipelines.max
                ),
            ));
        }
        defined.contains_key(&name)
    };
    let (check_name, check_sql, client) = (name.clone(), sql.clone(), pipelines.client.clone());
    let checked = tokio::task::spawn_blocking(move || {
        // Its topics exist from now on: a results page can open them before the
        // first row.
        let prepared = runtime::prepare(&check_name, &check_sql, &client)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| runtime::Error::Cluster(e.to_string()))?;
        runtime::create_topics_of(&prepared, &rt)
    })
    .await
    .map_err(|e| ApiError::busy(e.to_string()))?;
    if let Err(err) = checked {
        return Err(match err {
            runtime::Error::Sql(e) => {
                let mut answer = ApiError::bad_request(e.message.clone());
                answer.line = Some(e.line);
                answer.column = Some(e.column);
                answer
            }
            runtime::Error::Cluster(e) => ApiError::busy(e),
            other => ApiError::bad_request(other.to_string()),
        });
    }
    // A redefinition keeps a paused pipeline paused.
    let paused = pipelines.lock().get(&name).is_some_and(|e| e.paused);
    store(&pipelines, &name, Definition { sql, paused }).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(pipelines.describe(&name).unwrap_or_default())))
}

/// Writes a definition to the shared topic, then applies it here at once (the
/// follower applies it again when it reads it back: no change then).
async fn store(
    pipelines: &Arc<Pipelines>,
    name: &str,
    definition: Definition,
) -> Result<(), ApiError> {
    pipelines.topic.ensure().await.map_err(ApiError::busy)?;
    pipelines
        .producer
        .send(
            FutureRecord::<str, str>::to(&pipelines.topic.name)
                .key(name)
                .payload(&definition.encode())
                .partition(0),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(err, _)| ApiError::busy(err.to_string()))?;
    let (name, applier) = (name.to_string(), pipelines.clone());
    tokio::task::spawn_blocking(move || {
        apply(
            &applier.defined,
            &applier.client,
            applier.run,
            &name,
            Some(definition),
        )
    })
    .await
    .map_err(|e| ApiError::busy(e.to_string()))
}

/// `PUT /pipelines/{name}/pause`: every gateway stops its run of the pipeline (a last
/// checkpoint, its groups left) and keeps the definition; answered once this
/// gateway's run has stopped.
async fn pause(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    set_paused(gateway, name, true).await
}

/// `PUT /pipelines/{name}/resume`: runs a paused pipeline again, from its
/// checkpoints.
async fn resume(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    set_paused(gateway, name, false).await
}

async fn set_paused(
    gateway: Arc<Gateway>,
    name: String,
    paused: bool,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let pipelines = gateway.pipelines.clone();
    let sql = pipelines
        .lock()
        .get(&name)
        .map(|e| e.sql.clone())
        .ok_or_else(|| not_found(&name))?;
    store(&pipelines, &name, Definition { sql, paused }).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(pipelines.describe(&name).unwrap_or_default()),
    ))
}

/// Deletes the definition everywhere; this gateway's run stops (with a last
/// checkpoint) before the answer.
async fn delete(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let pipelines = gateway.pipelines.clone();
    if !pipelines.lock().contains_key(&name) {
        return Err(not_found(&name));
    }
    pipelines
        .producer
        .send(
            FutureRecord::<str, str>::to(&pipelines.topic.name)
                .key(&name)
                .partition(0),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(err, _)| ApiError::busy(err.to_string()))?;
    let applier = pipelines.clone();
    tokio::task::spawn_blocking(move || {
        apply(&applier.defined, &applier.client, applier.run, &name, None)
    })
    .await
    .map_err(|e| ApiError::busy(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threads of this process named `name` (Linux truncates names to 15 bytes).
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|comm| comm.trim_end() == name)
                    .count()
            })
            .unwrap_or(0)
    }

    /// The follower and a PUT apply one definition at the same time: one run starts.
    #[test]
    fn concurrent_applies_of_one_definition_start_one_run() {
        // Nothing listens there: each run retries its connection until stopped.
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", "127.0.0.1:9");
        let runs = Runs::default();
        for round in 0..20 {
            let name = format!("r{round}");
            let start = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        start.wait();
                        let definition = Definition {
                            sql: "SELECT 1".into(),
                            paused: false,
                        };
                        apply(&runs, &client, true, &name, Some(definition));
                    });
                }
            });
            // A thread a run starts carries the run's name until it names itself:
            // wait for one, with a deadline (an orphaned run stays for ever).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut runs_seen = threads_named(&format!("pipeline-{name}"));
            while runs_seen != 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                runs_seen = threads_named(&format!("pipeline-{name}"));
            }
            assert_eq!(runs_seen, 1, "runs of the definition in round {round}");
        }
        for entry in runs.lock().values() {
            entry.stop.store(true, Ordering::Relaxed);
        }
    }

    #[test]
    fn definitions_read_back_as_written() {
        for (sql, paused) in [("SELECT 1", false), ("SELECT '{'", true), ("", false)] {
            let definition = Definition {
                sql: sql.into(),
                paused,
            };
            assert_eq!(
                Definition::decode(definition.encode().as_bytes()),
                definition
            );
        }
        // What earlier versions wrote: the SQL text alone, running.
        assert_eq!(
            Definition::decode(b"INSERT INTO o SELECT * FROM i;"),
            Definition {
                sql: "INSERT INTO o SELECT * FROM i;".into(),
                paused: false
            }
        );
    }

    /// A paused definition stops the run and keeps the entry; resumed, it runs again.
    #[test]
    fn pausing_stops_the_run_and_resuming_starts_one() {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", "127.0.0.1:9");
        let runs = Runs::default();
        let define = |paused| {
            let definition = Definition {
                sql: "SELECT 2".into(),
                paused,
            };
            apply(&runs, &client, true, "p", Some(definition));
        };
        define(false);
        assert!(runs.lock()["p"].thread.is_some());
        define(true);
        assert!(runs.lock()["p"].thread.is_none());
        assert_eq!(
            *runs.lock()["p"].stats.status.lock().unwrap(),
            Status::Paused
        );
        assert_eq!(
            threads_named("pipeline-p"),
            0,
            "the run stopped before apply returned"
        );
        define(false);
        assert!(runs.lock()["p"].thread.is_some());
        apply(&runs, &client, true, "p", None);
        assert!(runs.lock().is_empty());
    }
}
