// fleetcast dashboard: a native-dialect client in plain JavaScript, no dependencies.
// Messages only update state; drawing happens once per animation frame.
'use strict';

const SEVERITY = { info: 1, low: 2, medium: 3, warning: 3, high: 4, critical: 5 };
const TRAIL = 12;
const MAX_ALERTS = 500;
const FOLLOW_LOG = 40;
const CHART_POINTS = 120; // ten minutes of system_status at one per 5 s

// Everything the page knows; `window.fc` so that tests and curious operators can look.
const fc = (window.fc = {
  state: 'idle',
  cred: null,
  ws: null,
  role: null,
  fleet: null,
  vehicles: new Map(),
  alerts: [],
  alertPos: null, // {epoch, seq} of the last alert processed
  alertGaps: 0,
  alertDuplicates: 0,
  alertReloads: 0,
  following: null,
  followLog: [],
  followForeign: 0,
  liveAt: 0,
  followTelemetry: null,
  system: [],
  fleetMetrics: null,
  reconnects: 0,
  attempt: 0,
  lastClose: null,
  stats: { messages: 0, positionChanges: 0, frames: 0, drawMs: [], frameGapMs: [], handlerMs: 0, tilesDrawn: 0 },
  config: { tile_url: null, tile_attribution: null },
});

const $ = (id) => document.getElementById(id);
let dirty = { map: true, list: true, alerts: true, follow: true, node: true };
let lastList = 0;
let lastFrameAt = 0;
let nextId = 1;
let timer = null;

// ------------------------------------------------------------------ sign-in

