//! fleetcast-load: drives a broker that speaks fleetcast's native dialect.
//!
//! This first version has one mode, `fanout`: S dashboards subscribe to a fleet's
//! `vehicle_locations`, P publishers send location updates at a fixed total rate, and the
//! tool reports deliveries per second, loss and end-to-end latency. Scenario files,
//! reports and capacity mode come with their own issue (see `docs/performance.md`).

use clap::{Parser, Subcommand};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::{Message, WebSocket};

#[derive(Parser)]
#[command(name = "fleetcast-load", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Many dashboards watch one fleet while publishers send location updates.
    Fanout {
        /// Broker base URL.
        #[arg(long, default_value = "ws://127.0.0.1:8000")]
        url: String,
        /// Viewer API key for the dashboards.
        #[arg(long)]
        viewer_key: String,
        /// Service (or device) API key for the publishers.
        #[arg(long)]
        publisher_key: String,
        #[arg(long, default_value_t = 100)]
        dashboards: usize,
        #[arg(long, default_value_t = 2)]
        publishers: usize,
        /// Total location updates per second over all publishers.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Reader threads for the dashboards.
        #[arg(long, default_value_t = 2)]
        reader_threads: usize,
    },
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn connect(url: &str) -> anyhow::Result<WebSocket<TcpStream>> {
    let host_port = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:8000");
    let stream = TcpStream::connect(host_port)?;
    stream.set_nodelay(true)?;
    let (ws, _) =
        tungstenite::client(url, stream).map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
    Ok(ws)
}

/// Reads `"sent_us":<digits>` out of a frame without parsing the JSON.
fn sent_us(text: &str) -> Option<u64> {
    let i = text.find("\"sent_us\":")? + 10;
    let digits: String = text[i..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

struct Totals {
    delivered: AtomicU64,
    latencies: Mutex<Vec<u64>>,
}

#[allow(clippy::too_many_arguments)]
fn fanout(
    url: &str,
    viewer_key: &str,
    publisher_key: &str,
    dashboards: usize,
    publishers: usize,
    rate: u64,
    duration: u64,
    reader_threads: usize,
) -> anyhow::Result<()> {
    let ws_url = format!("{url}/v1/streaming/websocket");
    let totals = Arc::new(Totals {
        delivered: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let connect_start = Instant::now();
    let mut groups: Vec<Vec<WebSocket<TcpStream>>> =
        (0..reader_threads).map(|_| Vec::new()).collect();
    for i in 0..dashboards {
        let mut ws = connect(&format!("{ws_url}?api_key={viewer_key}"))?;
        ws.send(Message::text(
            r#"{"type":"subscribe","id":"s","payload":{"action":"subscribe","channel":"vehicle_locations"}}"#,
        ))?;
        loop {
            if let Message::Text(t) = ws.read()?
                && t.contains("\"subscribed\"")
            {
                break;
            }
        }
        ws.get_ref().set_nonblocking(true)?;
        groups[i % reader_threads].push(ws);
    }
    eprintln!(
        "{dashboards} dashboards subscribed in {:?}",
        connect_start.elapsed()
    );
    let readers: Vec<_> = groups
        .into_iter()
        .map(|mut group| {
            let totals = totals.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut local = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut idle = true;
                    for ws in group.iter_mut() {
                        for _ in 0..256 {
                            match ws.read() {
                                Ok(Message::Text(t)) => {
                                    idle = false;
                                    n += 1;
                                    if n.is_multiple_of(16)
                                        && let Some(s) = sent_us(t.as_str())
                                    {
                                        local.push(now_us().saturating_sub(s));
                                    }
                                }
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                    }
                    if n >= 4096 {
                        totals.delivered.fetch_add(n, Ordering::Relaxed);
                        n = 0;
                    }
                    if idle {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                totals.delivered.fetch_add(n, Ordering::Relaxed);
                totals.latencies.lock().unwrap().extend(local);
            })
        })
        .collect();
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let pubs: Vec<_> = (0..publishers)
        .map(|p| {
            let url = format!("{ws_url}?api_key={publisher_key}");
            let sent = sent.clone();
            let per = rate / publishers as u64;
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut ws = connect(&url)?;
                let interval = Duration::from_secs_f64(1.0 / per.max(1) as f64);
                let total = per * duration;
                for i in 0..total {
                    let due = start + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let msg = format!(
                        r#"{{"type":"location_update","payload":{{"vehicle_id":"veh_{p}_{}","sent_us":{},"location":{{"latitude":40.7,"longitude":-74.0,"speed":30.5}}}}}}"#,
                        i % 1000,
                        now_us()
                    );
                    ws.send(Message::text(msg))?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                ws.flush()?;
                std::thread::sleep(Duration::from_secs(2));
                Ok(())
            })
        })
        .collect();
    let mut last = 0;
    for _ in 0..duration {
        std::thread::sleep(Duration::from_secs(1));
        let d = totals.delivered.load(Ordering::Relaxed);
        eprintln!(
            "delivered/s ~{} (sent {})",
            d - last,
            sent.load(Ordering::Relaxed)
        );
        last = d;
    }
    for p in pubs {
        p.join().expect("publisher")?;
    }
    let elapsed = start.elapsed().as_secs_f64() - 2.0;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader");
    }
    let delivered = totals.delivered.load(Ordering::Relaxed);
    let expected = sent.load(Ordering::Relaxed) * dashboards as u64;
    let mut lat = totals.latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!("dashboards={dashboards} publishers={publishers} rate={rate}/s duration={duration}s");
    println!(
        "expected={expected} delivered={delivered} loss={}",
        expected.saturating_sub(delivered)
    );
    println!("deliveries/s={:.0}", delivered as f64 / elapsed);
    println!(
        "latency_us p50={} p90={} p99={} max={}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        lat.last().copied().unwrap_or(0)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Fanout {
            url,
            viewer_key,
            publisher_key,
            dashboards,
            publishers,
            rate,
            duration,
            reader_threads,
        } => fanout(
            &url,
            &viewer_key,
            &publisher_key,
            dashboards,
            publishers,
            rate,
            duration,
            reader_threads,
        ),
    }
}
