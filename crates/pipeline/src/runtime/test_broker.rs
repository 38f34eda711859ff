//! A broker in the test process, on a free loopback port, for the runtime's tests
//! that need a real one (fencing of checkpoints, librdkafka's cached offsets).

use std::sync::Arc;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

pub struct Broker {
    pub addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Runs on its own thread and runtime, so that the code under test may block.
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let config = broker::BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let broker = broker::Broker::open(
                    config,
                    "127.0.0.1".into(),
                    addr.port() as i32,
                    Arc::new(broker::SystemClock),
                )
                .unwrap();
                tokio::spawn(broker.clone().run_background());
                addr_tx.send(addr.to_string()).unwrap();
                broker::server::run(broker, listener, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Broker {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.addr);
        client
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let created = rt
            .block_on(admin.create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            ))
            .unwrap();
        assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}
