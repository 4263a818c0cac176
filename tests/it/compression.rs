//! permessage-deflate (RFC 7692) end to end: the negotiation in the 101, one compressed
//! frame shared by every subscriber that negotiated it, uncompressed clients unaffected,
//! compressed publishes, a deflate bomb closed with 1009, and real clients (Python
//! `websockets`, Node `ws`) that negotiate it.

use crate::support::*;
use flate2::{Compress, Compression, FlushCompress};
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ACCEPTED: &str = "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A client speaking raw frames, to see RSV1 and the exact bytes the broker sends.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// The 101 answer's head.
    head: String,
}

/// One server frame: first byte (FIN, RSV, opcode) and payload.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    first: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn rsv1(&self) -> bool {
        self.first & 0x40 != 0
    }
    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }
    /// The message text, inflated if the frame is compressed.
    fn text(&self) -> String {
        let bytes = if self.rsv1() {
            let mut z = self.payload.clone();
            z.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let mut out = Vec::with_capacity(64 * 1024);
            let mut d = flate2::Decompress::new(false);
            d.decompress_vec(&z, &mut out, flate2::FlushDecompress::Sync)
                .expect("valid deflate data");
            out
        } else {
            self.payload.clone()
        };
        String::from_utf8(bytes).expect("UTF-8")
    }
}

impl Raw {
    fn connect(b: &Broker, path: &str, extensions: Option<&str>) -> Raw {
        let mut s = TcpStream::connect(b.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let ext = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        )
        .unwrap();
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let end = loop {
            assert!(Instant::now() < deadline, "no 101 in 5 s");
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).expect("read the 101");
            assert!(n > 0, "closed before the 101");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        Raw { s, buf, head }
    }

    fn negotiated(&self) -> bool {
        self.head.contains("Sec-WebSocket-Extensions")
    }

    /// Sends a masked frame with the given first byte.
    fn send_frame(&mut self, first: u8, payload: &[u8]) {
        let mask = [0x3a, 0x91, 0x0c, 0x77];
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&out).unwrap();
    }

    fn send_text(&mut self, v: &Value) {
        self.send_frame(0x81, v.to_string().as_bytes());
    }

    /// Sends `v` compressed (RSV1, no context takeover), as one frame.
    fn send_deflated(&mut self, text: &[u8]) {
        self.send_frame(0xC1, &deflate(text));
    }

    /// The next frame (pings answered are the caller's business: none come in 5 s).
    fn frame(&mut self) -> Frame {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no frame in 10 s");
            if self.buf.len() >= 2 {
                let len7 = (self.buf[1] & 0x7f) as usize;
                let (hl, len) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
                    }
                    127 if self.buf.len() >= 10 => (
                        10,
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n),
                };
                if hl != usize::MAX && self.buf.len() >= hl + len {
                    let f = Frame {
                        first: self.buf[0],
                        payload: self.buf[hl..hl + len].to_vec(),
                    };
                    self.buf.drain(..hl + len);
                    return f;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.s.read(&mut chunk).expect("read a frame");
            assert!(n > 0, "connection closed while a frame was expected");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next data frame's message as JSON (skipping pings).
    fn json(&mut self) -> (Frame, Value) {
        for _ in 0..10 {
            let f = self.frame();
            if f.opcode() == 0x9 {
                continue;
            }
            let v = serde_json::from_str(&f.text()).expect("JSON");
            return (f, v);
        }
        panic!("only pings");
    }

    fn expect_type(&mut self, ty: &str) -> (Frame, Value) {
        let (f, v) = self.json();
        assert_eq!(v["type"], ty, "{v}");
        (f, v)
    }

    /// The close code the broker sends next (after any other frames).
    fn close_code(&mut self) -> u16 {
        for _ in 0..20 {
            let f = self.frame();
            if f.opcode() == 0x8 {
                assert!(!f.rsv1(), "a control frame is never compressed");
                return u16::from_be_bytes([f.payload[0], f.payload[1]]);
            }
        }
        panic!("no close frame");
    }
}

