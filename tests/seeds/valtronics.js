'use strict';
// Runs the Valtronics seed's JavaScript client class, ValtronicsWebSocket (extracted from
// the seed page at run time, unchanged), against fleetcast the way the seed's usage
// example does: construct with the URL and a token, set onTelemetryUpdate/onAlert, connect,
// subscribe('telemetry', {device_id: 1}) and subscribe('alerts', {severity: [...]}).
// Driven by tests/it/seeds.rs.
//
// Two defects of the seed code need a hand, and this harness gives it without editing it:
// - handleMessage() calls this.handleAuthResponse(), which the class does not define; the
//   page defines it as a free function further down ("function handleAuthResponse(data)").
//   That function is extracted too and set on the instance. (Without it a browser would
//   log a TypeError on every auth_response and carry on; installWebSocket() reports such
//   a handler exception as a "listener_error" line, which the test treats as a failure.)
// - The usage example subscribes right after connect(), while the socket is still
//   connecting; send() then drops the message silently and nothing re-sends it. So the
//   harness subscribes once the auth_response has come (as the page's prose says:
//   connect, authenticate, subscribe).
// After subscribing it sends the seed's ping message through the class's send() (the class
// has no ping method); the pong tells the test that the subscriptions are in place.
//
// Environment: SEED_FILE, SEED_URL (ws://host:port/ws), SEED_TOKEN, SEED_TIMEOUT_MS.
// Stdout: one JSON line per event ({"ev": ...}) among the class's console output.
// Stdin: EOF ends the run.

const S = require('./seedtext.js');

const seedFile = S.env('SEED_FILE');
const url = S.env('SEED_URL');
const token = S.env('SEED_TOKEN');

S.installWebSocket((u) => u);
let ValtronicsWebSocket;
let handleAuthResponse;
try {
  ValtronicsWebSocket = S.loadSeed(seedFile, 'class ValtronicsWebSocket {');
  handleAuthResponse = S.loadSeed(seedFile, 'function handleAuthResponse(data) {');
} catch (e) {
  S.emit('fatal', { message: `extracting the Valtronics client: ${e.message}` });
  process.exit(1);
}

const wsClient = new ValtronicsWebSocket(url, token);
wsClient.handleAuthResponse = handleAuthResponse;

// The usage example's callbacks.
wsClient.onTelemetryUpdate = (data) => S.emit('callback', { name: 'onTelemetryUpdate', data });
wsClient.onAlert = (data) => S.emit('callback', { name: 'onAlert', data });
wsClient.onDeviceStatusUpdate = (data) => S.emit('callback', { name: 'onDeviceStatusUpdate', data });

let subscribed = false;
const handleMessage = wsClient.handleMessage;
wsClient.handleMessage = function (data) {
  S.emit('message', { msg: data });
  const r = handleMessage.call(this, data);
  if (data.type === 'auth_response' && data.success && !subscribed) {
    subscribed = true;
    wsClient.subscribe('telemetry', { device_id: 1 });
    wsClient.subscribe('alerts', { severity: ['critical', 'warning'] });
    const ping = { type: 'ping', timestamp: new Date().toISOString() };
    wsClient.send(ping);
    S.emit('sent', { msg: ping });
  }
  if (data.type === 'pong') S.emit('ready');
  return r;
};

wsClient.connect();

S.driveFromStdin(
  (cmd) => S.emit('fatal', { message: `unknown command ${JSON.stringify(cmd)}` }),
  () => wsClient.disconnect(),
  Number(process.env.SEED_TIMEOUT_MS || 20000),
);
