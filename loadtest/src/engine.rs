//! The I/O threads. Each owns a share of the connections (publishers and dashboards
//! alike), one mio `Poll` over their non-blocking sockets, a timerfd for the publish
//! schedule, and its own histograms and counters (merged when the run ends).
//!
//! Receive path per readable socket: one `read` of up to 256 KiB into the thread's
//! buffer (after the connection's carried partial frame), frames parsed in place,
//! `t_us`/`n`/vehicle found by substring search, one histogram record per delivery. No
//! allocation, no JSON parsing.
//!
//! Send path: a binary heap of (due time, connection, slot); the timerfd is armed at
//! the earliest due time (nanosecond resolution); a message carries its *scheduled*
//! time in `t_us`, so latency counts any lateness of the generator or of the broker's
//! reading (coordinated omission), and the lateness itself goes to the send-lag
//! histogram.

use crate::clock::{mono_ns, now_us, us_of};
use crate::scan::{self, Kind, PubId, Scanner};
use crate::scenario::{ConnKind, LocSub, Plan, Sub};
use crate::schedule::{
    CATEGORIES, Periodic, Rng, SEVERITIES, TRIP_EVENTS, alert_severity, mix64, spread_phase,
};
use crate::ws;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PHASE_CONNECT: u8 = 0;
pub const PHASE_RUN: u8 = 1;
pub const PHASE_DRAIN: u8 = 2;
pub const PHASE_CLOSE: u8 = 3;

/// Highest latency the histograms hold (60 s, in microseconds); larger ones saturate.
pub const MAX_LATENCY_US: u64 = 60_000_000;

pub fn latency_histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig).expect("valid histogram bounds")
}

/// One second of one thread (merged over threads by the report).
#[derive(Debug, Clone)]
pub struct Second {
    /// Seconds since the engine started.
    pub sec: u32,
    pub sent: u64,
    pub delivered: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
}

impl Second {
    pub fn new(sec: u32) -> Second {
        Second {
            sec,
            sent: 0,
            delivered: 0,
            errors: 0,
            latency: latency_histogram(2),
        }
    }
}

/// State the coordinator and the I/O threads share.
pub struct Shared {
    pub phase: AtomicU8,
    /// When the engine started (connect phase), CLOCK_MONOTONIC ns.
    pub t0_ns: u64,
    /// The publishing window [start, end).
    pub start_ns: AtomicU64,
    pub end_ns: AtomicU64,
    /// Connections open (and, for dashboards, subscribed).
    pub ready: AtomicU64,
    /// Connections that never became ready.
    pub failed: AtomicU64,
    /// Sockets with a completed upgrade, open now.
    pub open: AtomicI64,
    pub sent: AtomicU64,
    /// Live deliveries (t_us inside this run).
    pub delivered: AtomicU64,
    /// Live estimate of deliveries owed (sent x watchers, less rejections).
    pub expected: AtomicI64,
    pub errors: AtomicU64,
    /// Appended to every publish id, so a broker that deduplicates ids (fleetcast
    /// does, for 60 s) never mistakes this run's messages for an earlier run's.
    pub run_tag: u32,
    /// Threads that have sent everything of the window.
    pub publishers_done: AtomicU64,
    /// Completed seconds, pushed by the threads.
    pub seconds: Mutex<Vec<Second>>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            phase: AtomicU8::new(PHASE_CONNECT),
            t0_ns: mono_ns(),
            start_ns: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(u64::MAX),
            ready: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            open: AtomicI64::new(0),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            expected: AtomicI64::new(0),
            errors: AtomicU64::new(0),
            publishers_done: AtomicU64::new(0),
            run_tag: (crate::clock::now_us() / 1000 % 1_000_000_000) as u32,
            seconds: Mutex::new(Vec::new()),
        }
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Every broker (cluster): connection i goes to `addrs[i % len]` (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    /// Host header.
    pub host: String,
    /// Bind client sockets to 127.0.0.1 ..= 127.0.0.N (0: do not bind).
    pub sources: u32,
    /// Request target (path and query) per tenant: [device, viewer, service].
    pub requests: Vec<[String; 3]>,
    /// `wss://`: every connection runs TLS.
    pub tls: Option<crate::tls::TlsTarget>,
    /// Offer permessage-deflate (`--deflate`).
    pub deflate: bool,
}

#[derive(Debug, Clone)]
pub struct VehicleCounts {
    pub tenant: u32,
    pub first: u32,
    pub sent: Vec<u32>,
    pub rejected: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct ServiceCounts {
    pub tenant: u32,
    pub alerts_sent: [u64; 4],
    pub alerts_rejected: [u64; 4],
    pub trips_sent: u64,
    pub trips_rejected: u64,
}

#[derive(Debug, Clone)]
pub struct DashResult {
    pub tenant: u32,
    pub group: u32,
    pub index: u32,
    pub sub: Sub,
    /// Subscribed before the window opened (only these are owed anything).
    pub ready: bool,
    /// Why it ended early (failed to connect or subscribe, or closed during the run).
    pub ended: Option<String>,
    pub locations: u64,
    pub alerts: u64,
    pub trips: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub stale: u64,
    /// Cut by the storm.
    pub cut: bool,
    /// From the cut to every subscription answered again (µs).
    pub resumed_after_us: Option<u64>,
    /// Alerts and trip events received (also before the cut): what a storm dashboard
    /// is owed exactly (its locations come back as a snapshot).
    pub events: u64,
}

pub struct WorkerResult {
    pub latency: Histogram<u64>,
    /// Latency to the dashboard socket's kernel receive time (SO_TIMESTAMPNS): without
    /// the generator's own queueing before the read.
    pub socket_latency: Histogram<u64>,
    pub send_lag: Histogram<u64>,
    pub connect: Histogram<u64>,
    /// The TCP part of `connect`: its `connect()` call until the socket is writable.
    pub tcp: Histogram<u64>,
    /// The part of `connect` before its `connect()` call (the generator's own queue).
    pub connect_queue: Histogram<u64>,
    pub subscribe: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub vehicles: Vec<VehicleCounts>,
    pub services: Vec<ServiceCounts>,
    pub dashboards: Vec<DashResult>,
    /// Events whose `t_us` could not be found.
    pub unparsed: u64,
    /// Publishes queued behind unsent bytes (the broker was not reading).
    pub backpressured: u64,
    /// Bytes received on all sockets.
    pub bytes_in: u64,
    /// Control-group (non-storm) latency by publish time: before the storm, during it
    /// (`[at, at + spread + settle)`), after.
    pub control: [Histogram<u64>; 3],
    /// Storm: reconnects (TCP + upgrade) after the cut.
    pub reconnect: Histogram<u64>,
    /// Storm: `subscribed` replies with `"recovered":false`.
    pub not_recovered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Connecting,
    Upgrading,
    Open,
    Closed,
}

struct Vehicles {
    first: u32,
    sched: Vec<Periodic>,
    k: Vec<u32>,
    sent: Vec<u32>,
    rejected: Vec<u32>,
}

struct Service {
    index: u32,
    alert: Option<Periodic>,
    trip: Option<Periodic>,
    alert_k: u64,
    trip_k: u64,
    counts: ServiceCounts,
}

struct Dash {
    sub: Sub,
    group: u32,
    index: u32,
    pending: u32,
    sub_sent_ns: u64,
    /// Last `n` seen per vehicle of the tenant (location subscribers), modulo 256: one
    /// byte per vehicle keeps 1 000 dashboards x 1 000 vehicles in 1 MiB of cache.
    /// Order is judged by the wrapping difference, right while fewer than 128
    /// consecutive updates of a vehicle go missing (loss itself is counted exactly).
    last_n: Vec<u8>,
    /// For per-vehicle subscriptions: the watched vehicles (bitset).
    wanted: Vec<u64>,
    locations: u64,
    alerts: u64,
    trips: u64,
    duplicates: u64,
    unexpected: u64,
    stale: u64,
    /// Last alert position seen (`epoch`, `seq`), for the `since` resume.
    epoch: u64,
    seq: u64,
    /// Storm: when it was cut (0: never).
    cut_ns: u64,
    resumed_ns: u64,
    events: u64,
}

impl Dash {
    fn wants(&self, v: u32) -> bool {
        self.wanted.is_empty()
            || self
                .wanted
                .get(v as usize / 64)
                .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }
}

enum Role {
    Vehicles(Vehicles),
    Service(Box<Service>),
    Dashboard(Box<Dash>),
}

struct Conn {
    global: usize,
    tenant: u32,
    state: State,
    sock: Option<TcpStream>,
    /// The TLS session (`wss://`).
    tls: Option<Box<rustls::ClientConnection>>,
    start_at_ns: u64,
    started_ns: u64,
    /// When its `connect()` was actually called (after the others due in the same turn).
    issued_ns: u64,
    accept: String,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    frag: Vec<u8>,
    in_frag: bool,
    /// The fragmented message in progress is compressed (RSV1 on its first frame).
    frag_z: bool,
    rng: Rng,
    ready: bool,
    /// Counted in the worker's connections-being-opened.
    in_flight: bool,
    /// Set while processing input: end the connection with this error key.
    kill: Option<String>,
    ended: Option<String>,
    role: Role,
}

impl Conn {
    fn mask(&mut self) -> [u8; 4] {
        (self.rng.next_u64() as u32).to_ne_bytes()
    }

    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.mask();
        ws::write_frame(&mut self.out, opcode, payload, mask);
    }

