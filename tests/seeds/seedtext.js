'use strict';
// JavaScript code out of a scraped seed page, and helpers shared by the Node harnesses.
//
// The seed pages in ../shared/seeds are scraped web pages: code blocks are not fenced and
// may start in the middle of a line ("}));class ValtronicsWebSocket {"). A block is found
// by a needle that must occur exactly once (its header, e.g. "class BookoviaWebSocket {")
// and ends at the brace that closes the needle's opening brace. The brace count skips
// strings, template literals (with nested ${...}), comments and regular-expression
// literals; the latter are told from divisions by the token before the slash, the usual
// heuristic, which a regex right after `)` or `]` would fool. The block must then
// compile, so a miscount fails loudly rather than yielding half a class.
//
// Usage: node seedtext.js SEED_FILE 'class Name {'   (prints the block)

const fs = require('fs');
const path = require('path');
const vm = require('vm');
const crypto = require('crypto');

class SeedError extends Error {}

const REGEX_AFTER = new Set(['', '(', ',', '=', ':', '[', '!', '&', '|', '?', '{', '}', ';', '+', '-', '*', '%', '<', '>', '~', '^']);
const REGEX_AFTER_WORD = new Set(['return', 'typeof', 'case', 'do', 'else', 'in', 'of', 'new', 'delete', 'void', 'throw', 'yield', 'await']);

// Index just past the brace that closes the one at `open`.
function matchBrace(text, open) {
  if (text[open] !== '{') throw new SeedError(`no "{" at offset ${open}`);
  // Contexts: code (with its own brace depth; `tpl` marks a ${...} inside a template) and
  // template literal text.
  const stack = [{ kind: 'code', depth: 0, tpl: false }];
  let prev = ''; // the last significant code character
  let word = ''; // the last identifier, for `return /re/`
  let i = open;
  while (i < text.length) {
    const top = stack[stack.length - 1];
    const c = text[i];
    if (top.kind === 'template') {
      if (c === '\\') { i += 2; continue; }
      if (c === '`') { stack.pop(); i += 1; prev = '`'; word = ''; continue; }
      if (c === '$' && text[i + 1] === '{') { stack.push({ kind: 'code', depth: 0, tpl: true }); i += 2; prev = '{'; continue; }
      i += 1;
      continue;
    }
    if (c === '/' && text[i + 1] === '/') {
      const nl = text.indexOf('\n', i);
      i = nl < 0 ? text.length : nl;
      continue;
    }
    if (c === '/' && text[i + 1] === '*') {
      const end = text.indexOf('*/', i + 2);
      if (end < 0) throw new SeedError(`unterminated comment at offset ${i}`);
      i = end + 2;
      continue;
    }
    if (c === "'" || c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== c) {
        if (text[j] === '\\') j += 1;
        else if (text[j] === '\n') throw new SeedError(`unterminated string at offset ${i}`);
        j += 1;
      }
      i = j + 1; prev = c; word = '';
      continue;
    }
    if (c === '`') { stack.push({ kind: 'template' }); i += 1; continue; }
    if (c === '/' && (REGEX_AFTER.has(prev) && word === '' || REGEX_AFTER_WORD.has(word))) {
      let j = i + 1;
      let cls = false;
      while (j < text.length && (cls || text[j] !== '/')) {
        if (text[j] === '\\') j += 1;
        else if (text[j] === '[') cls = true;
        else if (text[j] === ']') cls = false;
        else if (text[j] === '\n') throw new SeedError(`unterminated regex at offset ${i}`);
        j += 1;
      }
      i = j + 1;
      while (i < text.length && /[a-z]/.test(text[i])) i += 1;
      prev = '/'; word = '';
      continue;
    }
    if (c === '{') {
      top.depth += 1;
    } else if (c === '}') {
      if (top.tpl && top.depth === 0) { stack.pop(); i += 1; continue; }
      top.depth -= 1;
      if (stack.length === 1 && top.depth === 0) return i + 1;
    }
    if (/[A-Za-z0-9_$]/.test(c)) {
      word = /[A-Za-z0-9_$]/.test(prev) ? word + c : c;
      prev = c;
    } else if (!/\s/.test(c)) {
      prev = c; word = '';
    }
    i += 1;
  }
  throw new SeedError(`no closing brace for the one at offset ${open}`);
}

