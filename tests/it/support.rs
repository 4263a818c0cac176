//! Test scaffolding: start a node with known credentials; a scripted WebSocket client.

#![allow(dead_code)]

use fleetcast::config::{ApiKeyConfig, Config};
use fleetcast::model::Role;
use fleetcast::node::Node;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

pub const SECRET: &str = "test-secret-test-secret-0123456789";

/// The API key of `role` in `tenant` (tenants: fleet_a, fleet_b).
pub fn key(tenant: &str, role: Role) -> String {
    format!("key-{tenant}-{}-0123456789", role.name())
}

pub fn config(shards: usize) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shards = shards;
    cfg.server.shutdown_grace_ms = 2_000;
    cfg.auth.jwt_hs256_secret = Some(SECRET.into());
    // Tests time token expiry to the second: no clock leeway (its default is 30 s).
    cfg.auth.jwt_leeway_s = 0;
    // Tests open many connections from one address and publish in bursts; the limits
    // themselves are tested in limits.rs with their defaults or small values.
    relax_limits(&mut cfg);
    for tenant in ["fleet_a", "fleet_b"] {
        for role in [Role::Device, Role::Viewer, Role::Service, Role::Admin] {
            cfg.auth.api_keys.push(ApiKeyConfig {
                key: key(tenant, role),
                key_sha256: None,
                user_id: format!("{tenant}-{}", role.name()),
                tenant: tenant.into(),
                role,
                // Devices may publish for any vehicle, driver and trip of the tenant
                // (narrower scopes: security.rs).
                vehicles: vec!["*".into()],
                drivers: vec!["*".into()],
                trips: vec!["*".into()],
            });
        }
        cfg.auth.api_keys.push(ApiKeyConfig {
            key: format!("key-{tenant}-device-v1-0123456789"),
            key_sha256: None,
            user_id: format!("{tenant}-device-v1"),
            tenant: tenant.into(),
            role: Role::Device,
            vehicles: vec!["v1".into()],
            drivers: vec![],
            trips: vec![],
        });
    }
    cfg
}

/// A running node, shut down when dropped.
pub struct Broker {
    node: Option<Node>,
    pub addr: SocketAddr,
}

impl Broker {
    /// Starts a node in this process. `FLEETCAST_IO` (mio, io_uring) picks its IO driver,
    /// as it does for the binary: CI runs the suite once with each. A test that chose
    /// io_uring itself keeps it.
    pub fn start(mut cfg: Config) -> Broker {
        if let Ok(io) = std::env::var("FLEETCAST_IO")
            && cfg.server.io == fleetcast::config::IoDriver::Mio
        {
            cfg.server.io = io.parse().expect("FLEETCAST_IO is mio or io_uring");
        }
        let node = Node::start(cfg).expect("node starts");
        let addr = node.local_addr();
        Broker {
            node: Some(node),
            addr,
        }
    }

    pub fn with_shards(n: usize) -> Broker {
        Broker::start(config(n))
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// Connects with the given API key in the query string.
    pub fn connect_key(&self, key: &str) -> Client {
        Client::connect(&self.url(&format!("/v1/streaming/websocket?api_key={key}")))
    }

    /// Connects, authenticates with an `auth` message and waits for auth_success.
    pub fn connect_auth(&self, key: &str) -> Client {
        let mut c = Client::connect(&self.url("/v1/streaming/websocket"));
        c.send(json!({"type":"auth","id":"auth-1","payload":{"api_key": key}}));
        c.expect("auth_success");
        c
    }

    /// Raw HTTP request; returns (status, body).
    pub fn http(&self, raw: &str) -> (u16, String) {
        http_to(self.addr, raw)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    pub fn shutdown(mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown();
        }
    }
}

/// A blocking WebSocket client that speaks JSON.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

/// How a read ended when it did not yield a JSON message.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(Option<u16>),
    Timeout,
    Error(String),
}

impl Client {
    /// Nothing is pending for this client: the answer to a ping is the next message.
    pub fn expect_nothing_more(&mut self, who: &str) {
        self.send(json!({"type":"ping","id":"end"}));
        let m = self.recv();
        assert_eq!(
            (&m["type"], &m["id"]),
            (&json!("pong"), &json!("end")),
            "{who}: {m}"
        );
    }

