//! A deliberately plain second client, to check fleetcast-load's latency figures with
//! code that shares nothing with its engine: blocking `tungstenite`, one OS thread per
//! dashboard, or with `--tokio` a tokio-tungstenite task per dashboard on tokio's
//! multi-threaded runtime (one worker per CPU it may use), and one publisher thread that
//! stamps each message with the time it actually sends it (not its scheduled time).
//!
//! The workload is fanout at 20 updates/s (`fanout --rate-multiplier 0.02`): `--vehicles`
//! publisher connections send one `location_update` in turn every `1/--rate` s, and
//! `--dashboards` fleet-wide dashboards receive each one.
//!
//! ```sh
//! cargo build --release -p fleetcast-load --examples
//! taskset -c 0 target/release/fleetcast serve --config loadtest/scenarios/fanout.broker.toml &
//! taskset -c 1 target/release/examples/plain_client [--tokio] [--delayed-acks] [--scheduled] [--duration 20]
//! ```
//!
//! `--delayed-acks` (threads only) puts each dashboard socket back in delayed-ACK mode after every read
//! (`TCP_QUICKACK` 0), as fleetcast-load does by default; `--scheduled` stamps the
//! scheduled send time, as fleetcast-load does. Everything else is the kernel's default.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tungstenite::Message;

struct Args {
    addr: String,
    dashboards: usize,
    vehicles: usize,
    rate: f64,
    duration_s: f64,
    delayed_acks: bool,
    scheduled: bool,
    tokio: bool,
    viewer_key: String,
    device_key: String,
}

fn args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:8000".into(),
        dashboards: 1000,
        vehicles: 1000,
        rate: 20.0,
        duration_s: 20.0,
        delayed_acks: false,
        scheduled: false,
        tokio: false,
        viewer_key: "fanout-viewer-key-0001".into(),
        device_key: "fanout-device-key-0001".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().expect("a value after the flag");
        match k.as_str() {
            "--addr" => a.addr = v(),
            "--dashboards" => a.dashboards = v().parse().expect("number"),
            "--vehicles" => a.vehicles = v().parse().expect("number"),
            "--rate" => a.rate = v().parse().expect("number"),
            "--duration" => a.duration_s = v().parse().expect("number"),
            "--viewer-key" => a.viewer_key = v(),
            "--device-key" => a.device_key = v(),
            "--delayed-acks" => a.delayed_acks = true,
            "--scheduled" => a.scheduled = true,
            "--tokio" => a.tokio = true,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn connect(addr: &str, key: &str) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_nodelay(true).expect("nodelay");
    let url = format!("ws://{addr}/v1/streaming/websocket?api_key={key}");
    let (ws, _) = tungstenite::client::client(url, stream).expect("upgrade");
    ws
}

fn quickack_off(s: &TcpStream) {
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt on an open socket with a local int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&zero as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

const SUBSCRIBE: &str = r#"{"type":"subscribe","id":"s","payload":{"action":"subscribe","channel":"vehicle_locations"}}"#;

/// What the dashboards share: the stop flag, how many have subscribed, the stamp from
/// which events count, and every latency sample (us) once they stop.
#[derive(Default)]
struct Board {
    stop: AtomicBool,
    subscribed: AtomicUsize,
    from_us: AtomicU64,
    received: AtomicUsize,
    all: Mutex<Vec<u32>>,
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

/// `--tokio`: every dashboard is a task on a multi-threaded runtime (its own thread).
fn tokio_dashboards(a: Arc<Args>, board: Arc<Board>) -> std::thread::JoinHandle<()> {
    use futures_util::{SinkExt, StreamExt};
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for _ in 0..a.dashboards {
                let (a, board) = (a.clone(), board.clone());
                tasks.push(tokio::spawn(async move {
                    let stream = tokio::net::TcpStream::connect(&a.addr)
                        .await
                        .expect("tcp connect");
                    stream.set_nodelay(true).expect("nodelay");
                    let url = format!(
                        "ws://{}/v1/streaming/websocket?api_key={}",
                        a.addr, a.viewer_key
                    );
                    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
                        .await
                        .expect("upgrade");
                    ws.send(Message::text(SUBSCRIBE)).await.expect("subscribe");
                    while let Some(m) = ws.next().await {
                        if m.expect("subscribed")
                            .to_text()
                            .is_ok_and(|t| t.contains("\"subscribed\""))
                        {
                            break;
                        }
                    }
                    board.subscribed.fetch_add(1, Ordering::Relaxed);
                    let mut lat = Vec::with_capacity(1024);
                    while !board.stop.load(Ordering::Relaxed) {
                        let next = tokio::time::timeout(Duration::from_millis(200), ws.next());
                        match next.await {
                            Ok(Some(Ok(Message::Text(t)))) => {
                                let now = unix_us();
                                if let Some(t) = t_us_of(&t)
                                    && t >= board.from_us.load(Ordering::Relaxed)
                                {
                                    lat.push(now.saturating_sub(t).min(u32::MAX as u64) as u32);
                                }
                            }
                            Ok(Some(Ok(_))) | Err(_) => {}
                            Ok(Some(Err(e))) => panic!("dashboard read: {e}"),
                            Ok(None) => panic!("dashboard closed"),
                        }
                    }
                    board.received.fetch_add(lat.len(), Ordering::Relaxed);
                    board.all.lock().expect("lock").extend_from_slice(&lat);
                }));
            }
            for t in tasks {
                t.await.expect("dashboard task");
            }
        });
    })
}

