//! TLS (issue 15): `wss://` and `https://` on the TLS listener, with a test CA made here
//! (rcgen). Real clients: a rustls client (tungstenite over rustls), Python `websockets`,
//! and the Bookovia seed's JavaScript class under Node; hostile TLS input and a handshake
//! storm beside healthy subscribers, with exact counts; certificate reload on SIGHUP
//! under load (the real binary).

use crate::support::*;
use fleetcast::model::Role;
use fleetcast::node::Node;
use fleetcast::tls::TlsConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

// ---------------------------------------------------------------- a test PKI

/// A CA and a leaf for localhost and 127.0.0.1, as PEM files in a fresh directory.
struct Pki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "tls-{tag}-{}-{}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("fleetcast test CA {tag}"));
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let pki = Pki {
            dir,
            ca: ca_cert.der().clone(),
            cert_pem: format!("{}{}", leaf.pem(), ca_cert.pem()),
            key_pem: leaf_key.serialize_pem(),
        };
        std::fs::write(pki.ca_file(), ca_cert.pem()).unwrap();
        pki.install(&pki.dir);
        pki
    }

    /// Writes this PKI's chain and key as `cert.pem` and `key.pem` in `dir`.
    fn install(&self, dir: &Path) {
        std::fs::write(dir.join("cert.pem.tmp"), &self.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem.tmp"), &self.key_pem).unwrap();
        std::fs::rename(dir.join("cert.pem.tmp"), dir.join("cert.pem")).unwrap();
        std::fs::rename(dir.join("key.pem.tmp"), dir.join("key.pem")).unwrap();
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn tls_config(&self, handshakes_per_turn: usize) -> TlsConfig {
        TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_file: self.dir.join("cert.pem"),
            key_file: self.dir.join("key.pem"),
            handshakes_per_turn,
        }
    }

    /// A client trusting only this CA, offering ALPN http/1.1.
    fn client(&self) -> Arc<ClientConfig> {
        client_config(
            &self.ca,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8)
}

fn client_config(
    ca: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

// ---------------------------------------------------------------- rustls clients

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS stream to `addr` for "localhost", handshake completed.
fn tls_connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> std::io::Result<Tls> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// An HTTPS request; (status, body).
fn https(addr: SocketAddr, cfg: &Arc<ClientConfig>, raw: &str) -> (u16, String) {
    let mut tls = tls_connect(addr, cfg).expect("TLS handshake");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    crate::support::http_answer(&String::from_utf8_lossy(&out))
}

fn get(addr: SocketAddr, cfg: &Arc<ClientConfig>, path: &str) -> (u16, String) {
    https(
        addr,
        cfg,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

/// A WebSocket over rustls.
struct Wss {
    ws: WebSocket<Tls>,
}

impl Wss {
    fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>, path: &str) -> Wss {
        let tls = tls_connect(addr, cfg).expect("TLS handshake");
        let url = format!("wss://localhost:{}{path}", addr.port());
        let (ws, _) = tungstenite::client(url.as_str(), tls)
            .unwrap_or_else(|e| panic!("wss upgrade {url}: {e}"));
        Wss { ws }
    }

    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// The next text message, or None at the timeout or end.
    fn next_text(&mut self, timeout: Duration) -> Option<String> {
        self.ws
            .get_ref()
            .sock
            .set_read_timeout(Some(timeout))
            .unwrap();
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(t.to_string()),
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    fn expect(&mut self, ty: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let t = self
                .next_text(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("waiting for {ty}: connection ended"));
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == ty {
                return v;
            }
        }
        panic!("no {ty} within 5 s")
    }

    fn subscribe(&mut self, channel: &str) {
        self.send(
            json!({"type":"subscribe","id":"s","payload":{"action":"subscribe",
            "channel":channel,"filters":{}}}),
        );
        self.expect("subscribed");
    }
}

/// A subscriber to fleet_a's `vehicle_locations`, plaintext or TLS, that counts the
/// location events it receives (in publication order) until `want`, then checks that nothing
/// more is pending (its ping is answered next).
enum Sub {
    Plain(Box<Client>),
    Tls(Box<Wss>),
}

impl Sub {
    fn plain(addr: SocketAddr) -> Sub {
        let url = format!(
            "ws://{addr}/v1/streaming/websocket?api_key={}",
            key("fleet_a", Role::Viewer)
        );
        let mut c = Client::connect(&url);
        c.subscribe("vehicle_locations", json!({}));
        Sub::Plain(Box::new(c))
    }

    fn tls(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Sub {
        let path = format!(
            "/v1/streaming/websocket?api_key={}",
            key("fleet_a", Role::Viewer)
        );
        let mut c = Wss::connect(addr, cfg, &path);
        c.subscribe("vehicle_locations");
        Sub::Tls(Box::new(c))
    }

    fn next_text(&mut self, d: Duration) -> Option<String> {
        match self {
            Sub::Plain(c) => {
                c.set_timeout(d);
                loop {
                    match c.ws.read() {
                        Ok(Message::Text(t)) => return Some(t.to_string()),
                        Ok(Message::Close(_)) | Err(_) => return None,
                        Ok(_) => continue,
                    }
                }
            }
            Sub::Tls(w) => w.next_text(d),
        }
    }

    fn send(&mut self, v: Value) {
        match self {
            Sub::Plain(c) => c.send(v),
            Sub::Tls(w) => w.send(v),
        }
    }

    /// Receives location events in publication order until `want` (or `within`); the count.
    fn receive(mut self, want: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut got = 0;
        let mut last = 0.0;
        while got < want && Instant::now() < deadline {
            let Some(t) = self.next_text(Duration::from_secs(5)) else {
                break;
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "location_update" {
                continue;
            }
            // Published with increasing latitudes: delivered in order.
            let lat = v["payload"]["location"]["latitude"].as_f64().unwrap();
            assert!(lat > last, "latitude {lat} after {last}");
            last = lat;
            got += 1;
        }
        if got == want {
            self.send(json!({"type":"ping","id":"end"}));
            let t = self.next_text(Duration::from_secs(5)).unwrap_or_default();
            assert!(t.contains("\"pong\""), "more than {want} events: {t}");
        }
        got
    }
}

/// Publishes `n` location updates for fleet_a over a plaintext device connection.
fn publish(addr: SocketAddr, n: usize, every: Duration) {
    let url = format!(
        "ws://{addr}/v1/streaming/websocket?api_key={}",
        key("fleet_a", Role::Device)
    );
    let mut c = Client::connect(&url);
    for i in 0..n {
        c.send(location(&format!("v{}", i % 7), 40.0 + i as f64 * 1e-4));
        if !every.is_zero() {
            thread::sleep(every);
        }
    }
    c.expect_nothing_more("publisher");
}

// ---------------------------------------------------------------- an in-process node

struct TlsNode {
    node: Option<Node>,
    plain: SocketAddr,
    tls: SocketAddr,
}

impl TlsNode {
    fn start(
        pki: &Pki,
        shards: usize,
        per_turn: usize,
        tweak: impl FnOnce(&mut fleetcast::config::Config),
    ) -> TlsNode {
        let mut cfg = config(shards);
        cfg.server.tls = Some(pki.tls_config(per_turn));
        tweak(&mut cfg);
        let node = Node::start(cfg).expect("node starts");
        TlsNode {
            plain: node.local_addr(),
            tls: node.tls_addr().expect("a TLS listener"),
            node: Some(node),
        }
    }

    /// Sum of metric `name`'s series whose labels contain `label`, read over plaintext.
    fn metric(&self, name: &str, label: &str) -> u64 {
        let mut s = TcpStream::connect(self.plain).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        metric_in(&body, name, label)
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown();
        }
    }
}

fn metric_in(body: &str, name: &str, label: &str) -> u64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(label)
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

// ---------------------------------------------------------------- wss and https

/// Every kind of request over TLS: the HTTP API (publish, fleet reads), /healthz,
/// /metrics, and the upgrade on every dialect path; TLS 1.2 and 1.3 both, ALPN http/1.1;
/// a native subscriber over wss receives what is published over https.
#[test]
fn tls_serves_wss_and_https_on_every_path() {
    let pki = Pki::new("paths");
    let n = TlsNode::start(&pki, 2, 32, |_| {});
    let cfg = pki.client();
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let c = client_config(&pki.ca, versions);
        let tls = tls_connect(n.tls, &c).unwrap();
        assert_eq!(
            tls.conn.protocol_version(),
            Some(versions[0].version),
            "negotiated version"
        );
        assert_eq!(get(n.tls, &c, "/healthz"), (200, "ok\n".to_string()));
    }
    let (status, metrics) = get(n.tls, &cfg, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("fleetcast_tls_refused_total"), "{metrics}");
    assert_eq!(get(n.tls, &cfg, "/readyz").0, 200);

    let mut sub = Wss::connect(
        n.tls,
        &cfg,
        &format!(
            "/v1/streaming/websocket?api_key={}",
            key("fleet_a", Role::Viewer)
        ),
    );
    sub.subscribe("vehicle_locations");
    let body = json!({"messages":[location("v1", 41.5)]}).to_string();
    let (status, text) = https(
        n.tls,
        &cfg,
        &format!(
            "POST /v1/publish HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            key("fleet_a", Role::Device),
            body.len()
        ),
    );
    assert_eq!(status, 202, "{text}");
    let ev = sub.expect("location_update");
    assert_eq!(ev["payload"]["location"]["latitude"], 41.5, "{ev}");
    let (status, text) = https(
        n.tls,
        &cfg,
        &format!(
            "GET /v1/fleets/fleet_a/vehicles HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
             Connection: close\r\n\r\n",
            key("fleet_a", Role::Viewer)
        ),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("41.5"), "{text}");

    // Every dialect's paths upgrade over wss as they do over ws (same answer status).
    let key13 = "dGhlIHNhbXBsZSBub25jZQ==";
    let native = [
        "/v1/streaming/websocket",
        "/v1/streaming/websocket/fleet/fleet_a",
        "/v1/streaming/websocket/vehicle/v1",
        "/v1/streaming/websocket/trip/t1",
    ];
    let paths = fleetcast::dialect::ENDPOINTS.iter().map(|(p, _, _)| *p);
    for path in native.into_iter().chain(paths) {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key13}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let plain = status_of(&mut TcpStream::connect(n.plain).unwrap(), &req);
        let mut tls = tls_connect(n.tls, &cfg).unwrap();
        let over_tls = status_of(&mut tls, &req);
        assert_eq!(plain, over_tls, "{path}");
        assert_ne!(over_tls, 404, "{path}");
    }
}

/// Sends `req` and returns the status of the response head.
fn status_of(s: &mut impl ReadWrite, req: &str) -> u16 {
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => head.extend_from_slice(&buf[..k]),
        }
    }
    String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

// ---------------------------------------------------------------- hostile input

/// Waits until the server ends `s` (EOF, reset, or an alert then EOF); false if it is
/// still open after `within`. Returns what it read.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> (bool, Vec<u8>) {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (true, got),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (true, got),
        }
    }
    (false, got)
}

