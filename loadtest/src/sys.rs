//! The machine: open-file limit, ephemeral ports, CPUs, /proc readings of this process
//! and the broker, and (best effort) the broker's Prometheus counters.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// File descriptors kept for everything that is not a connection (poll and timer fds,
/// stdio, /proc reads, report files).
pub const FD_RESERVE: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

impl FdLimit {
    /// Connections this process can hold open.
    pub fn max_connections(&self) -> u64 {
        self.soft.saturating_sub(FD_RESERVE)
    }
}

/// Reads RLIMIT_NOFILE and raises the soft limit to the hard one.
pub fn raise_nofile() -> FdLimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return FdLimit {
            soft_before: 1024,
            soft: 1024,
            hard: 1024,
        };
    }
    let soft_before = r.rlim_cur;
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: raising the soft limit up to the hard limit is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    FdLimit {
        soft_before,
        soft: r.rlim_cur,
        hard: r.rlim_max,
    }
}

/// The explanation printed before a run (and the refusal when it does not fit).
pub fn fd_budget(limit: &FdLimit, needed: u64) -> Result<String, String> {
    let raised = if limit.soft_before < limit.soft {
        format!(" (soft limit raised from {})", limit.soft_before)
    } else {
        String::new()
    };
    let max = limit.max_connections();
    let line = format!(
        "open-file limit {} (hard {}){raised}: this process can open {max} connections \
         ({} kept for itself); this run opens {needed}",
        limit.soft, limit.hard, FD_RESERVE
    );
    if needed > max {
        Err(format!(
            "{line}.\nRefusing to start: lower --dashboards/--vehicles (or raise vehicles_per_connection), \
             or raise the hard limit (`ulimit -Hn`, /etc/security/limits.conf, systemd LimitNOFILE=) \
             and run again. The broker needs as many descriptors for its side."
        ))
    } else {
        Ok(line)
    }
}

/// The ephemeral port range (connections per source address to one server address).
pub fn port_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// CPUs this process may run on (respects taskset).
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Cumulative ticks of one CPU from /proc/stat.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTicks {
    pub busy: u64,
    pub softirq: u64,
    pub total: u64,
}

/// Per-CPU ticks (`cpu0`, `cpu1`, ... in order).
pub fn cpu_ticks() -> Vec<CpuTicks> {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return vec![];
    };
    parse_cpu_ticks(&s)
}

pub fn parse_cpu_ticks(s: &str) -> Vec<CpuTicks> {
    s.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let get = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal (guest is inside user).
            let idle = get(3) + get(4);
            let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
            CpuTicks {
                busy,
                softirq: get(6),
                total: busy + idle,
            }
        })
        .collect()
}

/// Busy and softirq percentages per CPU between two readings.
pub fn cpu_percent(a: &[CpuTicks], b: &[CpuTicks]) -> Vec<(f64, f64)> {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let t = b.total.saturating_sub(a.total).max(1) as f64;
            (
                b.busy.saturating_sub(a.busy) as f64 / t * 100.0,
                b.softirq.saturating_sub(a.softirq) as f64 / t * 100.0,
            )
        })
        .collect()
}

/// The CPUs a process may run on (0: this process).
pub fn affinity(pid: u32) -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the size passed is its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::sched_getaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if r != 0 {
        return vec![];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// CPU seconds (user + system) of a process from /proc/<pid>/stat.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ... utime(14) stime(15) -> indexes 11 and 12 here.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// (VmRSS, VmHWM) in bytes from /proc/<pid>/status.
pub fn memory(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:").unwrap_or(0)))
}

/// Fetches `http://addr/metrics` and sums the counters the report shows, over shards
/// (key: metric name plus its non-shard labels). Empty when the server has no such
/// endpoint: that is fine, it is a fleetcast extra.
pub fn scrape_metrics(addr: SocketAddr, host: &str) -> BTreeMap<String, f64> {
    const WANTED: [&str; 9] = [
        "fleetcast_publishes_total",
        "fleetcast_deliveries_total",
        "fleetcast_delivered_bytes_total",
        "fleetcast_bytes_out_total",
        "fleetcast_deflate_negotiated_total",
        "fleetcast_drops_total",
        "fleetcast_limit_breaches_total",
        "fleetcast_loop_busy_seconds_total",
        "fleetcast_connections_accepted_total",
    ];
    let mut out = BTreeMap::new();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return out;
    }
    let mut body = Vec::new();
    let _ = s.take(32 * 1024 * 1024).read_to_end(&mut body);
    let text = String::from_utf8_lossy(&body);
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return out;
    }
    for line in text.lines() {
        let Some(name) = WANTED.iter().find(|n| {
            line.strip_prefix(**n)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        }) else {
            continue;
        };
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let labels: Vec<&str> = series
            .find('{')
            .map(|i| &series[i + 1..series.len().saturating_sub(1)])
            .unwrap_or("")
            .split(',')
            .filter(|l| !l.is_empty() && !l.starts_with("shard="))
            .collect();
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

/// after - before, keeping the series that moved.
pub fn metrics_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d.abs() > 1e-9).then(|| (k.clone(), (d * 1000.0).round() / 1000.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_budget_refuses_with_an_explanation() {
        let l = FdLimit {
            soft_before: 1024,
            soft: 20_000,
            hard: 20_000,
        };
        assert_eq!(l.max_connections(), 20_000 - FD_RESERVE);
        let ok = fd_budget(&l, 11_000).unwrap();
        assert!(ok.contains("can open 19936 connections"), "{ok}");
        assert!(ok.contains("raised from 1024"), "{ok}");
        let err = fd_budget(&l, 30_000).unwrap_err();
        assert!(err.contains("Refusing to start"), "{err}");
    }

    #[test]
    fn own_process_readings() {
        let me = std::process::id().to_string();
        assert!(cpu_seconds(&me).is_some());
        let (rss, hwm) = memory(&me).unwrap();
        assert!(rss > 0 && hwm >= rss / 2);
        assert!(cpu_seconds("0").is_none());
        let (lo, hi) = port_range();
        assert!(lo < hi);
        assert!(raise_nofile().soft >= 16);
    }

    #[test]
    fn per_cpu_ticks() {
        let stat = "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 2 0 0 0\ncpu1 100 1 20 300 10 1 8 0 0 0\nintr 1\n";
        let t = parse_cpu_ticks(stat);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[1],
            CpuTicks {
                busy: 130,
                softirq: 8,
                total: 440
            }
        );
        let later = vec![
            CpuTicks {
                busy: 62,
                softirq: 12,
                total: 152,
            },
            t[1],
        ];
        let p = cpu_percent(&t, &later);
        assert_eq!(p[0], (50.0, 10.0));
        assert_eq!(p[1], (0.0, 0.0));
        assert!(!cpu_ticks().is_empty());
        assert!(!affinity(0).is_empty());
    }

    #[test]
    fn deltas() {
        let a = BTreeMap::from([("x".to_string(), 1.0), ("y".to_string(), 2.0)]);
        let b = BTreeMap::from([
            ("x".to_string(), 1.0),
            ("y".to_string(), 5.5),
            ("z".to_string(), 1.0),
        ]);
        let d = metrics_delta(&a, &b);
        assert_eq!(d.len(), 2);
        assert_eq!(d["y"], 3.5);
    }
}
