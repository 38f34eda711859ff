//! `freshet serve`: load the configuration, open the data directory (recovering
//! every partition), bind, start the embedded HTTP gateway (a Kafka client of this
//! broker, like any other), print where it listens, serve until SIGINT/SIGTERM,
//! then stop the gateway, answer what is in flight and flush every partition.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use broker::{Broker, BrokerConfig, SystemClock};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Where partitions and metadata live [default: ./freshet-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on, host:port (port 0 picks one) [default: 127.0.0.1:9092]
    #[arg(long)]
    listen: Option<String>,
    /// host:port clients should connect to, if not the listen address.
    #[arg(long)]
    advertised_listener: Option<String>,
    /// TOML file with broker settings; FRESHET_<KEY> environment variables and
    /// these flags override it.
    #[arg(long, env = "FRESHET_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the embedded HTTP gateway, host:port, or `off` [default: 127.0.0.1:8080]
    #[arg(long)]
    http_listen: Option<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::init_logging();
    let mut config = BrokerConfig::load(args.config.as_deref(), std::env::vars())?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(advertised) = args.advertised_listener {
        config.advertised_listener = Some(advertised);
    }
    let mut http = gateway::GatewayConfig::load(args.config.as_deref(), std::env::vars())?;
    if let Some(listen) = args.http_listen {
        http.listen = listen;
    }
    let listener = std::net::TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let (host, port) = advertised(&config, local)?;
    let data_dir =
        std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    // The embedded gateway is a Kafka client of this broker, like any other.
    http.brokers = format!("{host}:{port}");
    if http.spool_dir == gateway::GatewayConfig::default().spool_dir {
        http.spool_dir = data_dir.join("http-spool");
    }
    let broker = Broker::open(config, host, port, Arc::new(SystemClock))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("freshet")
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop_rx = async move {
            let _ = stop_rx.await;
        };
        let background = tokio::spawn(broker.clone().run_background());
        let serving = tokio::spawn(broker::server::run(broker.clone(), listener, stop_rx));
        let http = if http.listen == "off" {
            None
        } else {
            // Its GET /metrics shows this broker's metrics too.
            let b = broker.clone();
            let metrics: gateway::metrics::Source =
                Arc::new(move |registry| broker::metrics::BrokerMetrics::register(&b, registry));
            Some(gateway::start_with_metrics(http, vec![metrics]).await?)
        };
        // The one line a user (and the test harness) reads; logs go to stderr.
        match &http {
            Some(http) => println!(
                "freshet listening on {local}, http on {}, data in {}",
                http.addr,
                data_dir.display()
            ),
            None => println!(
                "freshet listening on {local}, data in {}",
                data_dir.display()
            ),
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        // The gateway first: its in-flight requests still need the broker.
        if let Some(http) = http {
            http.shutdown().await;
        }
        let _ = stop_tx.send(());
        let _ = serving.await;
        background.abort();
        tracing::info!("shutting down: flushing partitions");
        let b = broker.clone();
        tokio::task::spawn_blocking(move || b.shutdown()).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    Ok(())
}

fn advertised(config: &BrokerConfig, local: SocketAddr) -> anyhow::Result<(String, i32)> {
    if let Some(adv) = &config.advertised_listener {
        let (host, port) = adv
            .rsplit_once(':')
            .context("advertised_listener must be host:port")?;
        let port: u16 = port.parse().context("advertised_listener port")?;
        return Ok((
            host.trim_matches(|c| c == '[' || c == ']').to_string(),
            port as i32,
        ));
    }
    if local.ip().is_unspecified() {
        tracing::warn!(
            "listening on all interfaces without --advertised-listener; advertising 127.0.0.1"
        );
        return Ok(("127.0.0.1".into(), local.port() as i32));
    }
    Ok((local.ip().to_string(), local.port() as i32))
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