    /// Writes queued bytes until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        let Some(sock) = self.sock.as_mut() else {
            return Ok(());
        };
        if let Some(tls) = self.tls.as_mut() {
            self.out_pos += crate::tls::write(tls, sock, &self.out[self.out_pos..])?;
            if self.out_pos == self.out.len() {
                self.out.clear();
                self.out_pos = 0;
            }
            return Ok(());
        }
        while self.out_pos < self.out.len() {
            match sock.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }

    fn pending_out(&self) -> bool {
        self.out_pos < self.out.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }
}

/// Per-thread measurement state (kept apart from the connections for borrowing).
struct Ctx {
    /// permessage-deflate offered (`--deflate`): RSV1 frames are inflated.
    deflate: bool,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    scanner: Scanner,
    phase: u8,
    start_ns: u64,
    start_us: u64,
    end_ns: u64,
    latency: Histogram<u64>,
    socket_latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    connect: Histogram<u64>,
    tcp: Histogram<u64>,
    connect_queue: Histogram<u64>,
    subscribe: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    sec: Second,
    /// CLOCK_REALTIME minus the generator's clock (µs), refreshed every second, to put
    /// kernel receive timestamps on the same scale as `t_us`.
    realtime_minus_mapped_us: i64,
    unparsed: u64,
    backpressured: u64,
    bytes_in: u64,
    delayed_acks: bool,
    socket_timestamps: bool,
    busy_poll: bool,
    // Not yet added to the shared counters.
    d_sent: u64,
    d_delivered: u64,
    d_expected: i64,
    d_errors: u64,
    control: [Histogram<u64>; 3],
    reconnect: Histogram<u64>,
    not_recovered: u64,
    /// Storm bounds on the generator's clock (µs): [cut, end of "during").
    storm_us: (u64, u64),
}

impl Ctx {
    fn error(&mut self, key: &str) {
        *self.errors.entry(key.to_string()).or_insert(0) += 1;
        self.sec.errors += 1;
        self.d_errors += 1;
    }

    fn flush_counters(&mut self) {
        let s = &self.shared;
        if self.d_sent > 0 {
            s.sent.fetch_add(self.d_sent, Ordering::Relaxed);
            self.d_sent = 0;
        }
        if self.d_delivered > 0 {
            s.delivered.fetch_add(self.d_delivered, Ordering::Relaxed);
            self.d_delivered = 0;
        }
        if self.d_expected != 0 {
            s.expected.fetch_add(self.d_expected, Ordering::Relaxed);
            self.d_expected = 0;
        }
        if self.d_errors > 0 {
            s.errors.fetch_add(self.d_errors, Ordering::Relaxed);
            self.d_errors = 0;
        }
    }

    fn roll_second(&mut self, now: u64) {
        let sec = (now.saturating_sub(self.shared.t0_ns) / 1_000_000_000) as u32;
        if sec > self.sec.sec {
            self.realtime_minus_mapped_us = realtime_minus_mapped_us();
            let done = std::mem::replace(&mut self.sec, Second::new(sec));
            self.shared.seconds.lock().expect("seconds lock").push(done);
        }
    }
}

const TIMER: Token = Token(usize::MAX - 1);
const READ_BUF: usize = 256 * 1024;
const READS_PER_EVENT: usize = 4;

pub struct Worker {
    poll: Poll,
    events: Events,
    timer: OwnedFd,
    armed_for: u64,
    target: Arc<Target>,
    conns: Vec<Conn>,
    next_connect: usize,
    in_flight: usize,
    max_in_flight: usize,
    connect_timeout_ns: u64,
    heap: BinaryHeap<Reverse<(u64, u32, u32)>>,
    rbuf: Vec<u8>,
    scratch: Vec<u8>,
    ready_again: Vec<usize>,
    ready_now: Vec<usize>,
    io_events: Vec<(usize, bool, bool)>,
    last_check_ns: u64,
    publishing_done: bool,
    /// Storm: the cut happened; the dashboards to reconnect, by start time.
    storm_done: bool,
    reconnects: Vec<usize>,
    next_reconnect: usize,
    ctx: Ctx,
}