/// Each kind of hostile TLS input gets a clean close and its counter, while healthy
/// subscribers (two over wss, one over ws) receive exactly what is published:
/// 3 x garbage, 2 x plaintext HTTP, 3 x oversized record (one instead of a ClientHello,
/// two after a completed handshake), 3 x handshake that never finishes (slowloris),
/// 1 x a client with no common ALPN protocol.
#[test]
fn tls_hostile_input_is_refused_and_counted_beside_healthy_subscribers() {
    const EVENTS: usize = 300;
    let pki = Pki::new("hostile");
    let n = TlsNode::start(&pki, 2, 32, |c| c.limits.handshake_timeout_ms = 1_500);
    let cfg = pki.client();
    let subs = vec![
        Sub::tls(n.tls, &cfg),
        Sub::tls(n.tls, &cfg),
        Sub::plain(n.plain),
    ];
    let readers: Vec<_> = subs
        .into_iter()
        .map(|s| thread::spawn(move || s.receive(EVENTS, Duration::from_secs(30))))
        .collect();
    let plain = n.plain;
    let publisher = thread::spawn(move || publish(plain, EVENTS, Duration::from_millis(5)));

    let tls = n.tls;
    let mut hostile = Vec::new();
    // Garbage instead of a ClientHello.
    for i in 0..3u8 {
        hostile.push(thread::spawn(move || {
            let mut s = TcpStream::connect(tls).unwrap();
            let junk: Vec<u8> = (0..64u8)
                .map(|b| b.wrapping_mul(37).wrapping_add(i))
                .collect();
            s.write_all(&junk).unwrap();
            let (closed, _) = closed_by_server(&mut s, Duration::from_secs(5));
            assert!(closed, "garbage: still open");
        }));
    }
    // Plaintext HTTP on the TLS port: a 400 in clear text that says to use TLS.
    for _ in 0..2 {
        hostile.push(thread::spawn(move || {
            let mut s = TcpStream::connect(tls).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let (closed, got) = closed_by_server(&mut s, Duration::from_secs(5));
            let text = String::from_utf8_lossy(&got);
            assert!(closed, "plaintext: still open");
            assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
            assert!(text.contains("speaks TLS"), "{text}");
        }));
    }
    // An oversized record header instead of a ClientHello.
    hostile.push(thread::spawn(move || {
        let mut s = TcpStream::connect(tls).unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]).unwrap();
        s.write_all(&[0u8; 512]).unwrap();
        let (closed, _) = closed_by_server(&mut s, Duration::from_secs(5));
        assert!(closed, "oversized hello: still open");
    }));
    // An oversized application-data record on an open wss connection.
    for _ in 0..2 {
        let cfg = cfg.clone();
        let path = format!(
            "/v1/streaming/websocket?api_key={}",
            key("fleet_a", Role::Viewer)
        );
        hostile.push(thread::spawn(move || {
            let mut w = Wss::connect(tls, &cfg, &path);
            let raw = &mut w.ws.get_mut().sock;
            raw.write_all(&[0x17, 0x03, 0x03, 0xff, 0xff]).unwrap();
            let _ = raw.write_all(&[0u8; 512]);
            let (closed, _) = closed_by_server(raw, Duration::from_secs(5));
            assert!(closed, "oversized record: still open");
        }));
    }
    // A client that speaks only h2 (no common ALPN protocol): a protocol refusal.
    {
        let mut h2 = (*cfg).clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        let h2 = Arc::new(h2);
        hostile.push(thread::spawn(move || {
            let Err(e) = tls_connect(tls, &h2) else {
                panic!("a handshake with no common ALPN protocol succeeded");
            };
            assert!(e.to_string().to_lowercase().contains("protocol"), "{e}");
        }));
    }
    // Slowloris: half a ClientHello (twice), or nothing at all, then silence.
    let mut hello = Vec::new();
    ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap())
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    for part in [&hello[..20], &hello[..hello.len() / 2], &[][..]] {
        let part = part.to_vec();
        hostile.push(thread::spawn(move || {
            let mut s = TcpStream::connect(tls).unwrap();
            s.write_all(&part).unwrap();
            let started = Instant::now();
            let (closed, _) = closed_by_server(&mut s, Duration::from_secs(6));
            assert!(closed, "slowloris: still open");
            assert!(
                started.elapsed() >= Duration::from_millis(1_000),
                "closed before the deadline"
            );
        }));
    }
    for h in hostile {
        h.join().expect("hostile client");
    }
    publisher.join().expect("publisher");
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(r.join().unwrap(), EVENTS, "healthy subscriber {i}");
    }
    let refused = |reason: &str| {
        n.metric(
            "fleetcast_tls_refused_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(refused("garbage"), 3);
    assert_eq!(refused("plaintext"), 2);
    assert_eq!(refused("oversized"), 3);
    assert_eq!(refused("timeout"), 3);
    assert_eq!(refused("protocol"), 1);
    // Two healthy subscribers and two hostile clients completed their handshakes.
    assert_eq!(n.metric("fleetcast_tls_handshakes_total", ""), 4);
}

// ---------------------------------------------------------------- handshake storm

/// 150 ClientHellos land at once on a shard that runs 2 handshake steps per turn:
/// every healthy subscriber (two over wss, two over ws) receives exactly the 300 events
/// published during the storm, the handshake backlog is used, and every storm client
/// completes its handshake and gets its answer.
#[test]
fn tls_handshake_storm_does_not_starve_subscribers() {
    const STORM: usize = 150;
    const EVENTS: usize = 300;
    let pki = Pki::new("storm");
    let n = TlsNode::start(&pki, 1, 2, |_| {});
    let cfg = pki.client();
    let subs = vec![
        Sub::tls(n.tls, &cfg),
        Sub::tls(n.tls, &cfg),
        Sub::plain(n.plain),
        Sub::plain(n.plain),
    ];
    // Connected first, hellos all written at once below.
    let mut storm: Vec<(TcpStream, ClientConnection)> = (0..STORM)
        .map(|_| {
            let s = TcpStream::connect(n.tls).unwrap();
            let c = ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap())
                .unwrap();
            (s, c)
        })
        .collect();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|s| {
            thread::spawn(move || (s.receive(EVENTS, Duration::from_secs(60)), Instant::now()))
        })
        .collect();
    let plain = n.plain;
    let publisher = thread::spawn(move || {
        publish(plain, EVENTS, Duration::from_millis(2));
        Instant::now()
    });
    thread::sleep(Duration::from_millis(50));
    for (s, c) in &mut storm {
        c.write_tls(s).unwrap();
    }
    let finished = thread::spawn(move || {
        let mut ok = 0;
        for (mut s, mut c) in storm {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut tls = rustls::Stream::new(&mut c, &mut s);
            let answered = tls
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .map(|_| {
                    let mut out = Vec::new();
                    let _ = tls.read_to_end(&mut out);
                    String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200 ")
                });
            ok += answered.unwrap_or(false) as usize;
        }
        ok
    });
    assert_eq!(finished.join().unwrap(), STORM, "storm clients answered");
    let published = publisher.join().expect("publisher");
    for (i, r) in readers.into_iter().enumerate() {
        let (got, done) = r.join().unwrap();
        assert_eq!(got, EVENTS, "healthy subscriber {i}");
        // Not held back behind the handshakes: the last event arrives right after the
        // publisher's last send was answered (generous for a shared 2-core machine).
        let behind = done.saturating_duration_since(published);
        assert!(
            behind < Duration::from_secs(2),
            "subscriber {i}: {behind:?} behind"
        );
    }
    assert_eq!(
        n.metric("fleetcast_tls_handshakes_total", ""),
        (STORM + 2) as u64
    );
    let deferred = n.metric("fleetcast_tls_handshakes_deferred_total", "");
    assert!(deferred > 0, "the handshake budget was never reached");
    assert_eq!(n.metric("fleetcast_tls_refused_total", ""), 0);
}

