//! The transaction coordinator over real TCP with raw Kafka requests, on a broker
//! served in-process: what the clients' tests (tests/e2e/test_transactions.py)
//! cannot reach: a crash between a transaction's prepared state and its markers,
//! epoch exhaustion, the limit on transactional ids and their expiry, a zombie
//! writing outside its transaction, and KIP-360 after a timeout; and a property
//! test: random sequences of transactional requests against a model of what each
//! partition's last stable offset and aborted transactions must be.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use broker::{BrokerConfig, Clock};
use common::*;
use protocol::kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use protocol::kafka_protocol::messages::list_offsets_request::{
    ListOffsetsPartition, ListOffsetsTopic,
};
use protocol::kafka_protocol::messages::*;
use protocol::kafka_protocol::protocol::StrBytes;
use protocol::record_batch::{build_simple_batch, set_producer, set_transactional};
use protocol::ResponseError;

struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn clock() -> Arc<TestClock> {
    Arc::new(TestClock(AtomicI64::new(1_000_000_000_000)))
}

async fn start(dir: tempfile::TempDir, config: BrokerConfig, clock: Arc<TestClock>) -> TestBroker {
    let setup = Setup {
        clock,
        background: true,
        ..Setup::default()
    };
    TestBroker::start_with(dir, config, setup).await
}

/// A broker with the default settings in a new data directory.
async fn fresh(clock: Arc<TestClock>) -> TestBroker {
    start(tempfile::tempdir().unwrap(), BrokerConfig::default(), clock).await
}

fn txn_id(id: &str) -> TransactionalId {
    TransactionalId(StrBytes::from_string(id.to_string()))
}

fn code(e: ResponseError) -> i16 {
    e.code()
}

impl Client {
    /// (error, producer id, epoch); `current` is KIP-360's (id, epoch), v3+.
    async fn init_txn(&mut self, id: &str, current: (i64, i16)) -> (i16, i64, i16) {
        let r = self
            .call(
                InitProducerIdRequest::default()
                    .with_transactional_id(Some(txn_id(id)))
                    .with_transaction_timeout_ms(10_000)
                    .with_producer_id(ProducerId(current.0))
                    .with_producer_epoch(current.1),
                4,
            )
            .await;
        (r.error_code, r.producer_id.0, r.producer_epoch)
    }

    async fn add_partition(&mut self, id: &str, pid: i64, epoch: i16, topic: &str, p: i32) -> i16 {
        let r = self
            .call(
                AddPartitionsToTxnRequest::default()
                    .with_v3_and_below_transactional_id(txn_id(id))
                    .with_v3_and_below_producer_id(ProducerId(pid))
                    .with_v3_and_below_producer_epoch(epoch)
                    .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                        .with_name(topic_name(topic))
                        .with_partitions(vec![p])]),
                3,
            )
            .await;
        r.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code
    }

    async fn produce_txn(&mut self, topic: &str, p: i32, pid: i64, epoch: i16, seq: i32) -> i16 {
        let mut batch = build_simple_batch(0, &[b"a", b"b"]);
        set_producer(&mut batch, pid, epoch, seq);
        set_transactional(&mut batch);
        produce(self, topic, p, batch, -1).await.error_code
    }

    /// The end offset a read_committed reader sees (the last stable offset).
    async fn stable_end(&mut self, topic: &str, p: i32) -> i64 {
        let r = self
            .call(
                ListOffsetsRequest::default()
                    .with_replica_id(BrokerId(-1))
                    .with_isolation_level(1)
                    .with_topics(vec![ListOffsetsTopic::default()
                        .with_name(topic_name(topic))
                        .with_partitions(vec![ListOffsetsPartition::default()
                            .with_partition_index(p)
                            .with_timestamp(-1)])]),
                6,
            )
            .await;
        r.topics[0].partitions[0].offset
    }

    /// The aborted transactions a read_committed fetch from 0 names.
    async fn aborted(&mut self, topic: &str, p: i32) -> Vec<(i64, i64)> {
        let r = self
            .call(fetch_request(topic, p, 0, 0, 0).with_isolation_level(1), 12)
            .await;
        r.responses[0].partitions[0]
            .aborted_transactions
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|a| (a.producer_id.0, a.first_offset))
            .collect()
    }
}

/// Rewrites the state file of `pid` as a crash after its prepared state was
/// written, before any marker, would have left it.
fn leave_prepared(dir: &std::path::Path, pid: i64, state: &str) {
    let path = dir.join("__transactions").join(format!("{pid}.json"));
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(meta["state"], "Ongoing", "{meta}");
    meta["state"] = serde_json::Value::String(state.to_string());
    std::fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();
}