impl Worker {
    /// A worker for the connections `globals` (indexes into `plan.conns`).
    pub fn new(
        plan: Arc<Plan>,
        shared: Arc<Shared>,
        target: Arc<Target>,
        globals: &[usize],
        threads: usize,
    ) -> io::Result<Worker> {
        let poll = Poll::new()?;
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        poll.registry()
            .register(&mut SourceFd(&timer.as_raw_fd()), TIMER, Interest::READABLE)?;
        let s = &plan.scenario;
        let total = plan.conns.len().max(1) as u64;
        let ramp_ns = (s.ramp_up_s * 1e9) as u64;
        let mut conns = Vec::with_capacity(globals.len());
        for &g in globals {
            let cp = &plan.conns[g];
            let tenant = &plan.tenants[cp.tenant as usize];
            let role = match &cp.kind {
                ConnKind::Vehicles { first, count } => Role::Vehicles(Vehicles {
                    first: *first,
                    sched: Vec::new(),
                    k: vec![0; *count as usize],
                    sent: vec![0; *count as usize],
                    rejected: vec![0; *count as usize],
                }),
                ConnKind::Service { index, .. } => Role::Service(Box::new(Service {
                    index: *index,
                    alert: None,
                    trip: None,
                    alert_k: 0,
                    trip_k: 0,
                    counts: ServiceCounts {
                        tenant: cp.tenant,
                        ..Default::default()
                    },
                })),
                ConnKind::Dashboard { group, index, sub } => {
                    let (last_n, wanted) = match &sub.locations {
                        LocSub::None => (Vec::new(), Vec::new()),
                        LocSub::Fleet => (vec![0; tenant.vehicles as usize], Vec::new()),
                        LocSub::Vehicles(vs) => {
                            let mut w = vec![0u64; (tenant.vehicles as usize).div_ceil(64)];
                            for &v in vs {
                                w[v as usize / 64] |= 1 << (v % 64);
                            }
                            (vec![0; tenant.vehicles as usize], w)
                        }
                    };
                    Role::Dashboard(Box::new(Dash {
                        sub: sub.clone(),
                        group: *group,
                        index: *index,
                        pending: 0,
                        sub_sent_ns: 0,
                        last_n,
                        wanted,
                        locations: 0,
                        alerts: 0,
                        trips: 0,
                        duplicates: 0,
                        unexpected: 0,
                        stale: 0,
                        epoch: 0,
                        seq: 0,
                        cut_ns: 0,
                        resumed_ns: 0,
                        events: 0,
                    }))
                }
            };
            conns.push(Conn {
                global: g,
                tenant: cp.tenant,
                state: State::Waiting,
                sock: None,
                tls: None,
                start_at_ns: shared.t0_ns + ramp_ns * g as u64 / total,
                started_ns: 0,
                issued_ns: 0,
                accept: String::new(),
                inbuf: Vec::new(),
                out: Vec::new(),
                out_pos: 0,
                frag: Vec::new(),
                in_frag: false,
                frag_z: false,
                rng: Rng::new(g as u64 ^ 0xC0FFEE),
                ready: false,
                in_flight: false,
                kill: None,
                ended: None,
                role,
            });
        }
        let max_in_flight = s.connect_concurrency.div_ceil(threads.max(1)).max(1);
        let connect_timeout_ns = (s.connect_timeout_s * 1e9) as u64;
        let ctx = Ctx {
            deflate: target.deflate,
            plan: plan.clone(),
            shared: shared.clone(),
            scanner: Scanner::default(),
            phase: PHASE_CONNECT,
            start_ns: u64::MAX,
            start_us: u64::MAX,
            end_ns: u64::MAX,
            latency: latency_histogram(3),
            socket_latency: latency_histogram(3),
            send_lag: latency_histogram(3),
            connect: latency_histogram(3),
            tcp: latency_histogram(3),
            connect_queue: latency_histogram(3),
            subscribe: latency_histogram(3),
            errors: BTreeMap::new(),
            sec: Second::new(0),
            realtime_minus_mapped_us: realtime_minus_mapped_us(),
            unparsed: 0,
            backpressured: 0,
            bytes_in: 0,
            delayed_acks: s.delayed_acks,
            socket_timestamps: s.socket_timestamps,
            busy_poll: s.busy_poll,
            d_sent: 0,
            d_delivered: 0,
            d_expected: 0,
            d_errors: 0,
            control: [
                latency_histogram(3),
                latency_histogram(3),
                latency_histogram(3),
            ],
            reconnect: latency_histogram(3),
            not_recovered: 0,
            storm_us: (u64::MAX, u64::MAX),
        };
        Ok(Worker {
            poll,
            events: Events::with_capacity(1024),
            timer,
            armed_for: u64::MAX,
            target,
            conns,
            next_connect: 0,
            in_flight: 0,
            max_in_flight,
            connect_timeout_ns,
            heap: BinaryHeap::new(),
            rbuf: vec![0; READ_BUF],
            scratch: Vec::with_capacity(1024),
            ready_again: Vec::new(),
            ready_now: Vec::new(),
            io_events: Vec::with_capacity(1024),
            last_check_ns: 0,
            publishing_done: false,
            storm_done: false,
            reconnects: Vec::new(),
            next_reconnect: 0,
            ctx,
        })
    }