// ---------------------------------------------------------------- backpressure, shutdown

/// A wss subscriber that stops reading is closed as a slow consumer (1013) once its
/// queue passes the hard bound, behind TLS records as behind a plain socket: what it had
/// been sent decrypts and parses to the end (no record or frame cut), and a healthy wss
/// subscriber receives every alert.
#[test]
fn tls_slow_consumer_is_closed_and_others_receive_everything() {
    const ALERTS: usize = 3_000;
    let pki = Pki::new("slow");
    let n = TlsNode::start(&pki, 2, 32, |c| {
        c.limits.soft_outbound_bytes = 16 * 1024;
        c.limits.max_outbound_bytes = 64 * 1024;
    });
    let cfg = pki.client();
    let path = format!(
        "/v1/streaming/websocket?api_key={}",
        key("fleet_a", Role::Viewer)
    );
    // The stalled client's kernel buffers are kept small (see slow_consumer.rs), so that
    // the broker's own bounds are what fills.
    let stalled = {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.set_tcp_mss(536).unwrap();
        socket.connect(&SockAddr::from(n.tls)).unwrap();
        let sock = TcpStream::from(socket);
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn =
            ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        let url = format!("wss://localhost:{}{path}", n.tls.port());
        let (ws, _) = tungstenite::client(url.as_str(), tls).unwrap();
        let mut w = Wss { ws };
        w.subscribe("alerts");
        w
    };
    let mut healthy = Wss::connect(n.tls, &cfg, &path);
    healthy.subscribe("alerts");
    let reader = thread::spawn(move || {
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < ALERTS && Instant::now() < deadline {
            match healthy.next_text(Duration::from_secs(5)) {
                Some(t) if t.contains("\"safety_alert\"") => got += 1,
                Some(_) => {}
                None => break,
            }
        }
        got
    });
    let url = format!(
        "ws://{}/v1/streaming/websocket?api_key={}",
        n.plain,
        key("fleet_a", Role::Service)
    );
    let mut svc = Client::connect(&url);
    let padding = "x".repeat(300);
    for i in 0..ALERTS {
        let mut a = alert(&format!("a{i}"), "v1", "high");
        a["payload"]["note"] = json!(padding);
        svc.send(a);
    }
    svc.expect_nothing_more("service");
    assert_eq!(reader.join().unwrap(), ALERTS, "the healthy wss subscriber");
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.metric("fleetcast_limit_breaches_total", "kind=\"slow_consumer\"") < 1
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        n.metric("fleetcast_limit_breaches_total", "kind=\"slow_consumer\""),
        1
    );
    // Everything the stalled client can still read is intact, and ends with 1013 (or the
    // socket, once the close linger passed).
    let mut stalled = stalled;
    let mut got = 0;
    let mut code = None;
    let end = Instant::now() + Duration::from_secs(10);
    stalled
        .ws
        .get_ref()
        .sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    while Instant::now() < end {
        match stalled.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("corrupt message after {got}: {e}"));
                got += (v["type"] == "safety_alert") as usize;
            }
            Ok(Message::Close(f)) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                panic!("the stalled client was not closed (read {got} alerts)")
            }
            Err(_) => break, // the socket ended after the linger
        }
    }
    assert!(
        got < ALERTS,
        "the stalled client got everything: not stalled"
    );
    assert!(matches!(code, Some(1013) | None), "{code:?} after {got}");
    assert_eq!(n.metric("fleetcast_tls_refused_total", ""), 0);
}

