// One kafkajs operation per run, driven by tests/e2e/test_kafkajs*.py and
// tests/e2e/group_workers.py.
//
//   node run.js < request.json
//   node run.js '{"op": "member", ...}'    (stdin stays free for commands)
//
// The request is {"brokers": ["127.0.0.1:PORT"], "op": "...", ...}. The answer is one JSON
// line on stdout: {"ok": true, "result": ...} or {"ok": false, "error": {...}} for an error
// that kafkajs reported (the test decides whether it was expected). The long-lived `member`
// op prints event lines before it (see there). kafkajs' own log goes to stderr. Binary
// values travel as base64 strings; null stays null.
'use strict'

const { Kafka, logLevel, CompressionTypes, ConfigResourceTypes, PartitionAssigners } = require('kafkajs')
const readline = require('readline')
const codecs = require('./codecs')

codecs.register()

const COMPRESSION = {
  none: CompressionTypes.None,
  gzip: CompressionTypes.GZIP,
  snappy: CompressionTypes.Snappy,
  lz4: CompressionTypes.LZ4,
  zstd: CompressionTypes.ZSTD,
}

const b64 = s => (s === null || s === undefined ? null : Buffer.from(s, 'base64'))
const toB64 = b => (b === null || b === undefined ? null : Buffer.from(b).toString('base64'))

// kafkajs ships one assigner; a request names it as the other clients name theirs.
const ASSIGNERS = { roundrobin: PartitionAssigners.roundRobin }

const emit = obj => process.stdout.write(JSON.stringify(obj) + '\n')

// A consumed message as the tests compare it: exact bytes, every header value in order.
function recordOf(partition, message) {
  const headers = {}
  for (const [k, v] of Object.entries(message.headers || {})) {
    headers[k] = (Array.isArray(v) ? v : [v]).map(toB64)
  }
  return { partition, offset: Number(message.offset), key: toB64(message.key), value: toB64(message.value),
    headers, timestamp: Number(message.timestamp) }
}

function stderrLogger() {
  return ({ namespace, level, label, log }) => {
    const { message, ...extra } = log
    process.stderr.write(`[kafkajs ${label} ${namespace}] ${message} ${JSON.stringify(extra)}\n`)
  }
}

function client(req) {
  return new Kafka({
    clientId: 'freshet-e2e',
    brokers: req.brokers,
    logLevel: logLevel.WARN,
    logCreator: stderrLogger,
    connectionTimeout: 5000,
    requestTimeout: 20000,
    retry: { retries: req.retries === undefined ? 3 : req.retries, initialRetryTime: 100, maxRetryTime: 1000 },
  })
}