    /// Runs until the coordinator moves to the close phase; returns the measurements.
    pub fn run(mut self) -> WorkerResult {
        loop {
            let now = mono_ns();
            let phase = self.ctx.shared.phase.load(Ordering::Acquire);
            if phase != self.ctx.phase {
                self.enter(phase);
            }
            if self.ctx.phase == PHASE_CLOSE {
                break;
            }
            if self.ctx.phase == PHASE_CONNECT {
                self.start_connects(now);
            } else {
                self.storm(now);
            }
            self.run_due();
            let now = mono_ns();
            if now.saturating_sub(self.last_check_ns) >= 100_000_000 {
                self.last_check_ns = now;
                self.check_deadlines(now);
            }
            self.ctx.roll_second(now);
            self.ctx.flush_counters();
            if self.ctx.phase >= PHASE_RUN && self.heap.is_empty() && !self.publishing_done {
                self.publishing_done = true;
                self.ctx
                    .shared
                    .publishers_done
                    .fetch_add(1, Ordering::Release);
            }
            self.arm_timer();
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                self.ctx.error(&format!("poll: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
            self.io_events.clear();
            for ev in self.events.iter() {
                self.io_events.push((
                    ev.token().0,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable() || ev.is_error(),
                ));
            }
            for i in std::mem::take(&mut self.ready_again) {
                self.on_readable(i);
                self.publish_if_due();
            }
            for k in 0..self.io_events.len() {
                let (tok, r, w) = self.io_events[k];
                if tok == TIMER.0 {
                    let mut b = [0u8; 8];
                    // SAFETY: reads 8 bytes into a local buffer from our own timerfd.
                    unsafe { libc::read(self.timer.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
                    continue;
                }
                if tok >= self.conns.len() {
                    continue;
                }
                if w {
                    self.on_writable(tok);
                }
                if r {
                    self.on_readable(tok);
                }
                // Under load one turn reads hundreds of sockets: publishing must not
                // wait for the turn to end (that would delay sends and, by convoy,
                // the broker's whole pipeline).
                self.publish_if_due();
            }
            // Connections read to their budget this turn are read again next turn.
            self.ready_again = std::mem::take(&mut self.ready_now);
        }
        self.close_all();
        self.ctx.roll_second(u64::MAX / 2);
        self.finish()
    }

    fn enter(&mut self, phase: u8) {
        let old = self.ctx.phase;
        self.ctx.phase = phase;
        if old == PHASE_CONNECT && phase >= PHASE_RUN {
            // Whatever is not ready now missed the start.
            for i in 0..self.conns.len() {
                if !self.conns[i].ready && self.conns[i].state != State::Closed {
                    let why = match self.conns[i].state {
                        State::Waiting => "timeout: not started before the window",
                        State::Open => "timeout: subscribe",
                        _ => "timeout: connect",
                    };
                    self.fail(i, why.to_string());
                }
            }
            let start = self.ctx.shared.start_ns.load(Ordering::Acquire);
            let end = self.ctx.shared.end_ns.load(Ordering::Acquire);
            self.ctx.start_ns = start;
            self.ctx.start_us = us_of(start);
            self.ctx.end_ns = end;
            if let Some(st) = self.ctx.plan.scenario.storm {
                let at = start + (st.at_s * 1e9) as u64;
                let until = at + ((st.spread_s + st.settle_s) * 1e9) as u64;
                self.ctx.storm_us = (us_of(at), us_of(until));
            }
            self.schedule_publishers(start, end);
        }
    }

    fn schedule_publishers(&mut self, start: u64, end: u64) {
        let plan = self.ctx.plan.clone();
        for (li, c) in self.conns.iter_mut().enumerate() {
            if c.state != State::Open {
                continue;
            }
            let t = &plan.tenants[c.tenant as usize];
            match &mut c.role {
                Role::Vehicles(v) => {
                    v.sched = (0..v.k.len() as u32)
                        .map(|s| {
                            let vehicle = (v.first + s) as u64;
                            Periodic {
                                start_ns: start,
                                phase_ns: spread_phase(vehicle, t.vehicles as u64, t.interval_ns),
                                interval_ns: t.interval_ns,
                                jitter_ns: t.jitter_ns,
                                seed: mix64(vehicle ^ ((c.tenant as u64) << 40)),
                            }
                        })
                        .collect();
                    for (s, p) in v.sched.iter().enumerate() {
                        let due = p.due(0);
                        if due < end {
                            self.heap.push(Reverse((due, li as u32, s as u32)));
                        }
                    }
                }
                Role::Service(svc) => {
                    let of = t.service_connections.max(1) as u64;
                    let index = svc.index as u64;
                    let mk = |rate: f64, salt: u64| {
                        (rate > 0.0).then(|| {
                            let interval_ns = (of as f64 * 1e9 / rate) as u64;
                            Periodic {
                                start_ns: start,
                                phase_ns: spread_phase(index, of, interval_ns)
                                    + interval_ns / (2 * of).max(1) * salt,
                                interval_ns: interval_ns.max(1),
                                jitter_ns: 0,
                                seed: 0,
                            }
                        })
                    };
                    svc.alert = mk(t.alerts_per_second, 0);
                    svc.trip = mk(t.trip_events_per_second, 1);
                    for (slot, p) in [(0u32, svc.alert), (1, svc.trip)] {
                        if let Some(p) = p
                            && p.due(0) < end
                        {
                            self.heap.push(Reverse((p.due(0), li as u32, slot)));
                        }
                    }
                }
                Role::Dashboard(_) => {}
            }
        }
    }

    /// The reconnect storm: at its time, close every storm dashboard's socket at once;
    /// then reconnect them at their spread start times, `connect_concurrency` at a time.
    fn storm(&mut self, now: u64) {
        let Some(st) = self.ctx.plan.scenario.storm else {
            return;
        };
        if self.ctx.phase >= PHASE_CLOSE {
            return;
        }
        let at = self.ctx.start_ns + (st.at_s * 1e9) as u64;
        if !self.storm_done && self.ctx.phase == PHASE_RUN && now >= at {
            self.storm_done = true;
            let spread_ns = (st.spread_s * 1e9) as u64;
            let total = self.ctx.plan.conns.len().max(1) as u64;
            for i in 0..self.conns.len() {
                let c = &mut self.conns[i];
                let Role::Dashboard(d) = &mut c.role else {
                    continue;
                };
                if !d.sub.storm || c.state != State::Open || !c.ready {
                    continue;
                }
                d.cut_ns = now;
                d.pending = 0;
                if let Some(mut sock) = c.sock.take() {
                    let _ = self.poll.registry().deregister(&mut sock);
                    // Dropped: closed without a close frame, as a network cut or a
                    // client crash would (the broker reads EOF).
                }
                c.tls = None;
                self.ctx.shared.open.fetch_sub(1, Ordering::Relaxed);
                c.state = State::Waiting;
                c.inbuf.clear();
                c.out.clear();
                c.out_pos = 0;
                c.frag.clear();
                c.in_frag = false;
                // Evenly over the spread, in an order unrelated to the connections'.
                let slot = mix64(c.global as u64 ^ 0x5707) % total;
                c.start_at_ns = at + spread_ns * slot / total;
                self.reconnects.push(i);
            }
            let conns = &self.conns;
            self.reconnects.sort_by_key(|&i| conns[i].start_at_ns);
        }
        while self.next_reconnect < self.reconnects.len() && self.in_flight < self.max_in_flight {
            let i = self.reconnects[self.next_reconnect];
            if self.conns[i].start_at_ns > now {
                break;
            }
            self.next_reconnect += 1;
            self.in_flight += 1;
            self.conns[i].in_flight = true;
            self.conns[i].ready = false;
            if let Err(e) = self.connect(i, now) {
                self.fail(i, format!("reconnect: tcp connect: {}", io_name(&e)));
            }
        }
    }

    fn start_connects(&mut self, now: u64) {
        while self.next_connect < self.conns.len() && self.in_flight < self.max_in_flight {
            let i = self.next_connect;
            if self.conns[i].start_at_ns > now {
                break;
            }
            self.next_connect += 1;
            self.in_flight += 1;
            self.conns[i].in_flight = true;
            if let Err(e) = self.connect(i, now) {
                self.fail(i, format!("tcp connect: {}", io_name(&e)));
            }
        }
    }

    fn connect(&mut self, i: usize, now: u64) -> io::Result<()> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let c = &mut self.conns[i];
        c.state = State::Connecting;
        c.started_ns = now;
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        if self.ctx.socket_timestamps && matches!(c.role, Role::Dashboard(_)) {
            set_int_opt(&sock, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
        }
        if self.target.sources > 0 {
            // The kernel picks the port at connect time, so each source address can
            // use the whole ephemeral range towards one server.
            set_int_opt(&sock, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
            let src = Ipv4Addr::new(
                127,
                0,
                0,
                1 + (c.global % self.target.sources as usize) as u8,
            );
            sock.bind(&SockAddr::from(SocketAddr::new(src.into(), 0)))?;
        }
        let addr = self.target.addrs[c.global % self.target.addrs.len()];
        c.issued_ns = mono_ns();
        match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let std_stream: std::net::TcpStream = sock.into();
        let mut stream = TcpStream::from_std(std_stream);
        self.poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        c.sock = Some(stream);
        c.tls = match &self.target.tls {
            Some(t) => Some(Box::new(t.session()?)),
            None => None,
        };
        Ok(())
    }

    fn on_writable(&mut self, i: usize) {
        let c = &mut self.conns[i];
        match c.state {
            State::Connecting => {
                let Some(sock) = c.sock.as_ref() else { return };
                match sock.take_error() {
                    Ok(Some(e)) | Err(e) => {
                        return self.fail(i, format!("tcp connect: {}", io_name(&e)));
                    }
                    Ok(None) => {}
                }
                match sock.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                    Err(e) => return self.fail(i, format!("tcp connect: {}", io_name(&e))),
                }
                if matches!(&c.role, Role::Dashboard(d) if d.cut_ns == 0) {
                    let took = mono_ns().saturating_sub(c.issued_ns) / 1000;
                    self.ctx.tcp.saturating_record(took);
                    let queued = c.issued_ns.saturating_sub(c.started_ns) / 1000;
                    self.ctx.connect_queue.saturating_record(queued);
                }
                let mut key = [0u8; 16];
                key[..8].copy_from_slice(&c.rng.next_u64().to_ne_bytes());
                key[8..].copy_from_slice(&c.rng.next_u64().to_ne_bytes());
                let key = ws::client_key(key);
                c.accept = ws::accept_for(&key);
                let role_ix = match c.role {
                    Role::Vehicles(_) => 0,
                    Role::Dashboard(_) => 1,
                    Role::Service(_) => 2,
                };
                let target = &self.target.requests[c.tenant as usize][role_ix];
                c.out.extend_from_slice(&ws::upgrade_request_with(
                    &self.target.host,
                    target,
                    &key,
                    self.target.deflate,
                ));
                c.state = State::Upgrading;
                if let Err(e) = c.flush() {
                    self.fail(i, format!("io: {}", io_name(&e)));
                }
            }
            State::Upgrading | State::Open => {
                if c.pending_out()
                    && let Err(e) = c.flush()
                {
                    self.fail(i, format!("io: {}", io_name(&e)));
                }
            }
            _ => {}
        }
    }

    fn on_readable(&mut self, i: usize) {
        if i >= self.conns.len() {
            return;
        }
        for round in 0..READS_PER_EVENT {
            let Worker {
                conns, rbuf, ctx, ..
            } = self;
            let c = &mut conns[i];
            if !matches!(c.state, State::Upgrading | State::Open) {
                return;
            }
            let Some(sock) = c.sock.as_mut() else { return };
            let carry = c.inbuf.len();
            if rbuf.len() < carry + READ_BUF {
                rbuf.resize(carry + READ_BUF, 0);
            }
            rbuf[..carry].copy_from_slice(&c.inbuf);
            let space = rbuf.len() - carry;
            let is_dash = matches!(c.role, Role::Dashboard(_));
            let mut arrived_ns = None;
            let got = if let Some(tls) = c.tls.as_mut() {
                crate::tls::read(tls, sock, &mut rbuf[carry..])
            } else if is_dash && ctx.socket_timestamps {
                recv_stamped(sock, &mut rbuf[carry..], &mut arrived_ns)
            } else {
                sock.read(&mut rbuf[carry..])
            };
            let n = match got {
                Ok(0) => {
                    let why = if c.state == State::Upgrading {
                        "eof during upgrade"
                    } else {
                        "eof"
                    };
                    return self.fail(i, why.to_string());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(i, format!("io: {}", io_name(&e))),
            };
            ctx.bytes_in += n as u64;
            if ctx.delayed_acks && is_dash {
                set_quickack_off(sock);
            }
            let total = carry + n;
            let read_us = now_us();
            let stamp = Stamp {
                read_us,
                // Kernel time (CLOCK_REALTIME) on the generator's clock; never after
                // the read.
                socket_us: arrived_ns.map(|ns| {
                    ((ns / 1000) as i64 - ctx.realtime_minus_mapped_us).clamp(0, read_us as i64)
                        as u64
                }),
            };
            let consumed = process(c, &rbuf[..total], stamp, ctx);
            c.inbuf.clear();
            c.inbuf.extend_from_slice(&rbuf[consumed..total]);
            if c.pending_out()
                && c.kill.is_none()
                && let Err(e) = c.flush()
            {
                c.kill = Some(format!("io: {}", io_name(&e)));
            }
            if let Some(why) = c.kill.take() {
                return self.fail(i, why);
            }
            if c.ready && c.in_flight {
                c.in_flight = false;
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            // A TLS read returns one record at a time: read until WouldBlock.
            if n < space && c.tls.is_none() {
                return;
            }
            if round + 1 == READS_PER_EVENT {
                self.ready_now.push(i);
            }
        }
    }

    fn fail(&mut self, i: usize, why: String) {
        let in_close = self.ctx.phase >= PHASE_CLOSE;
        let c = &mut self.conns[i];
        if c.state == State::Closed {
            return;
        }
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.tls = None;
        if c.state == State::Open {
            self.ctx.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
        let was_ready = c.ready || matches!(&c.role, Role::Dashboard(d) if d.cut_ns > 0);
        c.ready = was_ready;
        c.state = State::Closed;
        c.out = Vec::new();
        c.inbuf = Vec::new();
        if !was_ready {
            self.ctx.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        if c.in_flight {
            c.in_flight = false;
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        if c.ended.is_none() {
            c.ended = Some(why.clone());
        }
        if !in_close {
            self.ctx.error(&why);
        }
    }

    fn check_deadlines(&mut self, now: u64) {
        if self.ctx.phase != PHASE_CONNECT {
            return;
        }
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if c.ready || c.state == State::Closed || c.state == State::Waiting {
                continue;
            }
            if now > c.started_ns + self.connect_timeout_ns {
                let why = match c.state {
                    State::Open => "timeout: subscribe",
                    State::Upgrading => "timeout: upgrade",
                    _ => "timeout: connect",
                };
                self.fail(i, why.to_string());
            }
        }
    }

    fn poll_timeout(&self, now: u64) -> Duration {
        if !self.ready_again.is_empty() || self.ctx.busy_poll {
            return Duration::ZERO;
        }
        if let Some(Reverse((due, _, _))) = self.heap.peek()
            && *due <= now
        {
            return Duration::ZERO;
        }
        let mut ms = 50u64;
        if self.ctx.phase == PHASE_CONNECT
            && self.next_connect < self.conns.len()
            && self.in_flight < self.max_in_flight
        {
            let at = self.conns[self.next_connect].start_at_ns;
            ms = ms.min(at.saturating_sub(now).div_ceil(1_000_000));
        }
        if self.storm_done
            && self.next_reconnect < self.reconnects.len()
            && self.in_flight < self.max_in_flight
        {
            let at = self.conns[self.reconnects[self.next_reconnect]].start_at_ns;
            ms = ms.min(at.saturating_sub(now).div_ceil(1_000_000));
        } else if !self.storm_done
            && self.ctx.phase == PHASE_RUN
            && let Some(st) = self.ctx.plan.scenario.storm
        {
            let at = self.ctx.start_ns + (st.at_s * 1e9) as u64;
            ms = ms.min(at.saturating_sub(now).div_ceil(1_000_000));
        }
        Duration::from_millis(ms)
    }

    fn arm_timer(&mut self) {
        let Some(&Reverse((due, _, _))) = self.heap.peek() else {
            return;
        };
        if due == self.armed_for {
            return;
        }
        self.armed_for = due;
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (due / 1_000_000_000) as libc::time_t,
                tv_nsec: (due % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: our timerfd and a valid itimerspec; an absolute time on CLOCK_MONOTONIC.
        unsafe {
            libc::timerfd_settime(
                self.timer.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
    }

    fn publish_if_due(&mut self) {
        if let Some(&Reverse((due, _, _))) = self.heap.peek()
            && due <= mono_ns()
        {
            self.run_due();
        }
    }

    fn run_due(&mut self) {
        let mut now = mono_ns();
        let mut n = 0;
        while let Some(&Reverse((due, li, slot))) = self.heap.peek() {
            if due > now {
                now = mono_ns();
                if due > now {
                    break;
                }
            }
            self.heap.pop();
            self.publish(li as usize, slot, due, now);
            n += 1;
            if n % 64 == 0 {
                now = mono_ns();
            }
            // Far behind schedule: let the reads in between (the rest stays due).
            if n >= 4096 {
                break;
            }
        }
    }

    fn publish(&mut self, li: usize, slot: u32, due: u64, now: u64) {
        let Worker {
            conns,
            ctx,
            scratch,
            heap,
            ..
        } = self;
        let c = &mut conns[li];
        if c.state != State::Open {
            return;
        }
        let tenant = &ctx.plan.tenants[c.tenant as usize];
        let t_us = us_of(due);
        let tag = ctx.shared.run_tag;
        let t_s = due.saturating_sub(ctx.start_ns) as f64 / 1e9;
        scratch.clear();
        let next = match &mut c.role {
            Role::Vehicles(v) => {
                let s = slot as usize;
                let vehicle = v.first + slot;
                let n = v.k[s] as u64 + 1;
                let p = tenant.route.position(vehicle as u64, t_s);
                let _ = write!(
                    scratch,
                    r#"{{"type":"location_update","id":"L{vehicle}.{n}.{tag}","payload":{{"vehicle_id":"v{vehicle}","t_us":{t_us},"n":{n},"location":{{"latitude":{:.6},"longitude":{:.6},"speed":{:.1},"heading":{:.1}}}}}}}"#,
                    p.latitude, p.longitude, p.speed_kmh, p.heading_deg
                );
                v.k[s] += 1;
                v.sent[s] += 1;
                ctx.d_expected += tenant.loc_watchers[vehicle as usize] as i64;
                v.sched[s].due(v.k[s] as u64)
            }
            Role::Service(svc) => {
                let idx = svc.index;
                if slot == 0 {
                    svc.alert_k += 1;
                    let n = svc.alert_k;
                    let sev = alert_severity(idx as u64, n);
                    let h = mix64(n ^ ((idx as u64) << 32));
                    let vehicle = h % tenant.vehicles.max(1) as u64;
                    let cat = CATEGORIES[(h >> 32) as usize % CATEGORIES.len()];
                    let _ = write!(
                        scratch,
                        r#"{{"type":"safety_alert","id":"A{idx}.{n}.{tag}","payload":{{"alert_id":"a{idx}.{n}","severity":"{}","category":"{cat}","vehicle_id":"v{vehicle}","t_us":{t_us},"n":{n}}}}}"#,
                        SEVERITIES[sev]
                    );
                    svc.counts.alerts_sent[sev] += 1;
                    ctx.d_expected += tenant.alert_watchers[sev] as i64;
                    svc.alert.map(|p| p.due(svc.alert_k)).unwrap_or(u64::MAX)
                } else {
                    svc.trip_k += 1;
                    let n = svc.trip_k;
                    let h = mix64(n ^ ((idx as u64) << 32) ^ 0x7417);
                    let vehicle = h % tenant.vehicles.max(1) as u64;
                    // Trips of ten events: started, eight waypoints, completed.
                    let ev = match n % 10 {
                        1 => TRIP_EVENTS[0],
                        0 => TRIP_EVENTS[2],
                        _ => TRIP_EVENTS[1],
                    };
                    let _ = write!(
                        scratch,
                        r#"{{"type":"trip_event","id":"T{idx}.{n}.{tag}","payload":{{"trip_id":"trip-{idx}-{}","event":"{ev}","vehicle_id":"v{vehicle}","t_us":{t_us},"n":{n}}}}}"#,
                        (n - 1) / 10
                    );
                    svc.counts.trips_sent += 1;
                    ctx.d_expected += tenant.trip_watchers as i64;
                    svc.trip.map(|p| p.due(svc.trip_k)).unwrap_or(u64::MAX)
                }
            }
            Role::Dashboard(_) => return,
        };
        if c.pending_out() {
            ctx.backpressured += 1;
        }
        c.queue(ws::OP_TEXT, scratch);
        ctx.send_lag
            .saturating_record(now.saturating_sub(due) / 1000);
        ctx.d_sent += 1;
        ctx.sec.sent += 1;
        if next < ctx.end_ns {
            heap.push(Reverse((next, li as u32, slot)));
        }
        if let Err(e) = c.flush() {
            let why = format!("io: {}", io_name(&e));
            self.fail(li, why);
        }
    }

    fn close_all(&mut self) {
        let payload = ws::close_payload(1000, "done");
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            if c.state == State::Open {
                c.queue(ws::OP_CLOSE, &payload);
                let _ = c.flush();
                if let Some(s) = c.sock.as_ref() {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            }
            self.fail(i, "closed".to_string());
        }
    }

    fn finish(self) -> WorkerResult {
        let mut vehicles = Vec::new();
        let mut services = Vec::new();
        let mut dashboards = Vec::new();
        for c in self.conns {
            match c.role {
                Role::Vehicles(v) => vehicles.push(VehicleCounts {
                    tenant: c.tenant,
                    first: v.first,
                    sent: v.sent,
                    rejected: v.rejected,
                }),
                Role::Service(s) => services.push(s.counts),
                Role::Dashboard(d) => dashboards.push(DashResult {
                    tenant: c.tenant,
                    group: d.group,
                    index: d.index,
                    sub: d.sub,
                    ready: c.ready,
                    ended: c.ended.filter(|e| e != "closed"),
                    locations: d.locations,
                    alerts: d.alerts,
                    trips: d.trips,
                    duplicates: d.duplicates,
                    unexpected: d.unexpected,
                    stale: d.stale,
                    cut: d.cut_ns > 0,
                    resumed_after_us: (d.resumed_ns > 0)
                        .then(|| d.resumed_ns.saturating_sub(d.cut_ns) / 1000),
                    events: d.events,
                }),
            }
        }
        let ctx = self.ctx;
        WorkerResult {
            latency: ctx.latency,
            socket_latency: ctx.socket_latency,
            send_lag: ctx.send_lag,
            connect: ctx.connect,
            tcp: ctx.tcp,
            connect_queue: ctx.connect_queue,
            subscribe: ctx.subscribe,
            errors: ctx.errors,
            vehicles,
            services,
            dashboards,
            unparsed: ctx.unparsed,
            backpressured: ctx.backpressured,
            bytes_in: ctx.bytes_in,
            control: ctx.control,
            reconnect: ctx.reconnect,
            not_recovered: ctx.not_recovered,
        }
    }
}

/// Handles received bytes (a response head, then frames); returns how many were used.
/// Sets `c.kill` to end the connection.
fn process(c: &mut Conn, data: &[u8], stamp: Stamp, ctx: &mut Ctx) -> usize {
    let mut pos = 0;
    if c.state == State::Upgrading {
        match ws::parse_response_head(data) {
            Ok(None) => return 0,
            Err(e) => {
                c.kill = Some(format!("protocol: {e}"));
                return data.len();
            }
            Ok(Some(h)) => {
                if h.status != 101 {
                    c.kill = Some(format!("http {}", h.status));
                    return data.len();
                }
                if h.accept.as_deref() != Some(c.accept.as_str()) {
                    c.kill = Some("protocol: bad Sec-WebSocket-Accept".into());
                    return data.len();
                }
                pos = h.len;
                on_open(c, ctx);
            }
        }
    }
    while pos < data.len() {
        let h = match ws::parse_frame(&data[pos..]) {
            Ok(ws::Parsed::Frame(h)) => h,
            Ok(ws::Parsed::Incomplete(_)) => break,
            Err(e) => {
                c.kill = Some(format!("protocol: {e}"));
                return data.len();
            }
        };
        if h.rsv1 && !ctx.deflate {
            c.kill = Some("protocol: RSV1 without permessage-deflate".into());
            return data.len();
        }
        let payload = &data[pos + h.header_len..pos + h.total()];
        pos += h.total();
        match h.opcode {
            ws::OP_TEXT if h.fin && !c.in_frag && h.rsv1 => {
                if let Err(e) = ws::with_inflated(payload, |m| on_message(c, m, stamp, ctx)) {
                    c.kill = Some(format!("protocol: {e}"));
                    return data.len();
                }
            }
            ws::OP_TEXT if h.fin && !c.in_frag => on_message(c, payload, stamp, ctx),
            ws::OP_BINARY if h.fin && !c.in_frag => {}
            ws::OP_TEXT | ws::OP_BINARY => {
                c.frag.clear();
                c.frag.extend_from_slice(payload);
                c.in_frag = true;
                c.frag_z = h.rsv1;
            }
            ws::OP_CONT => {
                if !c.in_frag {
                    c.kill = Some("protocol: continuation without a start".into());
                    return data.len();
                }
                c.frag.extend_from_slice(payload);
                if h.fin {
                    c.in_frag = false;
                    let msg = std::mem::take(&mut c.frag);
                    if c.frag_z {
                        if let Err(e) = ws::with_inflated(&msg, |m| on_message(c, m, stamp, ctx)) {
                            c.kill = Some(format!("protocol: {e}"));
                            return data.len();
                        }
                    } else {
                        on_message(c, &msg, stamp, ctx);
                    }
                    c.frag = msg;
                }
            }
            ws::OP_PING => c.queue(ws::OP_PONG, payload),
            ws::OP_CLOSE => {
                let code = ws::close_code(payload);
                c.queue(ws::OP_CLOSE, &code.to_be_bytes());
                let _ = c.flush();
                c.kill = Some(format!("close {code}"));
                return data.len();
            }
            _ => {}
        }
    }
    pos
}

/// The upgrade succeeded.
fn on_open(c: &mut Conn, ctx: &mut Ctx) {
    c.state = State::Open;
    let now = mono_ns();
    ctx.shared.open.fetch_add(1, Ordering::Relaxed);
    let took = now.saturating_sub(c.started_ns) / 1000;
    let msgs = match &mut c.role {
        Role::Dashboard(d) if d.cut_ns > 0 => {
            ctx.reconnect.saturating_record(took);
            // Locations restart from the snapshot: the last `n` per vehicle may repeat.
            d.last_n.iter_mut().for_each(|n| *n = 0);
            let since = (d.epoch > 0).then_some((d.epoch, d.seq));
            let msgs = d.sub.messages_since(since);
            d.pending = msgs.len() as u32;
            d.sub_sent_ns = now;
            msgs
        }
        Role::Dashboard(d) => {
            ctx.connect.saturating_record(took);
            let msgs = d.sub.messages();
            d.pending = msgs.len() as u32;
            d.sub_sent_ns = now;
            msgs
        }
        _ => {
            ctx.connect.saturating_record(took);
            Vec::new()
        }
    };
    if msgs.is_empty() {
        set_ready(c, ctx);
    }
    for m in msgs {
        c.queue(ws::OP_TEXT, m.as_bytes());
    }
}

fn set_ready(c: &mut Conn, ctx: &mut Ctx) {
    if !c.ready {
        c.ready = true;
        ctx.shared.ready.fetch_add(1, Ordering::Relaxed);
    }
}

fn on_message(c: &mut Conn, msg: &[u8], stamp: Stamp, ctx: &mut Ctx) {
    let kind = ctx.scanner.kind(msg);
    if !matches!(c.role, Role::Dashboard(_)) {
        match kind {
            Kind::Error => publisher_error(c, msg, ctx, None),
            Kind::Ack if ctx.scanner.is_duplicate_ack(msg) => {
                publisher_error(c, msg, ctx, Some("ack duplicate"))
            }
            _ => {}
        }
        return;
    }
    let Role::Dashboard(dash) = &mut c.role else {
        return;
    };
    match kind {
        Kind::Location | Kind::Alert | Kind::Trip => {
            let Some((t, end)) = ctx.scanner.t_us(msg) else {
                ctx.unparsed += 1;
                return;
            };
            if t < ctx.start_us {
                dash.stale += 1;
                return;
            }
            let lat = stamp.read_us.saturating_sub(t);
            if kind != Kind::Location {
                dash.events += 1;
                if kind == Kind::Alert {
                    // Envelope `"seq":N,"epoch":E` (before the payload): the resume point.
                    if let Some((seq, epoch)) = scan::seq_epoch(msg)
                        && seq > dash.seq
                    {
                        dash.seq = seq;
                        dash.epoch = epoch;
                    }
                }
            }
            if dash.cut_ns == 0 {
                // After a storm cut, snapshots and replays carry old `t_us`: they are
                // not a delivery latency (the resume time is measured instead).
                ctx.latency.saturating_record(lat);
                if let Some(at) = stamp.socket_us {
                    ctx.socket_latency.saturating_record(at.saturating_sub(t));
                }
                ctx.sec.latency.saturating_record(lat);
                if !dash.sub.storm && ctx.storm_us.0 != u64::MAX {
                    let k = if t < ctx.storm_us.0 {
                        0
                    } else if t < ctx.storm_us.1 {
                        1
                    } else {
                        2
                    };
                    ctx.control[k].saturating_record(lat);
                }
            }
            ctx.sec.delivered += 1;
            ctx.d_delivered += 1;
            match kind {
                Kind::Location => {
                    dash.locations += 1;
                    let n = ctx.scanner.n_after(msg, end);
                    let v = ctx.scanner.vehicle_index(msg);
                    match (n, v) {
                        (Some(n), Some(v)) if (v as usize) < dash.last_n.len() && dash.wants(v) => {
                            let last = &mut dash.last_n[v as usize];
                            if (n as u8).wrapping_sub(*last) as i8 <= 0 {
                                dash.duplicates += 1;
                            } else {
                                *last = n as u8;
                            }
                        }
                        _ => dash.unexpected += 1,
                    }
                }
                Kind::Alert => {
                    dash.alerts += 1;
                    let ok = ctx
                        .scanner
                        .severity(msg)
                        .is_some_and(|s| dash.sub.alert_mask & (1 << s) != 0);
                    if !ok {
                        dash.unexpected += 1;
                    }
                }
                _ => {
                    dash.trips += 1;
                    if !dash.sub.trips {
                        dash.unexpected += 1;
                    }
                }
            }
        }
        Kind::Subscribed => {
            if dash.epoch == 0
                && let Some((seq, epoch)) = scan::seq_epoch(msg)
            {
                // The first alerts subscription: the stream's position then.
                dash.seq = seq;
                dash.epoch = epoch;
            }
            if dash.cut_ns > 0 && memchr::memmem::find(msg, b"\"recovered\":false").is_some() {
                ctx.not_recovered += 1;
            }
            if dash.pending > 0 {
                dash.pending -= 1;
                if dash.pending == 0 && dash.cut_ns > 0 {
                    dash.resumed_ns = mono_ns();
                    // Counted ready once, at its first subscription.
                    c.ready = true;
                } else if dash.pending == 0 {
                    ctx.subscribe
                        .saturating_record(mono_ns().saturating_sub(dash.sub_sent_ns) / 1000);
                    set_ready(c, ctx);
                }
            }
        }
        Kind::Error => {
            let code = ctx.scanner.error_code(msg).unwrap_or(0);
            if dash.pending > 0 {
                c.kill = Some(format!("subscribe refused: error {code}"));
            } else {
                ctx.error(&format!("error {code}"));
            }
        }
        Kind::Ack | Kind::Other => {}
    }
}

/// An `error` (or a `duplicate` ack) answering a publish: count it and, when its id
/// names one of ours, take the message out of what subscribers are owed.
fn publisher_error(c: &mut Conn, msg: &[u8], ctx: &mut Ctx, key: Option<&str>) {
    match key {
        Some(k) => ctx.error(k),
        None => {
            let code = ctx.scanner.error_code(msg).unwrap_or(0);
            ctx.error(&format!("error {code}"));
        }
    }
    let Some(id) = scan::error_id(msg).and_then(|s| scan::parse_pub_id(&s)) else {
        return;
    };
    let tenant = &ctx.plan.tenants[c.tenant as usize];
    match (&mut c.role, id) {
        (Role::Vehicles(v), PubId::Location { vehicle, .. }) => {
            if let Some(s) = vehicle.checked_sub(v.first)
                && (s as usize) < v.rejected.len()
            {
                v.rejected[s as usize] += 1;
                ctx.d_expected -= tenant.loc_watchers[vehicle as usize] as i64;
            }
        }
        (Role::Service(svc), PubId::Alert { service, n }) if service == svc.index => {
            let sev = alert_severity(service as u64, n);
            svc.counts.alerts_rejected[sev] += 1;
            ctx.d_expected -= tenant.alert_watchers[sev] as i64;
        }
        (Role::Service(svc), PubId::Trip { service, .. }) if service == svc.index => {
            svc.counts.trips_rejected += 1;
            ctx.d_expected -= tenant.trip_watchers as i64;
        }
        _ => {}
    }
}

/// When a message was received: read by the generator, and (dashboards) when the
/// kernel received its last segment.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    read_us: u64,
    socket_us: Option<u64>,
}

fn set_int_opt(sock: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: a valid socket and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn realtime_minus_mapped_us() -> i64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    wall - now_us() as i64
}

/// `recvmsg` asking for the kernel receive timestamp (SO_TIMESTAMPNS): the time the
/// last segment of this read reached the socket.
fn recv_stamped(
    sock: &TcpStream,
    buf: &mut [u8],
    arrived_ns: &mut Option<u64>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one or two control messages (u64-aligned).
    let mut control = [0u64; 16];
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes valid, writable buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into `control`, with the
    // libc helpers and within `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                *arrived_ns = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

/// Puts the socket (back) in delayed-ACK mode: Linux otherwise ACKs every read that
/// drains a pushed segment, and on loopback the generator's core then also runs the
/// broker socket's ACK processing. Delayed ACKs (one per ~64 KiB or 40 ms) cut the
/// generator's CPU per delivery substantially; the sender is never window-limited here.
/// The kernel leaves this mode when a delayed-ACK timer fires, so it is set after
/// every read.
fn set_quickack_off(sock: &TcpStream) {
    set_int_opt(sock, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 0);
}

/// A short, stable name for an I/O error (errno names where there is one).
pub fn io_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL (out of ports?)".into(),
        Some(libc::EADDRINUSE) => "EADDRINUSE".into(),
        Some(libc::EMFILE) => "EMFILE (open-file limit)".into(),
        Some(libc::ENFILE) => "ENFILE (system file table)".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        _ => format!("{:?}", e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_names() {
        assert_eq!(
            io_name(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            "ECONNREFUSED"
        );
        assert_eq!(io_name(&io::ErrorKind::WriteZero.into()), "WriteZero");
    }

    #[test]
    fn histograms_saturate() {
        let mut h = latency_histogram(3);
        h.saturating_record(0);
        h.saturating_record(u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= MAX_LATENCY_US);
    }
}