function credentialFromFragment() {
  const m = /(?:^#|&)(key|token)=([^&]+)/.exec(location.hash);
  if (!m) return null;
  // The key stays out of the address bar (and out of screenshots and history).
  history.replaceState(null, '', location.pathname + location.search);
  return decodeURIComponent(m[2]);
}

function authPayload(cred) {
  // A JWT has two dots; anything else is an API key.
  return (cred.split('.').length === 3) ? { token: cred } : { api_key: cred };
}

function showSignin(message) {
  $('app').hidden = true;
  $('signout').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message || '';
}

function signIn(cred) {
  fc.cred = cred;
  sessionStorage.setItem('fleetcast.cred', cred);
  $('signin').hidden = true;
  $('app').hidden = false;
  $('signout').hidden = false;
  connect();
}

function signOut() {
  sessionStorage.removeItem('fleetcast.cred');
  fc.cred = null;
  clearTimeout(timer);
  if (fc.ws) { const ws = fc.ws; fc.ws = null; ws.close(1000); }
  setState('signedout', 'signed out');
  showSignin();
}

// ------------------------------------------------------------------ connection

function setState(state, text) {
  fc.state = state;
  const el = $('conn');
  el.className = 'conn ' + state;
  el.textContent = text || state;
}

function send(msg) {
  if (fc.ws && fc.ws.readyState === WebSocket.OPEN) fc.ws.send(JSON.stringify(msg));
}

function subscribe(channel, extra) {
  send({ type: 'subscribe', id: 's' + nextId++, payload: Object.assign({ action: 'subscribe', channel }, extra || {}) });
}

function connect() {
  if (!fc.cred) return;
  setState('connecting', fc.reconnects ? 'reconnecting…' : 'connecting…');
  const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
  const ws = new WebSocket(scheme + location.host + '/v1/streaming/websocket');
  fc.ws = ws;
  let authFailed = null;
  ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', id: 'auth', payload: authPayload(fc.cred) }));
  ws.onmessage = (e) => {
    if (ws !== fc.ws) return;
    const t0 = performance.now();
    let m;
    try { m = JSON.parse(e.data); } catch (_) { return; }
    if (m.type === 'auth_error') authFailed = (m.payload && m.payload.message) || 'refused';
    onMessage(m);
    fc.stats.handlerMs += performance.now() - t0;
  };
  ws.onclose = (e) => {
    if (ws !== fc.ws) return;
    fc.ws = null;
    fc.lastClose = { code: e.code, reason: e.reason, at: Date.now() };
    if (!fc.cred) return;
    if (authFailed && e.code === 1008 && !/429|too many|rate/i.test(authFailed)) {
      setState('signedout', 'signed out');
      showSignin('Sign-in refused: ' + authFailed);
      return;
    }
    reconnectLater(e.code);
  };
}

// Exponential backoff with jitter: about 1 s, 2 s, 4 s ... at most 15 s.
function reconnectLater(code) {
  const base = Math.min(15000, 1000 * Math.pow(2, fc.attempt++));
  const wait = Math.round(base / 2 + Math.random() * base / 2);
  let left = Math.ceil(wait / 1000);
  setState('reconnecting', `closed (${code}); reconnecting in ${left} s`);
  clearTimeout(timer);
  timer = setTimeout(() => { fc.reconnects++; connect(); }, wait);
}

function onAuthenticated(p) {
  fc.attempt = 0;
  fc.liveAt = Date.now();
  fc.role = p.role;
  fc.fleet = p.fleet_id;
  setState('live', 'live');
  $('who').textContent = `${p.user_id} · ${p.role} · ${p.fleet_id}`;
  // State channels: a snapshot of every vehicle, then live updates.
  subscribe('vehicle_locations');
  subscribe('driver_status');
  subscribe('device_status');
  subscribe('fleet_metrics');
  if (fc.role === 'admin') {
    $('node').hidden = false;
    subscribe('system');
  }
  if (fc.following) subscribeFollow(fc.following);
  if (fc.alertPos) {
    // Resume: the broker replays what was missed, from its history.
    subscribe('alerts', { since: fc.alertPos });
  } else {
    loadAlertHistory(fc.ws);
  }
}

// The alert history on first load (HTTP), then the live stream from where it ends.
async function loadAlertHistory(ws) {
  try {
    const r = await fetch(`/v1/fleets/${encodeURIComponent(fc.fleet)}/events?channel=alerts&since=0`,
      { headers: { Authorization: 'Bearer ' + fc.cred } });
    if (!r.ok) throw new Error('HTTP ' + r.status);
    const h = await r.json();
    if (ws !== fc.ws) return;
    fc.alerts = [];
    fc.alertPos = { epoch: h.epoch, seq: h.seq };
    for (const ev of h.events) addAlert(ev, true);
    fc.alertPos = { epoch: h.epoch, seq: h.seq };
    subscribe('alerts', { since: fc.alertPos });
  } catch (e) {
    // No history (another role, an old broker): live alerts only.
    subscribe('alerts');
  }
  dirty.alerts = true;
}

// ------------------------------------------------------------------ messages

function onMessage(m) {
  fc.stats.messages++;
  const p = m.payload || {};
  switch (m.type) {
    case 'auth_success': return onAuthenticated(p);
    case 'subscribed':
      if (p.channel === 'alerts') {
        if (p.recovered === false) {
          // The gap is older than the history: reload it.
          fc.alertReloads++;
          fc.alertPos = null;
          loadAlertHistory(fc.ws);
        } else if (!fc.alertPos && p.epoch !== undefined) {
          fc.alertPos = { epoch: p.epoch, seq: p.seq };
        }
      }
      return;
    case 'location_update': return onLocation(p, m.timestamp);
    case 'driver_status': return onStatus(p, 'driver');
    case 'device_status': return onStatus(p, 'device');
    case 'safety_alert': return addAlert(m, false);
    case 'telemetry_update': return onFollowed(m);
    case 'trip_event': return onFollowed(m);
    case 'route_progress': return onFollowed(m);
    case 'fleet_metrics': fc.fleetMetrics = p; dirty.node = true; return;
    case 'system_status': return onSystem(p, m.timestamp);
    case 'error': console.warn('fleetcast error', p); return;
    default: return;
  }
}

function vehicle(id) {
  let v = fc.vehicles.get(id);
  if (!v) {
    v = { id, lat: null, lon: null, speed: 0, heading: 0, trail: [], status: '', driver: '', driverStatus: '', device: '', ts: 0 };
    fc.vehicles.set(id, v);
  }
  return v;
}

function onLocation(p, ts) {
  const loc = p.location || {};
  if (!p.vehicle_id || typeof loc.latitude !== 'number') return;
  const v = vehicle(String(p.vehicle_id));
  if (v.lat !== null && (v.lat !== loc.latitude || v.lon !== loc.longitude)) fc.stats.positionChanges++;
  v.lat = loc.latitude;
  v.lon = loc.longitude;
  v.speed = loc.speed || 0;
  v.heading = loc.heading || 0;
  v.status = p.status || (v.speed > 1 ? 'moving' : 'stopped');
  if (p.driver_id) v.driver = String(p.driver_id);
  v.ts = Date.parse(ts) || Date.now();
  v.trail.push([v.lat, v.lon]);
  if (v.trail.length > TRAIL) v.trail.shift();
  dirty.map = true;
  dirty.list = true;
  if (fc.following === v.id) onFollowed({ type: 'location_update', timestamp: ts, payload: p });
}

function onStatus(p, kind) {
  const id = p.vehicle_id || p.device_id;
  if (!id) return;
  const v = vehicle(String(id));
  if (kind === 'driver') { v.driverStatus = p.status || ''; if (p.driver_id) v.driver = String(p.driver_id); }
  else v.device = p.status || '';
  dirty.list = true;
}

function addAlert(m, fromHistory) {
  const pos = fc.alertPos;
  if (pos && m.epoch === pos.epoch && typeof m.seq === 'number') {
    if (m.seq <= pos.seq && !fromHistory) { fc.alertDuplicates++; return; }
    if (m.seq > pos.seq + 1 && !fromHistory) fc.alertGaps += m.seq - pos.seq - 1;
  }
  if (typeof m.seq === 'number') fc.alertPos = { epoch: m.epoch, seq: m.seq };
  const p = m.payload || {};
  const a = {
    seq: m.seq, ts: m.timestamp, severity: String(p.severity || 'info'),
    category: String(p.category || p.alert_type || 'alert'), vehicle: String(p.vehicle_id || ''),
    message: String(p.message || p.description || p.title || ''),
  };
  fc.alerts.unshift(a);
  if (fc.alerts.length > MAX_ALERTS) fc.alerts.pop();
  const cat = $('cat');
  if (![...cat.options].some((o) => o.value === a.category)) cat.add(new Option(a.category, a.category));
  dirty.alerts = true;
}

function onFollowed(m) {
  const p = m.payload || {};
  // Only the followed vehicle is subscribed: anything else means a subscription leaked.
  if (!fc.following || String(p.vehicle_id || '') !== fc.following) { fc.followForeign++; return; }
  fc.followLog.unshift({ type: m.type, vehicle_id: String(p.vehicle_id || ''), ts: m.timestamp, p });
  if (fc.followLog.length > FOLLOW_LOG) fc.followLog.pop();
  if (m.type === 'telemetry_update') fc.followTelemetry = p.telemetry || p;
  dirty.follow = true;
}

function onSystem(p, ts) {
  fc.system.push({ ts, p });
  if (fc.system.length > CHART_POINTS) fc.system.shift();
  dirty.node = true;
}

// ------------------------------------------------------------------ follow

function subscribeFollow(id) {
  for (const channel of ['telemetry', 'trip_events', 'route_progress']) {
    subscribe(channel, { filters: { vehicle_id: id } });
  }
}

function follow(id) {
  if (fc.following === id) return;
  if (fc.following) {
    for (const channel of ['telemetry', 'trip_events', 'route_progress']) {
      send({ type: 'unsubscribe', id: 'u' + nextId++, payload: { channel, filters: { vehicle_id: fc.following } } });
    }
  }
  fc.following = id;
  fc.followLog = [];
  fc.followTelemetry = null;
  $('follow').hidden = !id;
  $('fid').textContent = id || '';
  if (id) subscribeFollow(id);
  dirty.follow = dirty.list = dirty.map = true;
}
fc.follow = follow;

// ------------------------------------------------------------------ drawing

function project(lat, lon, ref) {
  const k = 111320;
  return [(lon - ref.lon) * k * Math.cos(ref.lat * Math.PI / 180), (lat - ref.lat) * k];
}

let view = null; // {ref, cx, cy, scale}

// Optional map tiles (`[dashboard] tile_url`, Web Mercator z/x/y), drawn under the plane
// where they fall on it; none unless the operator configured a tile server.
const tiles = new Map();
function tileImage(url) {
  let t = tiles.get(url);
  if (!t) {
    if (tiles.size > 400) tiles.clear();
    t = { img: new Image(), ok: false };
    t.img.onload = () => { t.ok = true; dirty.map = true; };
    t.img.src = url;
    tiles.set(url, t);
  }
  return t.ok ? t.img : null;
}
const tileLon = (x, z) => x / 2 ** z * 360 - 180;
const tileLat = (y, z) => {
  const n = Math.PI - 2 * Math.PI * y / 2 ** z;
  return 180 / Math.PI * Math.atan(0.5 * (Math.exp(n) - Math.exp(-n)));
};
const lonTile = (lon, z) => Math.floor((lon + 180) / 360 * 2 ** z);
const latTile = (lat, z) => {
  const r = lat * Math.PI / 180;
  return Math.floor((1 - Math.log(Math.tan(r) + 1 / Math.cos(r)) / Math.PI) / 2 * 2 ** z);
};

function drawTiles(g, w, h, ref, toScreen) {
  const url = fc.config.tile_url;
  if (!url) return;
  const cos = Math.cos(ref.lat * Math.PI / 180);
  // The zoom whose tiles are closest to 256 px at this scale.
  const z = Math.max(0, Math.min(19, Math.round(Math.log2(156543.03 * cos * view.scale))));
  const unproject = (sx, sy) => {
    const x = view.cx + (sx - w / 2) / view.scale, y = view.cy - (sy - h / 2) / view.scale;
    return [ref.lat + y / 111320, ref.lon + x / (111320 * cos)];
  };
  const [latN, lonW] = unproject(0, 0), [latS, lonE] = unproject(w, h);
  const x0 = lonTile(lonW, z), x1 = lonTile(lonE, z), y0 = latTile(latN, z), y1 = latTile(latS, z);
  if ((x1 - x0 + 1) * (y1 - y0 + 1) > 200) return;
  for (let x = x0; x <= x1; x++) {
    for (let y = y0; y <= y1; y++) {
      const img = tileImage(url.replace('{z}', z).replace('{x}', x).replace('{y}', y));
      if (!img) continue;
      const [ax, ay] = toScreen(...project(tileLat(y, z), tileLon(x, z), ref));
      const [bx, by] = toScreen(...project(tileLat(y + 1, z), tileLon(x + 1, z), ref));
      g.drawImage(img, ax, ay, bx - ax, by - ay);
      fc.stats.tilesDrawn++;
    }
  }
  // Darken them so that vehicles and the grid stay readable.
  g.fillStyle = 'rgba(14,20,27,0.55)';
  g.fillRect(0, 0, w, h);
  if (fc.config.tile_attribution) {
    g.fillStyle = '#9fb0c3';
    g.fillText(fc.config.tile_attribution, w - 8 - g.measureText(fc.config.tile_attribution).width, h - 28);
  }
}

function drawMap() {
  const c = $('map');
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
  }
  const g = c.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.fillStyle = '#0e141b';
  g.fillRect(0, 0, w, h);
  const vs = [...fc.vehicles.values()].filter((v) => v.lat !== null);
  if (!vs.length) {
    g.fillStyle = '#7d8a99';
    g.fillText(fc.state === 'live' ? 'waiting for vehicle positions…' : fc.state, 20, 30);
    return;
  }
  const ref = view ? view.ref : { lat: vs[0].lat, lon: vs[0].lon };
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  for (const v of vs) {
    const [x, y] = project(v.lat, v.lon, ref);
    minX = Math.min(minX, x); maxX = Math.max(maxX, x); minY = Math.min(minY, y); maxY = Math.max(maxY, y);
  }
  const spanX = Math.max(maxX - minX, 500), spanY = Math.max(maxY - minY, 500);
  const scale = Math.min((w - 60) / spanX, (h - 60) / spanY);
  // Ease the view so that the map does not jump as vehicles move.
  const target = { ref, cx: (minX + maxX) / 2, cy: (minY + maxY) / 2, scale };
  if (!view) view = target;
  else {
    view.cx += (target.cx - view.cx) * 0.1; view.cy += (target.cy - view.cy) * 0.1;
    view.scale += (target.scale - view.scale) * 0.1;
  }
  const toScreen = (x, y) => [w / 2 + (x - view.cx) * view.scale, h / 2 - (y - view.cy) * view.scale];
  drawTiles(g, w, h, ref, toScreen);
  // Grid: a round step giving lines about every 80 px; a scale bar of one step.
  const steps = [50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000];
  const step = steps.find((s) => s * view.scale >= 80) || steps[steps.length - 1];
  g.strokeStyle = '#1c2733';
  g.lineWidth = 1;
  g.beginPath();
  const x0 = view.cx - w / 2 / view.scale, x1 = view.cx + w / 2 / view.scale;
  const y0 = view.cy - h / 2 / view.scale, y1 = view.cy + h / 2 / view.scale;
  for (let x = Math.floor(x0 / step) * step; x <= x1; x += step) {
    const [sx] = toScreen(x, 0); g.moveTo(sx, 0); g.lineTo(sx, h);
  }
  for (let y = Math.floor(y0 / step) * step; y <= y1; y += step) {
    const [, sy] = toScreen(0, y); g.moveTo(0, sy); g.lineTo(w, sy);
  }
  g.stroke();
  const bar = step * view.scale;
  g.strokeStyle = '#9fb0c3'; g.fillStyle = '#9fb0c3';
  g.beginPath(); g.moveTo(16, h - 16); g.lineTo(16 + bar, h - 16);
  g.moveTo(16, h - 20); g.lineTo(16, h - 12); g.moveTo(16 + bar, h - 20); g.lineTo(16 + bar, h - 12); g.stroke();
  g.fillText(step >= 1000 ? `${step / 1000} km` : `${step} m`, 20, h - 22);
  g.fillText('N ↑', w - 34, h - 14);
  // Trails, then vehicles as arrows pointing along their heading.
  g.strokeStyle = 'rgba(124,196,255,0.35)';
  g.beginPath();
  for (const v of vs) {
    v.trail.forEach(([la, lo], i) => {
      const [sx, sy] = toScreen(...project(la, lo, ref));
      if (i === 0) g.moveTo(sx, sy); else g.lineTo(sx, sy);
    });
  }
  g.stroke();
  const colours = { moving: '#6fdc8c', stopped: '#f1c21b', parked: '#8d99a6' };
  for (const v of vs) {
    const [sx, sy] = toScreen(...project(v.lat, v.lon, ref));
    v.sx = sx; v.sy = sy;
    g.save();
    g.translate(sx, sy);
    g.rotate(v.heading * Math.PI / 180);
    g.fillStyle = colours[v.status] || '#7cc4ff';
    g.beginPath(); g.moveTo(0, -7); g.lineTo(4.5, 5); g.lineTo(0, 2.5); g.lineTo(-4.5, 5); g.closePath(); g.fill();
    g.restore();
    if (v.id === fc.following) {
      g.strokeStyle = '#ffffff'; g.beginPath(); g.arc(sx, sy, 11, 0, 2 * Math.PI); g.stroke();
      g.fillStyle = '#ffffff'; g.fillText(v.id, sx + 13, sy - 8);
    }
  }
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s} s` : `${Math.round(s / 60)} min`;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

function drawList() {
  const q = $('search').value.trim().toLowerCase();
  const all = [...fc.vehicles.values()].sort((a, b) => a.id.localeCompare(b.id));
  const hits = q ? all.filter((v) => `${v.id} ${v.driver} ${v.status} ${v.driverStatus} ${v.device}`.toLowerCase().includes(q)) : all;
  $('vcount').textContent = q ? `${hits.length} of ${all.length}` : `${all.length}`;
  const rows = hits.slice(0, 300).map((v) =>
    `<tr data-id="${esc(v.id)}"${v.id === fc.following ? ' class="followed"' : ''}><td>${esc(v.id)}</td>` +
    `<td class="st-${esc(v.status)}">${esc(v.status)}${v.device && v.device !== 'online' ? ' · ' + esc(v.device) : ''}</td>` +
    `<td>${Math.round(v.speed)}</td><td>${esc(v.driverStatus)}</td><td>${v.ts ? ago(v.ts) : ''}</td></tr>`);
  $('vlist').innerHTML = rows.join('');
}

function drawAlerts() {
  const min = Number($('sev').value);
  const cat = $('cat').value;
  const shown = fc.alerts.filter((a) => (SEVERITY[a.severity] || 1) >= min && (!cat || a.category === cat));
  $('acount').textContent = `${shown.length} shown`;
  $('alerts').innerHTML = shown.slice(0, 150).map((a) =>
    `<li class="sev-${esc(a.severity)}" data-seq="${a.seq}"><b>${esc(a.severity)}</b> ${esc(a.category)} · ${esc(a.vehicle)}` +
    `<div>${esc(a.message)}</div><div class="t">${esc(a.ts || '')} · #${a.seq}</div></li>`).join('');
}

