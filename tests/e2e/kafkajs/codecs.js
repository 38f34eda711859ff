// Pure-JS codecs for kafkajs (which ships only gzip): snappy through kafkajs-snappy
// (snappyjs), LZ4 frames through lz4js, zstd through zstd-codec (emscripten build of
// the reference library, no native addon). Nothing here needs a compiler.
'use strict'

const { CompressionTypes, CompressionCodecs } = require('kafkajs')
const SnappyCodec = require('kafkajs-snappy')
const lz4js = require('lz4js')
const { ZstdCodec } = require('zstd-codec')

let zstdSimple = null
let zstdStreaming = null
const zstdReady = new Promise(resolve => {
  ZstdCodec.run(zstd => {
    zstdSimple = new zstd.Simple()
    zstdStreaming = new zstd.Streaming()
    resolve()
  })
})

const Lz4Codec = () => ({
  async compress(encoder) {
    return Buffer.from(lz4js.compress(encoder.buffer))
  },
  async decompress(buffer) {
    return Buffer.from(lz4js.decompress(buffer))
  },
})

const ZstdJsCodec = () => ({
  async compress(encoder) {
    await zstdReady
    return Buffer.from(zstdSimple.compress(new Uint8Array(encoder.buffer), 3))
  },
  async decompress(buffer) {
    await zstdReady
    // Streaming: librdkafka and Java write frames without a content size, which
    // zstd-codec's Simple.decompress cannot handle.
    const out = zstdStreaming.decompress(new Uint8Array(buffer))
    if (out === null) throw new Error('zstd: cannot decompress frame')
    return Buffer.from(out)
  },
})

function register() {
  CompressionCodecs[CompressionTypes.Snappy] = SnappyCodec
  CompressionCodecs[CompressionTypes.LZ4] = Lz4Codec
  CompressionCodecs[CompressionTypes.ZSTD] = ZstdJsCodec
}

module.exports = { register, zstdReady, Lz4Codec, ZstdJsCodec }