// The block that starts at `needle` (which must end with "{" and occur exactly once).
function extractBlock(text, needle) {
  if (!needle.endsWith('{')) throw new SeedError(`needle must end with "{": ${needle}`);
  const at = text.indexOf(needle);
  if (at < 0) throw new SeedError(`"${needle}" is not in the seed`);
  if (text.indexOf(needle, at + 1) >= 0) throw new SeedError(`"${needle}" occurs more than once in the seed`);
  const end = matchBrace(text, at + needle.length - 1);
  const source = text.slice(at, end);
  try {
    new vm.Script(`(${source})`, { filename: needle });
  } catch (e) {
    throw new SeedError(`the block "${needle}" does not compile: ${e.message}\n${source}`);
  }
  return {
    source,
    line: text.slice(0, at).split('\n').length,
    lines: source.split('\n').length,
    sha256: crypto.createHash('sha256').update(source).digest('hex'),
  };
}

// ------------------------------------------------------------------ harness helpers

// One line for tests/it/seeds.rs: a JSON object whose first member is "ev".
function emit(ev, fields = {}) {
  process.stdout.write(JSON.stringify({ ev, ...fields }) + '\n');
}

// Extracts the block and evaluates it in this context (so that it sees the global
// WebSocket and console, as it would in a page); returns the class or function.
function loadSeed(seedFile, needle) {
  const got = extractBlock(fs.readFileSync(seedFile, 'utf8'), needle);
  const value = vm.runInThisContext(`(${got.source})`, { filename: `${path.basename(seedFile)}: ${needle}` });
  emit('extracted', { lang: 'js', seed: path.basename(seedFile), name: needle, line: got.line, lines: got.lines, sha256: got.sha256 });
  return value;
}

// The seeds' classes call `new WebSocket(url)` as in a browser. Node 20 has no global
// WebSocket: install the `ws` package's, with two browser behaviours: a URL the seed
// hard-codes (its production host) is mapped to the broker under test, and an exception
// thrown by an on* handler is reported (as a browser reports it on the console) instead
// of crashing the process. Connection errors and closes are reported to the test too.
function installWebSocket(mapUrl) {
  const WS = require('ws');
  class PageWebSocket extends WS {
    constructor(url, protocols, options) {
      const mapped = mapUrl(String(url));
      super(mapped, protocols, options);
      emit('ws_connect', { url: String(url), mapped });
      this.on('error', (e) => emit('ws_error', { url: mapped, message: e.message }));
      this.on('close', (code, reason) => emit('ws_close', { url: mapped, code, reason: String(reason) }));
    }
  }
  for (const name of ['onopen', 'onmessage', 'onclose', 'onerror']) {
    const base = Object.getOwnPropertyDescriptor(WS.prototype, name);
    Object.defineProperty(PageWebSocket.prototype, name, {
      configurable: true,
      enumerable: true,
      get() { return base.get.call(this); },
      set(fn) {
        const wrapped = typeof fn !== 'function' ? fn : function (...args) {
          try {
            return fn.apply(this, args);
          } catch (e) {
            emit('listener_error', { handler: name, error: String((e && e.stack) || e) });
            console.error(`Uncaught (in ${name} handler)`, e);
            return undefined;
          }
        };
        base.set.call(this, wrapped);
      },
    });
  }
  globalThis.WebSocket = PageWebSocket;
  return PageWebSocket;
}

// Runs `onCommand(obj)` for each JSON line on stdin and `onEnd()` when stdin closes (the
// test is done). Exits on its own after `timeoutMs` (a test that died leaves no orphan).
function driveFromStdin(onCommand, onEnd, timeoutMs) {
  let buf = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk) => {
    buf += chunk;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line) continue;
      try {
        onCommand(JSON.parse(line));
      } catch (e) {
        emit('fatal', { message: `command ${line}: ${(e && e.stack) || e}` });
      }
    }
  });
  process.stdin.on('end', () => {
    onEnd();
    setTimeout(() => process.exit(0), 200);
  });
  setTimeout(() => {
    emit('fatal', { message: `harness still running after ${timeoutMs} ms` });
    process.exit(3);
  }, timeoutMs).unref();
}

function env(name) {
  const v = process.env[name];
  if (!v) {
    emit('fatal', { message: `environment variable ${name} is not set` });
    process.exit(2);
  }
  return v;
}

module.exports = { SeedError, matchBrace, extractBlock, emit, loadSeed, installWebSocket, driveFromStdin, env };

if (require.main === module) {
  const [seedFile, needle] = process.argv.slice(2);
  if (!seedFile || !needle) {
    console.error("usage: node seedtext.js SEED_FILE 'class Name {'");
    process.exit(2);
  }
  try {
    const got = extractBlock(fs.readFileSync(seedFile, 'utf8'), needle);
    process.stdout.write(got.source + '\n');
    console.error(`// ${needle}: seed line ${got.line}, ${got.lines} lines, sha256 ${got.sha256.slice(0, 16)}`);
  } catch (e) {
    console.error(`seedtext.js: ${e.message}`);
    process.exit(1);
  }
}