function drawFollow() {
  const t = fc.followTelemetry || {};
  $('ftele').innerHTML = Object.entries(t).map(([k, v]) =>
    `<dt>${esc(k)}</dt><dd>${esc(typeof v === 'object' && v ? v.value : v)}</dd>`).join('');
  $('flog').innerHTML = fc.followLog.slice(0, 12).map((e) =>
    `<li>${esc(e.type)} ${esc(e.vehicle_id)} ${esc((e.ts || '').slice(11, 19))}</li>`).join('');
}

function sparkline(canvas, values, label) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  const max = Math.max(1, ...values);
  g.strokeStyle = '#7cc4ff';
  g.beginPath();
  values.forEach((v, i) => {
    const x = (i / Math.max(1, CHART_POINTS - 1)) * w, y = h - 4 - (v / max) * (h - 16);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillStyle = '#9fb0c3';
  g.fillText(`${label}: ${values.length ? values[values.length - 1] : '–'} (max ${max})`, 4, 11);
}

function drawNode() {
  const m = fc.fleetMetrics && fc.fleetMetrics.metrics;
  if (m) $('fleetstats').textContent = `${m.active_vehicles} active · ${m.active_trips} trips · ${m.average_speed} km/h avg · ${m.messages_per_second} msg/s`;
  if (fc.role !== 'admin' || !fc.system.length) return;
  const last = fc.system[fc.system.length - 1].p;
  const figs = Object.entries(last).filter(([, v]) => typeof v !== 'object' || v === null);
  for (const [k, v] of Object.entries(last)) {
    if (Array.isArray(v)) figs.push([k, v.join(' · ')]);
    else if (v && typeof v === 'object') {
      const nonzero = Object.entries(v).filter(([, b]) => b);
      figs.push([k, nonzero.length ? nonzero.map(([a, b]) => `${a} ${b}`).join(', ') : 'none']);
    }
  }
  const label = (k) => k.replace(/_per_second/, '/s').replace(/_/g, ' ');
  $('nodefigs').innerHTML = figs.map(([k, v]) => `<dt>${esc(label(k))}</dt><dd>${esc(v)}</dd>`).join('');
  // Live charts over the last ten minutes: one per figure, one per shard's loop load,
  // and drops of every reason together.
  const series = [
    ['messages in/s', (p) => p.messages_in_per_second],
    ['deliveries/s', (p) => p.deliveries_per_second],
    ['connections', (p) => p.active_connections],
    ['publish→write p99 ms', (p) => p.publish_to_write_p99_ms],
    ['drops/s', (p) => p.drops_per_second && Object.values(p.drops_per_second).reduce((a, b) => a + b, 0)],
  ];
  (last.shard_busy_percent || []).forEach((_, i) => series.push([`shard ${i} busy %`, (p) => (p.shard_busy_percent || [])[i]]));
  const box = $('charts');
  for (const [label, get] of series) {
    if (get(last) === undefined || get(last) === null) continue;
    let c = box.querySelector(`canvas[data-k="${label}"]`);
    if (!c) { c = document.createElement('canvas'); c.dataset.k = label; box.appendChild(c); }
    sparkline(c, fc.system.map((s) => Math.round((Number(get(s.p)) || 0) * 10) / 10), label);
  }
}

// One frame: whatever changed since the last, drawn once however many messages came.
function frame(now) {
  const t0 = performance.now();
  if (lastFrameAt) pushRing(fc.stats.frameGapMs, now - lastFrameAt);
  lastFrameAt = now;
  if (dirty.map || fc.following) { drawMap(); dirty.map = false; }
  if (dirty.list && t0 - lastList > 1000) { drawList(); dirty.list = false; lastList = t0; }
  if (dirty.alerts) { drawAlerts(); dirty.alerts = false; }
  if (dirty.follow) { drawFollow(); dirty.follow = false; }
  if (dirty.node) { drawNode(); dirty.node = false; }
  fc.stats.frames++;
  pushRing(fc.stats.drawMs, performance.now() - t0);
  requestAnimationFrame(frame);
}

function pushRing(a, v) {
  a.push(v);
  if (a.length > 600) a.shift();
}

// Percentiles of the last frames, for the browser test and for the curious.
fc.frameStats = () => {
  const pct = (a, q) => { const s = [...a].sort((x, y) => x - y); return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))] : 0; };
  const d = fc.stats.drawMs, g = fc.stats.frameGapMs;
  return { frames: fc.stats.frames, drawP50: pct(d, 0.5), drawP95: pct(d, 0.95), drawMax: pct(d, 1), gapP50: pct(g, 0.5), gapP95: pct(g, 0.95), gapMax: pct(g, 1) };
};

