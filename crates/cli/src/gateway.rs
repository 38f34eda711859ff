//! `freshet gateway`: the HTTP gateway on its own, a Kafka client of any cluster, so
//! it can be scaled out behind a load balancer.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GatewayArgs {
    /// Bootstrap brokers of the cluster, comma separated [default: 127.0.0.1:9092]
    #[arg(long)]
    brokers: Option<String>,
    /// Address to serve HTTP on, host:port (port 0 picks one) [default: 127.0.0.1:8080]
    #[arg(long)]
    http_listen: Option<String>,
    /// Where records wait while the cluster cannot take them [default: ./freshet-spool]
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// TOML file whose `[http]` table holds gateway settings; FRESHET_HTTP_<KEY>
    /// environment variables and these flags override it.
    #[arg(long, env = "FRESHET_CONFIG")]
    config: Option<PathBuf>,
}

pub fn run(args: GatewayArgs) -> anyhow::Result<()> {
    crate::init_logging();
    let mut config = gateway::GatewayConfig::load(args.config.as_deref(), std::env::vars())?;
    if let Some(brokers) = args.brokers {
        config.brokers = brokers;
    }
    if let Some(listen) = args.http_listen {
        config.listen = listen;
    }
    if let Some(dir) = args.spool_dir {
        config.spool_dir = dir;
    }
    let brokers = config.brokers.clone();
    let spool = std::path::absolute(&config.spool_dir).unwrap_or_else(|_| config.spool_dir.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("freshet-gateway")
        .build()?;
    runtime.block_on(async {
        let running = gateway::start(config).await?;
        println!(
            "freshet gateway listening on {}, brokers {brokers}, spool in {}",
            running.addr,
            spool.display()
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        crate::serve::shutdown_signal().await;
        running.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
