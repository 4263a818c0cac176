'use strict';
// Runs the Bookovia seed's JavaScript client class (extracted from the seed page at run
// time, unchanged) against fleetcast, the way the seed's usage example does: construct,
// connect(), then subscribe() each channel with a handler. Driven by tests/it/seeds.rs.
//
// Environment: SEED_FILE (the seed page), SEED_BASE_URL (ws://host:port, replaces the
// seed's hard-coded wss://api.bookovia.com), SEED_API_KEY, SEED_FLEET_ID,
// SEED_TIMEOUT_MS (default 20000).
// Stdout: one JSON line per event ({"ev": ...}); the class's own console output is
// interleaved as plain text. Stdin: JSON commands, one a line; EOF ends the run.
//   {"do":"ping"}                    class.send({type:"ping"}) (the class has no ping method)
//   {"do":"unsubscribe","channel":C} class.unsubscribe(C)

const S = require('./seedtext.js');

const seedFile = S.env('SEED_FILE');
const base = S.env('SEED_BASE_URL');
const apiKey = S.env('SEED_API_KEY');
const fleetId = S.env('SEED_FLEET_ID');
// The usage example's channels, in its order.
const CHANNELS = ['vehicle_locations', 'trip_events', 'alerts', 'fleet_metrics'];

S.installWebSocket((url) => url.replace(/^wss:\/\/api\.bookovia\.com(?=\/)/, base));
let BookoviaWebSocket;
try {
  BookoviaWebSocket = S.loadSeed(seedFile, 'class BookoviaWebSocket {');
} catch (e) {
  S.emit('fatal', { message: `extracting BookoviaWebSocket: ${e.message}` });
  process.exit(1);
}

const wsClient = new BookoviaWebSocket(apiKey, fleetId);

// See every message the class receives, before it dispatches it.
let subscribed = 0;
const handleMessage = wsClient.handleMessage;
wsClient.handleMessage = function (message) {
  S.emit('message', { msg: message });
  const r = handleMessage.call(this, message);
  if (message.type === 'subscribed' && ++subscribed === CHANNELS.length) S.emit('ready');
  return r;
};

// The usage example: connect, then subscribe (the class sends the subscriptions once the
// socket is open, after its auth message).
wsClient.connect();
for (const channel of CHANNELS) {
  wsClient.subscribe(channel, (data) => S.emit('handler', { channel, data }));
}

S.driveFromStdin(
  (cmd) => {
    if (cmd.do === 'ping') {
      const msg = { type: 'ping' };
      wsClient.send(msg); // stamps msg.id and msg.timestamp
      S.emit('sent', { msg });
    } else if (cmd.do === 'unsubscribe') {
      wsClient.unsubscribe(cmd.channel);
      S.emit('sent', { msg: { type: 'unsubscribe', channel: cmd.channel } });
    } else {
      S.emit('fatal', { message: `unknown command ${JSON.stringify(cmd)}` });
    }
  },
  () => wsClient.disconnect(),
  Number(process.env.SEED_TIMEOUT_MS || 20000),
);
