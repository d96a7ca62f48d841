/**
 * Writes a tiny llama-architecture GGUF model with random weights, for trying
 * the local provider without downloading a model:
 *
 *   npm run build && node dist/scripts/make-gguf.js ./data/tiny.gguf [--embd 64] [--layers 2] [--ff 128] [--heads 4] [--seed 1]
 *   CHATWIRE_LLM=local CHATWIRE_MODEL_PATH=./data/tiny.gguf npm start
 *
 * The replies are gibberish made of words from its small vocabulary.
 */
import { parseArgs } from 'node:util';
import { writeTinyLlamaGguf } from '../test/fixtures/gguf-tiny-llama.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    embd: { type: 'string', default: '64' },
    layers: { type: 'string', default: '2' },
    ff: { type: 'string' },
    heads: { type: 'string', default: '4' },
    context: { type: 'string', default: '4096' },
    seed: { type: 'string', default: '1' },
  },
});
const out = positionals[0];
if (!out) {
  console.error('usage: node dist/scripts/make-gguf.js <out.gguf> [--embd N] [--layers N] [--ff N] [--heads N] [--context N] [--seed N]');
  process.exit(2);
}
const embd = Number(values.embd);
const info = writeTinyLlamaGguf(out, {
  embeddingLength: embd,
  blockCount: Number(values.layers),
  feedForwardLength: values.ff === undefined ? embd * 2 : Number(values.ff),
  headCount: Number(values.heads),
  contextLength: Number(values.context),
  seed: Number(values.seed),
});
console.log(JSON.stringify({ path: info.path, bytes: info.bytes, parameters: info.parameters, vocabSize: info.vocabSize }));