#[tokio::test]
async fn a_transaction_a_crash_left_prepared_is_finished_at_start() {
    for (state, aborted) in [("PrepareCommit", false), ("PrepareAbort", true)] {
        let clock = clock();
        let b = fresh(clock.clone()).await;
        let mut c = Client::connect(b.addr).await;
        create_topic(&mut c, "t", 1).await;
        let (err, pid, epoch) = c.init_txn("tx", (-1, -1)).await;
        assert_eq!((err, epoch), (0, 0));
        assert_eq!(c.add_partition("tx", pid, epoch, "t", 0).await, 0);
        assert_eq!(c.produce_txn("t", 0, pid, epoch, 0).await, 0);
        assert_eq!(
            c.stable_end("t", 0).await,
            0,
            "the open transaction holds readers"
        );
        drop(c);
        let dir = b.stop().await;
        leave_prepared(dir.path(), pid, state);

        let b = start(dir, BrokerConfig::default(), clock).await;
        let mut c = Client::connect(b.addr).await;
        // The marker goes at offset 2, after the two records: the stable end is 3.
        let broker = b.broker.clone();
        wait_until("the prepared transaction is finished", || {
            let p = broker.topics.get("t").unwrap().partition(0).unwrap();
            let hwm = p.lock().high_watermark();
            hwm == 3 && p.last_stable_offset(hwm) == 3
        })
        .await;
        assert_eq!(c.stable_end("t", 0).await, 3, "{state}");
        let expected = if aborted { vec![(pid, 0)] } else { vec![] };
        assert_eq!(c.aborted("t", 0).await, expected, "{state}");
        // The id goes on: the next epoch, a new transaction.
        let (err, pid2, epoch2) = c.init_txn("tx", (-1, -1)).await;
        assert_eq!((err, pid2, epoch2), (0, pid, 1));
        drop(broker);
        b.stop().await;
    }
}

#[tokio::test]
async fn an_exhausted_epoch_gives_a_new_producer_id() {
    let clock = clock();
    let b = fresh(clock.clone()).await;
    let mut c = Client::connect(b.addr).await;
    let (_, pid, _) = c.init_txn("tx", (-1, -1)).await;
    drop(c);
    let dir = b.stop().await;
    let path = dir
        .path()
        .join("__transactions")
        .join(format!("{pid}.json"));
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    meta["epoch"] = serde_json::json!(i16::MAX - 3);
    std::fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();

    let b = start(dir, BrokerConfig::default(), clock).await;
    let mut c = Client::connect(b.addr).await;
    assert_eq!(c.init_txn("tx", (-1, -1)).await, (0, pid, i16::MAX - 2));
    let (err, pid2, epoch) = c.init_txn("tx", (pid, i16::MAX - 2)).await;
    assert_eq!((err, epoch), (0, 0));
    assert_ne!(pid2, pid, "a new producer id");
    create_topic(&mut c, "t", 1).await;
    assert_eq!(
        c.add_partition("tx", pid, i16::MAX - 2, "t", 0).await,
        code(ResponseError::InvalidProducerIdMapping)
    );
    assert_eq!(c.add_partition("tx", pid2, 0, "t", 0).await, 0);
    b.stop().await;
}

