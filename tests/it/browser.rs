//! The dashboard in real headless Chromium, driven over the Chrome DevTools Protocol (a
//! WebSocket: tungstenite and serde_json, as the other tests use). It starts the real
//! binary, `fleetcast serve --demo --demo-vehicles 1000`, opens `/` signed in through the
//! URL fragment the banner prints, and reads the page's state (`window.fc`) and its DOM.
//!
//! Without Chromium the test prints SKIPPED and passes, unless
//! `FLEETCAST_REQUIRE_BROWSER=1` (as in .ci/run, which installs Debian's `chromium`).

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

const REQUIRE: &str = "FLEETCAST_REQUIRE_BROWSER";
const VEHICLES: usize = 1000;

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A child process killed (with its process group) when dropped.
struct Proc {
    child: Child,
    group: bool,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group {
            // Chromium's renderer and GPU helpers share the browser's process group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of a child's output, read by a thread.
fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line within `timeout` that `pick` accepts, or a panic naming `what`.
fn wait_line<T>(
    rx: &Receiver<String>,
    timeout: Duration,
    what: &str,
    mut pick: impl FnMut(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(t) = pick(&line) {
                    return t;
                }
                seen.push(line);
            }
            Err(_) => panic!("no {what} within {timeout:?}; read {seen:#?}"),
        }
    }
}

struct Broker {
    _proc: Proc,
    addr: SocketAddr,
    admin_url: String,
}

fn start_broker(vehicles: usize, extra: &[&str]) -> Broker {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--demo",
            "--demo-vehicles",
        ])
        .arg(vehicles.to_string())
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn fleetcast");
    let rx = lines(child.stdout.take().unwrap());
    let proc = Proc {
        child,
        group: false,
    };
    let mut admin_url = None;
    let addr = wait_line(&rx, Duration::from_secs(20), "listening line", |l| {
        if l.trim_start().starts_with("http://") && l.contains("/#key=") {
            admin_url = Some(l.trim().to_string());
        }
        l.strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
    });
    // Keep reading so that the broker never blocks on a full pipe.
    std::thread::spawn(move || for _ in rx {});
    Broker {
        _proc: proc,
        addr,
        admin_url: admin_url.expect("the banner prints the dashboard URL"),
    }
}

