//! The harness the broker's integration tests share: a broker served in-process on
//! an ephemeral port, a client that sends it raw Kafka requests over real TCP, and
//! the requests every test file builds the same way.

#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::group::GroupConfig;
use broker::{Broker, BrokerConfig, Clock, SystemClock};
use bytes::{Bytes, BytesMut};
use protocol::kafka_protocol::messages::create_topics_request::CreatableTopic;
use protocol::kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use protocol::kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use protocol::kafka_protocol::messages::produce_response::PartitionProduceResponse;
use protocol::kafka_protocol::messages::*;
use protocol::kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How a test broker runs, beyond its `BrokerConfig`.
pub struct Setup {
    /// The system clock, or one the test moves by hand.
    pub clock: Arc<dyn Clock>,
    /// Also run the background jobs (flush, retention, producer-id expiry). Off
    /// unless a test asks: with them, a timer rather than the test's own requests
    /// decides when the broker fsyncs or drops state.
    pub background: bool,
    /// Group coordinator settings in place of those the `BrokerConfig` gives.
    pub groups: Option<GroupConfig>,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            clock: Arc::new(SystemClock),
            background: false,
            groups: None,
        }
    }
}

pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    dir: tempfile::TempDir,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    background: Option<JoinHandle<()>>,
}

impl TestBroker {
    /// A broker with `config` in a new data directory.
    pub async fn start(config: BrokerConfig) -> TestBroker {
        Self::start_in(tempfile::tempdir().unwrap(), config).await
    }

    /// A broker with `config` on the data in `dir` (from an earlier [`Self::stop`]).
    pub async fn start_in(dir: tempfile::TempDir, config: BrokerConfig) -> TestBroker {
        Self::start_with(dir, config, Setup::default()).await
    }

    pub async fn start_with(
        dir: tempfile::TempDir,
        mut config: BrokerConfig,
        setup: Setup,
    ) -> TestBroker {
        config.data_dir = dir.path().to_path_buf();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let broker =
            Broker::open(config, "127.0.0.1".into(), addr.port() as i32, setup.clock).unwrap();
        if let Some(groups) = setup.groups {
            broker.groups.set_config(groups);
        }
        let background = setup
            .background
            .then(|| tokio::spawn(broker.clone().run_background()));
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = broker.clone();
        let task = tokio::spawn(async move {
            broker::server::run(serving.clone(), listener, async {
                let _ = stopped.await;
            })
            .await;
            serving.shutdown();
        });
        TestBroker {
            addr,
            broker,
            dir,
            stop,
            task,
            background,
        }
    }

    /// Stops serving (and the background jobs), flushes, and hands back the data
    /// directory.
    pub async fn stop(self) -> tempfile::TempDir {
        let TestBroker {
            broker,
            dir,
            stop,
            task,
            background,
            ..
        } = self;
        let _ = stop.send(());
        task.await.unwrap();
        if let Some(background) = background {
            background.abort();
            let _ = background.await;
            // A job the background tasks handed to a blocking thread may still hold
            // the broker, and with it the data-dir lock a restart in `dir` takes.
            // (Without background jobs a test may itself hold the broker past stop.)
            wait_until("no background job holds the broker", || {
                Arc::strong_count(&broker) == 1
            })
            .await;
        }
        dir
    }
}

/// Polls `condition` until it holds; fails with `what` after 20 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub struct Client {
    pub stream: TcpStream,
    /// Of the last request sent, and of the last answer received.
    correlation_id: i32,
    answered: i32,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            correlation_id: 0,
            answered: 0,
        }
    }

    /// A client whose socket takes in only a few KiB before the broker's writes
    /// block: a peer that reads slowly, or not at all.
    pub async fn connect_slow_reader(addr: SocketAddr) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        Client {
            stream: socket.connect(addr).await.unwrap(),
            correlation_id: 0,
            answered: 0,
        }
    }

    pub async fn send_raw(&mut self, frame: &[u8]) {
        self.stream
            .write_all(&(frame.len() as i32).to_be_bytes())
            .await
            .unwrap();
        self.stream.write_all(frame).await.unwrap();
    }

    /// Reads one response frame; `None` if the broker closed the connection.
    pub async fn read_frame(&mut self) -> Option<Bytes> {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size).await.ok()?;
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut body).await.ok()?;
        Some(Bytes::from(body))
    }

    pub async fn call<R: Request>(&mut self, request: R, version: i16) -> R::Response {
        self.send_request(request, version).await;
        self.receive::<R>(version).await
    }

    /// Sends a request without waiting for its answer.
    pub async fn send_request<R: Request>(&mut self, request: R, version: i16) {
        self.correlation_id += 1;
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("test")))
            .encode(&mut buf, R::header_version(version))
            .unwrap();
        request.encode(&mut buf, version).unwrap();
        self.send_raw(&buf).await;
    }

    /// The answer to the oldest request not yet answered (answers come in
    /// request order).
    pub async fn receive<R: Request>(&mut self, version: i16) -> R::Response {
        let api_key = ApiKey::try_from(R::KEY).unwrap();
        let mut frame = self
            .read_frame()
            .await
            .expect("a response, not a closed connection");
        let header =
            ResponseHeader::decode(&mut frame, api_key.response_header_version(version)).unwrap();
        self.answered += 1;
        assert_eq!(header.correlation_id, self.answered);
        R::Response::decode(&mut frame, version).unwrap()
    }
}

pub fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

pub async fn create_topic(client: &mut Client, name: &str, partitions: i32) {
    let request = CreateTopicsRequest::default().with_topics(vec![CreatableTopic::default()
        .with_name(topic_name(name))
        .with_num_partitions(partitions)
        .with_replication_factor(1)]);
    let response = client.call(request, 7).await;
    assert_eq!(
        response.topics[0].error_code, 0,
        "{:?}",
        response.topics[0].error_message
    );
}

pub async fn produce(
    client: &mut Client,
    topic: &str,
    partition: i32,
    batch: Vec<u8>,
    acks: i16,
) -> PartitionProduceResponse {
    let request = ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic_name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(Bytes::from(batch)))])]);
    let mut response = client.call(request, 9).await;
    response.responses.remove(0).partition_responses.remove(0)
}

pub fn fetch_request(
    topic: &str,
    partition: i32,
    offset: i64,
    max_wait_ms: i32,
    min_bytes: i32,
) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(min_bytes)
        .with_max_bytes(1 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic_name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(1 << 20)])])
}

/// (error code, high watermark, records) of a fetch of one partition.
pub fn records_of(response: &FetchResponse) -> (i16, i64, Bytes) {
    let p = &response.responses[0].partitions[0];
    (
        p.error_code,
        p.high_watermark,
        p.records.clone().unwrap_or_default(),
    )
}

/// What a fetch that does not wait finds at `offset`: [`records_of`] its answer.
pub async fn fetch_now(
    client: &mut Client,
    topic: &str,
    partition: i32,
    offset: i64,
) -> (i16, i64, Bytes) {
    records_of(
        &client
            .call(fetch_request(topic, partition, offset, 0, 0), 12)
            .await,
    )
}