#[tokio::test]
async fn ids_past_the_limit_wait_for_idle_ones_to_expire() {
    let clock = clock();
    let config = BrokerConfig {
        max_transactional_ids: 2,
        transactional_id_expiration_ms: 60_000,
        transaction_abort_check_interval_ms: 10,
        ..BrokerConfig::default()
    };
    let b = start(tempfile::tempdir().unwrap(), config, clock.clone()).await;
    let mut c = Client::connect(b.addr).await;
    assert_eq!(c.init_txn("a", (-1, -1)).await.0, 0);
    assert_eq!(c.init_txn("b", (-1, -1)).await.0, 0);
    assert_eq!(
        c.init_txn("c", (-1, -1)).await.0,
        code(ResponseError::ThrottlingQuotaExceeded)
    );
    assert_eq!(c.init_txn("a", (-1, -1)).await.0, 0, "known ids go on");
    clock.0.fetch_add(60_000, Ordering::SeqCst);
    let broker = b.broker.clone();
    wait_until("idle ids expire", || broker.txns.is_empty()).await;
    assert_eq!(c.init_txn("c", (-1, -1)).await.0, 0);
    drop(broker);
    let dir = b.stop().await;
    let files = std::fs::read_dir(dir.path().join("__transactions"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "the expired ids' files are gone");
}

#[tokio::test]
async fn a_fenced_producer_writes_nowhere_and_a_partition_outside_the_transaction_is_refused() {
    let clock = clock();
    let b = fresh(clock).await;
    let mut c = Client::connect(b.addr).await;
    create_topic(&mut c, "t", 2).await;
    let (_, pid, zombie) = c.init_txn("tx", (-1, -1)).await;
    assert_eq!(c.add_partition("tx", pid, zombie, "t", 0).await, 0);
    assert_eq!(c.produce_txn("t", 0, pid, zombie, 0).await, 0);
    let (_, _, fresh) = c.init_txn("tx", (-1, -1)).await;
    assert_eq!(
        fresh,
        zombie + 2,
        "one bump for the abort, one for the new producer"
    );
    // In its old partition (the abort marker carries a newer epoch) and elsewhere.
    assert_eq!(
        c.produce_txn("t", 0, pid, zombie, 1).await,
        code(ResponseError::InvalidProducerEpoch)
    );
    assert_eq!(
        c.produce_txn("t", 1, pid, zombie, 0).await,
        code(ResponseError::InvalidProducerEpoch)
    );
    assert_eq!(
        c.add_partition("tx", pid, zombie, "t", 1).await,
        code(ResponseError::ProducerFenced)
    );
    // The new producer too, before it adds the partition.
    assert_eq!(
        c.produce_txn("t", 1, pid, fresh, 0).await,
        code(ResponseError::InvalidTxnState)
    );
    assert_eq!(c.add_partition("tx", pid, fresh, "t", 1).await, 0);
    assert_eq!(c.produce_txn("t", 1, pid, fresh, 0).await, 0);
    assert_eq!(c.aborted("t", 0).await, vec![(pid, 0)]);
    assert_eq!(
        c.stable_end("t", 0).await,
        3,
        "the zombie's transaction was aborted"
    );
    assert_eq!(c.stable_end("t", 1).await, 0, "the new one is open");
    b.stop().await;
}

#[tokio::test]
async fn a_producer_whose_transaction_timed_out_goes_on_with_kip_360() {
    let clock = clock();
    let config = BrokerConfig {
        transaction_abort_check_interval_ms: 10,
        ..BrokerConfig::default()
    };
    let b = start(tempfile::tempdir().unwrap(), config, clock.clone()).await;
    let mut c = Client::connect(b.addr).await;
    create_topic(&mut c, "t", 1).await;
    let (_, pid, epoch) = c.init_txn("tx", (-1, -1)).await;
    assert_eq!(c.add_partition("tx", pid, epoch, "t", 0).await, 0);
    assert_eq!(c.produce_txn("t", 0, pid, epoch, 0).await, 0);
    clock.0.fetch_add(10_000, Ordering::SeqCst); // the request's transaction timeout
    let broker = b.broker.clone();
    wait_until("the timed-out transaction is aborted", || {
        let p = broker.topics.get("t").unwrap().partition(0).unwrap();
        let hwm = p.lock().high_watermark();
        p.last_stable_offset(hwm) == 3
    })
    .await;
    assert_eq!(c.aborted("t", 0).await, vec![(pid, 0)]);
    assert_eq!(
        c.add_partition("tx", pid, epoch, "t", 0).await,
        code(ResponseError::ProducerFenced),
        "the old epoch is fenced"
    );
    // Naming its id and old epoch, it gets the next one; a stranger's epoch does not.
    assert_eq!(
        c.init_txn("tx", (pid, epoch + 7)).await.0,
        code(ResponseError::ProducerFenced)
    );
    assert_eq!(c.init_txn("tx", (pid, epoch)).await, (0, pid, epoch + 2));
    drop(broker);
    b.stop().await;
}

// ---- random sequences of requests against a model ------------------------------

#[derive(Debug, Clone)]
enum Op {
    Init(usize),
    Add(usize, i32),
    Produce(usize, i32),
    /// A produce with the epoch before the current one (a zombie's).
    Stale(usize, i32),
    End(usize, bool),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        2 => (0..3usize).prop_map(Op::Init),
        2 => (0..3usize, 0..2i32).prop_map(|(i, p)| Op::Add(i, p)),
        3 => (0..3usize, 0..2i32).prop_map(|(i, p)| Op::Produce(i, p)),
        1 => (0..3usize, 0..2i32).prop_map(|(i, p)| Op::Stale(i, p)),
        2 => (0..3usize, any::<bool>()).prop_map(|(i, c)| Op::End(i, c)),
    ]
}

/// What the model knows of one transactional id.
#[derive(Default)]
struct IdModel {
    producer: Option<(i64, i16)>,
    open: bool,
    /// Partition -> the first offset of the open transaction's batches there.
    partitions: std::collections::BTreeMap<i32, Option<i64>>,
    /// Per partition, the next sequence in the current epoch.
    seqs: std::collections::BTreeMap<i32, i32>,
    last_committed: Option<bool>,
}

