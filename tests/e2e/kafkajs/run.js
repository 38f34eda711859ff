// One kafkajs operation per run, driven by tests/e2e/test_kafkajs*.py.
//
//   node run.js '<json request>'
//
// The request is {"brokers": ["127.0.0.1:PORT"], "op": "...", ...}. The answer is one JSON
// line on stdout: {"ok": true, "result": ...} or {"ok": false, "error": {...}} for an error
// that kafkajs reported (the test decides whether it was expected). kafkajs' own log goes
// to stderr. Binary values travel as base64 strings; null stays null.
'use strict'

const { Kafka, logLevel, CompressionTypes, ConfigResourceTypes } = require('kafkajs')
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
  // messages: [{key, value, headers: {name: [b64, ...]}, partition, timestamp}]
  async produce(kafka, req) {
    const producer = kafka.producer({ allowAutoTopicCreation: true, idempotent: false })
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
      return await producer.send({
        topic: req.topic,
        messages,
        acks: req.acks === undefined ? -1 : req.acks,
        compression: COMPRESSION[req.compression || 'none'],
        timeout: 20000,
      })
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
    return withAdmin(kafka, admin => admin.deleteTopicRecords(req.args))
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
    await consumer.connect()
    try {
      await consumer.subscribe({ topics: [req.topic], fromBeginning: true })
      await consumer.run({
        eachMessage: async ({ partition, message }) => {
          const headers = {}
          for (const [k, v] of Object.entries(message.headers || {})) {
            headers[k] = (Array.isArray(v) ? v : [v]).map(toB64)
          }
          records.push({ partition, offset: Number(message.offset), key: toB64(message.key),
            value: toB64(message.value), headers, timestamp: Number(message.timestamp) })
          if (records.length >= req.count) done()
        },
      })
      const timer = new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`only ${records.length} of ${req.count} records in ${req.timeoutMs}ms`)),
          req.timeoutMs))
      await Promise.race([finished, timer])
      return records
    } finally {
      await consumer.disconnect()
    }
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
  const req = JSON.parse(process.argv[2])
  const op = ops[req.op]
  if (!op) throw new Error(`unknown op ${req.op}`)
  let answer
  try {
    answer = { ok: true, result: await op(client(req), req) }
  } catch (e) {
    answer = { ok: false, error: describeError(e) }
  }
  process.stdout.write(JSON.stringify(answer) + '\n')
}

main().then(
  () => process.exit(0),
  e => {
    process.stderr.write(`run.js crashed: ${e.stack}\n`)
    process.exit(2)
  })