/// Shutdown closes wss clients with 1001 through their TLS session, like ws clients.
#[test]
fn tls_shutdown_closes_wss_clients_with_1001() {
    let pki = Pki::new("shutdown");
    let mut n = TlsNode::start(&pki, 2, 32, |_| {});
    let cfg = pki.client();
    let path = format!(
        "/v1/streaming/websocket?api_key={}",
        key("fleet_a", Role::Viewer)
    );
    let mut clients: Vec<Wss> = (0..3).map(|_| Wss::connect(n.tls, &cfg, &path)).collect();
    for c in &mut clients {
        c.subscribe("alerts");
    }
    let node = n.node.take().unwrap();
    let stopper = thread::spawn(move || node.shutdown());
    for (i, c) in clients.iter_mut().enumerate() {
        c.ws.get_ref()
            .sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let code = loop {
            match c.ws.read() {
                Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("client {i}: {e}"),
            }
        };
        assert_eq!(code, Some(1001), "client {i}");
    }
    stopper.join().unwrap();
}

// ---------------------------------------------------------------- the binary

/// `fleetcast serve --config` with TLS, killed when dropped.
struct Served {
    child: Child,
    plain: SocketAddr,
    tls: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

const SERVED_TENANT: &str = "fleet_001";

fn served_key(role: Role) -> String {
    format!("key-{SERVED_TENANT}-{}-0123456789", role.name())
}

impl Served {
    fn start(pki: &Pki) -> Served {
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\nshutdown_grace_ms = 500\n\
             [server.tls]\nlisten = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n\
             [limits]\nmessages_per_second = 100000\nlocation_update_interval_ms = 0\n\
             [auth]\njwt_hs256_secret = \"{SECRET}\"\n",
            pki.dir.join("cert.pem"),
            pki.dir.join("key.pem"),
        );
        for role in [Role::Device, Role::Viewer, Role::Service] {
            toml += &format!(
                "[[auth.api_keys]]\nkey = \"{}\"\nuser_id = \"u-{}\"\ntenant = \"{SERVED_TENANT}\"\n\
                 role = \"{}\"\nvehicles = [\"*\"]\ndrivers = [\"*\"]\ntrips = [\"*\"]\n",
                served_key(role),
                role.name(),
                role.name()
            );
        }
        let path = pki.dir.join("fleetcast.toml");
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleetcast");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let (etx, stderr) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let _ = etx.send(line);
            }
        });
        let unset: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let mut b = Served {
            child,
            plain: unset,
            tls: unset,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("fleetcast prints its listening lines within 10 s");
            if let Some(rest) = line.strip_prefix("listening on ") {
                b.plain = rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            if let Some(rest) = line.strip_prefix("listening for TLS on ") {
                assert_ne!(b.plain, unset, "the plain listener is printed first");
                b.tls = rest.trim().parse().unwrap();
                return b;
            }
        }
    }

    fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP");
    }

    /// Waits for a log line containing `text`.
    fn log_line(&self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) if l.contains(text) => return l,
                Ok(_) => continue,
                Err(_) => panic!("no log line with {text:?} within {within:?}"),
            }
        }
    }

    /// POST /v1/publish over plaintext; asserts 202.
    fn publish(&self, messages: &[Value]) {
        let body = json!({ "messages": messages }).to_string();
        let mut s = TcpStream::connect(self.plain).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            served_key(Role::Device),
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 202 "), "publish: {out}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The leaf certificate the server presents to a client trusting `ca`, or the error.
fn presented(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Result<Vec<u8>, String> {
    let tls = tls_connect(addr, cfg).map_err(|e| e.to_string())?;
    Ok(tls.conn.peer_certificates().unwrap()[0].to_vec())
}

/// SIGHUP under load: subscribers opened before the reload receive every event published
/// before, during and after it; new connections see the new certificate (a client that
/// trusts only the new CA succeeds, one that trusts only the old fails); a bad file is
/// refused with a log line and the certificate in use stays.
#[test]
fn tls_certificate_reload_on_sighup_keeps_open_connections() {
    const EVENTS: usize = 400;
    let old = Pki::new("reload-old");
    let new = Pki::new("reload-new");
    let b = Served::start(&old);
    let path = format!(
        "/v1/streaming/websocket?api_key={}",
        served_key(Role::Viewer)
    );
    let subs: Vec<Wss> = (0..3)
        .map(|_| {
            let mut w = Wss::connect(b.tls, &old.client(), &path);
            w.subscribe("vehicle_locations");
            w
        })
        .collect();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|w| {
            thread::spawn(move || Sub::Tls(Box::new(w)).receive(EVENTS, Duration::from_secs(30)))
        })
        .collect();
    let (plain, stop) = (b.plain, Arc::new(AtomicBool::new(false)));
    let publisher = thread::spawn(move || {
        let url = format!(
            "ws://{plain}/v1/streaming/websocket?api_key={}",
            served_key(Role::Device)
        );
        let mut c = Client::connect(&url);
        for i in 0..EVENTS {
            c.send(location(&format!("v{}", i % 5), 40.0 + i as f64 * 1e-4));
            thread::sleep(Duration::from_millis(5));
        }
        c.expect_nothing_more("publisher");
    });
    thread::sleep(Duration::from_millis(300));
    let old_leaf = presented(b.tls, &old.client()).expect("the old certificate before");
    new.install(&old.dir);
    b.sighup();
    b.log_line("TLS certificate and key reloaded", Duration::from_secs(5));
    let new_leaf = presented(b.tls, &new.client()).expect("the new certificate after");
    assert_ne!(old_leaf, new_leaf);
    let refused = presented(b.tls, &old.client()).expect_err("the old CA no longer matches");
    assert!(refused.contains("certificate"), "{refused}");

    // A bad file: refused, logged, the new certificate stays.
    std::fs::write(old.dir.join("cert.pem"), "not a certificate\n").unwrap();
    b.sighup();
    let line = b.log_line("TLS reload refused", Duration::from_secs(5));
    assert!(line.contains("cert.pem"), "{line}");
    assert_eq!(presented(b.tls, &new.client()).unwrap(), new_leaf);
    // A key that does not belong to the certificate: refused too.
    std::fs::write(old.dir.join("cert.pem"), &new.cert_pem).unwrap();
    std::fs::write(old.dir.join("key.pem"), &old.key_pem).unwrap();
    b.sighup();
    b.log_line("TLS reload refused", Duration::from_secs(5));
    assert_eq!(presented(b.tls, &new.client()).unwrap(), new_leaf);

    publisher.join().expect("publisher");
    stop.store(true, Ordering::Release);
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(
            r.join().unwrap(),
            EVENTS,
            "subscriber {i} opened before the reload"
        );
    }
    // The plaintext listener never changed.
    b.publish(&[location("v1", 45.0)]);
}