impl IdModel {
    /// The open transaction ends; an abort adds its (producer, first offset) per
    /// partition to `aborted`.
    fn end(&mut self, commit: bool, aborted: &mut std::collections::BTreeSet<(i32, i64, i64)>) {
        let pid = self.producer.expect("open means initialised").0;
        for (p, first) in std::mem::take(&mut self.partitions) {
            if let (Some(first), false) = (first, commit) {
                aborted.insert((p, pid, first));
            }
        }
        self.open = false;
        self.last_committed = Some(commit);
    }
}

async fn run_ops(ops: Vec<Op>) {
    let b = start(
        tempfile::tempdir().unwrap(),
        BrokerConfig::default(),
        clock(),
    )
    .await;
    let mut c = Client::connect(b.addr).await;
    create_topic(&mut c, "t", 2).await;
    let mut ids: Vec<IdModel> = (0..3).map(|_| IdModel::default()).collect();
    let mut aborted = std::collections::BTreeSet::new();
    for op in &ops {
        match *op {
            Op::Init(i) => {
                let (err, pid, epoch) = c.init_txn(&format!("tx{i}"), (-1, -1)).await;
                assert_eq!(err, 0, "{op:?}");
                let m = &mut ids[i];
                if m.open {
                    m.end(false, &mut aborted);
                }
                m.producer = Some((pid, epoch));
                m.seqs.clear();
            }
            Op::Add(i, p) => {
                let m = &mut ids[i];
                let Some((pid, epoch)) = m.producer else {
                    continue;
                };
                assert_eq!(
                    c.add_partition(&format!("tx{i}"), pid, epoch, "t", p).await,
                    0,
                    "{op:?}"
                );
                m.open = true;
                m.partitions.entry(p).or_insert(None);
            }
            Op::Produce(i, p) => {
                let m = &mut ids[i];
                let Some((pid, epoch)) = m.producer else {
                    continue;
                };
                let seq = *m.seqs.get(&p).unwrap_or(&0);
                let mut batch = build_simple_batch(0, &[b"a", b"b"]);
                set_producer(&mut batch, pid, epoch, seq);
                set_transactional(&mut batch);
                let r = produce(&mut c, "t", p, batch, -1).await;
                match m.partitions.get_mut(&p) {
                    Some(first) => {
                        assert_eq!(r.error_code, 0, "{op:?}");
                        first.get_or_insert(r.base_offset);
                        m.seqs.insert(p, seq + 2);
                    }
                    None => {
                        assert_eq!(r.error_code, code(ResponseError::InvalidTxnState), "{op:?}")
                    }
                }
            }
            Op::Stale(i, p) => {
                let Some((pid, epoch)) = ids[i].producer else {
                    continue;
                };
                if epoch == 0 {
                    continue;
                }
                assert_eq!(
                    c.produce_txn("t", p, pid, epoch - 1, 0).await,
                    code(ResponseError::InvalidProducerEpoch),
                    "{op:?}"
                );
            }
            Op::End(i, commit) => {
                let m = &mut ids[i];
                let Some((pid, epoch)) = m.producer else {
                    continue;
                };
                let r = c
                    .call(
                        EndTxnRequest::default()
                            .with_transactional_id(txn_id(&format!("tx{i}")))
                            .with_producer_id(ProducerId(pid))
                            .with_producer_epoch(epoch)
                            .with_committed(commit),
                        3,
                    )
                    .await;
                if m.open {
                    assert_eq!(r.error_code, 0, "{op:?}");
                    m.end(commit, &mut aborted);
                } else if m.last_committed == Some(commit) {
                    assert_eq!(r.error_code, 0, "{op:?}: a retry");
                } else {
                    assert_eq!(r.error_code, code(ResponseError::InvalidTxnState), "{op:?}");
                }
            }
        }
    }
    for p in 0..2 {
        let open_first = ids
            .iter()
            .filter_map(|m| m.partitions.get(&p).copied().flatten())
            .min();
        let hwm = b
            .broker
            .topics
            .get("t")
            .unwrap()
            .partition(p)
            .unwrap()
            .lock()
            .high_watermark();
        assert_eq!(
            c.stable_end("t", p).await,
            open_first.unwrap_or(hwm),
            "partition {p} after {ops:?}"
        );
        let want: Vec<(i64, i64)> = aborted
            .iter()
            .filter(|(q, _, _)| *q == p)
            .map(|(_, pid, first)| (*pid, *first))
            .collect();
        let mut got = c.aborted("t", p).await;
        got.sort();
        let mut want = want;
        want.sort();
        // A fetch names only what it returns: nothing when the partition holds
        // nothing stable yet.
        if c.stable_end("t", p).await > 0 {
            assert_eq!(got, want, "aborted in partition {p} after {ops:?}");
        }
    }
    drop(c);
    b.stop().await;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    #[test]
    fn random_transactions_leave_the_stable_offsets_and_aborts_the_model_says(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_ops(ops));
    }
}
