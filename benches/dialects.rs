//! Fan-out cost by dialect: one event to 1 000 subscribers, all native, against the same
//! 1 000 split evenly between native and Valtronics (SPEC §1 "encode once": once per
//! dialect, so a second dialect should add one encode per event, not per subscriber).
//!
//! `cargo bench --bench dialects -- --warm-up-time 1 --measurement-time 5`
//!
//! Each iteration encodes a fresh event (so its per-dialect frame cache is cold, as for
//! every event in production), queues it into every subscriber's [`Outbox`], then flushes
//! every outbox into a sink, as the shard does after a loop turn's routing. Subscribers of
//! the two dialects are interleaved, as connections are in a shard's slab. After the run
//! the ratio of the medians (split / native only) is printed, from criterion's estimates.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use fleetcast::auth::{DeviceScope, Principal};
use fleetcast::config::Limits;
use fleetcast::dialect::native::Parser;
use fleetcast::dialect::{self, DialectId, NATIVE, VALTRONICS};
use fleetcast::event::{Event, Publication};
use fleetcast::model::Role;
use fleetcast::session::{Action, AdmitAll, Ctx, Now, Session};
use fleetcast::shard::outbox::Outbox;
use fleetcast::wire::frame::Message;
use fleetcast::wire::handshake::Scope;
use std::hint::black_box;
use std::io;
use std::sync::Arc;
use std::time::Instant;

const SUBSCRIBERS: usize = 1000;
const GROUP: &str = "fanout_1000_by_dialect";

/// The Valtronics seed's `telemetry_update`, as a device publishes it on `/ws`.
const VALTRONICS_TELEMETRY: &str = r#"{"type":"telemetry_update","device_id":1,"telemetry":{"temperature":{"value":23.5,"unit":"°C"},"humidity":{"value":45.2,"unit":"%"}},"timestamp":"2024-01-01T12:00:00Z"}"#;

/// A native `safety_alert` (the seed's shape), shown to Valtronics subscribers as `alert`.
const NATIVE_ALERT: &str = r#"{"type":"safety_alert","id":"m1","timestamp":"2024-03-15T14:30:00Z","payload":{"alert_id":"alert_789","vehicle_id":"vehicle_001","driver_id":"driver_456","severity":"high","category":"harsh_braking","title":"Harsh braking detected","message":"Deceleration of 0.6 g at 52 km/h","location":{"latitude":40.7128,"longitude":-74.006},"metadata":{"g_force":0.6,"speed_kmh":52}}}"#;

/// The publication a session of dialect `d` makes of `msg` (as the shard gets it).
fn publication(d: DialectId, msg: &str) -> Publication {
    let limits = Limits::default();
    let auth = fleetcast::auth::Authenticator::new(&Default::default()).unwrap();
    let mut parser = Parser::default();
    let principal = Principal {
        user_id: "svc".into(),
        tenant: "fleet_001".into(),
        role: Role::Service,
        scope: DeviceScope::any(),
        expires_at: None,
        credential: Default::default(),
    };
    let now = Now {
        mono: Instant::now(),
        unix_ms: 1_710_513_000_000,
    };
    let mut s = Session::new(
        "c0-1-1".into(),
        Scope::None,
        Some(std::sync::Arc::new(principal)),
        now.mono,
        &limits,
    )
    .with_dialect(dialect::codec(d), None, &limits, now);
    let mut ctx = Ctx {
        limits: &limits,
        auth: &auth,
        parser: &mut parser,
        admission: &AdmitAll,
    };
    s.handle_message(now, Message::Text(msg.as_bytes()), &mut ctx);
    std::iter::from_fn(|| s.poll_action())
        .find_map(|a| match a {
            Action::Publish(p) => Some(p),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{} did not accept {msg}", dialect::codec(d).name()))
}

/// A fresh copy of `p` (what the next publish of the same message would be).
fn copy(p: &Publication) -> Publication {
    Publication {
        channel: p.channel,
        id: p.id.clone(),
        payload: p.payload.clone(),
        keys: p.keys.clone(),
        severity: p.severity.clone(),
        category: p.category.clone(),
        status: p.status.clone(),
        canon: p.canon.clone(),
        timestamp: p.timestamp.clone(),
        ts_ms: p.ts_ms,
        ack: p.ack,
        publisher: p.publisher.clone(),
        bind_check: p.bind_check,
    }
}

/// One event through the fan-out: encoded, queued to every outbox, every outbox flushed.
fn deliver(template: &Publication, seq: u64, outboxes: &mut [Outbox], soft: usize) -> u64 {
    let ev = Arc::new(Event::encode(
        "fleet_001".into(),
        copy(template),
        seq,
        1,
        b"\"evt_1\"",
        Instant::now(),
    ));
    for out in outboxes.iter_mut() {
        out.push_event(ev.clone(), soft);
    }
    let mut written = 0u64;
    for out in outboxes.iter_mut() {
        let flushed = out.flush(&mut io::sink(), |_| written += 1);
        debug_assert!(matches!(flushed, Ok(true)));
    }
    written
}

/// `SUBSCRIBERS` outboxes, every `every`-th one Valtronics (0: none).
fn outboxes(valtronics_every: usize) -> Vec<Outbox> {
    (0..SUBSCRIBERS)
        .map(|i| {
            let mut o = Outbox::default();
            if valtronics_every > 0 && i % valtronics_every == valtronics_every - 1 {
                o.set_dialect(VALTRONICS);
            }
            o
        })
        .collect()
}

fn fanout_by_dialect(c: &mut Criterion) {
    let soft = Limits::default().soft_outbound_bytes;
    let events = [
        ("telemetry", publication(VALTRONICS, VALTRONICS_TELEMETRY)),
        ("alert", publication(NATIVE, NATIVE_ALERT)),
    ];
    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for (name, template) in &events {
        let probe = Event::encode("f".into(), copy(template), 1, 1, b"\"e\"", Instant::now());
        for d in [NATIVE, VALTRONICS] {
            assert!(probe.frame_in(d).is_some(), "{name} has no {d:?} frame");
        }
        for (case, valtronics_every) in [("native_only", 0), ("half_valtronics", 2)] {
            let mut outs = outboxes(valtronics_every);
            let mut seq = 0u64;
            group.bench_function(BenchmarkId::new(case, name), |b| {
                b.iter(|| {
                    seq += 1;
                    black_box(deliver(template, seq, &mut outs, soft))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, fanout_by_dialect);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_ratios();
}

/// Prints, per event kind, the median of the split fan-out over the native-only one, read
/// from criterion's estimates of the last run (nothing if there are none, as under
/// `cargo test --benches` or a filter that skipped a case).
fn print_ratios() {
    let root = std::env::var_os("CRITERION_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| "target".into(), std::path::PathBuf::from)
                .join("criterion")
        });
    let median = |case: &str, name: &str| -> Option<f64> {
        let path = root
            .join(GROUP)
            .join(case)
            .join(name)
            .join("new/estimates.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        v["median"]["point_estimate"].as_f64()
    };
    for name in ["telemetry", "alert"] {
        if let (Some(a), Some(b)) = (median("native_only", name), median("half_valtronics", name)) {
            println!(
                "{GROUP}/{name}: median native_only {:.1} us, half_valtronics {:.1} us, ratio {:.3} (bound 1.2)",
                a / 1e3,
                b / 1e3,
                b / a
            );
        }
    }
}