// ------------------------------------------------------------------ start

$('signin').addEventListener('submit', (e) => { e.preventDefault(); signIn($('cred').value.trim()); });
$('signout').addEventListener('click', signOut);
$('unfollow').addEventListener('click', () => follow(null));
$('search').addEventListener('input', () => { dirty.list = true; lastList = 0; });
$('sev').addEventListener('change', () => { dirty.alerts = true; });
$('cat').addEventListener('change', () => { dirty.alerts = true; });
$('vlist').addEventListener('click', (e) => {
  const tr = e.target.closest('tr');
  if (tr) follow(tr.dataset.id);
});
$('map').addEventListener('click', (e) => {
  const r = e.target.getBoundingClientRect();
  const x = e.clientX - r.left, y = e.clientY - r.top;
  let best = null, bestD = 15 * 15;
  for (const v of fc.vehicles.values()) {
    if (v.sx === undefined) continue;
    const d = (v.sx - x) ** 2 + (v.sy - y) ** 2;
    if (d < bestD) { best = v; bestD = d; }
  }
  if (best) follow(best.id);
});

fetch('/dashboard/config.json')
  .then((r) => (r.ok ? r.json() : {}))
  .then((c) => { fc.config = Object.assign(fc.config, c); dirty.map = true; })
  .catch(() => {});

const initial = credentialFromFragment() || sessionStorage.getItem('fleetcast.cred');
if (initial) signIn(initial); else showSignin();
requestAnimationFrame(frame);