/// One page of Chromium, driven over the DevTools protocol.
struct Page {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    _proc: Proc,
    _profile: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

impl Page {
    fn open(chrome: &Path) -> Page {
        let profile =
            std::env::temp_dir().join(format!("fleetcast-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let mut cmd = Command::new(chrome);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1400,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().expect("spawn chromium");
        let rx = lines(child.stderr.take().unwrap());
        let proc = Proc { child, group: true };
        let browser = wait_line(&rx, Duration::from_secs(30), "DevTools URL", |l| {
            l.strip_prefix("DevTools listening on ").map(str::to_string)
        });
        std::thread::spawn(move || for _ in rx {});
        // ws://127.0.0.1:PORT/devtools/browser/ID -> the page target's WebSocket.
        let host = browser
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let page_ws = loop {
            let list: Value =
                serde_json::from_str(&http_get(&host, "/json/list")).unwrap_or(Value::Null);
            let found = list.as_array().and_then(|a| {
                a.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
            });
            if let Some(u) = found {
                break u;
            }
            assert!(Instant::now() < deadline, "no page target in {list}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let stream = TcpStream::connect(&host).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(page_ws.as_str(), stream).expect("DevTools WebSocket");
        let mut page = Page {
            ws,
            next_id: 1,
            _proc: proc,
            _profile: TempDir(profile),
        };
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        );
        page
    }

    /// One DevTools command and its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let Message::Text(t) = self.ws.read().expect("DevTools answers") else {
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
        panic!("{method}: no answer within 30 s");
    }

    /// Evaluates `expr` in the page; its value (JSON).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true; panics with `why` and `show` after `timeout`.
    fn wait_for(&mut self, expr: &str, timeout: Duration, why: &str, show: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(expr) == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{why} within {timeout:?}: {}", self.eval(show));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        println!("screenshot: {}", path.display());
    }
}

const SUMMARY: &str = "JSON.stringify({state: fc.state, vehicles: fc.vehicles.size, \
    changes: fc.stats.positionChanges, messages: fc.stats.messages, alerts: fc.alerts.length, \
    alertPos: fc.alertPos, gaps: fc.alertGaps, dups: fc.alertDuplicates, reloads: fc.alertReloads, \
    reconnects: fc.reconnects, lastClose: fc.lastClose, following: fc.following, \
    followLog: fc.followLog.length, foreign: fc.followForeign, frames: fc.frameStats()})";

/// Chromium, or `None` (the test then skips) unless it is required.
fn browser(test: &str) -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        if std::env::var_os(REQUIRE).is_some_and(|v| v == "1") {
            panic!("chromium is not installed ({REQUIRE}=1: the browser test must run)");
        }
        eprintln!(
            "SKIPPED {test}: chromium is not installed \
             (.ci/run installs it; {REQUIRE}=1 turns this into a failure)"
        );
    }
    found
}

#[test]
fn browser_dashboard_shows_the_demo_fleet_live() {
    let Some(chrome) = browser("browser_dashboard_shows_the_demo_fleet_live") else {
        return;
    };
    let broker = start_broker(VEHICLES, &[]);
    let mut page = Page::open(&chrome);
    assert!(
        broker
            .admin_url
            .starts_with(&format!("http://{}/#key=dev-admin-", broker.addr))
    );
    page.call("Page.navigate", json!({"url": broker.admin_url}));

    // Signed in by the fragment, which the page then removes from the address bar.
    page.wait_for(
        "typeof fc === 'object' && fc.state === 'live'",
        Duration::from_secs(15),
        "not live",
        SUMMARY,
    );
    assert_eq!(
        page.eval("location.hash"),
        json!(""),
        "the key stays in the address bar"
    );

    // The demo's vehicles appear (the snapshot, then live updates).
    let t0 = Instant::now();
    page.wait_for(
        &format!(
            "fc.vehicles.size >= {VEHICLES} && document.querySelectorAll('#vlist tr').length > 0"
        ),
        Duration::from_secs(20),
        "the demo vehicles did not all appear",
        SUMMARY,
    );
    println!(
        "{VEHICLES} vehicles on the page {:?} after it was live",
        t0.elapsed()
    );

    // Their positions change.
    let before =
        page.eval("JSON.stringify([...fc.vehicles.values()].map(v => [v.id, v.lat, v.lon]))");
    let changes = page.eval("fc.stats.positionChanges").as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after =
        page.eval("JSON.stringify([...fc.vehicles.values()].map(v => [v.id, v.lat, v.lon]))");
    let moved = page.eval("fc.stats.positionChanges").as_u64().unwrap() - changes;
    assert_ne!(before, after, "no vehicle moved in 3 s");
    assert!(moved > 100, "only {moved} position changes in 3 s");

    // An alert shows in the feed (drawn in the DOM, coloured by severity).
    page.wait_for(
        "document.querySelectorAll('#alerts li[class^=sev-]').length > 0",
        Duration::from_secs(40),
        "no alert in the feed",
        SUMMARY,
    );

    // Following a vehicle (a click on its row) subscribes to that vehicle only.
    let id = page.eval(
        "(() => { const v = [...fc.vehicles.values()].find(v => v.status === 'moving') || [...fc.vehicles.values()][0]; \
           const row = document.querySelector(`#vlist tr[data-id=\"${v.id}\"]`); if (row) row.click(); else fc.follow(v.id); return v.id; })()",
    );
    let id = id.as_str().unwrap().to_string();
    page.wait_for(
        "fc.followLog.some(e => e.type === 'telemetry_update') && document.getElementById('ftele').children.length > 0",
        Duration::from_secs(15),
        "no telemetry of the followed vehicle",
        SUMMARY,
    );
    let log = page.eval("fc.followLog.map(e => e.vehicle_id)");
    let ids: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        !ids.is_empty() && ids.iter().all(|v| *v == id),
        "followed {id}, got {ids:?}"
    );
    assert_eq!(
        page.eval("fc.followForeign"),
        json!(0),
        "updates of other vehicles reached the follow panel"
    );
    assert_eq!(
        page.eval("document.getElementById('fid').textContent"),
        json!(id)
    );

    // The broker closes the connection: the page floods it with pings, past
    // limits.messages_per_second for longer than abuse_close_after_ms, and the broker
    // closes it with 1008. The page reconnects with backoff and resumes the alerts with
    // `since`: no gap. Repeated (at most 3 times) until alerts were published while it was
    // away, so that the resume really had something to replay.
    let mut replayed = 0;
    for round in 1..=3 {
        let reconnects = page.eval("fc.reconnects").as_u64().unwrap();
        page.eval(
            "(() => { const ws = fc.ws; let n = 0; const t = setInterval(() => { \
               if (fc.ws !== ws || ws.readyState !== 1 || ++n > 80) return clearInterval(t); \
               for (let i = 0; i < 60; i++) ws.send('{\"type\":\"ping\"}'); }, 100); return true; })()",
        );
        page.wait_for(
            &format!("fc.reconnects > {reconnects} && fc.state === 'live' && fc.lastClose && fc.lastClose.code === 1008"),
            Duration::from_secs(30),
            "the broker did not close the flooding connection, or the page did not come back",
            SUMMARY,
        );
        // Let the replay and some live alerts arrive.
        std::thread::sleep(Duration::from_secs(4));
        replayed = page
            .eval("fc.alerts.filter(a => Date.parse(a.ts) > fc.lastClose.at && Date.parse(a.ts) < fc.liveAt).length")
            .as_u64()
            .unwrap();
        let s = page.eval(SUMMARY);
        println!("round {round}: {replayed} alerts published while disconnected; {s}");
        assert_eq!(
            page.eval("fc.alertGaps"),
            json!(0),
            "a gap in the alerts: {s}"
        );
        assert_eq!(
            page.eval("fc.alertReloads"),
            json!(0),
            "the resume was not recovered: {s}"
        );
        // Every alert the page holds, by seq: contiguous.
        let contiguous = page.eval(
            "(() => { const s = fc.alerts.map(a => a.seq).sort((a, b) => a - b); \
               return s.every((x, i) => i === 0 || x === s[i - 1] + 1); })()",
        );
        assert_eq!(contiguous, json!(true), "alerts not contiguous: {s}");
        if replayed > 0 {
            break;
        }
    }
    assert!(
        replayed > 0,
        "no alert was published while the page was disconnected (3 tries)"
    );

