//! One run, start to finish: plan, limits, I/O threads, the coordinator's phases
//! (connect, publish window, drain, close), sampling and the live progress line.

use crate::capacity;
use crate::clock::{mono_ns, unix_s};
use crate::engine::{
    PHASE_CLOSE, PHASE_DRAIN, PHASE_RUN, Second, Shared, Target, Worker, latency_histogram,
};
use crate::report::{self, ProcUse, Report, RunData, Sample, Window, mib};
use crate::scenario::{Overrides, Plan, Scenario};
use crate::sys;
use anyhow::{Context, anyhow, bail, ensure};
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub overrides: Overrides,
    pub broker_pid: Option<u32>,
    /// Print the progress line.
    pub progress: bool,
    /// Read the broker's /metrics before and after (fleetcast extra; best effort).
    pub scrape_metrics: bool,
    /// Shown in reports (capacity steps).
    pub label: String,
    /// PEM file of the CA(s) to trust for `wss://` URLs.
    pub ca_file: Option<PathBuf>,
    /// Offer permessage-deflate on every connection (`--deflate`).
    pub deflate: bool,
}

/// Splits `ws://host:port/path?query` (or `wss://`) into (host:port, path-and-query or
/// "").
pub fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let (rest, port) = match url.strip_prefix("wss://") {
        Some(rest) => (rest, 443),
        None => (
            url.strip_prefix("ws://")
                .ok_or_else(|| anyhow!("url must start with ws:// or wss:// : {url:?}"))?,
            80,
        ),
    };
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    ensure!(!host.is_empty(), "url has no host: {url:?}");
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let path = if path == "/" { "" } else { path };
    Ok((host, path.to_string()))
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn query_encode(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

pub fn target(plan: &Plan, ca_file: Option<&Path>) -> anyhow::Result<Target> {
    let s = &plan.scenario;
    // Several brokers (a cluster): `ws://a:8000,ws://b:8001`; connection i goes to the
    // (i mod n)-th, publishers and dashboards alike. They share the first one's path
    // (and scheme).
    let urls: Vec<&str> = s.url.split(',').map(str::trim).collect();
    let resolve = |host: &str| -> anyhow::Result<SocketAddr> {
        host.to_socket_addrs()
            .with_context(|| format!("cannot resolve {host}"))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| anyhow!("{host} has no IPv4 address"))
    };
    let (host, url_path) = split_url(urls[0])?;
    let tls = match (s.url.starts_with("wss://"), ca_file) {
        (false, _) => None,
        (true, None) => {
            bail!("a wss:// url needs --ca-file (the CA that signed the broker's certificate)")
        }
        (true, Some(ca)) => {
            let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            Some(crate::tls::TlsTarget::new(ca, name)?)
        }
    };
    let addr = resolve(&host)?;
    let mut addrs = vec![addr];
    for u in &urls[1..] {
        addrs.push(resolve(&split_url(u)?.0)?);
    }
    let path = if url_path.is_empty() {
        s.path.clone()
    } else {
        url_path
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let req = |key: &str| format!("{path}{sep}api_key={}", query_encode(key));
    let requests = plan
        .tenants
        .iter()
        .zip(&s.tenants)
        .map(|(_, t)| [req(&t.device_key), req(&t.viewer_key), req(&t.service_key)])
        .collect();
    let loopback = addr.ip().is_loopback();
    Ok(Target {
        deflate: false,
        addr,
        addrs,
        host,
        sources: if loopback { s.source_addresses } else { 0 },
        requests,
        tls,
    })
}

/// CPU and memory of a process, sampled once a second.
struct ProcWatch {
    pid: String,
    last_cpu: Option<f64>,
    last_ns: u64,
    max_pct: f64,
    peak_rss: u64,
    last_rss: u64,
}

impl ProcWatch {
    fn new(pid: String) -> ProcWatch {
        ProcWatch {
            last_cpu: sys::cpu_seconds(&pid),
            last_ns: mono_ns(),
            pid,
            max_pct: 0.0,
            peak_rss: 0,
            last_rss: 0,
        }
    }

    /// (CPU % since the last sample, RSS bytes).
    fn sample(&mut self, in_window: bool) -> (Option<f64>, Option<u64>) {
        let now = mono_ns();
        let cpu = sys::cpu_seconds(&self.pid);
        let pct = match (cpu, self.last_cpu) {
            (Some(c), Some(l)) if now > self.last_ns => {
                Some((c - l) / ((now - self.last_ns) as f64 / 1e9) * 100.0)
            }
            _ => None,
        };
        self.last_cpu = cpu;
        self.last_ns = now;
        if in_window && let Some(p) = pct {
            self.max_pct = self.max_pct.max(p);
        }
        let rss = sys::memory(&self.pid).map(|(rss, hwm)| {
            self.peak_rss = self.peak_rss.max(rss).max(hwm);
            self.last_rss = rss;
            rss
        });
        (pct, rss)
    }

    fn usage(&self, window_cpu: f64, window_s: f64, pid: Option<u32>) -> ProcUse {
        ProcUse {
            pid,
            cpus: sys::affinity(pid.unwrap_or(0)),
            cpu_avg_pct: (window_cpu / window_s.max(1e-9) * 1000.0).round() / 10.0,
            cpu_max_pct: (self.max_pct * 10.0).round() / 10.0,
            cpu_seconds: (window_cpu * 1000.0).round() / 1000.0,
            rss_mib_end: mib(self.last_rss),
            rss_mib_peak: mib(self.peak_rss),
        }
    }
}

fn secs(ns: u64, t0: u64) -> f64 {
    ns.saturating_sub(t0) as f64 / 1e9
}

/// Runs the scenario once with the overrides; returns the report.
pub fn run(scenario: &Scenario, opts: &RunOptions) -> anyhow::Result<Report> {
    let s = scenario.with_overrides(&opts.overrides)?;
    let plan = Plan::build(&s)?;
    let fd = sys::raise_nofile();
    let needed = plan.conns.len() as u64;
    let budget = sys::fd_budget(&fd, needed).map_err(|e| anyhow!(e))?;
    eprintln!("{budget}");
    let mut target = target(&plan, opts.ca_file.as_deref())?;
    target.deflate = opts.deflate;
    if target.sources > 0 {
        let (lo, hi) = sys::port_range();
        let per_source = needed.div_ceil(target.sources as u64);
        let ports = (hi - lo + 1) as u64;
        ensure!(
            per_source <= ports,
            "{per_source} connections per source address exceed the {ports} ephemeral ports \
             ({lo}-{hi}): raise source_addresses / --source-addresses"
        );
    }
    if let Some(pid) = opts.broker_pid {
        ensure!(
            sys::cpu_seconds(&pid.to_string()).is_some(),
            "--broker-pid {pid}: no such process readable in /proc"
        );
    }
    let cpus = sys::cpus();
    let threads = if s.threads == 0 { cpus } else { s.threads }.clamp(1, plan.conns.len().max(1));
    let (loc, al, tr) = plan.offered_rates();
    eprintln!(
        "{}{}: {} connections ({} dashboards, {} vehicles, {} services) to {} from {} source \
         address(es), {} I/O thread(s); offered {:.0} publishes/s -> {:.0} deliveries/s",
        s.name,
        if opts.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", opts.label)
        },
        needed,
        plan.dashboards(),
        plan.vehicles(),
        plan.count(|k| matches!(k, crate::scenario::ConnKind::Service { .. })),
        target.addr,
        target.sources.max(1),
        threads,
        loc + al + tr,
        plan.offered_deliveries()
    );
    // /metrics is read in plaintext: not over a wss:// target (the broker's plain
    // listener may be elsewhere).
    let scrape = opts.scrape_metrics && target.tls.is_none();
    let metrics_before = if scrape {
        sys::scrape_metrics(target.addr, &target.host)
    } else {
        Default::default()
    };
    let started_unix_s = unix_s();
    let plan = Arc::new(plan);
    let target = Arc::new(target);
    let shared = Arc::new(Shared::new());
    let t0 = shared.t0_ns;
    let mut handles = Vec::new();
    for t in 0..threads {
        let globals: Vec<usize> = (t..plan.conns.len()).step_by(threads).collect();
        let w = Worker::new(
            plan.clone(),
            shared.clone(),
            target.clone(),
            &globals,
            threads,
        )
        .context("starting an I/O thread")?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("io-{t}"))
                .spawn(move || w.run())
                .context("spawning an I/O thread")?,
        );
    }

    let mut me = ProcWatch::new("self".into());
    let mut machine_last = sys::cpu_ticks();
    let mut machine_max: Vec<f64> = vec![0.0; machine_last.len()];
    let mut broker = opts.broker_pid.map(|p| ProcWatch::new(p.to_string()));
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = t0 + 1_000_000_000;
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let mut last_sent = 0u64;
    let mut last_delivered = 0u64;
    let total = needed;
    let mut phase_name = "connect";
    let mut in_window = false;
    let mut tick = |phase_name: &str,
                    in_window: bool,
                    samples: &mut Vec<Sample>,
                    me: &mut ProcWatch,
                    broker: &mut Option<ProcWatch>| {
        let now = mono_ns();
        if now < next_sample {
            return;
        }
        next_sample += 1_000_000_000;
        if next_sample <= now {
            next_sample = now + 1_000_000_000;
        }
        let (gen_pct, _) = me.sample(in_window);
        let (b_pct, b_rss) = match broker.as_mut() {
            Some(b) => b.sample(in_window),
            None => (None, None),
        };
        let ticks = sys::cpu_ticks();
        let machine = sys::cpu_percent(&machine_last, &ticks);
        machine_last = ticks;
        if in_window {
            for (m, (busy, _)) in machine_max.iter_mut().zip(&machine) {
                *m = m.max(*busy);
            }
        }
        let open = shared.open.load(Ordering::Relaxed);
        samples.push(Sample {
            t_s: secs(now, t0),
            open,
            generator_cpu_pct: gen_pct.unwrap_or(0.0),
            broker_cpu_pct: b_pct,
            broker_rss: b_rss,
            machine,
        });
        if !opts.progress {
            return;
        }
        let sent = shared.sent.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let owed = shared.expected.load(Ordering::Relaxed) - delivered as i64;
        let p99 = last_second_p99(&shared, now);
        let line = format!(
            "[{:6.1}s] {:<7} conns {}/{} ({} failed)  sent {:>7}/s  delivered {:>9}/s  in flight {:>8}  p99 {:>7} ms  errors {}  CPU gen {:.0}%{}",
            secs(now, t0),
            phase_name,
            shared.ready.load(Ordering::Relaxed),
            total,
            shared.failed.load(Ordering::Relaxed),
            sent - last_sent,
            delivered - last_delivered,
            owed,
            p99.map(report::ms3).unwrap_or_else(|| "-".into()),
            shared.errors.load(Ordering::Relaxed),
            gen_pct.unwrap_or(0.0),
            match (b_pct, b_rss) {
                (Some(c), Some(r)) => format!(" broker {c:.0}% {:.0} MiB", mib(r)),
                _ => String::new(),
            }
        );
        last_sent = sent;
        last_delivered = delivered;
        if tty {
            eprint!("\r{line:<width$}", width = last_line.len());
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
        last_line = line;
    };

    // Connect phase.
    let connect_deadline = t0 + ((s.ramp_up_s + s.connect_timeout_s + 2.0) * 1e9) as u64;
    loop {
        let done = shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= total || mono_ns() > connect_deadline {
            break;
        }
        tick(phase_name, in_window, &mut samples, &mut me, &mut broker);
        std::thread::sleep(Duration::from_millis(20));
    }
    let connected_ns = mono_ns();
    // The window starts shortly after, so every thread (polling at least every 50 ms)
    // sees it before its first publish is due.
    let start = connected_ns + 200_000_000;
    let end = start + (s.duration_s * 1e9) as u64;
    shared.start_ns.store(start, Ordering::Release);
    shared.end_ns.store(end, Ordering::Release);
    shared.phase.store(PHASE_RUN, Ordering::Release);
    phase_name = "run";
    let mut cpu_start = (None, None);
    let mut machine_start = Vec::new();
    loop {
        let now = mono_ns();
        if cpu_start.0.is_none() && now >= start {
            in_window = true;
            cpu_start = (
                sys::cpu_seconds("self"),
                opts.broker_pid
                    .and_then(|p| sys::cpu_seconds(&p.to_string())),
            );
            machine_start = sys::cpu_ticks();
        }
        if now >= end {
            break;
        }
        tick(phase_name, in_window, &mut samples, &mut me, &mut broker);
        std::thread::sleep(Duration::from_millis(
            ((end - now) / 1_000_000).clamp(1, 20),
        ));
    }
    let cpu_end = (
        sys::cpu_seconds("self"),
        opts.broker_pid
            .and_then(|p| sys::cpu_seconds(&p.to_string())),
    );
    let machine_end = sys::cpu_ticks();
    shared.phase.store(PHASE_DRAIN, Ordering::Release);
    phase_name = "drain";
    // Drain: until every owed delivery arrived, the drain time is up, or nothing moved
    // for two seconds.
    let drain_deadline = end + (s.drain_s * 1e9) as u64;
    let mut last_progress = (shared.delivered.load(Ordering::Relaxed), mono_ns());
    let drain_timed_out = loop {
        let now = mono_ns();
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let expected = shared.expected.load(Ordering::Relaxed);
        // Late sends of the window count once every thread has made them.
        let all_sent = shared.publishers_done.load(Ordering::Acquire) >= threads as u64;
        if all_sent && delivered as i64 >= expected {
            break false;
        }
        if delivered != last_progress.0 {
            last_progress = (delivered, now);
        }
        if now > drain_deadline || now > last_progress.1 + 2_000_000_000 {
            break true;
        }
        tick(phase_name, in_window, &mut samples, &mut me, &mut broker);
        std::thread::sleep(Duration::from_millis(5));
    };
    let drained_ns = mono_ns();
    in_window = false;
    tick(phase_name, in_window, &mut samples, &mut me, &mut broker);
    shared.phase.store(PHASE_CLOSE, Ordering::Release);
    if opts.progress && tty {
        eprintln!();
    }
    let mut workers = Vec::new();
    for h in handles {
        workers.push(h.join().map_err(|_| anyhow!("an I/O thread panicked"))?);
    }
    let metrics = if scrape {
        sys::metrics_delta(
            &metrics_before,
            &sys::scrape_metrics(target.addr, &target.host),
        )
    } else {
        Default::default()
    };
    let seconds: Vec<Second> = std::mem::take(&mut *shared.seconds.lock().expect("seconds"));
    let window_s = secs(end, start);
    let generator = me.usage(
        cpu_end.0.unwrap_or(0.0) - cpu_start.0.unwrap_or(0.0),
        window_s,
        Some(std::process::id()),
    );
    let broker_use = broker.as_ref().map(|b| {
        b.usage(
            cpu_end.1.unwrap_or(0.0) - cpu_start.1.unwrap_or(0.0),
            window_s,
            opts.broker_pid,
        )
    });
    let mut report = report::build(RunData {
        plan: (*plan).clone(),
        label: opts.label.clone(),
        url: s.url.clone(),
        started_unix_s,
        threads,
        cpus,
        fd,
        window: Window {
            connected_s: secs(connected_ns, t0),
            start_s: secs(start, t0),
            end_s: secs(end, t0),
            drained_s: secs(drained_ns, t0),
            drain_timed_out,
        },
        workers,
        seconds,
        samples,
        generator,
        broker: broker_use,
        machine_cpus: sys::cpu_percent(&machine_start, &machine_end)
            .into_iter()
            .enumerate()
            .map(|(cpu, (busy, si))| report::CpuUse {
                cpu,
                busy_avg_pct: (busy * 10.0).round() / 10.0,
                softirq_avg_pct: (si * 10.0).round() / 10.0,
                busy_max_pct: (machine_max.get(cpu).copied().unwrap_or(0.0) * 10.0).round() / 10.0,
            })
            .collect(),
        broker_metrics: metrics,
    });
    report.verdict = Some(capacity::evaluate(&report, &s.slo));
    Ok(report)
}

