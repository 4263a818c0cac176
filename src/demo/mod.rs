//! `serve --demo`: a simulated fleet that publishes into a running node the way a real
//! backend does. The simulation ([`sim`], on the city of [`roads`]) is pure; this module
//! is its driver: one thread, one loopback WebSocket connection on the native endpoint
//! with a service credential of the demo's tenant, so every message goes through the
//! same handshake, authentication, validation, limits and fan-out as any client's.

pub mod roads;
pub mod sim;

use crate::config::{ApiKeyConfig, Config};
use crate::model::Role;
use sim::Fleet;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::{Message, WebSocket};

/// Vehicles of `--demo` unless `--demo-vehicles` says otherwise.
pub const DEFAULT_VEHICLES: usize = 50;
/// The user id of the demo's credential (it shows in logs and metrics).
pub const USER_ID: &str = "demo-simulator";
/// Vehicles are spread over this many send times within each period, so that a large
/// fleet does not publish in one burst.
const SLOTS: u32 = 10;
/// Margin over the broker's per-vehicle location interval: updates sent exactly one
/// interval apart would be refused (429) whenever the earlier one was delayed.
const MARGIN: Duration = Duration::from_millis(50);

/// Adds the simulator's credential to `cfg`: a service key of `tenant`, fresh and random
/// each run, known only to this process. Returns the key.
pub fn add_credential(cfg: &mut Config, tenant: &str, random_hex: &str) -> String {
    let key = format!("demo-sim-{random_hex}");
    cfg.auth.api_keys.push(ApiKeyConfig {
        key: key.clone(),
        key_sha256: None,
        user_id: USER_ID.into(),
        tenant: tenant.into(),
        role: Role::Service,
        vehicles: vec![],
        drivers: vec![],
        trips: vec![],
    });
    key
}

/// A running simulation; stopped (and its connection closed) by [`Demo::stop`].
pub struct Demo {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

/// What the simulation sent, and what the broker refused of it (`error` replies).
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub refused: AtomicU64,
    pub connects: AtomicU64,
}

pub struct Settings {
    /// The node's address (an unspecified address is reached on loopback).
    pub addr: SocketAddr,
    pub key: String,
    pub vehicles: usize,
    pub seed: u64,
    /// The broker's `limits.location_update_interval_ms`: one update per vehicle per
    /// interval (at least a second).
    pub interval: Duration,
}

impl Demo {
    pub fn start(s: Settings) -> std::io::Result<Demo> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (flag, c) = (stop.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("fleetcast-demo".into())
            .spawn(move || run(s, &flag, &c))?;
        Ok(Demo {
            stop,
            counters,
            thread: Some(thread),
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn connect(addr: SocketAddr, key: &str) -> Result<WebSocket<TcpStream>, String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).ok();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let url = format!("ws://{addr}/v1/streaming/websocket?api_key={key}");
    let (ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| e.to_string())?;
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(1)))
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Reads what the broker sent without waiting: errors are counted (a 429 is a location
/// update that came too soon after the one before; the vehicle's next update goes out a
/// period later). `Err` when the connection is gone.
fn drain(ws: &mut WebSocket<TcpStream>, refused: &AtomicU64) -> Result<(), String> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                if t.as_str().starts_with("{\"type\":\"error\"") {
                    let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                    if n <= 3 || n.is_power_of_two() {
                        tracing::debug!(refused = n, "demo: broker refused {t}");
                    }
                }
            }
            Ok(Message::Close(c)) => return Err(format!("closed by the broker: {c:?}")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn run(s: Settings, stop: &AtomicBool, counters: &Counters) {
    let mut fleet = Fleet::new(s.seed, s.vehicles);
    let period = s.interval.max(Duration::from_secs(1)) + MARGIN;
    let slot = period / SLOTS;
    let mut ws: Option<WebSocket<TcpStream>> = None;
    let mut backoff = Duration::from_millis(200);
    let mut retry_at = Instant::now();
    let mut last_step: Vec<Option<Instant>> = vec![None; fleet.len()];
    let mut next = Instant::now();
    let mut turn = 0u32;
    tracing::info!(vehicles = fleet.len(), seed = s.seed, "demo fleet starting");
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next += slot;
        let this = turn % SLOTS;
        turn = turn.wrapping_add(1);
        if ws.is_none() && Instant::now() >= retry_at {
            match connect(s.addr, &s.key) {
                Ok(c) => {
                    counters.connects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("demo fleet connected to {}", s.addr);
                    ws = Some(c);
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    tracing::warn!("demo fleet cannot connect: {e}; retrying in {backoff:?}");
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let Some(conn) = ws.as_mut() else { continue };
        let result = (|| -> Result<(), String> {
            let now_ms = unix_ms();
            for i in (this as usize..fleet.len()).step_by(SLOTS as usize) {
                let at = Instant::now();
                let msgs = match last_step[i] {
                    None => {
                        let mut m = fleet.hello(i, now_ms);
                        m.extend(fleet.step(i, 0.05, now_ms));
                        m
                    }
                    Some(prev) => fleet.step(i, at.duration_since(prev).as_secs_f64(), now_ms),
                };
                last_step[i] = Some(at);
                for m in msgs {
                    conn.write(Message::text(m.text))
                        .map_err(|e| e.to_string())?;
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            conn.flush().map_err(|e| e.to_string())?;
            drain(conn, &counters.refused)
        })();
        if let Err(e) = result {
            tracing::warn!("demo fleet lost its connection: {e}; reconnecting");
            ws = None;
            retry_at = Instant::now() + backoff;
        }
    }
    if let Some(mut c) = ws {
        let _ = c.close(None);
        let _ = c.flush();
    }
}