const ops = {
  // messages: [{key, value, headers: {name: [b64, ...]}, partition, timestamp}].
  // idempotent: InitProducerId first, then sequenced batches (kafkajs wants acks=-1 and one
  // request in flight). sendSize: messages per send (default all in one), so sequences
  // must carry on across requests of one producer.
  async produce(kafka, req) {
    const producer = req.idempotent
      ? kafka.producer({ allowAutoTopicCreation: true, idempotent: true, maxInFlightRequests: 1 })
      : kafka.producer({ allowAutoTopicCreation: true, idempotent: false })
    await producer.connect()
    try {
      const messages = req.messages.map(m => {
        const headers = {}
        for (const [name, values] of Object.entries(m.headers || {})) headers[name] = values.map(b64)
        const out = { key: b64(m.key), value: b64(m.value), headers }
        if (m.partition !== undefined && m.partition !== null) out.partition = m.partition
        if (m.timestamp !== undefined && m.timestamp !== null) out.timestamp = String(m.timestamp)
        return out
      })
      // One send = one request; batches split by partition.
      const sendSize = req.sendSize || messages.length
      const results = []
      for (let i = 0; i < messages.length; i += sendSize) {
        results.push(...await producer.send({
          topic: req.topic,
          messages: messages.slice(i, i + sendSize),
          acks: req.acks === undefined ? -1 : req.acks,
          compression: COMPRESSION[req.compression || 'none'],
          timeout: 20000,
        }))
      }
      return results
    } finally {
      await producer.disconnect()
    }
  },

  // transactions: [{values: [b64, ...], commit: bool}], one after the other, by one
  // transactional producer (transactionalId); each sends its values to req.topic
  // partition 0 and commits or aborts. Returns nothing.
  async transactions(kafka, req) {
    const producer = kafka.producer({ transactionalId: req.transactionalId, idempotent: true,
      maxInFlightRequests: 1 })
    await producer.connect()
    try {
      for (const t of req.transactions) {
        const txn = await producer.transaction()
        await txn.send({ topic: req.topic, acks: -1,
          messages: t.values.map(v => ({ value: b64(v), partition: 0 })) })
        if (t.commit) await txn.commit()
        else await txn.abort()
      }
    } finally {
      await producer.disconnect()
    }
  },

  async createTopics(kafka, req) {
    return withAdmin(kafka, admin => admin.createTopics(req.args))
  },
  async deleteTopics(kafka, req) {
    return withAdmin(kafka, admin => admin.deleteTopics(req.args))
  },
  async listTopics(kafka) {
    return withAdmin(kafka, admin => admin.listTopics())
  },
  async fetchTopicMetadata(kafka, req) {
    return withAdmin(kafka, admin => admin.fetchTopicMetadata(req.args))
  },
  async fetchTopicOffsets(kafka, req) {
    return withAdmin(kafka, admin => admin.fetchTopicOffsets(req.topic))
  },
  async fetchTopicOffsetsByTimestamp(kafka, req) {
    return withAdmin(kafka, admin => admin.fetchTopicOffsetsByTimestamp(req.topic, req.timestamp))
  },
  async describeConfigs(kafka, req) {
    return withAdmin(kafka, admin =>
      admin.describeConfigs({
        includeSynonyms: false,
        resources: req.topics.map(name => ({ type: ConfigResourceTypes.TOPIC, name })),
      }))
  },
  async createPartitions(kafka, req) {
    return withAdmin(kafka, admin => admin.createPartitions(req.args))
  },
  async deleteTopicRecords(kafka, req) {
    // kafkajs looks the leaders up in metadata it already has and does not load it
    // itself ("Topic metadata not loaded" on a fresh client): load it first.
    return withAdmin(kafka, async admin => {
      await admin.fetchTopicOffsets(req.args.topic)
      return admin.deleteTopicRecords(req.args)
    })
  },
  async describeCluster(kafka) {
    return withAdmin(kafka, admin => admin.describeCluster())
  },

  // Consumer-group consumption: needs FindCoordinator/JoinGroup/SyncGroup/Heartbeat/
  // OffsetFetch on the broker. Reads until `count` records arrived or timeoutMs.
  async consumeGroup(kafka, req) {
    const consumer = kafka.consumer({ groupId: req.groupId, sessionTimeout: 10000, heartbeatInterval: 1000,
      maxWaitTimeInMs: 200, retry: { retries: 2 } })
    const records = []
    let done
    const finished = new Promise(resolve => { done = resolve })
    let crashed
    const crash = new Promise((_, reject) => { crashed = reject })
    consumer.on(consumer.events.CRASH, ({ payload }) => crashed(payload.error))
    await consumer.connect()
    try {
      await consumer.subscribe({ topics: [req.topic], fromBeginning: true })
      await consumer.run({
        eachMessage: async ({ partition, message }) => {
          records.push(recordOf(partition, message))
          if (records.length >= req.count) done()
        },
      })
      const timer = new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`only ${records.length} of ${req.count} records in ${req.timeoutMs}ms`)),
          req.timeoutMs))
      await Promise.race([finished, timer, crash])
      return records
    } finally {
      await consumer.disconnect()
    }
  },

  // A long-lived group member for tests/e2e/group_workers.py, which SIGKILLs it or closes
  // it. Prints one JSON line per event, in the order they happened:
  //   {"assigned": [partitions]}   after every join + sync (kafkajs rebalances eagerly)
  //   {"positioned": true}         the first fetch after a join is done, so every assigned
  //                                partition has a position (committed, or the reset)
  //   {"recs": [record, ...]}      a batch, before it is committed
  //   {"committed": {p: offset}}   after the commit succeeded
  //   {"commit_failed": {p: offset}, "error": ...}
  //   {"error": ...}               a consumer crash
  // stdin commands, one a line: "hold" stops committing (answered {"held": true}: a
  // commit that had started before may still be reported), "close" (or EOF) disconnects,
  // which sends LeaveGroup.
  async member(kafka, req) {
    const assigner = ASSIGNERS[req.assignor || 'roundrobin']
    if (!assigner) throw new Error(`kafkajs has no assigner ${req.assignor}`)
    const consumer = kafka.consumer({
      groupId: req.groupId,
      sessionTimeout: req.sessionTimeoutMs,
      heartbeatInterval: req.heartbeatIntervalMs,
      maxWaitTimeInMs: 100,
      partitionAssigners: [assigner],
      retry: { retries: 5, initialRetryTime: 100, maxRetryTime: 1000 },
    })
    let holding = false
    let close
    const closed = new Promise(resolve => { close = resolve })
    const commands = readline.createInterface({ input: process.stdin })
    commands.on('line', line => {
      if (line.trim() === 'hold') {
        holding = true
        emit({ held: true })
      } else if (line.trim() === 'close') {
        close()
      }
    })
    commands.on('close', () => close())

    // Join -> fetch start -> fetch done: only then has every partition a position.
    let joined = false
    let fetchAfterJoin = false
    consumer.on(consumer.events.GROUP_JOIN, ({ payload }) => {
      emit({ assigned: [...(payload.memberAssignment[req.topic] || [])].sort((a, b) => a - b) })
      joined = true
      fetchAfterJoin = false
    })
    consumer.on(consumer.events.FETCH_START, () => { if (joined) fetchAfterJoin = true })
    consumer.on(consumer.events.FETCH, () => {
      if (fetchAfterJoin) {
        emit({ positioned: true })
        joined = fetchAfterJoin = false
      }
    })
    consumer.on(consumer.events.CRASH, ({ payload }) => emit({ error: describeError(payload.error) }))

    await consumer.connect()
    await consumer.subscribe({ topics: [req.topic], fromBeginning: req.fromBeginning !== false })
    await consumer.run({
      autoCommit: false,
      eachBatch: async ({ batch }) => {
        if (batch.messages.length === 0) return
        emit({ recs: batch.messages.map(m => recordOf(batch.partition, m)) })
        if (holding) return
        const last = batch.messages[batch.messages.length - 1]
        const next = String(Number(last.offset) + 1)
        const offsets = { [batch.partition]: Number(next) }
        try {
          await consumer.commitOffsets([{ topic: batch.topic, partition: batch.partition, offset: next }])
          emit({ committed: offsets })
        } catch (e) {
          emit({ commit_failed: offsets, error: describeError(e) })
        }
      },
    })
    await closed
    commands.close()
    await consumer.disconnect()
    return { closed: true }
  },
}

