"""Transactions with librdkafka's transactional producer (confluent-kafka), and
kafkajs's, and read_committed consumers of both: committed transactions are read, aborted ones are not,
an open one holds readers at its first record, a new producer with the same
transactional.id fences the old one, offsets sent to a transaction are committed
with it, a transaction past its timeout is aborted by the broker, and all of it
holds across a kill -9 of the broker.

The oracle is what each test itself committed and aborted, kept as it produced.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from helpers import consume, create_topic, topic_name, wait_until
from kafkajs_driver import b64, ok, unb64

PARTITIONS = 2


def txn_producer(bootstrap: str, txn_id: str, **conf) -> Producer:
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                  "linger.ms": 5, **conf})
    p.init_transactions(30)
    return p


def read(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    recs = consume(bootstrap, topic, partitions=range(PARTITIONS), **{"isolation.level": isolation})
    return sorted(r.value for r in recs)


def produce_txn(p: Producer, topic: str, prefix: str, n: int) -> list[bytes]:
    sent = []
    for i in range(n):
        v = f"{prefix}-{i}".encode()
        p.produce(topic, value=v, partition=i % PARTITIONS)
        sent.append(v)
    return sent


def test_committed_transactions_are_read_and_aborted_ones_are_not(broker):
    topic = create_topic(broker.bootstrap, topic_name("txn"), PARTITIONS)
    p = txn_producer(broker.bootstrap, f"t-{uuid.uuid4()}")
    committed: list[bytes] = []
    everything: list[bytes] = []
    for round_, commit in enumerate([True, False, True, False, True]):
        p.begin_transaction()
        sent = produce_txn(p, topic, f"r{round_}", 50 + round_)
        everything += sent
        if commit:
            p.commit_transaction(30)
            committed += sent
        else:
            p.flush(30)  # the records are in the log before the abort
            p.abort_transaction(30)
    # A plain producer's records between transactions are read by both.
    plain = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(10):
        plain.produce(topic, value=f"plain-{i}".encode(), partition=i % PARTITIONS)
    plain.flush(30)
    plain_values = [f"plain-{i}".encode() for i in range(10)]

    assert read(broker.bootstrap, topic, "read_committed") == sorted(committed + plain_values)
    assert read(broker.bootstrap, topic, "read_uncommitted") == sorted(everything + plain_values)


def test_an_open_transaction_holds_readers_at_its_first_record_until_it_commits(broker):
    topic = create_topic(broker.bootstrap, topic_name("txn-open"), PARTITIONS)
    before = Producer({"bootstrap.servers": broker.bootstrap})
    before.produce(topic, value=b"before", partition=0)
    before.flush(30)
    p = txn_producer(broker.bootstrap, f"t-{uuid.uuid4()}")
    p.begin_transaction()
    sent = produce_txn(p, topic, "open", 20)
    p.flush(30)
    # A record after the open transaction's first one, from another producer.
    before.produce(topic, value=b"after", partition=0)
    before.flush(30)
    assert read(broker.bootstrap, topic, "read_committed") == [b"before"]
    assert read(broker.bootstrap, topic, "read_uncommitted") == sorted(sent + [b"before", b"after"])
    p.commit_transaction(30)
    assert read(broker.bootstrap, topic, "read_committed") == sorted(sent + [b"before", b"after"])


def test_a_new_producer_with_the_same_id_fences_the_old_one_and_aborts_its_transaction(broker):
    topic = create_topic(broker.bootstrap, topic_name("txn-fence"), PARTITIONS)
    txn_id = f"t-{uuid.uuid4()}"
    zombie = txn_producer(broker.bootstrap, txn_id)
    zombie.begin_transaction()
    produce_txn(zombie, topic, "zombie", 10)
    zombie.flush(30)

    fresh = txn_producer(broker.bootstrap, txn_id)
    fresh.begin_transaction()
    kept = produce_txn(fresh, topic, "fresh", 10)
    fresh.commit_transaction(30)

    # The zombie can neither write nor commit any more.
    with pytest.raises(KafkaException) as failed:
        for i in range(5):
            zombie.produce(topic, value=f"late-{i}".encode(), partition=i % PARTITIONS)
        zombie.commit_transaction(30)
    err = failed.value.args[0]
    assert err.fatal() or err.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                         KafkaError.INVALID_PRODUCER_EPOCH), err
    assert read(broker.bootstrap, topic, "read_committed") == sorted(kept)


def test_offsets_sent_to_a_transaction_are_committed_with_it(broker):
    source = create_topic(broker.bootstrap, topic_name("txn-src"), 1)
    sink = create_topic(broker.bootstrap, topic_name("txn-out"), PARTITIONS)
    plain = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(30):
        plain.produce(source, value=f"in-{i}".encode(), partition=0)
    plain.flush(30)
    group = f"g-{uuid.uuid4()}"
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                  "isolation.level": "read_committed"})
    c.subscribe([source])
    p = txn_producer(broker.bootstrap, f"t-{uuid.uuid4()}")

    def process(n: int, commit: bool) -> int:
        got = []
        while len(got) < n:
            m = c.poll(10)
            assert m is not None, f"read {len(got)} of {n}"
            assert m.error() is None, m.error()
            got.append(m)
        p.begin_transaction()
        for m in got:
            p.produce(sink, value=b"out-" + m.value(), partition=0)
        offsets = [TopicPartition(source, 0, got[-1].offset() + 1)]
        p.send_offsets_to_transaction(offsets, c.consumer_group_metadata(), 30)
        if commit:
            p.commit_transaction(30)
        else:
            p.abort_transaction(30)
        return got[-1].offset() + 1

    def committed_offset() -> int:
        return c.committed([TopicPartition(source, 0)], timeout=10)[0].offset

    first = process(10, commit=True)
    assert committed_offset() == first == 10
    process(10, commit=False)
    assert committed_offset() == 10, "an aborted transaction's offsets are not committed"
    c.close()
    assert read(broker.bootstrap, sink, "read_committed") == sorted(
        f"out-in-{i}".encode() for i in range(10))


def test_a_transaction_past_its_timeout_is_aborted_by_the_broker(broker_factory):
    b = broker_factory(config={"transaction_abort_check_interval_ms": 100})
    topic = create_topic(b.bootstrap, topic_name("txn-timeout"), PARTITIONS)
    p = txn_producer(b.bootstrap, f"t-{uuid.uuid4()}", **{"transaction.timeout.ms": 1500})
    p.begin_transaction()
    produce_txn(p, topic, "stuck", 10)
    p.flush(30)
    later = Producer({"bootstrap.servers": b.bootstrap})
    later.produce(topic, value=b"later", partition=0)
    later.flush(30)
    # Readers are held until the broker aborts it; then they see only the later one.
    wait_until(lambda: read(b.bootstrap, topic, "read_committed") == [b"later"], timeout=30,
               what="the timed-out transaction aborted")
    with pytest.raises(KafkaException):
        p.commit_transaction(30)


def test_transactions_survive_a_kill_of_the_broker(broker_factory):
    b = broker_factory()
    topic = create_topic(b.bootstrap, topic_name("txn-kill"), PARTITIONS)
    txn_id = f"t-{uuid.uuid4()}"
    p = txn_producer(b.bootstrap, txn_id)
    p.begin_transaction()
    committed = produce_txn(p, topic, "kept", 40)
    p.commit_transaction(30)
    p.begin_transaction()
    produce_txn(p, topic, "open", 40)
    p.flush(30)
    b.kill()
    b.start()
    assert read(b.bootstrap, topic, "read_committed") == sorted(committed), \
        "the open transaction still holds readers after the restart"
    # A new producer with the same id aborts the open transaction: readers move on.
    fresh = txn_producer(b.bootstrap, txn_id)
    fresh.begin_transaction()
    more = produce_txn(fresh, topic, "fresh", 10)
    fresh.commit_transaction(30)
    assert read(b.bootstrap, topic, "read_committed") == sorted(committed + more)
    b.kill()
    b.start()
    assert read(b.bootstrap, topic, "read_committed") == sorted(committed + more)


def test_kafkajs_transactions_read_by_kafkajs_and_librdkafka(broker):
    """A second client's own transaction code and read_committed decoding: kafkajs
    commits and aborts, kafkajs (in a group) and librdkafka read what was committed,
    in order."""
    topic = create_topic(broker.bootstrap, topic_name("kjs-txn"), 1)
    transactions = [{"values": [f"t{t}-{i}".encode() for i in range(5 + t)], "commit": t % 2 == 0}
                    for t in range(6)]
    ok(broker, "transactions", topic=topic, transactionalId=f"kjs-{uuid.uuid4()}",
       transactions=[{"values": [b64(v) for v in t["values"]], "commit": t["commit"]}
                     for t in transactions])
    committed = [v for t in transactions if t["commit"] for v in t["values"]]
    got = ok(broker, "consumeGroup", topic=topic, groupId=f"g-{topic}", count=len(committed),
             timeoutMs=30000)
    assert [unb64(r["value"]) for r in got] == committed
    recs = consume(broker.bootstrap, topic, **{"isolation.level": "read_committed"})
    assert [r.value for r in recs] == committed
