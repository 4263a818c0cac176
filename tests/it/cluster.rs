//! Cluster mode (issue 13): three real `fleetcast` processes on one real `nats-server`
//! with JetStream, started by the test on free loopback ports with a temporary store.
//!
//! Without `nats-server` on the PATH (or in /usr/sbin) these tests print SKIPPED and
//! pass, unless `FLEETCAST_REQUIRE_NATS` is set (`.ci/run` sets it and installs the
//! Debian package).

use crate::support::{Client, http_to, key};
use fleetcast::model::Role;
use serde_json::{Value, json};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("FLEETCAST_REQUIRE_NATS").is_none(),
            "FLEETCAST_REQUIRE_NATS is set but nats-server is not installed"
        );
        eprintln!("SKIPPED: nats-server not installed (apt-get install nats-server)");
    }
    found
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A nats-server with JetStream on disk, killed when dropped.
struct Nats {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    /// More command-line arguments (a clustered server's name, routes, monitoring port).
    args: Vec<String>,
    child: Option<Child>,
}

impl Nats {
    fn start(dir: &Path) -> Option<Nats> {
        let mut n = Nats {
            bin: nats_binary()?,
            port: free_port(),
            dir: dir.join("jetstream"),
            args: Vec::new(),
            child: None,
        };
        n.up();
        Some(n)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let port = self.port;
        wait_until("nats-server to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Shuts the server down cleanly (SIGTERM), its store written out.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signals a child this test started and has not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Three nats-servers with JetStream, clustered over loopback routes, each with its own
/// store and monitoring port.
struct NatsTrio {
    servers: Vec<Nats>,
    monitors: Vec<u16>,
}

impl NatsTrio {
    fn start(dir: &Path) -> Option<NatsTrio> {
        let bin = nats_binary()?;
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let monitors: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let servers = (0..3)
            .map(|i| {
                let mut n = Nats {
                    bin: bin.clone(),
                    port: free_port(),
                    dir: dir.join(format!("jetstream{i}")),
                    args: [
                        "--server_name",
                        &format!("s{i}"),
                        "--cluster_name",
                        "fctest",
                        "--cluster",
                        &format!("nats://127.0.0.1:{}", routes[i]),
                        "--routes",
                        &route_urls,
                        "-m",
                        &monitors[i].to_string(),
                    ]
                    .map(String::from)
                    .to_vec(),
                    child: None,
                };
                n.up();
                n
            })
            .collect();
        let trio = NatsTrio { servers, monitors };
        wait_until(
            "JetStream to elect its leader",
            Duration::from_secs(30),
            || (0..3).all(|i| trio.jsz(i, "")["meta_cluster"]["leader"].is_string()),
        );
        Some(trio)
    }

    /// `/jsz` of server `i` (`query`: e.g. `?streams=true`), or null.
    fn jsz(&self, i: usize, query: &str) -> Value {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitors[i]));
        let (_, body) = http_to(addr, &format!("GET /jsz{query} HTTP/1.0\r\n\r\n"));
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// The TOML value of `cluster.nats_url`: every server.
    fn urls(&self) -> String {
        let urls: Vec<String> = self
            .servers
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// The name of the server that leads stream `name` (asked of every live server).
    fn stream_leader(&self, name: &str) -> Option<String> {
        fn find<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
            match v {
                Value::Object(o) if o.get("name").and_then(Value::as_str) == Some(name) => {
                    o.get("cluster").and_then(|c| c.get("leader"))
                }
                Value::Object(o) => o.values().find_map(|v| find(v, name)),
                Value::Array(a) => a.iter().find_map(|v| find(v, name)),
                _ => None,
            }
        }
        (0..3)
            .filter(|&i| self.servers[i].child.is_some())
            .find_map(|i| {
                let jsz = self.jsz(i, "?accounts=true&streams=true");
                find(&jsz, name).and_then(Value::as_str).map(String::from)
            })
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `fleetcast serve` process in cluster mode.
struct NodeProc {
    addr: SocketAddr,
    child: Child,
}

fn api_keys_toml() -> String {
    let mut s = String::new();
    for tenant in ["fleet_a", "fleet_b"] {
        for role in [Role::Device, Role::Viewer, Role::Service, Role::Admin] {
            s.push_str(&format!(
                "[[auth.api_keys]]\nkey = \"{}\"\nuser_id = \"{tenant}-{}\"\ntenant = \"{tenant}\"\n\
                 role = \"{}\"\nvehicles = [\"*\"]\ndrivers = [\"*\"]\ntrips = [\"*\"]\n\n",
                key(tenant, role),
                role.name(),
                role.name()
            ));
        }
    }
    s
}

impl NodeProc {
    /// `nats`: the TOML value of `cluster.nats_url` (a quoted URL or a list of them);
    /// `extra`: more `[cluster]` keys.
    fn start(dir: &Path, name: &str, nats: &str, extra: &str) -> NodeProc {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nshards = 2\nshutdown_grace_ms = 1000\n\n\
                 [limits]\nmessages_per_second = 1000000\nlocation_update_interval_ms = 0\n\
                 new_connections_per_minute_per_ip = 1000000\n\
                 new_connections_per_minute_per_user = 1000000\nrequests_per_second = 1000000\n\n\
                 [cluster]\nnats_url = {nats}\nnode_name = \"{name}\"\n\
                 subject_prefix = \"fctest\"\n{extra}\n\n{}",
                api_keys_toml()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("fleetcast starts");
        let node = NodeProc {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            child,
        };
        wait_until(
            &format!("{name} to be ready"),
            Duration::from_secs(20),
            || node.get("/readyz").0 == 200,
        );
        node
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.raw(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    /// A raw request on a fresh connection; (status, body), or status 0 when the node
    /// does not answer (not listening yet, or killed).
    fn raw(&self, req: &str) -> (u16, String) {
        http_to(self.addr, req)
    }

    fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no metric {name}")) as u64
    }

    fn connect(&self, tenant: &str, role: Role) -> Client {
        Client::connect(&format!(
            "ws://{}/v1/streaming/websocket?api_key={}",
            self.addr,
            key(tenant, role)
        ))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    nats: Nats,
    nodes: Vec<NodeProc>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cluster(n: usize) -> Option<Cluster> {
    cluster_with(n, "")
}

/// `n` nodes whose configs end with `extra` (TOML).
fn cluster_with(n: usize, extra: &str) -> Option<Cluster> {
    let dir = temp_dir("cluster");
    let nats = Nats::start(&dir.0)?;
    let nodes = (0..n)
        .map(|i| {
            let url = format!("\"{}\"", nats.url());
            NodeProc::start(&dir.0, &format!("node{i}"), &url, extra)
        })
        .collect();
    Some(Cluster {
        nats,
        nodes,
        _dir: dir,
    })
}

/// A new directory under the system's temporary one, removed when dropped.
fn temp_dir(kind: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "fleetcast-{kind}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn alert(n: u64) -> Value {
    json!({"type":"safety_alert","id":format!("al-{n}"),"payload":{"alert_id":format!("a{n}"),
        "severity":"high","category":"harsh_braking","vehicle_id":"v1","n":n}})
}

fn acked_alert(c: &mut Client, n: u64) -> Value {
    let mut m = alert(n);
    m["ack"] = json!(true);
    c.send(m);
    c.expect("ack")
}

/// Publishes alert `n` with `ack`, retrying with the same id after each 503 (as a
/// publisher does; the stream drops a retry of a stored one) for up to 30 s. Returns the
/// refusals.
fn publish_until_stored(svc: &mut Client, n: u64) -> u32 {
    let end = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    while Instant::now() < end {
        let mut m = alert(n);
        m["ack"] = json!(true);
        svc.send(m);
        let r = svc.recv();
        if r["type"] == "ack" {
            return refused;
        }
        assert_eq!(r["payload"]["code"], 503, "{r}");
        refused += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("alert {n} never stored");
}

fn location(vehicle: &str, lat: f64) -> Value {
    crate::support::location(vehicle, lat)
}

/// A viewer of fleet_a on `node` that subscribes to alerts resuming after (epoch, seq);
/// returns it with the `subscribed` answer (waited for up to 15 s: the node may first
/// have to sync the channel from the cluster).
fn resume_alerts(node: &NodeProc, epoch: u64, seq: u64) -> (Client, Value) {
    let mut c = node.connect("fleet_a", Role::Viewer);
    c.send(
        json!({"type":"subscribe","id":"resume","payload":{"action":"subscribe",
        "channel":"alerts","since":{"epoch":epoch,"seq":seq}}}),
    );
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if let Ok(v) = c.next(Duration::from_millis(500))
            && v["type"] == "subscribed"
        {
            return (c, v);
        }
    }
    panic!("no answer to the resuming subscribe");
}

/// Reads events of `ty` until `n` arrived (or the bounded wait ends); returns them.
fn collect(c: &mut Client, ty: &str, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(15);
    while got.len() < n && Instant::now() < end {
        match c.next(Duration::from_millis(500)) {
            Ok(v) if v["type"] == ty => got.push(v),
            Ok(_) | Err(_) => {}
        }
    }
    got
}

/// Reads events until `n` of each type arrived (or the bounded wait ends), whatever
/// order the types interleave in; returns them by type.
fn collect_each<const K: usize>(c: &mut Client, want: [(&str, usize); K]) -> [Vec<Value>; K] {
    let mut got: [Vec<Value>; K] = std::array::from_fn(|_| Vec::new());
    let end = Instant::now() + Duration::from_secs(15);
    while want.iter().zip(&got).any(|((_, n), g)| g.len() < *n) && Instant::now() < end {
        if let Ok(v) = c.next(Duration::from_millis(500))
            && let Some(i) = want.iter().position(|(ty, _)| v["type"] == *ty)
        {
            got[i].push(v);
        }
    }
    got
}

#[test]
fn cluster_delivers_across_nodes_with_exact_counts_and_tenant_isolation() {
    let Some(c) = cluster(3) else { return };
    let [n0, n1, n2] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    let mut dash_a0 = n0.connect("fleet_a", Role::Viewer);
    dash_a0.subscribe("vehicle_locations", json!({}));
    dash_a0.subscribe("alerts", json!({}));
    let mut dash_a1 = n1.connect("fleet_a", Role::Viewer);
    dash_a1.subscribe("vehicle_locations", json!({}));
    dash_a1.subscribe("alerts", json!({}));
    let mut dash_b2 = n2.connect("fleet_b", Role::Viewer);
    dash_b2.subscribe("vehicle_locations", json!({}));
    dash_b2.subscribe("alerts", json!({}));

    // fleet_a: positions from a device on node 2, alerts from a service on node 1.
    let mut dev_a = n2.connect("fleet_a", Role::Device);
    for v in 0..40 {
        dev_a.send(location(&format!("va{v}"), 40.0 + v as f64 / 100.0));
    }
    let mut svc_a = n1.connect("fleet_a", Role::Service);
    for n in 1..=25 {
        assert!(
            acked_alert(&mut svc_a, n)["payload"]["seq"]
                .as_u64()
                .is_some()
        );
    }
    // fleet_b: both from node 0.
    let mut dev_b = n0.connect("fleet_b", Role::Device);
    for v in 0..15 {
        dev_b.send(location(&format!("vb{v}"), 10.0));
    }
    let mut svc_b = n0.connect("fleet_b", Role::Service);
    for n in 1..=10 {
        acked_alert(&mut svc_b, n);
    }

    for (who, dash) in [("a0", &mut dash_a0), ("a1", &mut dash_a1)] {
        let mut locs = 0;
        let mut seqs = Vec::new();
        let end = Instant::now() + Duration::from_secs(15);
        while (locs < 40 || seqs.len() < 25) && Instant::now() < end {
            let Ok(v) = dash.next(Duration::from_millis(500)) else {
                continue;
            };
            let vehicle = v["payload"]["vehicle_id"].as_str().unwrap_or("");
            assert!(!vehicle.starts_with("vb"), "{who} got fleet_b's {v}");
            match v["type"].as_str() {
                Some("location_update") => locs += 1,
                Some("safety_alert") => seqs.push(v["seq"].as_u64().unwrap()),
                _ => {}
            }
        }
        assert_eq!(locs, 40, "{who}: every fleet_a position, once");
        assert_eq!(
            seqs,
            (1..=25).collect::<Vec<_>>(),
            "{who}: alerts in stream order"
        );
        dash.expect_silence(Duration::from_millis(300));
    }
    // Positions (core NATS) and alerts (the stream) interleave: read both in one pass.
    let [b_locs, b_alerts] = collect_each(
        &mut dash_b2,
        [("location_update", 15), ("safety_alert", 10)],
    );
    assert_eq!((b_locs.len(), b_alerts.len()), (15, 10));
    assert!(b_locs.iter().all(|v| {
        v["payload"]["vehicle_id"]
            .as_str()
            .unwrap()
            .starts_with("vb")
    }));
    dash_b2.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_node_without_subscribers_receives_nothing() {
    let Some(c) = cluster(3) else { return };
    let [n0, n1, n2] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    let mut dash = n1.connect("fleet_a", Role::Viewer);
    dash.subscribe("vehicle_locations", json!({}));
    let mut dev = n0.connect("fleet_a", Role::Device);
    for v in 0..30 {
        dev.send(location(&format!("v{v}"), 1.0));
    }
    assert_eq!(collect(&mut dash, "location_update", 30).len(), 30);
    // Node 2 has no dashboard: it follows nothing and took in nothing.
    assert_eq!(n2.metric("fleetcast_cluster_following"), 0);
    assert_eq!(n2.metric("fleetcast_cluster_received_total"), 0);
    assert_eq!(n1.metric("fleetcast_cluster_received_total"), 30);
    // The publishing node sent each once.
    assert_eq!(n0.metric("fleetcast_cluster_sent_total"), 30);
    // When the last dashboard leaves, node 1 stops following.
    drop(dash);
    wait_until("node 1 to stop following", Duration::from_secs(10), || {
        n1.metric("fleetcast_cluster_following") == 0
    });
    for v in 0..10 {
        dev.send(location(&format!("w{v}"), 2.0));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(n1.metric("fleetcast_cluster_received_total"), 30);
}

#[test]
fn a_dashboard_resumes_on_another_node_after_its_node_is_killed() {
    let Some(mut c) = cluster(3) else { return };
    let mut dash = c.nodes[0].connect("fleet_a", Role::Viewer);
    let sub = dash.subscribe("alerts", json!({}));
    let epoch = sub["payload"]["epoch"].as_u64().unwrap();
    let mut svc = c.nodes[1].connect("fleet_a", Role::Service);
    for n in 1..=10 {
        acked_alert(&mut svc, n);
    }
    let first = collect(&mut dash, "safety_alert", 10);
    assert_eq!(first.len(), 10);
    let last_seq = first[9]["seq"].as_u64().unwrap();
    assert_eq!(first[9]["epoch"].as_u64(), Some(epoch));
    c.nodes[0].kill9();
    for n in 11..=25 {
        acked_alert(&mut svc, n);
    }
    // Another node, which never had a subscriber of fleet_a's alerts.
    let (mut back, reply) = resume_alerts(&c.nodes[2], epoch, last_seq);
    assert_eq!(reply["payload"]["recovered"], true, "{reply}");
    assert_eq!(reply["payload"]["epoch"].as_u64(), Some(epoch));
    let gap = collect(&mut back, "safety_alert", 15);
    let ns: Vec<u64> = gap
        .iter()
        .map(|v| v["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (11..=25).collect::<Vec<_>>(), "exactly the gap");
    back.expect_silence(Duration::from_millis(300));
}

#[test]
fn snapshots_and_dedup_span_nodes() {
    let Some(c) = cluster(2) else { return };
    let [n0, n1] = [&c.nodes[0], &c.nodes[1]];
    // Positions accepted by node 0 while node 1 has no subscriber of them.
    let mut dev = n0.connect("fleet_a", Role::Device);
    for v in 0..5 {
        dev.send(location(&format!("v{v}"), 1.0));
    }
    dev.send(location("v0", 2.0));
    // Published to NATS (and the bucket) once each.
    wait_until("positions sent", Duration::from_secs(10), || {
        n0.metric("fleetcast_cluster_sent_total") == 6
    });
    let mut dash = n1.connect("fleet_a", Role::Viewer);
    dash.subscribe("vehicle_locations", json!({}));
    let snap = collect(&mut dash, "location_update", 5);
    assert_eq!(snap.len(), 5, "one newest value per vehicle");
    let v0 = snap
        .iter()
        .find(|v| v["payload"]["vehicle_id"] == "v0")
        .unwrap();
    assert_eq!(
        v0["payload"]["location"]["latitude"], 2.0,
        "the newest value"
    );
    dash.expect_silence(Duration::from_millis(300));

    // The same publish id through two nodes: stored once.
    let mut alerts = n1.connect("fleet_a", Role::Viewer);
    alerts.subscribe("alerts", json!({}));
    let mut svc0 = n0.connect("fleet_a", Role::Service);
    let mut svc1 = n1.connect("fleet_a", Role::Service);
    let first = acked_alert(&mut svc0, 7);
    assert!(first["payload"]["seq"].as_u64().is_some(), "{first}");
    let retry = acked_alert(&mut svc1, 7);
    assert!(retry["payload"]["seq"].is_null(), "a duplicate: {retry}");
    assert_eq!(collect(&mut alerts, "safety_alert", 1).len(), 1);
    alerts.expect_silence(Duration::from_millis(500));
}

#[test]
fn a_dashboard_joining_while_positions_stream_in_sees_each_once_in_order() {
    const VEHICLES: usize = 10;
    const ROUNDS: usize = 80;
    let Some(c) = cluster(2) else { return };
    let addr = c.nodes[0].addr;
    // One device on node 0 streams positions (every vehicle every ~20 ms, the latitude
    // rising) while a dashboard on node 1, which followed nothing, subscribes: its
    // snapshot comes from the bucket while live updates keep arriving.
    let device = std::thread::spawn(move || {
        let mut dev = Client::connect(&format!(
            "ws://{addr}/v1/streaming/websocket?api_key={}",
            key("fleet_a", Role::Device)
        ));
        for round in 1..=ROUNDS {
            for v in 0..VEHICLES {
                dev.send(location(&format!("v{v}"), round as f64));
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        dev.expect_silence(Duration::from_millis(100));
    });
    std::thread::sleep(Duration::from_millis(400));
    let mut dash = c.nodes[1].connect("fleet_a", Role::Viewer);
    dash.subscribe("vehicle_locations", json!({}));
    device.join().unwrap();
    let mut lats: Vec<Vec<f64>> = vec![Vec::new(); VEHICLES];
    let end = Instant::now() + Duration::from_secs(15);
    while lats.iter().any(|l| l.last() != Some(&(ROUNDS as f64))) && Instant::now() < end {
        if let Ok(v) = dash.next(Duration::from_millis(500))
            && v["type"] == "location_update"
        {
            let id = v["payload"]["vehicle_id"].as_str().unwrap();
            let i: usize = id[1..].parse().unwrap();
            lats[i].push(v["payload"]["location"]["latitude"].as_f64().unwrap());
        }
    }
    dash.expect_silence(Duration::from_millis(300));
    for (v, l) in lats.iter().enumerate() {
        assert!(
            l.windows(2).all(|w| w[0] < w[1]),
            "v{v}: snapshot then live, each position once and never an older one: {l:?}"
        );
        assert_eq!(l.last(), Some(&(ROUNDS as f64)), "v{v}: the newest: {l:?}");
    }
}

#[test]
fn nothing_acknowledged_is_lost_when_nats_restarts_or_goes_away() {
    let Some(mut c) = cluster(2) else { return };
    let mut dash = c.nodes[1].connect("fleet_a", Role::Viewer);
    let sub = dash.subscribe("alerts", json!({}));
    let epoch = sub["payload"]["epoch"].as_u64().unwrap();
    let mut locs = c.nodes[0].connect("fleet_a", Role::Viewer);
    locs.subscribe("vehicle_locations", json!({}));
    let mut svc = c.nodes[0].connect("fleet_a", Role::Service);
    let mut acked = Vec::new();
    for n in 1..=10 {
        if acked_alert(&mut svc, n)["payload"]["seq"].is_u64() {
            acked.push(n);
        }
    }
    // NATS goes away.
    c.nats.kill();
    wait_until("readyz to say degraded", Duration::from_secs(10), || {
        c.nodes[0].get("/readyz").1.contains("degraded")
    });
    assert_eq!(
        c.nodes[0].get("/readyz").0,
        200,
        "local traffic still served"
    );
    // Local traffic flows on the node.
    let mut dev = c.nodes[0].connect("fleet_a", Role::Device);
    dev.send(location("local", 5.0));
    assert_eq!(collect(&mut locs, "location_update", 1).len(), 1);
    // An alert cannot be stored: refused, not acknowledged.
    let mut m = alert(11);
    m["ack"] = json!(true);
    svc.send(m);
    let refused = svc.expect("error");
    assert_eq!(refused["payload"]["code"], 503, "{refused}");
    // NATS is back (same store on disk): the link comes back and the stream goes on.
    c.nats.up();
    wait_until("the link to come back", Duration::from_secs(20), || {
        c.nodes[0].metric("fleetcast_cluster_connected") == 1
            && c.nodes[1].metric("fleetcast_cluster_connected") == 1
    });
    for n in 12..=20 {
        let a = acked_alert(&mut svc, n);
        if a["payload"]["seq"].is_u64() {
            acked.push(n);
        }
    }
    assert!(
        acked.len() >= 15,
        "most publishes were acknowledged: {acked:?}"
    );
    // Every acknowledged alert reaches the dashboard, live or on resume from the stream.
    let mut seen: Vec<u64> = collect(&mut dash, "safety_alert", acked.len())
        .iter()
        .map(|v| v["payload"]["n"].as_u64().unwrap())
        .collect();
    if seen.len() < acked.len() {
        let (mut again, _) = resume_alerts(&c.nodes[1], epoch, 0);
        seen = collect(&mut again, "safety_alert", acked.len())
            .iter()
            .map(|v| v["payload"]["n"].as_u64().unwrap())
            .collect();
    }
    for n in &acked {
        assert!(
            seen.contains(n),
            "acknowledged alert {n} lost: seen {seen:?}"
        );
    }
    assert!(!seen.contains(&11), "the refused alert was not stored");
}

#[test]
fn alerts_stored_after_nats_lost_stored_ones_are_delivered_with_a_new_epoch() {
    let Some(mut c) = cluster(2) else { return };
    let mut dash = c.nodes[1].connect("fleet_a", Role::Viewer);
    let epoch = dash.subscribe("alerts", json!({}))["payload"]["epoch"]
        .as_u64()
        .unwrap();
    let mut svc = c.nodes[0].connect("fleet_a", Role::Service);
    let received = |dash: &mut Client, n: usize| -> Vec<(u64, u64, u64)> {
        collect(dash, "safety_alert", n)
            .iter()
            .map(|v| {
                let field = |f: &Value| f.as_u64().unwrap();
                (
                    field(&v["payload"]["n"]),
                    field(&v["seq"]),
                    field(&v["epoch"]),
                )
            })
            .collect()
    };
    let relink = |c: &Cluster| {
        wait_until("the links to come back", Duration::from_secs(20), || {
            c.nodes
                .iter()
                .all(|n| n.metric("fleetcast_cluster_connected") == 1)
        })
    };
    for n in 1..=5 {
        acked_alert(&mut svc, n);
    }
    let old: Vec<_> = (1..=5).map(|n| (n, n, epoch)).collect();
    assert_eq!(received(&mut dash, 5), old);
    // An operator keeps a copy of the store, NATS goes on and stores alerts 6-10 (the
    // dashboard gets them), then the server is restored from the copy: 6-10 are gone.
    c.nats.stop();
    let store = c.nats.dir.clone();
    let copy = store.with_extension("copy");
    copy_dir(&store, &copy);
    c.nats.up();
    relink(&c);
    for n in 6..=10 {
        acked_alert(&mut svc, n);
    }
    let lost: Vec<_> = (6..=10).map(|n| (n, n, epoch)).collect();
    assert_eq!(received(&mut dash, 5), lost);
    assert_eq!(
        c.nodes[1].metric("fleetcast_cluster_stream_rewinds_total"),
        0,
        "a restart that lost nothing is no rewind"
    );
    c.nats.stop();
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::rename(&copy, &store).unwrap();
    c.nats.up();
    relink(&c);
    // New alerts take positions 6-10 again: each reaches the dashboard, once, at those
    // positions of a new epoch (a client never sees one (epoch, seq) twice).
    for n in 11..=15 {
        let ack = acked_alert(&mut svc, n);
        assert_eq!(ack["payload"]["seq"], n - 5, "{ack}");
    }
    let new = received(&mut dash, 5);
    assert_eq!(
        new.iter().map(|a| (a.0, a.1)).collect::<Vec<_>>(),
        (11..=15).map(|n| (n, n - 5)).collect::<Vec<_>>(),
        "{new:?}"
    );
    let new_epoch = new[0].2;
    assert!(new_epoch > epoch, "{new:?}");
    assert!(new.iter().all(|a| a.2 == new_epoch), "{new:?}");
    dash.expect_silence(Duration::from_millis(300));
    assert_eq!(
        c.nodes[1].metric("fleetcast_cluster_stream_rewinds_total"),
        1,
        "the node saw the stream lose what it had delivered"
    );
    // Positions of the new epoch resume; the old epoch's are not claimed as recovered.
    let (mut again, sub) = resume_alerts(&c.nodes[1], new_epoch, 7);
    assert_eq!(sub["payload"]["recovered"], true, "{sub}");
    let replay = received(&mut again, 3);
    assert_eq!(
        replay.iter().map(|a| a.0).collect::<Vec<_>>(),
        [13, 14, 15],
        "{replay:?}"
    );
    let (_, sub) = resume_alerts(&c.nodes[1], epoch, 8);
    assert_eq!(sub["payload"]["recovered"], false, "{sub}");
}

#[test]
fn with_three_replicas_the_loss_of_a_nats_server_loses_no_acknowledged_alert() {
    let dir = temp_dir("trio");
    let Some(mut trio) = NatsTrio::start(&dir.0) else {
        return;
    };
    let nodes: Vec<NodeProc> = (0..2)
        .map(|i| NodeProc::start(&dir.0, &format!("node{i}"), &trio.urls(), "replicas = 3"))
        .collect();
    let mut dash = nodes[1].connect("fleet_a", Role::Viewer);
    let epoch = dash.subscribe("alerts", json!({}))["payload"]["epoch"]
        .as_u64()
        .unwrap();
    let mut svc = nodes[0].connect("fleet_a", Role::Service);
    for n in 1..=10 {
        publish_until_stored(&mut svc, n);
    }
    let ns = |got: Vec<Value>| -> Vec<u64> {
        got.iter()
            .map(|v| v["payload"]["n"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        ns(collect(&mut dash, "safety_alert", 10)),
        (1..=10).collect::<Vec<_>>()
    );
    // The server that leads the alerts stream dies: another takes over with its copy.
    let leader = trio
        .stream_leader("fctest_ev_fleet_a_alerts")
        .expect("the stream has a leader");
    let i: usize = leader[1..].parse().unwrap();
    trio.servers[i].kill();
    for n in 11..=20 {
        publish_until_stored(&mut svc, n);
    }
    // The operator brings the server back. (nats-server 2.9 may go on placing new
    // consumers on a peer it has not yet found dead, for tens of seconds: both nodes
    // retry, but the test does not wait that out.)
    trio.servers[i].up();
    wait_until(
        "JetStream to have a leader",
        Duration::from_secs(30),
        || (0..3).all(|s| trio.jsz(s, "")["meta_cluster"]["leader"].is_string()),
    );
    assert_eq!(
        ns(collect(&mut dash, "safety_alert", 10)),
        (11..=20).collect::<Vec<_>>(),
        "every alert after the loss, once, in order"
    );
    dash.expect_silence(Duration::from_millis(300));
    // The whole history is still there, from the other node.
    let (mut again, sub) = resume_alerts(&nodes[0], epoch, 0);
    assert_eq!(sub["payload"]["recovered"], true, "{sub}");
    assert_eq!(
        ns(collect(&mut again, "safety_alert", 20)),
        (1..=20).collect::<Vec<_>>()
    );
    for n in &nodes {
        assert_eq!(n.metric("fleetcast_cluster_stream_rewinds_total"), 0);
    }
}

/// The JSON answer to an iTrack `subscribe` with `hash` on `node` (`/v2/event/subscription`).
fn itrack_subscribe(node: &NodeProc, hash: &str) -> Value {
    let mut c = Client::connect(&format!(
        "ws://{}/v2/event/subscription?X-Atmosphere-tracking-id=0&X-Atmosphere-Framework=2.3.6-javascript\
         &X-Atmosphere-Transport=websocket&Content-Type=application/json&X-atmo-protocol=true",
        node.addr
    ));
    c.set_timeout(Duration::from_secs(5));
    c.ws.send(tungstenite::Message::text(
        json!({"action":"subscribe","hash":hash,"events":["state"],"trackers":[15564]}).to_string(),
    ))
    .unwrap();
    for _ in 0..10 {
        if let Ok(tungstenite::Message::Text(t)) = c.ws.read()
            && let Ok(v) = serde_json::from_str::<Value>(t.as_str())
        {
            return v;
        }
    }
    panic!("no answer to subscribe")
}

#[test]
fn an_itrack_session_opens_on_every_node_and_a_logout_ends_it_everywhere() {
    let password = "pw-ops-0123456789";
    let users = format!(
        "\n[[itrack.users]]\nlogin = \"ops\"\npassword_hash = \"{}\"\ntenant = \"fleet_a\"\n\
         trackers = [\"*\"]\n",
        fleetcast::sessions::hash_password(password).unwrap()
    );
    let Some(c) = cluster_with(2, &users) else {
        return;
    };
    let (status, body) = c.nodes[0].get(&format!("/v2/user/auth?login=ops&password={password}"));
    assert_eq!(status, 200, "{body}");
    let hash = serde_json::from_str::<Value>(&body).unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    // Node 1 never saw the login: the session reached it through the cluster.
    let mut answer = Value::Null;
    wait_until("the session on node 1", Duration::from_secs(5), || {
        answer = itrack_subscribe(&c.nodes[1], &hash);
        answer["type"] == "response"
    });
    assert_eq!(answer["action"], "subscription/subscribe", "{answer}");
    // A logout on node 1 ends it on node 0 too.
    let (status, body) = c.nodes[1].get(&format!("/v2/user/logout?hash={hash}"));
    assert_eq!(status, 200, "{body}");
    wait_until("the logout on node 0", Duration::from_secs(5), || {
        itrack_subscribe(&c.nodes[0], &hash)["status"]["code"] == 3
    });
    // A made-up hash opens nothing anywhere.
    assert_eq!(
        itrack_subscribe(&c.nodes[1], &"0".repeat(32))["status"]["code"],
        3
    );
}

#[test]
fn derived_fleet_metrics_count_the_whole_cluster_on_every_node() {
    let Some(c) = cluster_with(3, "\n[history]\nmetrics_interval_ms = 300\n") else {
        return;
    };
    let mut dashes: Vec<Client> = [1, 2]
        .iter()
        .map(|&i| {
            let mut d = c.nodes[i].connect("fleet_a", Role::Viewer);
            d.subscribe("fleet_metrics", json!({}));
            d
        })
        .collect();
    // Vehicles and alerts arrive at node 0 only; nodes 1 and 2 have no subscriber of them.
    let mut dev = c.nodes[0].connect("fleet_a", Role::Device);
    for v in 0..7 {
        dev.send(location(&format!("v{v}"), 1.0));
    }
    let mut svc = c.nodes[0].connect("fleet_a", Role::Service);
    for n in 1..=3 {
        acked_alert(&mut svc, n);
    }
    for (i, d) in dashes.iter_mut().enumerate() {
        let mut last = Value::Null;
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(m) = d.next(Duration::from_millis(500))
                && m["type"] == "fleet_metrics"
            {
                last = m;
                if last["payload"]["metrics"]["active_vehicles"] == 7
                    && last["payload"]["alerts_summary"]["high"] == 3
                {
                    break;
                }
            }
        }
        assert_eq!(
            last["payload"]["metrics"]["active_vehicles"],
            7,
            "node {}: {last}",
            i + 1
        );
        assert_eq!(last["payload"]["alerts_summary"]["high"], 3, "{last}");
    }
}

#[test]
fn a_publisher_that_retries_loses_nothing_and_duplicates_nothing_across_a_nats_restart() {
    const TOTAL: u64 = 150;
    let Some(mut c) = cluster(2) else { return };
    let mut dash = c.nodes[1].connect("fleet_a", Role::Viewer);
    dash.subscribe("alerts", json!({}));
    let addr = c.nodes[0].addr;
    let publisher = std::thread::spawn(move || {
        let mut svc = Client::connect(&format!(
            "ws://{addr}/v1/streaming/websocket?api_key={}",
            key("fleet_a", Role::Service)
        ));
        let mut refused = 0;
        for n in 1..=TOTAL {
            refused += publish_until_stored(&mut svc, n);
            std::thread::sleep(Duration::from_millis(5));
        }
        refused
    });
    std::thread::sleep(Duration::from_millis(300));
    c.nats.kill();
    std::thread::sleep(Duration::from_millis(700));
    c.nats.up();
    let refused = publisher.join().unwrap();
    let mut seen: Vec<u64> = collect(&mut dash, "safety_alert", TOTAL as usize)
        .iter()
        .map(|v| v["payload"]["n"].as_u64().unwrap())
        .collect();
    dash.expect_silence(Duration::from_millis(500));
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every alert exactly once ({refused} publishes were refused while NATS was away)"
    );
    // NATS was away while publishing: the node lost its link and made a second one (the
    // publisher saw `refused` 503s, or none if the client's buffer bridged the gap).
    assert!(
        c.nodes[0].metric("fleetcast_cluster_connects_total") >= 2,
        "the link went down and came back ({refused} refused)"
    );
}

#[test]
fn an_http_publish_is_answered_once_the_stream_has_stored_it() {
    let Some(c) = cluster(2) else { return };
    let mut dash = c.nodes[1].connect("fleet_a", Role::Viewer);
    dash.subscribe("alerts", json!({}));
    dash.subscribe("vehicle_locations", json!({}));
    let body = [alert(1), alert(2), location("v9", 3.0), alert(1)]
        .iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let (status, text) = c.nodes[0].raw(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n{body}",
        key("fleet_a", Role::Service),
        body.len()
    ));
    assert_eq!(status, 202, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let results = v["results"].as_array().unwrap();
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["accepted", "accepted", "accepted", "duplicate"],
        "{v}"
    );
    // The alerts' positions are the stream's.
    assert_eq!(
        (results[0]["seq"].as_u64(), results[1]["seq"].as_u64()),
        (Some(1), Some(2))
    );
    let mut types = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while types.len() < 3 && Instant::now() < end {
        if let Ok(m) = dash.next(Duration::from_millis(500)) {
            types.push(m["type"].as_str().unwrap_or("").to_owned());
        }
    }
    types.sort();
    assert_eq!(types, ["location_update", "safety_alert", "safety_alert"]);
    dash.expect_silence(Duration::from_millis(300));
}