    // Smoothness with 1000 vehicles at 1 Hz: frame times over the last frames, and no
    // backlog (the newest position on the page is at most a few seconds old).
    page.eval("fc.stats.drawMs.length = 0; fc.stats.frameGapMs.length = 0; true");
    std::thread::sleep(Duration::from_secs(8));
    let f = page.eval("fc.frameStats()");
    let lag = page.eval("Date.now() - Math.max(...[...fc.vehicles.values()].map(v => v.ts))");
    println!("frames with {VEHICLES} vehicles: {f}; newest position {lag} ms old");
    let draw_p95 = f["drawP95"].as_f64().unwrap();
    assert!(f["frames"].as_u64().unwrap() > 0);
    assert!(
        draw_p95 < 50.0,
        "drawing takes {draw_p95:.1} ms per frame (p95): {f}"
    );
    assert!(
        lag.as_f64().unwrap() < 5_000.0,
        "the page is {lag} ms behind"
    );

    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    page.screenshot(&shot);
}

/// A tile server on loopback: answers every request with a 256 px SVG tile and records the
/// paths asked for. Stops after `for_how_long`.
fn tile_server(
    for_how_long: Duration,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = paths.clone();
    std::thread::spawn(move || {
        let tile = "<svg xmlns='http://www.w3.org/2000/svg' width='256' height='256'>\
                    <rect width='256' height='256' fill='#2a4d3a'/>\
                    <path d='M0 128H256M128 0V256' stroke='#8fbc8f' stroke-width='6'/></svg>";
        let deadline = Instant::now() + for_how_long;
        while Instant::now() < deadline {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            if let Some(path) = head.split_whitespace().nth(1) {
                seen.lock().unwrap().push(path.to_string());
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: image/svg+xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{tile}",
                tile.len()
            );
        }
    });
    (addr, paths)
}

/// `--dashboard-tile-url`: the page asks the configured tile server for the Web Mercator
/// tiles under the fleet and draws them.
#[test]
fn browser_dashboard_draws_configured_map_tiles() {
    let Some(chrome) = browser("browser_dashboard_draws_configured_map_tiles") else {
        return;
    };
    let (tiles, paths) = tile_server(Duration::from_secs(60));
    let url = format!("http://{tiles}/{{z}}/{{x}}/{{y}}.svg");
    let broker = start_broker(30, &["--dashboard-tile-url", &url]);
    let mut page = Page::open(&chrome);
    page.call("Page.navigate", json!({"url": broker.admin_url}));
    page.wait_for(
        "typeof fc === 'object' && fc.vehicles.size >= 30 && fc.stats.tilesDrawn > 0",
        Duration::from_secs(30),
        "no tile drawn",
        "JSON.stringify({config: fc.config, vehicles: fc.vehicles.size, tiles: fc.stats.tilesDrawn})",
    );
    let asked = paths.lock().unwrap().clone();
    // The demo city lies around 52.52 N, 13.405 E: the tile holding it at the zoom the
    // page chose is among those asked for.
    let hit = asked.iter().any(|p| {
        let parts: Vec<f64> = p
            .trim_start_matches('/')
            .trim_end_matches(".svg")
            .split('/')
            .filter_map(|n| n.parse().ok())
            .collect();
        let [z, x, y] = parts[..] else { return false };
        let n = 2f64.powf(z);
        let cx = ((13.405 + 180.0) / 360.0 * n).floor();
        let lat = 52.52f64.to_radians();
        let cy =
            ((1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / std::f64::consts::PI) / 2.0 * n).floor();
        (12.0..=17.0).contains(&z) && (x - cx).abs() <= 1.0 && (y - cy).abs() <= 1.0
    });
    assert!(hit, "no tile near the demo city among {asked:?}");
    page.screenshot(&Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-tiles.png"));
}
