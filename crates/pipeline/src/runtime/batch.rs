//! Reading a consumer's records in batches. librdkafka's per-message poll costs a
//! queue poll, an event, an `Arc` and three clock reads per record (a sixth of a
//! fused sink reader's time); here one `rd_kafka_consume_batch_queue` call reads many.
//!
//! The records come from a queue of our own that every assigned partition's fetch
//! queue forwards to (the consumer's context sets the forwarding up with
//! [`BatchQueue::assign`] in its rebalance callback, before librdkafka starts
//! fetching a partition, so no record of it is ever in the consumer's queue
//! ahead of one in ours: the order within a partition is kept). Rebalances and errors
//! still arrive on the consumer's own queue, served by `BaseConsumer::poll`: a batch
//! read never serves them (librdkafka would answer a rebalance there by unassigning
//! everything, as it does for an application without a rebalance callback).
//!
//! Owns only the reading; what a record means is the caller's.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Timestamp};
use rdkafka::{Message, TopicPartitionList};

use super::Error;

/// What a consumer read with [`Batches`] keeps in its context: the reader's queue,
/// and how many partitions are assigned (none: the reader waits on the consumer's
/// queue instead, for the assignment). The context calls [`BatchQueue::assign`]
/// before librdkafka starts fetching what it is assigned, and
/// [`BatchQueue::revoke`] when partitions are revoked.
#[derive(Default)]
pub(super) struct BatchQueue {
    queue: AtomicPtr<rd::rd_kafka_queue_t>,
    assigned: AtomicUsize,
}

impl BatchQueue {
    /// Points each partition's fetch queue at the reader's queue (eager protocol:
    /// `tpl` is the whole assignment).
    pub fn assign<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, tpl: &TopicPartitionList) {
        let queue = self.queue.load(Ordering::Acquire);
        for e in tpl.elements() {
            if queue.is_null() {
                break;
            }
            let Ok(topic) = CString::new(e.topic()) else {
                continue;
            };
            // SAFETY: the client outlives this call; the partition's queue handle is
            // released at once (the forwarding stays set on the partition's fetch
            // queue, with a reference to ours).
            unsafe {
                let rk = consumer.client().native_ptr();
                let fetchq = rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), e.partition());
                if !fetchq.is_null() {
                    rd::rd_kafka_queue_forward(fetchq, queue);
                    rd::rd_kafka_queue_destroy(fetchq);
                }
            }
        }
        self.assigned.store(tpl.count(), Ordering::Release);
    }

    pub fn revoke(&self) {
        self.assigned.store(0, Ordering::Release);
    }
}

/// Sets where each partition of a new assignment `tpl` starts: its committed offset,
/// or its first offset when the group has none (`auto.offset.reset = earliest`),
/// both looked up here. Left to librdkafka, a partition without a committed offset
/// is reset after a 100 ms back-off (it takes the missing offset for an error): a
/// tenth of a second of every new pipeline's and sink's start. Two small requests
/// on the reading thread, which has nothing to read until they are answered; if
/// either fails, librdkafka looks the offsets up itself.
pub(super) fn start_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
    timeout: Duration,
) {
    let Ok(committed) = consumer.committed_offsets(tpl.clone(), timeout) else {
        return;
    };
    for mut e in tpl.elements() {
        let at = match committed
            .find_partition(e.topic(), e.partition())
            .map(|c| c.offset())
        {
            Some(at @ rdkafka::Offset::Offset(_)) => at,
            _ => match consumer.fetch_watermarks(e.topic(), e.partition(), timeout) {
                Ok((low, _)) => rdkafka::Offset::Offset(low),
                Err(_) => continue,
            },
        };
        let _ = e.set_offset(at);
    }
}

/// A consumer context with a [`BatchQueue`].
pub(super) trait Batched: ConsumerContext {
    fn batch_queue(&self) -> &BatchQueue;
}

/// The context of a consumer that needs nothing else (a sink's).
#[derive(Default)]
pub(super) struct BatchContext(BatchQueue);

impl ClientContext for BatchContext {}