async function withAdmin(kafka, fn) {
  const admin = kafka.admin()
  await admin.connect()
  try {
    return await fn(admin)
  } finally {
    await admin.disconnect()
  }
}

function describeError(e) {
  const out = { name: e.name, type: e.type, code: e.code, message: e.message, retriable: e.retriable }
  if (e.errors) out.errors = e.errors.map(describeError)
  if (e.cause) out.cause = describeError(e.cause)
  return out
}

async function main() {
  let text = process.argv[2]
  if (text === undefined) {
    const chunks = []
    for await (const chunk of process.stdin) chunks.push(chunk)
    text = Buffer.concat(chunks).toString('utf8')
  }
  const req = JSON.parse(text)
  const op = ops[req.op]
  if (!op) throw new Error(`unknown op ${req.op}`)
  let answer
  try {
    answer = { ok: true, result: await op(client(req), req) }
  } catch (e) {
    answer = { ok: false, error: describeError(e) }
  }
  // Stdout to a pipe is asynchronous: exiting before the write has drained would cut a
  // large answer short.
  await new Promise(resolve => process.stdout.write(JSON.stringify(answer) + '\n', resolve))
}

main().then(
  () => process.exit(0),
  e => {
    process.stderr.write(`run.js crashed: ${e.stack}\n`)
    process.exit(2)
  })