    pub fn connect(url: &str) -> Client {
        Client::try_connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    pub fn try_connect(url: &str) -> Result<Client, tungstenite::Error> {
        let req = url.into_client_request()?;
        Client::try_connect_request(req)
    }

    pub fn try_connect_request(
        req: tungstenite::handshake::client::Request,
    ) -> Result<Client, tungstenite::Error> {
        let host = req.uri().host().unwrap().to_string();
        let port = req.uri().port_u16().unwrap();
        let stream = TcpStream::connect((host.as_str(), port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (ws, _) = tungstenite::client(req, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
        })?;
        Ok(Client { ws })
    }

    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    pub fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_string())).expect("send");
    }

    pub fn set_timeout(&mut self, d: Duration) {
        self.ws.get_ref().set_read_timeout(Some(d)).unwrap();
    }

    /// Next JSON message, or how the stream ended.
    pub fn next(&mut self, timeout: Duration) -> Result<Value, Ended> {
        self.set_timeout(timeout);
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return Ok(serde_json::from_str(t.as_str()).expect("server sends JSON"));
                }
                Ok(Message::Close(f)) => {
                    return Err(Ended::Closed(f.map(|f: CloseFrame| u16::from(f.code))));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Ended::Timeout);
                }
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => {
                    return Err(Ended::Closed(None));
                }
                Err(e) => return Err(Ended::Error(e.to_string())),
            }
        }
    }

    pub fn recv(&mut self) -> Value {
        self.next(Duration::from_secs(5))
            .expect("a message within 5 s")
    }

    /// Reads until a message of type `ty` arrives (others are skipped) and returns it.
    pub fn expect(&mut self, ty: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.next(Duration::from_secs(5)) {
                Ok(m) if m["type"] == ty => return m,
                Ok(_) => continue,
                Err(e) => panic!("waiting for {ty}: {e:?}"),
            }
        }
        panic!("no {ty} within 5 s")
    }

    /// Asserts nothing arrives within `d`.
    pub fn expect_silence(&mut self, d: Duration) {
        match self.next(d) {
            Err(Ended::Timeout) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Reads until the server closes; returns the close code.
    pub fn expect_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.next(Duration::from_secs(10)) {
                Ok(_) => continue,
                Err(Ended::Closed(c)) => return c,
                Err(e) => panic!("waiting for close: {e:?}"),
            }
        }
        panic!("no close within 10 s")
    }

    pub fn subscribe(&mut self, channel: &str, filters: Value) -> Value {
        self.send(json!({"type":"subscribe","id":format!("sub-{channel}"),
            "payload":{"action":"subscribe","channel":channel,"filters":filters}}));
        self.expect("subscribed")
    }
}

/// The unsigned number after `key` (e.g. `"seq":`) in a JSON text, for readers of many
/// events that share two cores with the broker and do not build a JSON tree per event.
pub fn num(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn location(vehicle: &str, lat: f64) -> Value {
    json!({"type":"location_update","payload":{"vehicle_id":vehicle,"trip_id":"trip_1",
        "location":{"latitude":lat,"longitude":-74.006,"speed":35.2,"heading":245.5}}})
}

pub fn alert(id: &str, vehicle: &str, severity: &str) -> Value {
    json!({"type":"safety_alert","payload":{"alert_id":id,"severity":severity,
        "category":"harsh_braking","vehicle_id":vehicle}})
}

/// Raises the rate and connection limits far above what functional tests need.
pub fn relax_limits(cfg: &mut Config) {
    let l = &mut cfg.limits;
    l.messages_per_second = 1_000_000;
    l.roles = Default::default();
    l.roles.service.messages_per_second = Some(1_000_000);
    l.max_connections = 10_000;
    l.max_connections_per_user = 10_000;
    l.new_connections_per_minute_per_user = 1_000_000;
    l.new_connections_per_minute_per_ip = 1_000_000;
    l.location_update_interval_ms = 0;
    l.requests_per_second = 1_000_000;
    l.max_pending_connections = 100_000;
    l.max_pending_connections_per_ip = 100_000;
}

impl Broker {
    /// Sum over shards of the series of metric `name` whose labels contain `label`
    /// (e.g. `kind="batch_size"`; "" for every series of the metric).
    pub fn metric(&self, name: &str, label: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    && l.contains(label)
            })
            .map(|l| {
                let v = l.rsplit(' ').next().unwrap_or_default();
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad metric line {l:?}")) as u64
            })
            .sum()
    }
}

/// Sends one raw HTTP request to `addr` and reads the answer to its end: (status, body);
/// (0, "") when nothing listens there.
pub fn http_to(addr: SocketAddr, raw: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(raw.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    http_answer(&out)
}

/// (status, body) of a raw HTTP response.
pub fn http_answer(out: &str) -> (u16, String) {
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