impl ConsumerContext for BatchContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                start_offsets(consumer, tpl, super::CLUSTER_TIMEOUT);
                self.0.assign(consumer, tpl)
            }
            Rebalance::Revoke(_) => self.0.revoke(),
            Rebalance::Error(_) => {}
        }
    }
}

impl Batched for BatchContext {
    fn batch_queue(&self) -> &BatchQueue {
        &self.0
    }
}

/// One record read in a batch (the consumer's, kept alive until it is dropped).
pub(super) struct Record<'c> {
    ptr: NonNull<rd::rd_kafka_message_t>,
    /// Read from a consumer that outlives it.
    _consumer: std::marker::PhantomData<&'c ()>,
}

impl Record<'_> {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: valid until `rd_kafka_message_destroy` in `drop`.
        unsafe { self.ptr.as_ref() }
    }

    /// librdkafka's error for this record (a consumer error on its partition).
    fn error(&self) -> Option<KafkaError> {
        let err = self.raw().err;
        (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| KafkaError::MessageConsumption(RDKafkaErrorCode::from(err)))
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        // SAFETY: the message came from `rd_kafka_consume_batch_queue`, destroyed once.
        unsafe { rd::rd_kafka_message_destroy(self.ptr.as_ptr()) }
    }
}

/// A record's bytes: `len` bytes at `ptr`, or None.
///
/// # Safety
/// `ptr` must be null or point to `len` readable bytes that outlive `'a`.
unsafe fn bytes<'a>(ptr: *const std::ffi::c_void, len: usize) -> Option<&'a [u8]> {
    match ptr.is_null() {
        true => None,
        false => Some(std::slice::from_raw_parts(ptr as *const u8, len)),
    }
}

impl Message for Record<'_> {
    type Headers = RecordHeaders;

    fn key(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: librdkafka's key buffer lives as long as the message.
        unsafe { bytes(m.key, m.key_len) }
    }

    fn payload(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: as the key.
        unsafe { bytes(m.payload, m.len) }
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        let m = self.ptr.as_mut();
        match m.payload.is_null() {
            true => None,
            false => Some(std::slice::from_raw_parts_mut(m.payload as *mut u8, m.len)),
        }
    }

    fn topic(&self) -> &str {
        // SAFETY: the message holds its topic, whose name lives as long as it.
        let name = unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_topic_name(self.raw().rkt)) };
        name.to_str().unwrap_or_default()
    }

    fn partition(&self) -> i32 {
        self.raw().partition
    }

    fn offset(&self) -> i64 {
        self.raw().offset
    }

    fn timestamp(&self) -> Timestamp {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a valid message.
        let ms = unsafe { rd::rd_kafka_message_timestamp(self.ptr.as_ptr(), &mut kind) };
        match kind {
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => {
                Timestamp::CreateTime(ms)
            }
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => {
                Timestamp::LogAppendTime(ms)
            }
            _ => Timestamp::NotAvailable,
        }
    }

    fn headers(&self) -> Option<&RecordHeaders> {
        let mut headers = std::ptr::null_mut();
        // SAFETY: a valid message; the headers belong to it (not to be freed here).
        let err = unsafe { rd::rd_kafka_message_headers(self.ptr.as_ptr(), &mut headers) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
            return None;
        }
        // SAFETY: `RecordHeaders` is a zero-sized stand-in for librdkafka's headers,
        // only ever used behind this pointer, which lives as long as the message.
        Some(unsafe { &*(headers as *const RecordHeaders) })
    }
}

/// A record's headers (librdkafka's, behind a reference).
pub(super) struct RecordHeaders {
    _opaque: [u8; 0],
}

impl RecordHeaders {
    fn ptr(&self) -> *const rd::rd_kafka_headers_t {
        self as *const RecordHeaders as *const rd::rd_kafka_headers_t
    }
}

impl Headers for RecordHeaders {
    fn count(&self) -> usize {
        // SAFETY: valid headers (see `Record::headers`).
        unsafe { rd::rd_kafka_header_cnt(self.ptr()) }
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0);
        // SAFETY: valid headers; the name and value live as long as they do.
        unsafe {
            let err =
                rd::rd_kafka_header_get_all(self.ptr(), idx, &mut name, &mut value, &mut size);
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return None;
            }
            Some(Header {
                key: std::ffi::CStr::from_ptr(name).to_str().unwrap_or_default(),
                value: bytes(value, size),
            })
        }
    }
}