fn last_second_p99(shared: &Shared, now: u64) -> Option<f64> {
    let sec = (now.saturating_sub(shared.t0_ns) / 1_000_000_000) as u32;
    let want = sec.checked_sub(1)?;
    let secs = shared.seconds.lock().ok()?;
    let mut h = latency_histogram(2);
    for s in secs.iter().rev().take(64).filter(|s| s.sec == want) {
        let _ = h.add(&s.latency);
    }
    (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0)
}

/// `target/fleetcast-load/<name>-<timestamp>` under the current directory.
pub fn default_out(name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from("target")
        .join("fleetcast-load")
        .join(format!("{safe}-{}", crate::clock::compact(unix_s())))
}

/// Writes report.json and report.html into `dir`.
pub fn write_report(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(dir.join("report.json"), json)?;
    std::fs::write(dir.join("report.html"), report::html(r))?;
    Ok(())
}

/// Capacity mode: runs each step, stops at the first that breaks.
pub fn capacity(
    scenario: &Scenario,
    opts: &RunOptions,
    ramp: capacity::Ramp,
    values: &[f64],
    slo: crate::scenario::SloConfig,
    out: &Path,
    pause: Duration,
) -> anyhow::Result<capacity::CapacityReport> {
    let mut scenario = scenario.clone();
    scenario.slo = slo;
    let mut c = capacity::CapacityReport {
        tool: "fleetcast-load".into(),
        scenario: scenario.name.clone(),
        started_at: crate::clock::rfc3339(unix_s()),
        url: opts
            .overrides
            .url
            .clone()
            .unwrap_or_else(|| scenario.url.clone()),
        ramp: ramp.name().into(),
        slo,
        ..Default::default()
    };
    for (i, &v) in values.iter().enumerate() {
        let mut o = opts.clone();
        o.overrides = ramp.apply(&opts.overrides, v);
        o.label = format!(
            "step {}: {} = {}",
            i + 1,
            ramp.name(),
            capacity::fmt_value(v)
        );
        let r = match run(&scenario, &o) {
            Ok(r) => r,
            Err(e) => {
                if c.steps.is_empty() {
                    return Err(e);
                }
                eprintln!("step {} could not run: {e:#}", i + 1);
                break;
            }
        };
        let dir_name = format!(
            "step-{:02}-{}-{}",
            i + 1,
            ramp.name(),
            capacity::fmt_value(v)
        );
        write_report(&out.join(&dir_name), &r)?;
        let step = capacity::Step::from_report(v, &r, &dir_name);
        eprintln!(
            "step {}: {} = {}: {:.0} deliveries/s, loss {:.4}%, p99 {} ms -> {}",
            i + 1,
            ramp.name(),
            capacity::fmt_value(v),
            step.delivered_per_s,
            step.loss_ratio * 100.0,
            report::ms3(step.p99_ms),
            if step.held {
                "held".to_string()
            } else {
                format!("BROKE ({})", step.reasons.join("; "))
            }
        );
        let held = step.held;
        c.steps.push(step);
        c.conclude();
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&c)?)?;
        std::fs::write(out.join("report.html"), capacity::html(&c))?;
        if !held {
            break;
        }
        std::thread::sleep(pause);
    }
    if c.steps.is_empty() {
        bail!("no step ran");
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("ws://127.0.0.1:8000").unwrap(),
            ("127.0.0.1:8000".into(), "".into())
        );
        assert_eq!(
            split_url("ws://localhost:9/v1/streaming/websocket?x=1").unwrap(),
            ("localhost:9".into(), "/v1/streaming/websocket?x=1".into())
        );
        assert_eq!(
            split_url("ws://example.test/").unwrap(),
            ("example.test:80".into(), "".into())
        );
        assert_eq!(
            split_url("wss://localhost/x").unwrap(),
            ("localhost:443".into(), "/x".into())
        );
        assert!(split_url("ws:///x").is_err());
        assert_eq!(query_encode("ab-C_9.~"), "ab-C_9.~");
        assert_eq!(query_encode("a b&c"), "a%20b%26c");
    }

    #[test]
    fn targets_carry_keys_per_tenant_and_role() {
        let s = Scenario::from_toml(crate::report::tests::SCEN).unwrap();
        let plan = Plan::build(&s).unwrap();
        let t = target(&plan, None).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(t.sources, 4);
        assert_eq!(
            t.requests[0][1],
            "/v1/streaming/websocket?api_key=viewer-key-0123456789"
        );
    }

    #[test]
    fn default_out_dir() {
        let p = default_out("city fleet");
        let s = p.to_string_lossy();
        assert!(s.starts_with("target/fleetcast-load/city_fleet-20"), "{s}");
    }
}
