//! The shard's IO driver (`[server] io`, issue 16): io_uring runs when asked and the kernel
//! allows it; where the kernel or a sandbox refuses it, fleetcast says so and runs on mio.
//! (The whole suite runs on each driver in CI: `FLEETCAST_IO=io_uring`.)

use crate::support::*;
use fleetcast::config::IoDriver;
use fleetcast::model::Role;
use serde_json::json;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Installs a seccomp filter in the calling process that fails the io_uring system calls
/// with EPERM, as container runtimes' default profiles do.
fn refuse_io_uring() -> std::io::Result<()> {
    const NR: u32 = 0; // offsetof(struct seccomp_data, nr)
    const ARCH: u32 = 4; // offsetof(struct seccomp_data, arch)
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;
    let arch = if cfg!(target_arch = "x86_64") {
        AUDIT_ARCH_X86_64
    } else {
        AUDIT_ARCH_AARCH64
    };
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // io_uring_setup, io_uring_enter, io_uring_register: 425, 426, 427 on both.
    let mut filter = [
        stmt(load, ARCH),
        jeq(arch, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, NR),
        jeq(425, 3, 0),
        jeq(426, 2, 0),
        jeq(427, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: plain system calls on this (forked, not yet exec'd) process; `prog` and
    // `filter` outlive the call, which copies them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `fleetcast serve --io io_uring` in dev mode, optionally with io_uring refused; its
/// address, dev-mode keys, "listening" line, and its stderr (collected by a thread).
struct Served {
    child: Child,
    addr: std::net::SocketAddr,
    keys: std::collections::HashMap<String, String>,
    listening: String,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_io_uring(refused: bool) -> Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetcast"));
    cmd.args(["serve", "--io", "io_uring", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .env_remove("FLEETCAST_IO")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if refused {
        // SAFETY: `refuse_io_uring` only makes system calls (no allocation, no locks).
        unsafe { cmd.pre_exec(refuse_io_uring) };
    }
    let mut child = cmd.spawn().expect("spawn fleetcast");
    let (tx, stderr) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut keys = std::collections::HashMap::new();
    let mut line = String::new();
    let listening = loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read fleetcast's stdout");
        assert!(
            n > 0,
            "fleetcast exited before listening: {:?}",
            child.wait()
        );
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [role @ ("device" | "viewer"), key] = words[..] {
            keys.insert(role.to_string(), key.to_string());
        }
        if line.starts_with("listening on ") {
            break line.trim().to_string();
        }
    };
    // Keep reading stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    let addr = listening
        .strip_prefix("listening on ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {listening:?}"));
    Served {
        child,
        addr,
        keys,
        listening,
        stderr,
    }
}

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A viewer subscribed to locations sees a device's position: the broker works.
fn a_position_streams(s: &Served) {
    let url = |key: &str| format!("ws://{}/v1/streaming/websocket?api_key={key}", s.addr);
    let mut viewer = Client::connect(&url(&s.keys["viewer"]));
    viewer.subscribe("vehicle_locations", json!({}));
    let mut device = Client::connect(&url(&s.keys["device"]));
    device.send(location("truck-1", 12.5));
    assert_eq!(
        viewer.expect("location_update")["payload"]["vehicle_id"],
        "truck-1"
    );
}

#[test]
fn a_refused_io_uring_is_reported_and_mio_serves() {
    let s = serve_io_uring(true);
    assert!(
        s.listening.ends_with("(io: mio)"),
        "the banner names the driver in use: {:?}",
        s.listening
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    let warning = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = s.stderr.recv_timeout(left) else {
            panic!("no io_uring warning on stderr; saw {seen:?}");
        };
        if line.contains("io_uring refused") {
            break line;
        }
        seen.push(line);
    };
    assert!(
        warning.contains("WARN") && warning.contains("falling back to mio"),
        "{warning}"
    );
    // The kernel's answer is in the message, so an operator knows what refused it.
    assert!(warning.contains("Operation not permitted"), "{warning}");
    let metrics = get(s.addr, "/metrics");
    assert!(
        metrics.contains("fleetcast_io_driver{shard=\"0\",driver=\"mio\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("driver=\"io_uring\""), "{metrics}");
    a_position_streams(&s);
}

/// Whether this kernel and sandbox allow io_uring; where they do not, the io_uring test is
/// skipped unless `FLEETCAST_REQUIRE_IO_URING=1` (CI) makes that a failure.
fn io_uring_available() -> bool {
    match fleetcast::shard::uring_probe() {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var("FLEETCAST_REQUIRE_IO_URING").as_deref() != Ok("1"),
                "FLEETCAST_REQUIRE_IO_URING=1 but io_uring is refused here: {e}"
            );
            eprintln!("skipped: io_uring is refused here ({e})");
            false
        }
    }
}

#[test]
fn the_binary_runs_on_io_uring_when_asked() {
    if !io_uring_available() {
        return;
    }
    let s = serve_io_uring(false);
    assert!(s.listening.ends_with("(io: io_uring)"), "{:?}", s.listening);
    let metrics = get(s.addr, "/metrics");
    assert!(
        metrics.contains("fleetcast_io_driver{shard=\"0\",driver=\"io_uring\"} 1"),
        "{metrics}"
    );
    a_position_streams(&s);
}

/// On io_uring, what a receive buffer (4 KiB) or one send's slices (64 frames) cannot
/// hold arrives whole and in order: a 200 KiB publish batch over HTTP, and 2 000 events
/// queued to one subscriber in one burst.
#[test]
fn io_uring_carries_large_requests_and_bursts_whole() {
    if !io_uring_available() {
        return;
    }
    let mut cfg = config(1);
    cfg.server.io = IoDriver::IoUring;
    cfg.limits.max_http_body_bytes = 1 << 20;
    cfg.limits.max_batch = 2_000;
    cfg.limits.max_outbound_bytes = 64 << 20;
    cfg.limits.soft_outbound_bytes = 64 << 20;
    let b = Broker::start(cfg);
    assert_eq!(
        b.metric("fleetcast_io_driver", "driver=\"io_uring\""),
        1,
        "the shard runs on io_uring"
    );
    let mut viewer = b.connect_key(&key("fleet_a", Role::Viewer));
    viewer.subscribe("vehicle_locations", json!({}));
    let n = 2_000;
    let body: String = (0..n)
        .map(|i| location(&format!("v{i}"), 10.0 + f64::from(i) / 1e4).to_string() + "\n")
        .collect();
    assert!(body.len() > 200_000, "{}", body.len());
    let (status, reply) = b.http(&format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n{body}",
        key("fleet_a", Role::Service),
        body.len()
    ));
    assert_eq!(status, 202, "{reply}");
    for i in 0..n {
        let ev = viewer.expect("location_update");
        assert_eq!(ev["payload"]["vehicle_id"], format!("v{i}"), "in order");
    }
}
