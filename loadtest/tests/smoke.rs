//! Against a real broker: the `fleetcast` library started in this process with the
//! shipped small-fleet broker config, driven by the `fleetcast-load` binary.

use fleetcast::config::Config;
use fleetcast::model::Role;
use fleetcast::node::Node;
use fleetcast_load::scenario::{ConnKind, Plan, Scenario};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Waits for the child, killing it past `limit` (the test then fails, never hangs).
fn wait_at_most(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "fleetcast-load still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

#[test]
fn small_fleet_runs_against_the_broker_without_loss() {
    let mut cfg = Config::load(&scenarios().join("small-fleet.broker.toml")).unwrap();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shards = 2;
    cfg.server.shutdown_grace_ms = 500;
    let node = Node::start(cfg).expect("broker starts");
    let url = format!("ws://{}", node.local_addr());
    let out = std::env::temp_dir().join(format!("fleetcast-load-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_fleetcast-load"))
        .args(["run", "--scenario"])
        .arg(scenarios().join("small-fleet.toml"))
        .args([
            "--url",
            &url,
            "--duration",
            "3",
            "--dashboards",
            "12",
            "--quiet",
            "--socket-timestamps",
        ])
        // The broker runs in this test process.
        .args(["--broker-pid", &std::process::id().to_string()])
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleetcast-load starts");
    let run = wait_at_most(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    // About 4.5 s here (1 s ramp-up, 3 s window, drain, close); generous under CI load.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(stdout.contains("delivered"), "{stdout}");
    assert!(stderr.contains("open-file limit"), "{stderr}");

    let json = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    let r: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let d = &r["delivery"];
    assert_eq!(d["lost"], 0, "{stdout}");
    assert_eq!(d["duplicates"], 0, "{stdout}");
    assert_eq!(d["unexpected"], 0, "{stdout}");
    assert!(d["delivered"].as_u64().unwrap() > 0, "{stdout}");
    assert_eq!(d["delivered"], d["expected"], "{stdout}");
    assert_eq!(r["error_total"], 0, "{stdout}");
    assert_eq!(r["setup"]["dashboards"], 12);
    assert_eq!(r["connections"]["failed"], 0);
    assert!(r["published"]["alerts"].as_u64().unwrap() > 0);
    assert!(r["published"]["trip_events"].as_u64().unwrap() > 0);
    let lat = &r["latency_ms"];
    assert!(lat["count"].as_u64().unwrap() > 0);
    // Every delivery also has its kernel receive time, which is never after the read.
    let sock = &r["socket_latency_ms"];
    assert_eq!(sock["count"], lat["count"]);
    assert!(sock["max"].as_f64().unwrap() <= lat["max"].as_f64().unwrap());
    assert!(r["broker"]["rss_mib_peak"].as_f64().unwrap() > 0.0);
    // The broker's own counters moved (fleetcast serves /metrics on the same port).
    assert!(
        r["broker_metrics"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("fleetcast_deliveries_total")),
        "{}",
        r["broker_metrics"]
    );
    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(html.contains("<svg"));
    assert!(!html.contains("<script"));
    node.shutdown();
    let _ = std::fs::remove_dir_all(&out);
}

/// Each shipped scenario's broker config lists its keys with the right tenant and role
/// and raises the caps the scenario needs.
#[test]
fn shipped_scenarios_match_their_broker_configs() {
    for name in [
        "small-fleet",
        "city-fleet",
        "fanout",
        "idle",
        "reconnect-storm",
    ] {
        let s = Scenario::load(&scenarios().join(format!("{name}.toml"))).unwrap();
        assert_eq!(s.name, name);
        let cfg = Config::load(&scenarios().join(format!("{name}.broker.toml"))).unwrap();
        assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8000", "{name}");
        let plan = Plan::build(&s).unwrap();
        let l = &cfg.limits;
        assert!(
            l.max_connections >= plan.conns.len(),
            "{name}: max_connections"
        );
        for (ti, t) in s.tenants.iter().enumerate() {
            let count = |f: &dyn Fn(&ConnKind) -> bool| {
                plan.conns
                    .iter()
                    .filter(|c| c.tenant as usize == ti && f(&c.kind))
                    .count()
            };
            let uses = [
                (
                    &t.device_key,
                    Role::Device,
                    count(&|k| matches!(k, ConnKind::Vehicles { .. })),
                ),
                (
                    &t.viewer_key,
                    Role::Viewer,
                    count(&|k| matches!(k, ConnKind::Dashboard { .. })),
                ),
                (
                    &t.service_key,
                    Role::Service,
                    count(&|k| matches!(k, ConnKind::Service { .. })),
                ),
            ];
            for (key, role, conns) in uses {
                if conns == 0 {
                    continue;
                }
                let k = cfg
                    .auth
                    .api_keys
                    .iter()
                    .find(|k| &k.key == key)
                    .unwrap_or_else(|| panic!("{name}: key of {} {role:?} missing", t.id));
                assert_eq!(k.tenant, t.id, "{name}");
                assert_eq!(k.role, role, "{name}");
                assert!(
                    role != Role::Device || k.vehicles.iter().any(|v| v == "*"),
                    "{name}: device key limited to vehicles (it needs vehicles = [\"*\"])"
                );
                // One key is shared by every connection of the role: its user-wide
                // publish bucket must take the whole scenario's rate.
                assert!(
                    l.for_role(role).publishes_per_second >= 10_000 || role == Role::Viewer,
                    "{name}: {role:?} publishes_per_second"
                );
                let eff = l.for_role(role);
                assert!(
                    eff.max_connections_per_user >= conns,
                    "{name}: {role:?} per-user cap"
                );
                assert!(
                    eff.new_connections_per_minute_per_user as usize >= conns,
                    "{name}: {role:?} new connections per minute"
                );
            }
            let interval = t.update_interval_ms - 2.0 * t.jitter_ms;
            assert!(
                l.location_update_interval_ms == 0
                    || (l.location_update_interval_ms as f64) < interval,
                "{name}: location_update_interval_ms refuses the scenario's updates"
            );
        }
        let per_ip = plan.conns.len().div_ceil(s.source_addresses as usize);
        assert!(
            l.new_connections_per_minute_per_ip as usize >= per_ip,
            "{name}: per-ip"
        );
    }
}