// ---------------------------------------------------------------- other clients

fn required() -> bool {
    std::env::var("FLEETCAST_REQUIRE_SEED_CLIENTS").is_ok_and(|v| v == "1")
}

/// A runtime the `seed clients` step of `.ci/run` installs; None (skipped, said so) when
/// it is missing, unless `FLEETCAST_REQUIRE_SEED_CLIENTS=1`.
fn runtime(test: &str, cmd: &Path, probe: &[&str]) -> Option<PathBuf> {
    let ok = Command::new(cmd)
        .args(probe)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(cmd.to_path_buf());
    }
    assert!(
        !required(),
        "{test}: {} cannot run {probe:?}",
        cmd.display()
    );
    eprintln!("SKIPPED {test}: {} cannot run {probe:?}", cmd.display());
    None
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A client process whose stdout lines are read as they come; killed when dropped.
struct Lines {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn spawn(mut cmd: Command) -> Lines {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        Lines {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now) for which `pred` holds, within `within`.
    fn wait(&mut self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "waiting for {what} within {within:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PY_CLIENT: &str = r#"
import json, os, ssl, urllib.request
from websockets.sync.client import connect
ctx = ssl.create_default_context(cafile=os.environ["CA"])
base = os.environ["BASE"]
out = {}
with urllib.request.urlopen(f"https://{base}/healthz", context=ctx, timeout=5) as r:
    out["healthz"] = [r.status, r.read().decode()]
with connect(f"wss://{base}/v1/streaming/websocket?api_key={os.environ['KEY']}", ssl=ctx,
             open_timeout=5) as ws:
    out["tls"] = ws.socket.version()
    ws.send(json.dumps({"type": "subscribe", "id": "s1", "payload": {"action": "subscribe",
            "channel": "vehicle_locations", "filters": {}}}))
    while json.loads(ws.recv(timeout=5))["type"] != "subscribed":
        pass
    print("subscribed", flush=True)
    events = []
    while len(events) < 3:
        m = json.loads(ws.recv(timeout=10))
        if m["type"] == "location_update":
            events.append(m["payload"]["location"]["latitude"])
    out["events"] = events
print("result " + json.dumps(out), flush=True)
"#;

/// Python `websockets` over wss (and urllib over https), trusting only the test CA.
#[test]
fn tls_python_websockets_client_over_wss() {
    const TEST: &str = "tls_python_websockets_client_over_wss";
    let venv = root().join("target/seeds-venv/bin/python");
    let python = std::env::var_os("FLEETCAST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or(if venv.is_file() {
            venv
        } else {
            "python3".into()
        });
    let Some(python) = runtime(TEST, &python, &["-c", "import websockets.sync.client"]) else {
        return;
    };
    let pki = Pki::new("python");
    let b = Served::start(&pki);
    let mut cmd = Command::new(python);
    cmd.args(["-c", PY_CLIENT])
        .env("CA", pki.ca_file())
        .env("BASE", format!("localhost:{}", b.tls.port()))
        .env("KEY", served_key(Role::Viewer));
    let mut py = Lines::spawn(cmd);
    py.wait("subscribed", Duration::from_secs(15), |l| l == "subscribed");
    b.publish(&[
        location("v1", 10.0),
        location("v2", 20.0),
        location("v3", 30.0),
    ]);
    let line = py.wait("the result", Duration::from_secs(15), |l| {
        l.starts_with("result ")
    });
    let v: Value = serde_json::from_str(&line["result ".len()..]).unwrap();
    assert_eq!(v["healthz"], json!([200, "ok\n"]), "{v}");
    assert_eq!(v["tls"], "TLSv1.3", "{v}");
    assert_eq!(v["events"], json!([10.0, 20.0, 30.0]), "{v}");
}

/// The Bookovia seed's JavaScript class (tests/seeds/bookovia.js extracts it from the seed
/// page, unchanged) connects over wss under Node, which trusts the test CA through
/// NODE_EXTRA_CA_CERTS; its handler receives what is published.
#[test]
fn tls_bookovia_js_client_over_wss() {
    const TEST: &str = "tls_bookovia_js_client_over_wss";
    let node = std::env::var_os("FLEETCAST_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "node".into());
    let Some(node) = runtime(TEST, &node, &["--version"]) else {
        return;
    };
    let seeds = root().join("tests/seeds");
    let seed = std::env::var_os("FLEETCAST_SEEDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/seeds"))
        .join("bookovia-streaming-api.txt");
    if !seeds.join("node_modules/ws/package.json").is_file() || !seed.is_file() {
        assert!(
            !required(),
            "{TEST}: tests/seeds/node_modules or the seed is missing"
        );
        eprintln!("SKIPPED {TEST}: tests/seeds/node_modules or the seed page is missing");
        return;
    }
    let pki = Pki::new("bookovia");
    let b = Served::start(&pki);
    let mut cmd = Command::new(node);
    cmd.current_dir(&seeds)
        .arg("bookovia.js")
        .env("NODE_EXTRA_CA_CERTS", pki.ca_file())
        .env("SEED_FILE", &seed)
        .env("SEED_BASE_URL", format!("wss://localhost:{}", b.tls.port()))
        .env("SEED_API_KEY", served_key(Role::Viewer))
        .env("SEED_FLEET_ID", SERVED_TENANT)
        .env("SEED_TIMEOUT_MS", "20000");
    let mut js = Lines::spawn(cmd);
    let bad = |l: &str| {
        ["\"fatal\"", "\"ws_error\"", "\"listener_error\""]
            .iter()
            .any(|b| l.contains(b))
    };
    let ready = js.wait("the four subscriptions", Duration::from_secs(15), |l| {
        bad(l) || l.starts_with("{\"ev\":\"ready\"")
    });
    assert!(!bad(&ready), "{ready}");
    b.publish(&[location("vehicle_001", 40.7128)]);
    let handled = js.wait("the location handler", Duration::from_secs(10), |l| {
        bad(l) || (l.contains("\"handler\"") && l.contains("vehicle_locations"))
    });
    assert!(!bad(&handled), "{handled}");
    assert!(handled.contains("40.7128"), "{handled}");
}