fn t_us_of(msg: &str) -> Option<u64> {
    let at = msg.find("\"t_us\":")? + 7;
    let digits: String = msg[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn main() {
    let a = Arc::new(args());
    // Unix microseconds: a later run never mistakes an earlier run's events (which come
    // back as the subscribe's snapshot) for its own. Snapshots (a subscribe's last known
    // values, older runs' events) carry older stamps: only events stamped from the first
    // publish on count.
    let us = unix_us;
    let board = Arc::new(Board {
        from_us: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let mut threads = Vec::new();
    if a.tokio {
        threads.push(tokio_dashboards(a.clone(), board.clone()));
    }
    for _ in 0..if a.tokio { 0 } else { a.dashboards } {
        let (a, board) = (a.clone(), board.clone());
        threads.push(
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut ws = connect(&a.addr, &a.viewer_key);
                    ws.send(Message::text(SUBSCRIBE)).expect("subscribe");
                    loop {
                        let m = ws.read().expect("subscribed");
                        if m.to_text().is_ok_and(|t| t.contains("\"subscribed\"")) {
                            break;
                        }
                    }
                    ws.get_ref()
                        .set_read_timeout(Some(Duration::from_millis(200)))
                        .expect("timeout");
                    board.subscribed.fetch_add(1, Ordering::Relaxed);
                    let mut lat = Vec::with_capacity(1024);
                    while !board.stop.load(Ordering::Relaxed) {
                        match ws.read() {
                            Ok(Message::Text(t)) => {
                                let now = us();
                                if a.delayed_acks {
                                    quickack_off(ws.get_ref());
                                }
                                if let Some(t) = t_us_of(&t)
                                    && t >= board.from_us.load(Ordering::Relaxed)
                                {
                                    lat.push(now.saturating_sub(t).min(u32::MAX as u64) as u32);
                                }
                            }
                            Ok(_) => {}
                            Err(tungstenite::Error::Io(e))
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(e) => panic!("dashboard read: {e}"),
                        }
                    }
                    board.received.fetch_add(lat.len(), Ordering::Relaxed);
                    board.all.lock().expect("lock").extend_from_slice(&lat);
                })
                .expect("spawn"),
        );
    }
    let mut pubs: Vec<_> = (0..a.vehicles)
        .map(|_| connect(&a.addr, &a.device_key))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while board.subscribed.load(Ordering::Relaxed) < a.dashboards {
        assert!(
            Instant::now() < deadline,
            "dashboards not subscribed within 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{} dashboards subscribed, publishing", a.dashboards);
    let tag = std::process::id();
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let start_us = us() + 100_000;
    board.from_us.store(start_us, Ordering::Relaxed);
    let total = (a.duration_s * a.rate) as u64;
    let mut sent = 0u64;
    for k in 0..total {
        let due = start + interval * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let v = (k as usize) % a.vehicles;
        let t_us = if a.scheduled {
            start_us + (interval * k as u32).as_micros() as u64
        } else {
            us()
        };
        let msg = format!(
            r#"{{"type":"location_update","id":"P{v}.{k}.{tag}","payload":{{"vehicle_id":"v{v}","t_us":{t_us},"n":{k},"location":{{"latitude":48.856600,"longitude":2.352200,"speed":30.0,"heading":90.0}}}}}}"#
        );
        let ws = &mut pubs[v];
        ws.send(Message::text(msg)).expect("publish");
        ws.get_mut().flush().expect("flush");
        sent += 1;
    }
    std::thread::sleep(Duration::from_secs(2));
    board.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("dashboard thread");
    }
    let mut lat = std::mem::take(&mut *board.all.lock().expect("lock"));
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&v| v as f64 / 1000.0)
    };
    println!(
        "plain_client: sent {sent}, received {} of {} ({} dashboards); tokio={} delayed_acks={} scheduled={}",
        board.received.load(Ordering::Relaxed),
        sent as usize * a.dashboards,
        a.dashboards,
        a.tokio,
        a.delayed_acks,
        a.scheduled
    );
    println!(
        "latency ms: p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        lat.last().map_or(0.0, |&v| v as f64 / 1000.0)
    );
}