/// The reader of one consumer.
pub(super) struct Batches<'c, C: Batched> {
    consumer: &'c BaseConsumer<C>,
    queue: NonNull<rd::rd_kafka_queue_t>,
    buffer: Vec<*mut rd::rd_kafka_message_t>,
}

impl<'c, C: Batched> Batches<'c, C> {
    /// Before the consumer subscribes: the partitions it is assigned forward to
    /// this reader's queue.
    pub fn new(consumer: &'c BaseConsumer<C>) -> Batches<'c, C> {
        // SAFETY: a valid client; the queue is destroyed in `drop`, before the
        // consumer (which the reader borrows).
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        let queue = NonNull::new(queue).expect("librdkafka allocates a queue");
        (consumer.context().batch_queue().queue).store(queue.as_ptr(), Ordering::Release);
        Batches {
            consumer,
            queue,
            buffer: Vec::new(),
        }
    }

    /// Serves the consumer's events (a rebalance runs its callback here), then
    /// reads up to `max` records into `out`, waiting up to `wait` for the first.
    /// `Ok(Some(e))`: a consumer error, after the records in `out` (handle them
    /// first). `Err`: a record came through the consumer's own queue (a partition
    /// whose forwarding could not be set up): not read, the run restarts and
    /// reads it again from its positions.
    pub fn read(
        &mut self,
        wait: Duration,
        max: usize,
        out: &mut Vec<Record<'c>>,
    ) -> Result<Option<KafkaError>, Error> {
        let batch_queue = self.consumer.context().batch_queue();
        let assigned = batch_queue.assigned.load(Ordering::Acquire) > 0;
        // Unassigned, the wait is for the assignment, on the consumer's queue.
        let events_wait = if assigned { Duration::ZERO } else { wait };
        match self.consumer.poll(events_wait) {
            Some(Ok(m)) => {
                return Err(Error::Cluster(format!(
                    "a record of {}/{} came outside the batch reader's queue",
                    m.topic(),
                    m.partition()
                )))
            }
            Some(Err(e)) => return Ok(Some(e)),
            None if !assigned => return Ok(None),
            None => {}
        }
        let max = max.max(1);
        self.buffer.clear();
        self.buffer.reserve(max);
        // What is queued, at once. A batch read with a timeout waits for the batch
        // to fill, not for its first record: when nothing is queued, the wait is
        // for one record, then the rest of what is queued by then is taken.
        let mut n = self.consume(0, 0, max);
        if n == 0 && !wait.is_zero() {
            n = self.consume(wait.as_millis().min(i32::MAX as u128) as i32, 0, 1);
            if n == 1 {
                n += self.consume(0, 1, max - 1);
            }
        }
        // SAFETY: librdkafka wrote `n` message pointers.
        unsafe { self.buffer.set_len(n) };
        let mut error = None;
        for &ptr in &self.buffer {
            let Some(ptr) = NonNull::new(ptr) else {
                continue;
            };
            let record = Record {
                ptr,
                _consumer: std::marker::PhantomData,
            };
            match record.error() {
                // Reported after the records before it are handled.
                Some(e) => error = error.or(Some(e)),
                None => out.push(record),
            }
        }
        self.buffer.clear();
        Ok(error)
    }
}

impl<C: Batched> Batches<'_, C> {
    /// Up to `max` records from the queue into `buffer[at..]`, waiting up to
    /// `timeout_ms` for them; how many.
    fn consume(&mut self, timeout_ms: i32, at: usize, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        debug_assert!(at + max <= self.buffer.capacity());
        // SAFETY: the buffer has room for `at + max` pointers; librdkafka writes at
        // most `max` from `at`.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout_ms,
                self.buffer.as_mut_ptr().add(at),
                max,
            )
        };
        n.max(0) as usize
    }
}

