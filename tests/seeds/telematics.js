'use strict';
// Runs the Telematics SDK seed's JavaScript snippet (extracted from the seed page at run
// time) against fleetcast. The snippet is browser code, not a class: a top-level
// `const ws = new WebSocket('wss://portal-apis.telematicssdk.com/realtime/api/v1/ws/realtime')`
// followed by its onopen (sends `authenticate`), onmessage (logs authenticated, welcome,
// subscribed and device_update; answers the server's `ping` with a `pong`), onerror and
// onclose handlers. It runs here as a page would run it: as a script, once, with the
// `ws` package as the global WebSocket (Node 20 has none). Driven by tests/it/seeds.rs.
//
// What is set, and why (the page says "your_..." where a user puts their own values):
// - the URL: not edited in the text; the WebSocket constructor maps the production origin
//   wss://portal-apis.telematicssdk.com to SEED_BASE_URL (the broker under test), as the
//   Bookovia harness does;
// - the placeholder string literals 'your_jwt_token' and 'your_instance_id' become the
//   credential (SEED_TOKEN) and the tenant (SEED_INSTANCE): the snippet cannot
//   authenticate with the words "your_jwt_token";
// - 'optional_device_token' (single-device mode) depends on SEED_DEVICE_TOKEN: unset, the
//   literal stays as published (the client then follows a device of that name); `null`,
//   it becomes null, the value the seed's Python client sends for "no device" (instance
//   mode); anything else, that vehicle id (single-device mode).
// Each substitution must match exactly once, and is reported in a "substituted" line.
// 'your_client_id' stays: it is an optional label the broker only echoes.
//
// Observed, not changed: every message the socket receives ("message", emitted before the
// snippet's onmessage runs), everything the snippet sends ("sent"), and its console.log /
// console.error calls ("console", with the arguments as JSON values).
//
// Environment: SEED_FILE, SEED_BASE_URL (ws://host:port), SEED_TOKEN, SEED_INSTANCE,
// SEED_DEVICE_TOKEN (optional), SEED_TIMEOUT_MS. Stdout: one JSON line per event
// ({"ev": ...}) among the snippet's own console output. Stdin: EOF closes the socket (what
// leaving the page does) and ends the run.
//
// `node telematics.js --extract SEED_FILE` prints the extracted snippet.

const fs = require('fs');
const path = require('path');
const vm = require('vm');
const crypto = require('crypto');
const S = require('./seedtext.js');

const FIRST = "const ws = new WebSocket(";
const LAST = 'ws.onclose = (event) => {';
const PRODUCTION = 'wss://portal-apis.telematicssdk.com';

// The snippet: from `const ws = new WebSocket(` through the block of its last handler
// (`ws.onclose = (event) => {...}` and its `;`). Both markers must occur exactly once, in
// that order, and the text between them must compile as a script.
function extractSnippet(text) {
  const once = (needle) => {
    const at = text.indexOf(needle);
    if (at < 0) throw new S.SeedError(`"${needle}" is not in the seed`);
    if (text.indexOf(needle, at + 1) >= 0) throw new S.SeedError(`"${needle}" occurs more than once in the seed`);
    return at;
  };
  const start = once(FIRST);
  const last = once(LAST);
  if (last < start) throw new S.SeedError(`"${LAST}" comes before "${FIRST}"`);
  let end = S.matchBrace(text, last + LAST.length - 1);
  if (text[end] === ';') end += 1;
  const source = text.slice(start, end);
  try {
    new vm.Script(source, { filename: 'telematics snippet' });
  } catch (e) {
    throw new S.SeedError(`the snippet does not compile: ${e.message}\n${source}`);
  }
  return {
    source,
    line: text.slice(0, start).split('\n').length,
    lines: source.split('\n').length,
    sha256: crypto.createHash('sha256').update(source).digest('hex'),
  };
}

// Replaces the one occurrence of the string literal `literal` (quotes included).
function substitute(source, literal, replacement, done) {
  const at = source.indexOf(literal);
  if (at < 0 || source.indexOf(literal, at + 1) >= 0) {
    throw new S.SeedError(`${literal} must occur exactly once in the snippet`);
  }
  done.push({ literal, replacement });
  return source.slice(0, at) + replacement + source.slice(at + literal.length);
}

// A console argument as a JSON value (an ErrorEvent or Error as "Name: message").
function plain(a) {
  if (a === undefined) return null;
  if (a && typeof a === 'object' && !Array.isArray(a) && Object.getPrototypeOf(a) !== Object.prototype) {
    if ('message' in a) return `${a.constructor && a.constructor.name}: ${a.message}`;
  }
  try {
    return JSON.parse(JSON.stringify(a));
  } catch (e) {
    return String(a);
  }
}

function parsed(data) {
  const text = String(data);
  try {
    return JSON.parse(text);
  } catch (e) {
    return text;
  }
}

function main() {
  if (process.argv[2] === '--extract') {
    const got = extractSnippet(fs.readFileSync(process.argv[3], 'utf8'));
    process.stdout.write(got.source + '\n');
    process.stderr.write(`# telematics snippet: seed line ${got.line}, ${got.lines} lines, sha256 ${got.sha256.slice(0, 16)}\n`);
    return;
  }
  const seedFile = S.env('SEED_FILE');
  const base = S.env('SEED_BASE_URL');
  const token = S.env('SEED_TOKEN');
  const instance = S.env('SEED_INSTANCE');
  const device = process.env.SEED_DEVICE_TOKEN;

  let source;
  const done = [];
  try {
    const got = extractSnippet(fs.readFileSync(seedFile, 'utf8'));
    S.emit('extracted', { lang: 'js', seed: path.basename(seedFile), name: FIRST, line: got.line, lines: got.lines, sha256: got.sha256 });
    source = substitute(got.source, "'your_jwt_token'", JSON.stringify(token), done);
    source = substitute(source, "'your_instance_id'", JSON.stringify(instance), done);
    if (device !== undefined) {
      source = substitute(source, "'optional_device_token'", device === 'null' ? 'null' : JSON.stringify(device), done);
    }
  } catch (e) {
    S.emit('fatal', { message: `extracting the Telematics snippet: ${e.message}` });
    process.exit(1);
  }
  S.emit('substituted', { substitutions: done });

  const Page = S.installWebSocket((u) => (u.startsWith(PRODUCTION + '/') ? base + u.slice(PRODUCTION.length) : u));
  const sockets = [];
  class ObservedWebSocket extends Page {
    constructor(...args) {
      super(...args);
      sockets.push(this);
      // Registered before the snippet sets onmessage: runs first.
      this.on('message', (data) => S.emit('message', { msg: parsed(data) }));
    }

    send(data, ...rest) {
      S.emit('sent', { msg: parsed(data) });
      return super.send(data, ...rest);
    }
  }
  globalThis.WebSocket = ObservedWebSocket;

  for (const level of ['log', 'error', 'warn']) {
    const original = console[level].bind(console);
    console[level] = (...args) => {
      S.emit('console', { level, args: args.map(plain) });
      original(...args);
    };
  }

  try {
    vm.runInThisContext(source, { filename: `${path.basename(seedFile)}: JavaScript snippet` });
  } catch (e) {
    S.emit('fatal', { message: `running the snippet: ${(e && e.stack) || e}` });
    process.exit(1);
  }

  S.driveFromStdin(
    (cmd) => S.emit('fatal', { message: `unknown command ${JSON.stringify(cmd)}` }),
    () => {
      for (const s of sockets) s.close(1000, 'page closed');
    },
    Number(process.env.SEED_TIMEOUT_MS || 20000),
  );
}

main();