/// `msg` deflated as a client does with no context takeover (sync flush, tail stripped).
fn deflate(msg: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(msg.len() + 64);
    c.compress_vec(msg, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(c.total_in() as usize, msg.len(), "output room");
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn native(key_: &str) -> String {
    format!("/v1/streaming/websocket?api_key={key_}")
}

fn subscribe(c: &mut Raw, channel: &str) {
    c.send_text(&json!({"type":"subscribe","id":"s","payload":{"action":"subscribe","channel":channel,"filters":{}}}));
    c.expect_type("subscribed");
}

/// `compression_min_bytes` of the sharing test: between its small and its big events.
const MIN: u32 = 300;

/// A location update whose event message is well over [`MIN`] bytes.
fn big_update(n: u64) -> Value {
    json!({"type":"location_update","payload":{"vehicle_id":"v-compress","n":n,
        "location":{"latitude":52.370216,"longitude":4.895168,"speed":42.5,"heading":180.0},
        "note":"the same words again and again, the same words again and again, the same words"}})
}

fn metric(b: &Broker, name: &str) -> u64 {
    let (status, body) = b.get("/metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn compress_shared_frame_for_every_deflate_subscriber_plain_ones_unaffected() {
    let mut cfg = config(1);
    cfg.server.compression = fleetcast::config::Compression::On;
    cfg.server.compression_min_bytes = MIN;
    let b = Broker::start(cfg);
    let viewer = key("fleet_a", Role::Viewer);
    let mut z1 = Raw::connect(&b, &native(&viewer), Some(OFFER));
    let mut z2 = Raw::connect(&b, &native(&viewer), Some("permessage-deflate"));
    let mut plain = Raw::connect(&b, &native(&viewer), None);
    assert!(z1.head.contains(ACCEPTED), "{}", z1.head);
    assert!(z2.head.contains(ACCEPTED), "{}", z2.head);
    assert!(!plain.negotiated(), "{}", plain.head);
    for c in [&mut z1, &mut z2, &mut plain] {
        subscribe(c, "vehicle_locations");
    }
    assert_eq!(metric(&b, "fleetcast_deflate_negotiated_total"), 2);

    let mut publisher = b.connect_key(&key("fleet_a", Role::Device));
    for n in 0..5 {
        publisher.send(big_update(n));
    }
    // A small update: under compression_min_bytes, sent plain to everyone.
    publisher.send(json!({"type":"location_update","payload":{"vehicle_id":"s",
        "location":{"latitude":1.0,"longitude":2.0}}}));
    for n in 0..5 {
        let (f1, v1) = z1.expect_type("location_update");
        let (f2, v2) = z2.expect_type("location_update");
        let (fp, vp) = plain.expect_type("location_update");
        assert!(f1.rsv1() && f2.rsv1(), "compressed for deflate clients");
        assert!(!fp.rsv1(), "plain for the plain client");
        assert!(fp.payload.len() >= MIN as usize, "{}", fp.payload.len());
        // The very same bytes: deflated once, shared.
        assert_eq!(f1, f2);
        assert!(
            f1.payload.len() * 10 < fp.payload.len() * 8,
            "{} compressed vs {} plain",
            f1.payload.len(),
            fp.payload.len()
        );
        assert_eq!(f1.text(), fp.text(), "the same message once inflated");
        assert_eq!(v1["payload"]["n"], n);
        assert_eq!((v1.clone(), v2), (vp.clone(), vp));
    }
    for c in [&mut z1, &mut z2, &mut plain] {
        let (f, v) = c.expect_type("location_update");
        assert!(!f.rsv1(), "a small frame is sent plain");
        assert!(f.payload.len() < MIN as usize, "{}", f.payload.len());
        assert_eq!(v["payload"]["vehicle_id"], "s");
    }
}

#[test]
fn compress_offers_declined_or_switched_off_leave_plain_frames() {
    let viewer = key("fleet_a", Role::Viewer);
    let b = compressing(1);
    // Offers the broker cannot honour are declined; the upgrade still succeeds.
    for bad in [
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; unknown_param",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; client_max_window_bits=16",
        "x-webkit-deflate-frame",
    ] {
        let mut c = Raw::connect(&b, &native(&viewer), Some(bad));
        assert!(!c.negotiated(), "{bad}: {}", c.head);
        // Declined: RSV1 is a protocol error on this connection.
        c.send_deflated(br#"{"type":"ping","id":"p"}"#);
        assert_eq!(c.close_code(), 1002, "{bad}");
    }
    // A later acceptable offer in the list is taken.
    let c = Raw::connect(
        &b,
        &native(&viewer),
        Some("permessage-deflate; server_max_window_bits=9, permessage-deflate"),
    );
    assert!(c.head.contains(ACCEPTED), "{}", c.head);

    // compression = "off": never negotiated.
    let mut cfg = config(1);
    cfg.server.compression = fleetcast::config::Compression::Off;
    let off = Broker::start(cfg);
    let mut c = Raw::connect(&off, &native(&viewer), Some(OFFER));
    assert!(!c.negotiated(), "{}", c.head);
    subscribe(&mut c, "vehicle_locations");
    let mut publisher = off.connect_key(&key("fleet_a", Role::Device));
    publisher.send(big_update(1));
    let (f, _) = c.expect_type("location_update");
    assert!(!f.rsv1());
}

#[test]
fn compress_inbound_publish_fragmented_and_with_pings() {
    let b = compressing(1);
    let mut viewer = b.connect_key(&key("fleet_a", Role::Viewer));
    viewer.subscribe("vehicle_locations", json!({}));
    let mut dev = Raw::connect(&b, &native(&key("fleet_a", Role::Device)), Some(OFFER));
    assert!(dev.negotiated());
    // One frame.
    dev.send_deflated(big_update(1).to_string().as_bytes());
    // Fragmented: RSV1 on the first frame only, a ping between the fragments.
    let z = deflate(big_update(2).to_string().as_bytes());
    let third = z.len() / 3;
    dev.send_frame(0x41, &z[..third]);
    dev.send_frame(0x89, b"between");
    dev.send_frame(0x00, &z[third..2 * third]);
    dev.send_frame(0x80, &z[2 * third..]);
    // An uncompressed message on the same connection.
    dev.send_text(&big_update(3));
    for n in 1..=3 {
        let m = viewer.expect("location_update");
        assert_eq!(m["payload"]["n"], n, "{m}");
    }
    let pong = dev.frame();
    assert_eq!(
        (pong.opcode(), pong.payload.as_slice()),
        (0xA, &b"between"[..])
    );
    assert!(!pong.rsv1());
}

#[test]
fn compress_deflate_bomb_closes_1009() {
    let b = compressing(1);
    let mut dev = Raw::connect(&b, &native(&key("fleet_a", Role::Device)), Some(OFFER));
    // 1 MiB of spaces inside a JSON string deflates to about 1 KiB: under the bound on
    // compressed bytes, a thousand times the 1 KiB limit once inflated.
    let mut bomb = b"{\"type\":\"ping\",\"id\":\"".to_vec();
    bomb.extend(std::iter::repeat_n(b' ', 1 << 20));
    bomb.extend_from_slice(b"\"}");
    let z = deflate(&bomb);
    assert!(z.len() < 1200, "bomb of {} bytes", z.len());
    dev.send_frame(0xC1, &z);
    assert_eq!(dev.close_code(), 1009);
}

#[test]
fn compress_control_frame_with_rsv1_is_a_protocol_error() {
    let b = compressing(1);
    let mut dev = Raw::connect(&b, &native(&key("fleet_a", Role::Device)), Some(OFFER));
    dev.send_frame(0xC9, b"");
    assert_eq!(dev.close_code(), 1002);
}

// ------------------------------------------------------------- real clients

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn required() -> bool {
    std::env::var("FLEETCAST_REQUIRE_SEED_CLIENTS").is_ok_and(|v| v == "1")
}

/// Runs a client script; `None` (skipped, with the reason printed) when the tool or its
/// package is missing, unless `FLEETCAST_REQUIRE_SEED_CLIENTS=1`.
fn run_client(test: &str, mut cmd: Command) -> Option<String> {
    let out = match cmd.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) if !required() => {
            eprintln!("SKIPPED {test}: cannot run {cmd:?}: {e}");
            return None;
        }
        Err(e) => panic!("{test}: cannot run {cmd:?}: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if stderr.contains("MISSING-PACKAGE") && !required() {
        eprintln!("SKIPPED {test}: {stderr}");
        return None;
    }
    assert!(
        out.status.success(),
        "{test}: client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Some(stdout)
}

fn python() -> PathBuf {
    std::env::var_os("FLEETCAST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let venv = root().join("target/seeds-venv/bin/python");
            if venv.is_file() {
                venv
            } else {
                "python3".into()
            }
        })
}

/// What both client scripts do: subscribe (viewer), publish `N` compressed updates
/// (device), read them back, report the negotiated extension and the `n`s received.
const N: u64 = 20;

fn check_report(test: &str, out: &str, b: &Broker) {
    let report: Value = serde_json::from_str(out.trim().lines().last().unwrap_or("null"))
        .unwrap_or_else(|e| panic!("{test}: bad report {out:?}: {e}"));
    let ext = report["extensions"].as_str().unwrap_or_default();
    assert!(
        ext.contains("permessage-deflate") && ext.contains("server_no_context_takeover"),
        "{test}: {report}"
    );
    let got: Vec<u64> = report["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "{test}: {report}");
    // Both the viewer and the device negotiated it.
    assert_eq!(metric(b, "fleetcast_deflate_negotiated_total"), 2, "{test}");
}

#[test]
fn compress_python_websockets_client() {
    let b = compressing(2);
    let script = r#"
import asyncio, json, sys
try:
    import websockets
    from websockets.asyncio.client import connect
except ImportError as e:
    print("MISSING-PACKAGE websockets:", e, file=sys.stderr); sys.exit(0)
addr, viewer, device, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
async def main():
    url = f"ws://{addr}/v1/streaming/websocket?api_key="
    async with connect(url + viewer, max_size=None) as v, connect(url + device) as d:
        ext = v.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in d.response.headers.get("Sec-WebSocket-Extensions", "")
        await v.send(json.dumps({"type":"subscribe","id":"s","payload":{"action":"subscribe","channel":"vehicle_locations","filters":{}}}))
        assert json.loads(await v.recv())["type"] == "subscribed"
        for i in range(n):
            # websockets compresses every message it sends on a deflate connection.
            await d.send(json.dumps({"type":"location_update","payload":{"vehicle_id":"py","n":i,
                "location":{"latitude":52.37,"longitude":4.89,"speed":40.0},
                "note":"repeat repeat repeat repeat repeat repeat repeat repeat"}}))
        got = []
        while len(got) < n:
            m = json.loads(await asyncio.wait_for(v.recv(), 10))
            if m["type"] == "location_update":
                got.append(m["payload"]["n"])
        print(json.dumps({"extensions": ext, "received": got}))
asyncio.run(asyncio.wait_for(main(), 30))
"#;
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(script)
        .arg(b.addr.to_string())
        .arg(key("fleet_a", Role::Viewer))
        .arg(key("fleet_a", Role::Device))
        .arg(N.to_string());
    let Some(out) = run_client("compress_python_websockets_client", cmd) else {
        return;
    };
    check_report("python websockets", &out, &b);
}

#[test]
fn compress_node_ws_client() {
    let b = compressing(2);
    let modules = root().join("tests/seeds/node_modules");
    if !modules.join("ws/package.json").is_file() {
        assert!(
            !required(),
            "tests/seeds/node_modules/ws is missing (npm ci)"
        );
        eprintln!("SKIPPED compress_node_ws_client: tests/seeds/node_modules/ws is missing");
        return;
    }
    let script = r#"
const WebSocket = require('ws');
const [addr, viewer, device, n] = process.argv.slice(1);
const url = `ws://${addr}/v1/streaming/websocket?api_key=`;
// threshold 0: compress every message we send; the broker's answer decides the rest.
const opts = { perMessageDeflate: { threshold: 0 } };
const timer = setTimeout(() => { console.error('timeout'); process.exit(1); }, 30000);
const v = new WebSocket(url + viewer, opts);
let ext = '';
v.on('upgrade', (res) => { ext = res.headers['sec-websocket-extensions'] || ''; });
const got = [];
v.on('open', () => {
  v.send(JSON.stringify({type:'subscribe',id:'s',payload:{action:'subscribe',channel:'vehicle_locations',filters:{}}}));
});
v.on('message', (data) => {
  const m = JSON.parse(data.toString());
  if (m.type === 'subscribed') {
    const d = new WebSocket(url + device, opts);
    d.on('open', () => {
      if (!d.extensions.includes('permessage-deflate')) { console.error('device did not negotiate: ' + d.extensions); process.exit(1); }
      for (let i = 0; i < Number(n); i++) {
        d.send(JSON.stringify({type:'location_update',payload:{vehicle_id:'js',n:i,
          location:{latitude:52.37,longitude:4.89,speed:40.0},
          note:'repeat repeat repeat repeat repeat repeat repeat repeat'}}));
      }
    });
  } else if (m.type === 'location_update') {
    got.push(m.payload.n);
    if (got.length === Number(n)) {
      console.log(JSON.stringify({extensions: ext, received: got}));
      clearTimeout(timer);
      process.exit(0);
    }
  }
});
v.on('error', (e) => { console.error(e); process.exit(1); });
"#;
    let node = std::env::var_os("FLEETCAST_NODE").unwrap_or_else(|| "node".into());
    let mut cmd = Command::new(node);
    cmd.env("NODE_PATH", &modules)
        .arg("-e")
        .arg(script)
        .arg(b.addr.to_string())
        .arg(key("fleet_a", Role::Viewer))
        .arg(key("fleet_a", Role::Device))
        .arg(N.to_string());
    let Some(out) = run_client("compress_node_ws_client", cmd) else {
        return;
    };
    check_report("node ws", &out, &b);
}

/// A node with compression on (it is off by default).
fn compressing(shards: usize) -> Broker {
    let mut cfg = config(shards);
    cfg.server.compression = fleetcast::config::Compression::On;
    Broker::start(cfg)
}