impl<C: Batched> Drop for Batches<'_, C> {
    fn drop(&mut self) {
        let queue = &self.consumer.context().batch_queue().queue;
        queue.store(std::ptr::null_mut(), Ordering::Release);
        // SAFETY: created in `new`, destroyed once; librdkafka keeps the queue
        // itself alive while partitions still forward to it.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) }
    }
}

/// A copy of `message` that outlives its consumer (as `BorrowedMessage::detach`).
pub(super) fn detach(message: &impl Message) -> rdkafka::message::OwnedMessage {
    let headers = message.headers().map(|hs| {
        hs.iter()
            .fold(rdkafka::message::OwnedHeaders::new(), |owned, h| {
                owned.insert(h)
            })
    });
    rdkafka::message::OwnedMessage::new(
        message.payload().map(<[u8]>::to_vec),
        message.key().map(<[u8]>::to_vec),
        message.topic().to_string(),
        message.timestamp(),
        message.partition(),
        message.offset(),
        headers,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::test_broker::Broker;
    use rdkafka::message::OwnedHeaders;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use std::collections::BTreeMap;

    fn produce(broker: &Broker, topic: &str, partitions: i32, per_partition: i64, from: i64) {
        let producer: BaseProducer = broker.client().create().unwrap();
        for i in from..from + per_partition {
            for p in 0..partitions {
                let value = format!("{p}:{i}");
                let headers = OwnedHeaders::new().insert(Header {
                    key: "h",
                    value: Some(value.as_bytes()),
                });
                let record = BaseRecord::to(topic)
                    .partition(p)
                    .key(&value)
                    .payload(&value)
                    .timestamp(1_000 + i)
                    .headers(headers);
                producer.send(record).unwrap();
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// One more record, to partition 0.
    fn produce_one(broker: &Broker) {
        let producer: BaseProducer = broker.client().create().unwrap();
        producer
            .send(BaseRecord::to("t").partition(0).key("x").payload("x"))
            .unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    fn consumer(broker: &Broker) -> BaseConsumer<BatchContext> {
        broker
            .client()
            .set("group.id", "batch-test")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "6000")
            .create_with_context(BatchContext::default())
            .unwrap()
    }

    /// Reads into `seen` (per partition, the values in the order read) until
    /// `until` holds; each record's key, header and timestamp checked against its
    /// value.
    fn read_until(
        reader: &mut Batches<'_, BatchContext>,
        seen: &mut BTreeMap<i32, Vec<i64>>,
        until: impl Fn(&BTreeMap<i32, Vec<i64>>) -> bool,
    ) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        while !until(seen) {
            assert!(std::time::Instant::now() < deadline, "read {seen:?}");
            assert!(reader
                .read(Duration::from_millis(50), 7, &mut out)
                .unwrap()
                .is_none());
            assert!(out.len() <= 7);
            for m in out.drain(..) {
                let value = std::str::from_utf8(m.payload().unwrap())
                    .unwrap()
                    .to_string();
                let (p, i) = value.split_once(':').unwrap();
                assert_eq!(p.parse::<i32>().unwrap(), m.partition());
                let i: i64 = i.parse().unwrap();
                assert_eq!(m.key(), Some(value.as_bytes()));
                assert_eq!(m.topic(), "t");
                assert_eq!(m.timestamp(), Timestamp::CreateTime(1_000 + i));
                let h = m.headers().unwrap().get(0);
                assert_eq!((h.key, h.value), ("h", Some(value.as_bytes())));
                assert_eq!(m.offset(), i, "offset of {value}");
                seen.entry(m.partition()).or_default().push(i);
            }
        }
    }

    /// Every record once and in order per partition, in batches no larger than
    /// asked; and after a second member joins and takes partitions away, then
    /// leaves, the first reads on from where it was assigned again.
    #[test]
    fn batches_read_every_record_in_order_across_rebalances() {
        let broker = Broker::start();
        broker.create_topic("t", 4);
        produce(&broker, "t", 4, 100, 0);
        let first = consumer(&broker);
        let mut reader = Batches::new(&first);
        first.subscribe(&["t"]).unwrap();
        let mut seen = BTreeMap::new();
        let all = |n: usize| {
            move |s: &BTreeMap<i32, Vec<i64>>| s.len() == 4 && s.values().all(|v| v.len() >= n)
        };
        read_until(&mut reader, &mut seen, all(100));
        for v in seen.values() {
            assert_eq!(*v, (0..100).collect::<Vec<_>>());
        }
        // Commit what was read, so a partition moved to another member starts there.
        let mut tpl = TopicPartitionList::new();
        for p in 0..4 {
            tpl.add_partition_offset("t", p, rdkafka::Offset::Offset(100))
                .unwrap();
        }
        first
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
        {
            let second = consumer(&broker);
            let mut other = Batches::new(&second);
            second.subscribe(&["t"]).unwrap();
            let mut theirs = BTreeMap::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let (mut mine, mut yours) = (Vec::new(), Vec::new());
            // Until the group has split the partitions between them.
            while second.assignment().unwrap().count() == 0
                || first.assignment().unwrap().count() == 4
            {
                assert!(std::time::Instant::now() < deadline, "no rebalance");
                reader
                    .read(Duration::from_millis(20), 7, &mut mine)
                    .unwrap();
                other
                    .read(Duration::from_millis(20), 7, &mut yours)
                    .unwrap();
                assert!(mine.is_empty() && yours.is_empty());
            }
            // Both poll until the 50 new records of every partition are read by
            // one or the other.
            produce(&broker, "t", 4, 50, 100);
            loop {
                let read = |s: &BTreeMap<i32, Vec<i64>>, p| {
                    s.get(&p)
                        .map_or(0, |v| v.iter().filter(|&&o| o >= 100).count())
                };
                if (0..4).all(|p| read(&seen, p) + read(&theirs, p) >= 50) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{seen:?} {theirs:?}");
                reader
                    .read(Duration::from_millis(20), 7, &mut mine)
                    .unwrap();
                for m in mine.drain(..) {
                    seen.entry(m.partition()).or_default().push(m.offset());
                }
                other
                    .read(Duration::from_millis(20), 7, &mut yours)
                    .unwrap();
                for m in yours.drain(..) {
                    theirs.entry(m.partition()).or_default().push(m.offset());
                }
            }
            // Each new record read once, by one of them, in order.
            for p in 0..4 {
                let mine = seen[&p].iter().filter(|&&o| o >= 100);
                let new: Vec<i64> = mine
                    .chain(theirs.get(&p).into_iter().flatten())
                    .copied()
                    .collect();
                assert_eq!(new, (100..150).collect::<Vec<_>>(), "partition {p}");
            }
            assert!(!theirs.is_empty(), "the second member took no partition");
            // Each commits what it read.
            for c in [&first, &second] {
                let mut tpl = c.assignment().unwrap();
                tpl.set_all_offsets(rdkafka::Offset::Offset(150)).unwrap();
                c.commit(&tpl, rdkafka::consumer::CommitMode::Sync).unwrap();
            }
            drop(other);
            second.unsubscribe();
        }
        // The first member is given every partition again, and reads each from
        // its committed offset.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        while first.assignment().unwrap().count() < 4 {
            assert!(std::time::Instant::now() < deadline, "not reassigned");
            reader.read(Duration::from_millis(20), 7, &mut out).unwrap();
            assert!(out.is_empty());
        }
        produce(&broker, "t", 4, 10, 150);
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        while !(last.len() == 4 && last.values().all(|&o| o == 159)) {
            assert!(std::time::Instant::now() < deadline, "{last:?}");
            reader.read(Duration::from_millis(50), 7, &mut out).unwrap();
            for m in out.drain(..) {
                // From the committed offset, with no gap and no repeat.
                let next = last.get(&m.partition()).map_or(150, |o| o + 1);
                assert_eq!(m.offset(), next, "partition {}", m.partition());
                last.insert(m.partition(), m.offset());
            }
        }
        // A read waits for the first record, not for a full batch: one record
        // produced, a read of up to 7 with a long wait returns it well before.
        produce_one(&broker);
        let started = std::time::Instant::now();
        while out.is_empty() {
            reader.read(Duration::from_secs(10), 7, &mut out).unwrap();
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!((out[0].partition(), out[0].offset()), (0, 160));
    }
}
