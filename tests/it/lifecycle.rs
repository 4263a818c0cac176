//! Connection lifecycle: pings both ways, heartbeat timeout, client close, and graceful
//! shutdown of the real binary on SIGTERM (SPEC §5, §8, §9).

use crate::support::*;
use fleetcast::model::Role;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn json_ping_gets_pong_with_same_id() {
    let b = Broker::with_shards(1);
    // Before authentication too: ping is how a client checks the link.
    let mut anon = Client::connect(&b.url("/v1/streaming/websocket"));
    anon.send(json!({"type":"ping","id":"p0"}));
    let m = anon.recv();
    assert_eq!(
        (&m["type"], &m["id"]),
        (&json!("pong"), &json!("p0")),
        "{m}"
    );

    let mut c = b.connect_auth(&key("fleet_a", Role::Viewer));
    c.send(json!({"type":"ping","id":"p1"}));
    let m = c.recv();
    assert_eq!(m["type"], "pong", "{m}");
    assert_eq!(m["id"], "p1");
    assert!(m["timestamp"].is_string(), "{m}");
}

#[test]
fn websocket_ping_frame_gets_pong_with_same_payload() {
    let b = Broker::with_shards(1);
    let mut c = b.connect_auth(&key("fleet_a", Role::Viewer));
    c.set_timeout(Duration::from_secs(5));
    c.ws.send(Message::Ping(b"hello-42".to_vec().into()))
        .unwrap();
    for _ in 0..10 {
        match c.ws.read().expect("a pong") {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"hello-42");
                return;
            }
            Message::Ping(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    panic!("no pong");
}

#[test]
fn heartbeat_pings_and_closes_silent_clients() {
    const INTERVAL_MS: u64 = 300;
    let mut cfg = config(2);
    cfg.limits.heartbeat_interval_ms = INTERVAL_MS;
    let b = Broker::start(cfg);
    let mut live = b.connect_key(&key("fleet_a", Role::Viewer));
    // Connected and then never read from: its socket buffers the server's pings, and
    // nothing is ever sent back.
    let mut silent = b.connect_key(&key("fleet_a", Role::Viewer));

    // The live client keeps reading; tungstenite answers each ping on the next read.
    let started = Instant::now();
    let mut pings = 0;
    live.set_timeout(Duration::from_millis(20));
    while started.elapsed() < Duration::from_millis(5 * INTERVAL_MS) {
        match live.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("live client got {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("live client: {e}"),
        }
    }
    assert!(
        pings >= 3,
        "{pings} server pings in {:?}",
        started.elapsed()
    );
    live.send(json!({"type":"ping","id":"still-here"}));
    assert_eq!(live.expect("pong")["id"], "still-here");

    // Silent for 5 intervals, well past the two allowed.
    assert_eq!(close_code(&mut silent, Duration::from_secs(3)), Some(4008));
}

/// Reads past pings and messages until a close frame or the end of the stream; panics
/// after `within`. (`Client::expect_close` never times out while the server keeps
/// pinging, since every ping restarts its read.)
fn close_code(c: &mut Client, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    c.set_timeout(Duration::from_millis(50));
    while Instant::now() < deadline {
        match c.ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return None;
            }
            Err(e) => panic!("waiting for close: {e}"),
        }
    }
    panic!("not closed within {within:?}")
}

#[test]
fn client_close_is_echoed_and_connection_ends() {
    let b = Broker::with_shards(1);
    let mut c = b.connect_auth(&key("fleet_a", Role::Viewer));
    c.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    c.set_timeout(Duration::from_secs(5));
    let mut echoed = None;
    for _ in 0..10 {
        match c.ws.read() {
            Ok(Message::Close(f)) => {
                echoed = Some(f.map(|f| u16::from(f.code)));
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("waiting for the close echo: {e}"),
        }
    }
    assert_eq!(echoed, Some(Some(1000)));
    // The server then ends the TCP connection: end of stream, not a timeout.
    let mut buf = [0u8; 64];
    let n = c.ws.get_mut().read(&mut buf).expect("EOF, not a timeout");
    assert_eq!(n, 0, "bytes after the close frame");
    drop(c);
    // And forgets it.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let (_, body) = b.get("/metrics");
        let open = body
            .lines()
            .filter(|l| l.starts_with("fleetcast_connections_open{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connection still open after the close: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- the real binary

/// A `fleetcast` process, killed if the test ends without stopping it.
struct Proc {
    child: Child,
    addr: SocketAddr,
    /// Stdout lines printed before "listening on ..." (the dev-mode banner).
    banner: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `fleetcast serve ARGS --listen 127.0.0.1:0`, learns the port from the
    /// "listening on ADDR" line it prints, and checks `/healthz`. Port 0 leaves the choice
    /// to the kernel: a port picked here and handed over could meanwhile be taken by
    /// another test's broker and, with SO_REUSEPORT, silently shared.
    fn serve(args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fleetcast");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Proc {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            banner: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!(
                    "fleetcast serve {args:?}: no listening line (exit: {:?}); printed {:?}",
                    p.child.try_wait(),
                    p.banner
                );
            };
            if let Some(rest) = line.strip_prefix("listening on ") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                p.addr = addr.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
                break;
            }
            p.banner.push(line);
        }
        assert!(healthz(p.addr), "/healthz on {} after it listens", p.addr);
        p
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "still running {within:?} after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn healthz(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200 ")
}

struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("fleetcast-it-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const SHUTDOWN_CONFIG: &str = r#"
[server]
shards = 2
shutdown_grace_ms = 3000

[[auth.api_keys]]
key = "bin-viewer-key-0123456789"
user_id = "bin-viewer"
tenant = "fleet_a"
role = "viewer"

[[auth.api_keys]]
key = "bin-device-key-0123456789"
user_id = "bin-device"
tenant = "fleet_a"
role = "device"
"#;

#[test]
fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let cfg = TempFile::new("shutdown.toml", SHUTDOWN_CONFIG);
    let mut p = Proc::serve(&["--config", cfg.0.to_str().unwrap()]);
    let mut a =
        Client::connect(&p.url("/v1/streaming/websocket?api_key=bin-viewer-key-0123456789"));
    a.subscribe("vehicle_locations", json!({}));
    let mut d =
        Client::connect(&p.url("/v1/streaming/websocket?api_key=bin-device-key-0123456789"));
    d.send(json!({"type":"ping","id":"up"}));
    assert_eq!(d.expect("pong")["id"], "up");

    let sent = Instant::now();
    p.sigterm();
    assert_eq!(a.expect_close(), Some(1001));
    assert_eq!(d.expect_close(), Some(1001));
    drop((a, d));
    let status = p.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    // The clients left, so the process did not sit out its whole grace period.
    assert!(
        sent.elapsed() < Duration::from_millis(2_500),
        "exit took {:?}",
        sent.elapsed()
    );
}

#[test]
fn dev_mode_prints_working_keys() {
    let mut p = Proc::serve(&[]);
    let mut keys = std::collections::HashMap::new();
    let (mut dashboard, mut valtronics) = (None, None);
    for line in &p.banner {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [role @ ("device" | "viewer" | "service" | "admin"), key] = words[..] {
            keys.insert(role.to_string(), key.to_string());
        }
        match words[..] {
            ["native", url, ..] => dashboard = Some(url.to_string()),
            ["valtronics", url, ..] => valtronics = Some((url.to_string(), line.clone())),
            _ => {}
        }
    }
    let dashboard = dashboard.expect("a native dialect line");
    let (valtronics_url, valtronics_line) = valtronics.expect("a valtronics dialect line");
    assert_eq!(keys.len(), 4, "one key per role: {keys:?}");
    assert!(
        dashboard.starts_with(&format!("ws://{}/", p.addr)),
        "{dashboard}"
    );

    // The printed URL works as is, with the printed viewer key.
    let mut viewer = Client::connect(&dashboard);
    viewer.send(json!({"type":"auth","id":"a","payload":{"api_key": keys["viewer"]}}));
    let ok = viewer.expect("auth_success");
    assert_eq!(ok["payload"]["role"], "viewer");
    assert_eq!(ok["payload"]["fleet_id"], "fleet_001");
    viewer.subscribe("vehicle_locations", json!({}));

    // And the printed device key streams to it.
    let mut device = Client::connect(&p.url(&format!(
        "/v1/streaming/websocket?api_key={}",
        keys["device"]
    )));
    device.send(location("truck-1", 12.5));
    assert_eq!(
        viewer.expect("location_update")["payload"]["vehicle_id"],
        "truck-1"
    );

    // The Valtronics line: its URL, then the auth message it shows, pasted as printed.
    let auth = valtronics_line
        .split_once("then send ")
        .map(|(_, m)| m.trim().to_string())
        .expect("the auth message to send");
    assert!(auth.contains(&keys["viewer"]), "{valtronics_line}");
    let mut v = Client::connect(&valtronics_url);
    v.send(serde_json::from_str(&auth).expect("the printed auth message is JSON"));
    let ok = v.expect("auth_response");
    assert_eq!(ok["success"], true, "{ok}");

    p.sigterm();
    assert_eq!(viewer.expect_close(), Some(1001));
    drop((viewer, device, v));
    let status = p.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
}
