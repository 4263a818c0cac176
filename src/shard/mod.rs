//! A shard: one thread, one mio `Poll`, one slab of connections, one subscriber index.
//!
//! The shard is the thin IO driver around the pure core: it moves bytes between sockets
//! and [`Session`]s and applies the actions sessions return. The path of one message:
//!
//! ```text
//! socket --read--> FrameReader --Message--> Session --Action::Publish--> hub lock:
//!   seq+1, encode once (Event), record state, push Arc<Event> to every shard in the mask
//! shard inbox --Arc<Event>--> SubscriberIndex (bitset union) --> Session::verdict
//!   --> Outbox (Arc clone, no copy) --writev--> socket
//! ```
//!
//! Work per loop turn is bounded: accepts, bytes read per connection, inbox messages.

mod api;
mod browser;
mod clustered;
pub mod conn;
pub mod outbox;
mod revoke;
pub mod shared;
pub mod snapshot;
pub mod tls;
mod uring;

pub use uring::probe as uring_probe;

use crate::dialect::native::{self, Parser, ProtoError};
use crate::dialect::view::View;
use crate::dialect::{self, DialectId};
use crate::event::{Event, Publication};
use crate::hub::TenantHub;
use crate::metrics::{Drop as StatDrop, Limit, Outcome, ShardStats};
use crate::session::{Action, Ctx, Now, Reply, Selection, Session, Verdict};
use crate::store::{Counted, Joining, Positioned, Published, Store};
use crate::wire::frame::{self, FrameError, FrameReader, Message, close};
use crate::wire::handshake::{self, Endpoint, Head, HeadError, Request};
use crate::{auth::Credential, model::Channel};
use conn::{Conn, Phase};
use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use shared::Shared;
use slab::Slab;
use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::protocol::frame::coding::{Data, OpCode};

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);

/// Capacity of a shard's inbox. A shard this far behind is stalled, not slow: what does
/// not fit is dropped (`drops{reason="overload"}`) and the shard closes its subscribers
/// with 1013, so that they come back with a fresh snapshot and resume events with `since`.
pub const INBOX_CAPACITY: usize = 65_536;

/// Queues `ev` to every shard in `mask` (called under the channel's lock, so a shard
/// receives a channel's events in order). Returns the other shards to wake.
pub(crate) fn route(shared: &Shared, me: usize, ev: &Arc<Event>, mask: u64) -> u64 {
    let mut mask = mask;
    let mut wake = 0;
    while mask != 0 {
        let shard = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        if shared.mesh[shard].try_send(ev.clone()).is_err() {
            // Its subscribers now have a gap (or a stale state value): the shard closes
            // them, and they come back with a snapshot and `since`.
            shared.stats[shard].drop(StatDrop::Overload, 1);
            shared.inbox_overflowed[shard].store(true, Ordering::Release);
        }
        if shard != me {
            wake |= 1 << shard;
        }
    }
    wake
}

/// Accepts per loop turn, so a connect storm cannot starve delivery.
const ACCEPTS_PER_TURN: usize = 256;
/// Bytes read from one connection per loop turn.
const READ_BUDGET: usize = 64 * 1024;
/// The most connection slots a shard reserves when it starts (beyond it, its slab grows).
const MAX_PRESIZED_SLOTS: usize = 1 << 16;
/// Inbox messages handled per loop turn (and per batch when overloaded).
const INBOX_PER_TURN: usize = 8192;
/// Connections written per loop turn: between slices the shard reads and routes what
/// arrived, so a long fan-out does not hold back new input, and a connection not yet
/// written gets the newer events in the same `writev`.
const FLUSH_PER_TURN: usize = 256;
/// Wait before accepting again after accept failed for lack of resources.
pub(super) const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Time a peer gets to answer our close frame, or to read an HTTP response.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Connection timers (heartbeats, deadlines) handled per loop turn.
const TIMERS_PER_TURN: usize = 1024;
/// Connections sent their close frame per turn during shutdown (no reconnect storm).
const SHUTDOWN_CLOSES_PER_TURN: usize = 500;
/// Tick interval during shutdown: 500 closes per 10 ms is 50 000 per second.
const SHUTDOWN_TICK: Duration = Duration::from_millis(10);

pub struct Shard {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<Arc<Event>>,
    /// The cluster bridge's answers (cluster mode).
    ctl: Receiver<crate::cluster::Ctl>,
    /// Cluster mode: what the shard waits for from the bridge.
    cluster: clustered::Waiting,
    shared: Arc<Shared>,
    conns: Slab<Conn>,
    index: crate::route::index::SubscriberIndex,
    parser: Parser,
    scratch: Vec<u8>,
    /// Connections with something to write, in the order they became so.
    dirty: VecDeque<usize>,
    /// The connections wait longer than `limits.overload_lag_ms` for their write.
    overloaded: bool,
    /// The longest wait for a write since the flush list was last empty.
    cycle_lag: Duration,
    /// Something was written since the flush list was last empty.
    cycle_wrote: bool,
    /// Slots whose read budget ran out with data possibly left (edge-triggered).
    pending_reads: Vec<usize>,
    /// Other shards to wake at the end of this turn.
    wake_mask: u64,
    accept_pending: bool,
    /// Accept failed for lack of resources (EMFILE...): try again at this time, so that
    /// the backlog is drained once descriptors are free (an edge-triggered listener
    /// would not report the connections already queued).
    accept_retry_at: Option<Instant>,
    next_generation: u32,
    next_event: u64,
    next_tick: Instant,
    /// Every connection's next deadline (handshake, auth, heartbeat, expiry, close
    /// linger), earliest first; entries that no longer match their connection are skipped
    /// when they come up. No tick walks every connection.
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    shutdown_deadline: Option<Instant>,
    /// Shard 0 publishes derived `fleet_metrics` and `system` status at this time.
    next_metrics: Instant,
    derived: crate::store::derived::Derived,
    /// The walk that closes connections of revoked credentials after a reload.
    revocation: revoke::RevocationWalk,
    /// The TLS listener and handshake budget (`[server.tls]`; see `tls.rs`).
    tls: Option<Box<tls::ShardTls>>,
    /// The io_uring driver (`[server] io = "io_uring"`; see `uring.rs`), `None` on mio.
    uring: Option<Box<uring::Uring>>,
}

fn now() -> Now {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Now {
        mono: Instant::now(),
        unix_ms,
    }
}

/// Frames projected for some subscribers, by dialect and view (`None`: that
/// dialect does not show the event).
type Projections = HashMap<(DialectId, Arc<View>), Option<Arc<[u8]>>>;

impl Shard {
    pub fn new(
        id: usize,
        poll: Poll,
        listener: TcpListener,
        inbox: Receiver<Arc<Event>>,
        ctl: Receiver<crate::cluster::Ctl>,
        shared: Arc<Shared>,
    ) -> io::Result<Shard> {
        let mut listener = listener;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        // The slab is sized for this shard's share of the node's connections at once:
        // pages are resident only once connections use them, and a slab grown by doubling
        // would leave its earlier copies with the allocator (issue 16: under a connect
        // burst they stayed resident, ~300 bytes per connection).
        let share = shared
            .config
            .limits
            .max_connections
            .div_ceil(shared.config.shard_count().max(1))
            .min(MAX_PRESIZED_SLOTS);
        Ok(Shard {
            id,
            poll,
            listener: Some(listener),
            inbox,
            ctl,
            cluster: Default::default(),
            shared,
            conns: Slab::with_capacity(share),
            index: Default::default(),
            parser: Parser::default(),
            scratch: vec![0; READ_BUDGET],
            dirty: VecDeque::new(),
            overloaded: false,
            cycle_lag: Duration::ZERO,
            cycle_wrote: false,
            pending_reads: Vec::new(),
            wake_mask: 0,
            accept_pending: false,
            accept_retry_at: None,
            next_generation: 0,
            next_event: 0,
            next_tick: Instant::now(),
            timers: BinaryHeap::new(),
            shutdown_deadline: None,
            next_metrics: Instant::now(),
            derived: Default::default(),
            revocation: Default::default(),
            tls: None,
            uring: None,
        })
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.id]
    }

    /// Sets up the shard's IO driver (io_uring when asked and allowed); call on the
    /// shard's own thread, before `run`.
    pub fn start_io(&mut self) {
        self.start_uring();
    }

    /// Runs the event loop until shutdown completes.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let tick = Session::tick_interval(&self.shared.config.limits);
        loop {
            let timers_due = self
                .timers
                .peek()
                .is_some_and(|Reverse((t, _, _))| *t <= Instant::now());
            let busy = self.accept_pending
                || timers_due
                || !self.pending_reads.is_empty()
                || !self.dirty.is_empty()
                || !self.inbox.is_empty()
                || !self.ctl.is_empty()
                || self.revocation_walk_pending()
                || self.tls.as_ref().is_some_and(|t| t.busy())
                || self.uring_busy();
            let mut wake_at = match self.accept_retry_at {
                Some(t) => t.min(self.next_tick),
                None => self.next_tick,
            };
            if let Some(Reverse((t, _, _))) = self.timers.peek() {
                wake_at = wake_at.min(*t);
            }
            let timeout = if busy {
                Duration::ZERO
            } else {
                wake_at.saturating_duration_since(Instant::now())
            };
            if let Err(e) = self.wait(&mut events, timeout) {
                tracing::error!(shard = self.id, "poll failed: {e}");
                return;
            }
            let turn_start = Instant::now();
            self.tls_turn();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_pending = true,
                    tls::TLS_LISTENER => self.tls_listener_ready(),
                    WAKER => {}
                    Token(slot) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(slot);
                        }
                        if ev.is_writable()
                            && let Some(conn) = self.conns.get_mut(slot)
                        {
                            conn.out.set_writable();
                            // Edge-triggered: a readable event often says writable too.
                            if conn.wants_write() || conn.snapshots.is_some() || !conn.is_open() {
                                self.mark_dirty(slot);
                            }
                        }
                    }
                }
            }
            self.uring_turn();
            if self.accept_retry_at.is_some_and(|t| Instant::now() >= t) {
                self.accept_retry_at = None;
                self.accept_pending = true;
                self.tls_listener_ready();
            }
            if self.accept_pending {
                self.accept();
            }
            self.accept_tls();
            for slot in std::mem::take(&mut self.pending_reads) {
                self.on_readable(slot);
            }
            if self.shutdown_deadline.is_none() && self.shared.stopping.load(Ordering::Acquire) {
                self.begin_shutdown();
            }
            self.drain_ctl();
            self.drain_inbox();
            self.flush_dirty();
            self.fire_timers();
            self.check_revocations();
            if Instant::now() >= self.next_tick {
                self.on_tick();
                // While shutting down, tick fast to pace the close frames.
                let step = if self.shutdown_deadline.is_some() {
                    SHUTDOWN_TICK
                } else {
                    tick
                };
                self.next_tick = Instant::now() + step;
            }
            self.wake_others();
            let stats = self.stats();
            stats.turns.fetch_add(1, Ordering::Relaxed);
            stats
                .last_turn_ms
                .store(now().unix_ms as u64, Ordering::Relaxed);
            let work = turn_start.elapsed();
            stats
                .busy_ns
                .fetch_add(work.as_nanos() as u64, Ordering::Relaxed);
            stats.loop_iteration.observe(work);
            if let Some(deadline) = self.shutdown_deadline
                && (self.conns.is_empty() || Instant::now() >= deadline)
            {
                tracing::debug!(shard = self.id, left = self.conns.len(), "shard stopped");
                return;
            }
        }
    }

    /// Waits for readiness (mio) or completions (io_uring, which also watches the mio
    /// poll's descriptor: then mio's events are read without waiting).
    fn wait(&mut self, events: &mut Events, timeout: Duration) -> io::Result<()> {
        let timeout = match &mut self.uring {
            None => Some(timeout),
            Some(u) => {
                u.wait(timeout)?;
                if !std::mem::take(&mut u.mio_ready) {
                    events.clear();
                    return Ok(());
                }
                Some(Duration::ZERO)
            }
        };
        match self.poll.poll(events, timeout) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
            _ => Ok(()),
        }
    }

    // ------------------------------------------------------------------ accept

    fn accept(&mut self) {
        if self.uring_rearm_accept() {
            // The ring accepts (multishot); this only re-arms it after a failure.
            self.accept_pending = false;
            return;
        }
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = &self.listener else {
                self.accept_pending = false;
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.add_conn(stream, peer, false);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the backlog is still queued and the listener
                    // will not report it again; retry shortly rather than spin or forget.
                    tracing::warn!(shard = self.id, "accept failed: {e}; retrying in 50 ms");
                    self.accept_pending = false;
                    self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
        // Budget spent with connections possibly still queued: continue next turn.
    }

    /// Registers an accepted socket; its slot, unless it was refused.
    /// `via_uring`: accepted by the io_uring driver, which then receives and sends for it
    /// (mio does not see it).
    fn add_conn(
        &mut self,
        mut stream: TcpStream,
        peer: std::net::SocketAddr,
        via_uring: bool,
    ) -> Option<usize> {
        // Connections that have not upgraded yet (or are still sending an HTTP request)
        // are capped per node and per address: beyond it the socket is closed at once.
        if let Err(limit) = self.shared.admission.pending_open(peer.ip()) {
            self.stats().breach(limit);
            return None;
        }
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        if slot >= tls::TLS_LISTENER.0 {
            self.shared.admission.pending_done(peer.ip());
            return None;
        }
        if !via_uring
            && let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )
        {
            tracing::warn!("register failed: {e}");
            self.shared.admission.pending_done(peer.ip());
            return None;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let limits = &self.shared.config.limits;
        let deadline = Instant::now() + limits.handshake_timeout();
        entry.insert(Conn::new(
            stream,
            peer,
            self.next_generation,
            deadline,
            limits.max_message_bytes,
        ));
        self.schedule(slot, deadline);
        if via_uring {
            self.uring_attach(slot);
        }
        self.stats()
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    fn drop_conn(&mut self, slot: usize) {
        if !self.conns.contains(slot) {
            return;
        }
        let mut conn = self.conns.remove(slot);
        if !self.uring_detach(&conn, slot) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        if let Some(tls) = &mut conn.tls {
            tls.close_notify(&mut conn.stream);
        }
        if conn.pending {
            self.shared.admission.pending_done(conn.peer.ip());
        }
        if let (Some(session), Some(hub)) = (&conn.session, &conn.hub) {
            let subs: Vec<(Channel, Selection)> = session
                .subscriptions()
                .map(|(c, s)| (c, s.clone()))
                .collect();
            for (channel, sel) in subs {
                self.unindex(hub, channel, &sel, slot);
            }
        }
        if let Some(p) = conn.session.as_ref().and_then(Session::principal) {
            self.shared.admission.release_user(p);
        }
        if conn.session.is_some() || conn.echo {
            self.shared.admission.close();
            let gauge = if conn.echo {
                &self.stats().connections_echo
            } else {
                &self.stats().connections[conn.out.dialect().0 as usize]
            };
            gauge.fetch_sub(1, Ordering::Relaxed);
        }
    }

    // ------------------------------------------------------------------ read

    fn on_readable(&mut self, slot: usize) {
        if self.conns.get(slot).is_some_and(|c| c.tls.is_some()) {
            return self.on_readable_tls(slot);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(conn) = self.conns.get_mut(slot) {
            if budget == 0 {
                self.pending_reads.push(slot);
                break;
            }
            let n = match conn.stream.read(&mut scratch[..budget]) {
                Ok(0) => {
                    self.drop_conn(slot);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_conn(slot);
                    break;
                }
            };
            budget -= n;
            self.stats().bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            self.on_bytes(slot, &mut scratch[..n]);
        }
        self.scratch = scratch;
    }

    /// Feeds freshly read bytes to the connection in its current phase.
    fn on_bytes(&mut self, slot: usize, fresh: &mut [u8]) {
        let conn = &mut self.conns[slot];
        match conn.phase {
            Phase::Handshake { .. } => {
                conn.rbuf.extend_from_slice(fresh);
                if conn.awaits_body() {
                    self.api_body_bytes(slot);
                } else {
                    self.on_handshake_bytes(slot);
                }
            }
            Phase::Open => {
                if conn.rbuf.is_empty() {
                    let used = self.decode_frames(slot, fresh);
                    if let Some(conn) = self.conns.get_mut(slot)
                        && conn.is_open()
                    {
                        conn.rbuf.extend_from_slice(&fresh[used..]);
                    }
                } else {
                    let mut buf = std::mem::take(&mut conn.rbuf);
                    buf.extend_from_slice(fresh);
                    let used = self.decode_frames(slot, &mut buf);
                    buf.drain(..used);
                    if let Some(conn) = self.conns.get_mut(slot)
                        && conn.is_open()
                    {
                        conn.rbuf = if buf.is_empty() { Vec::new() } else { buf };
                    }
                }
            }
            // Input after we decided to close is read and discarded.
            Phase::Closing { .. } | Phase::HttpClose { .. } => {}
        }
    }

    /// Decodes complete frames from `buf`, runs them through the session and applies its
    /// actions. Returns the bytes consumed.
    fn decode_frames(&mut self, slot: usize, buf: &mut [u8]) -> usize {
        if self.conns[slot].echo {
            return self.echo_frames(slot, buf);
        }
        let now = now();
        let shared = self.shared.clone();
        let mut ctx = Ctx {
            limits: &shared.config.limits,
            auth: &shared.auth,
            parser: &mut self.parser,
            admission: &*shared,
        };
        let conn = &mut self.conns[slot];
        let Some(session) = conn.session.as_mut() else {
            return buf.len();
        };
        let mut messages = 0u64;
        let result = conn.reader.decode(buf, |msg| {
            messages += 1;
            session.handle_message(now, msg, &mut ctx);
            !session.is_closed()
        });
        self.stats()
            .messages_in
            .fetch_add(messages, Ordering::Relaxed);
        let used = match result {
            Ok(used) => used,
            Err(e) => {
                self.apply_actions(slot, now);
                self.frame_error(slot, e);
                return buf.len();
            }
        };
        self.apply_actions(slot, now);
        // A message can bring a deadline forward (authenticated: heartbeat instead of the
        // auth timeout).
        self.schedule_next(slot, now);
        used
    }

    fn frame_error(&mut self, slot: usize, e: FrameError) {
        let limit = match e {
            FrameError::TooBig => Limit::MessageSize,
            FrameError::Protocol(_) | FrameError::InvalidUtf8 => Limit::ProtocolError,
        };
        self.stats().breach(limit);
        self.close_conn(slot, e.close_code(), &e.to_string());
    }

    /// The echo endpoint (a testing aid): every message goes back as it came.
    fn echo_frames(&mut self, slot: usize, buf: &mut [u8]) -> usize {
        let conn = &mut self.conns[slot];
        let out = &mut conn.out;
        let mut close_code = None;
        let result = conn.reader.decode(buf, |msg| {
            let mut f = Vec::new();
            match msg {
                Message::Text(t) => frame::write_frame(&mut f, OpCode::Data(Data::Text), t),
                Message::Binary(b) => frame::write_frame(&mut f, OpCode::Data(Data::Binary), b),
                Message::Ping(p) => f = frame::pong_frame(p),
                Message::Pong => return true,
                Message::Close(code) => {
                    close_code = Some(code.unwrap_or(close::NORMAL));
                    return false;
                }
            }
            out.push_owned(f);
            true
        });
        self.mark_dirty(slot);
        if self.enforce_hard_bound(slot) {
            return buf.len();
        }
        match result {
            Ok(used) => {
                if let Some(code) = close_code {
                    self.close_conn(slot, code, "");
                }
                used
            }
            Err(e) => {
                self.frame_error(slot, e);
                buf.len()
            }
        }
    }

    fn on_handshake_bytes(&mut self, slot: usize) {
        let shared = self.shared.clone();
        let limits = &shared.config.limits;
        let conn = &mut self.conns[slot];
        let peer = conn.peer.ip();
        let (head, req) = match handshake::parse_request(&conn.rbuf, limits.max_handshake_bytes) {
            Ok((Head::Partial, _)) => return,
            Ok((Head::Complete(n), req)) => (n, req),
            Err(e) => {
                if e == HeadError::TooLarge {
                    self.stats().breach(Limit::HandshakeSize);
                }
                return self.http_error(slot, e.status(), &e.to_string());
            }
        };
        let endpoint = match Endpoint::classify(&req.path) {
            Endpoint::Echo if !shared.config.testing.echo_endpoint => Endpoint::NotFound,
            e => e,
        };
        if self.browser_gate(slot, &req, &endpoint) {
            return;
        }
        if endpoint != Endpoint::NotFound && !endpoint.allows(&req.method) {
            return self.http_error(slot, 405, "method not allowed");
        }
        let scope = match endpoint {
            Endpoint::Publish | Endpoint::FleetVehicles(_) | Endpoint::FleetEvents(_) => {
                return self.api_request(slot, head, &req, &endpoint);
            }
            Endpoint::User(call) => return self.user_request(slot, head, &req, call),
            Endpoint::Healthz => return self.http_answer(slot, &req, 200, "text/plain", b"ok\n"),
            Endpoint::Readyz => {
                let (status, body) = shared.readiness();
                return self.http_answer(slot, &req, status, "text/plain", body.as_bytes());
            }
            Endpoint::Asset(a) => return self.http_answer(slot, &req, 200, a.content_type, a.body),
            Endpoint::DashboardConfig => {
                let body = shared.config.dashboard.json();
                return self.http_answer(slot, &req, 200, "application/json", &body);
            }
            Endpoint::Metrics => {
                if let Some(token) = &shared.config.server.metrics_token
                    && !req.bearer().is_some_and(|b| {
                        crate::auth::constant_time_eq(b.as_bytes(), token.as_bytes())
                    })
                {
                    return self.http_error(
                        slot,
                        401,
                        "/metrics requires Authorization: Bearer <server.metrics_token>",
                    );
                }
                let body = shared.render_metrics();
                return self.http_reply(slot, 200, "text/plain; version=0.0.4", body.as_bytes());
            }
            Endpoint::NotFound => return self.http_error(slot, 404, "not found"),
            Endpoint::Echo => None,
            Endpoint::Native(scope) => Some((scope, dialect::NATIVE, None)),
            Endpoint::Stream(d, preset) => Some((handshake::Scope::None, d, preset)),
        };
        if let Some((_, d, _)) = &scope
            && let Err((status, message)) = dialect::codec(*d).check_handshake(&req.query)
        {
            return self.http_error(slot, status, &message);
        }
        if !(req.upgrade_websocket && req.connection_upgrade) {
            return self.http_error(slot, 426, "this endpoint speaks WebSocket only");
        }
        let Some(key) = req
            .ws_key
            .as_deref()
            .filter(|_| req.ws_version.as_deref() == Some("13"))
        else {
            return self.http_error(slot, 400, "Sec-WebSocket-Key and version 13 required");
        };
        let now = now();
        if let Err(limit) = shared.admission.open(peer, now.mono) {
            self.stats().breach(limit);
            let status = if limit == Limit::ConnectionsPerNode {
                503
            } else {
                429
            };
            return self.http_error(slot, status, limit.message());
        }
        // From here on the connection is counted as open; every refusal must release it.
        let refuse = |shard: &mut Shard, status: u16, message: &str| {
            shared.admission.close();
            shard.http_error(slot, status, message);
        };
        // permessage-deflate: the first acceptable offer, if compression is on.
        let deflate = shared.config.server.deflate_min().is_some()
            && req
                .extensions
                .as_deref()
                .is_some_and(crate::wire::deflate::negotiate);
        let Some((scope, dialect, preset)) = scope else {
            return self.upgrade(slot, head, key, deflate, None);
        };
        let cred = req
            .query_param("token")
            .map(Credential::Token)
            .or_else(|| req.query_param("api_key").map(Credential::ApiKey))
            .or_else(|| req.bearer().map(Credential::Bearer));
        let principal = match cred.map(|c| shared.auth.authenticate(c, now.unix_secs())) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return refuse(self, 401, &e.to_string()),
        };
        if let Some(p) = &principal {
            let scoped_fleet = match &scope {
                handshake::Scope::Fleet(f) => Some(&**f),
                _ => None,
            };
            let wrong = [req.query_param("fleet_id"), scoped_fleet]
                .into_iter()
                .flatten()
                .any(|f| f != &*p.tenant);
            if wrong {
                return refuse(self, 403, "credential does not belong to this fleet");
            }
            if let Err(limit) = crate::session::Admission::admit(&*shared, p, now) {
                self.stats().breach(limit);
                return refuse(self, limit.code(), limit.message());
            }
        }
        let conn_id = format!("c{}-{}-{}", self.id, slot, self.conns[slot].generation);
        let bucket = principal
            .as_ref()
            .map(|p| shared.admission.user_publish_bucket(p, now.mono));
        let mut session = Session::new(conn_id.into(), scope, principal, now.mono, limits);
        session.set_publish_bucket(bucket);
        if dialect != dialect::NATIVE {
            let codec = dialect::codec(dialect);
            if codec.shows_tracker_states() {
                session.set_state_rules(Arc::new(shared.config.itrack.state_rules()));
            }
            session = session.with_dialect(codec, preset, limits, now);
        }
        self.upgrade(slot, head, key, deflate, Some(session));
    }

    /// Answers 101 and switches the connection to WebSocket (a session, or echo).
    fn upgrade(
        &mut self,
        slot: usize,
        head: usize,
        key: &str,
        deflate: bool,
        session: Option<Session>,
    ) {
        let echo_max = self.shared.config.testing.echo_max_message_bytes;
        let deflate_min = self.shared.config.server.deflate_min().filter(|_| deflate);
        self.not_pending(slot);
        let conn = &mut self.conns[slot];
        conn.out
            .push_owned(handshake::switching_protocols_with(key, deflate));
        // The CORS origin only an HTTP answer echoes.
        conn.http = None;
        conn.echo = session.is_none();
        if conn.echo {
            conn.reader = FrameReader::new(echo_max);
        }
        conn.reader.set_deflate(deflate);
        let dialect = session.as_ref().map_or(dialect::NATIVE, |s| s.codec().id());
        conn.out.set_dialect(dialect);
        conn.out.set_deflate(deflate_min);
        let heartbeat_ms = self.shared.config.limits.heartbeat_interval_ms;
        if let Some(hello) = session
            .as_ref()
            .and_then(|s| s.codec().greeting(heartbeat_ms))
        {
            conn.out.push_owned(hello);
        }
        conn.session = session;
        conn.phase = Phase::Open;
        let rest = conn.rbuf.split_off(head);
        conn.rbuf = Vec::new();
        let echo = conn.echo;
        let stats = self.stats();
        stats.handshake(Outcome::Upgraded);
        if deflate {
            stats.deflate_negotiated.fetch_add(1, Ordering::Relaxed);
        }
        if echo {
            stats.connections_echo.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.connections[dialect.0 as usize].fetch_add(1, Ordering::Relaxed);
        }
        self.mark_dirty(slot);
        let now = now();
        self.apply_actions(slot, now);
        self.schedule_next(slot, now);
        if !rest.is_empty() {
            let mut rest = rest;
            self.on_bytes(slot, &mut rest);
        }
    }

    /// The connection is upgraded or answered: it no longer counts as pending.
    fn not_pending(&mut self, slot: usize) {
        let conn = &mut self.conns[slot];
        if std::mem::take(&mut conn.pending) {
            self.shared.admission.pending_done(conn.peer.ip());
        }
    }

    /// `http_reply`, or for `HEAD` its headers only.
    fn http_answer(&mut self, slot: usize, req: &Request, status: u16, ct: &str, body: &[u8]) {
        let mut response = handshake::response(status, ct, body);
        if req.method == "HEAD" {
            response = handshake::head_only(response);
        }
        self.http_send(slot, status, response);
    }

    fn http_reply(&mut self, slot: usize, status: u16, content_type: &str, body: &[u8]) {
        self.http_reply_with(slot, status, content_type, "", body);
    }

    /// An HTTP answer with extra header lines; CORS headers too when the request came
    /// from an allowed origin (`browser_gate`).
    fn http_reply_with(
        &mut self,
        slot: usize,
        status: u16,
        content_type: &str,
        extra: &str,
        body: &[u8],
    ) {
        let headers = {
            let conn = &mut self.conns[slot];
            let mut h = conn
                .http
                .as_mut()
                .and_then(|h| h.cors.take())
                .map(|o| crate::origin::cors_headers(&o))
                .unwrap_or_default();
            h.push_str(extra);
            h
        };
        let response = handshake::response_with_headers(status, content_type, &headers, body);
        self.http_send(slot, status, response);
    }

    pub(super) fn http_send(&mut self, slot: usize, status: u16, response: Vec<u8>) {
        self.stats().handshake(Outcome::from_status(status));
        self.not_pending(slot);
        let conn = &mut self.conns[slot];
        conn.rbuf = Vec::new();
        if let Some(h) = conn.http.as_mut() {
            h.body = None;
        }
        conn.out.push_owned(response);
        let deadline = Instant::now() + CLOSE_LINGER;
        conn.phase = Phase::HttpClose { deadline };
        self.mark_dirty(slot);
        self.schedule(slot, deadline);
    }

    fn http_error(&mut self, slot: usize, status: u16, message: &str) {
        let body = handshake::json_error_body(status, message);
        self.http_reply(slot, status, "application/json", &body);
    }

    // ------------------------------------------------------------------ actions

    fn apply_actions(&mut self, slot: usize, now: Now) {
        loop {
            let Some(conn) = self.conns.get_mut(slot) else {
                return;
            };
            let Some(action) = conn.session.as_mut().and_then(Session::poll_action) else {
                return;
            };
            match action {
                Action::Reply(reply) => self.send_reply(slot, &reply, now),
                Action::Authenticated => {
                    let tenant = conn
                        .session
                        .as_ref()
                        .and_then(|s| s.principal())
                        .map(|p| p.tenant.clone());
                    conn.hub = tenant.map(|t| self.shared.hubs.tenant(&t));
                }
                Action::Subscribe {
                    channel,
                    added,
                    snapshot,
                    since,
                    reply,
                } => self.subscribe(slot, channel, &added, &snapshot, since, reply),
                Action::Unsubscribe { channel, removed } => {
                    if let Some(hub) = conn.hub.clone() {
                        self.unindex(&hub, channel, &removed, slot);
                    }
                }
                Action::SnapshotRequest {
                    channel,
                    selection,
                    id,
                } => self.snapshot_reply(slot, channel, &selection, id.as_deref(), now),
                Action::Publish(p) => self.publish(slot, p, now),
                Action::Deliver { event, view } => self.deliver_held(slot, event, view),
                Action::Breach(limit) => {
                    self.stats().breach(limit);
                    if limit == Limit::MessageRate {
                        self.stats().drop(StatDrop::RateLimited, 1);
                    }
                }
                Action::Close { code, reason } => self.close_conn(slot, code, reason),
            }
        }
    }

    /// Indexes a subscription, then, under the channel's lock: sets this shard's mask bit,
    /// reads the stream position and takes the snapshot (state channels) or the history
    /// after `since` (event channels). Sends `subscribed` (completed with the position and
    /// `recovered`), then the replay, then paces the snapshot.
    fn subscribe(
        &mut self,
        slot: usize,
        channel: Channel,
        added: &Selection,
        snapshot: &Selection,
        since: Option<(u64, u64)>,
        reply: crate::session::Reply,
    ) {
        let Some(hub) = self.conns[slot].hub.clone() else {
            return;
        };
        let first = self.index.add(&hub.id, channel, added, slot);
        self.position(slot, &hub, channel, first, snapshot, since, reply, true);
    }

    /// Positions an indexed subscription in its stream and sends what that gives
    /// (`subscribed`, the replay, the paced snapshot). In cluster mode, while the channel
    /// is not synced from the cluster and `may_wait`, the subscription waits instead:
    /// parked, with every event fenced off, until the bridge says the channel is synced
    /// or `cluster.sync_timeout_ms` passes.
    #[allow(clippy::too_many_arguments)]
    fn position(
        &mut self,
        slot: usize,
        hub: &Arc<TenantHub>,
        channel: Channel,
        first: bool,
        snapshot: &Selection,
        since: Option<(u64, u64)>,
        mut reply: crate::session::Reply,
        may_wait: bool,
    ) {
        let Positioned {
            epoch,
            position,
            snapshot: events,
            replay,
            fence,
            waiting,
            gained,
        } = self.store().subscribe(
            hub,
            channel,
            Joining {
                shard: self.id,
                first,
                wait_sync: may_wait && self.shared.cluster.is_some(),
            },
            snapshot,
            since,
            now(),
        );
        if gained && let Some(link) = &self.shared.cluster {
            link.interest_changed(&hub.id, channel);
        }
        if waiting {
            return self.park(slot, channel, snapshot, since, reply);
        }
        if channel.is_event()
            && let crate::session::Reply::Subscribed { position: p, .. } = &mut reply
        {
            *p = Some(crate::session::StreamPosition {
                epoch,
                seq: position,
                recovered: since.map(|_| replay.is_some()),
            });
        }
        let ts = native::format_rfc3339_ms(now().unix_ms);
        let conn = &mut self.conns[slot];
        let session = conn.session.as_mut().expect("open");
        let d = session.codec().id();
        if let Some(f) = session.codec().encode_reply(&reply, &ts) {
            conn.out.push_owned(f);
        }
        // A fence from an earlier subscribe must not filter this snapshot or replay.
        session.set_fence(channel, Default::default());
        let mono = Instant::now();
        for ev in replay.unwrap_or_default() {
            match session.verdict(&ev, mono) {
                Verdict::Skip | Verdict::Held(_) => {}
                Verdict::Shared => conn.out.push_shared(ev),
                Verdict::Projected(v) => {
                    if let Some(f) = ev.view_frame(d, &v) {
                        conn.out.push_owned(f)
                    }
                }
            }
        }
        let items: Vec<snapshot::Item> = events
            .into_iter()
            .filter_map(|ev| match session.verdict(&ev, mono) {
                Verdict::Skip | Verdict::Held(_) => None,
                Verdict::Shared => ev.frame_in(d).is_some().then_some((ev, None)),
                Verdict::Projected(v) => {
                    let f = ev.view_frame(d, &v)?;
                    Some((ev, Some(f)))
                }
            })
            .collect();
        session.set_fence(channel, fence);
        self.mark_dirty(slot);
        // A `frequency` starts its intervals with the snapshot.
        self.schedule_next(slot, now());
        // The reply and a `since` replay count against the bounds like events do.
        if self.enforce_hard_bound(slot) {
            return;
        }
        if !items.is_empty() {
            let conn = &mut self.conns[slot];
            let list = &mut conn.snapshots.get_or_insert_with(Default::default).0;
            list.retain(|s| s.channel != channel);
            list.push(snapshot::PendingSnapshot::new(channel, items));
            self.feed_snapshots(slot);
        }
    }

    /// Moves pending snapshot values into the outbox while it is below half the soft
    /// bound. Returns true if anything was queued.
    fn feed_snapshots(&mut self, slot: usize) -> bool {
        let budget = self.shared.config.limits.soft_outbound_bytes / 2;
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        let mut fed = false;
        while conn.out.bytes() < budget {
            let Some(list) = conn.snapshots.as_mut() else {
                break;
            };
            let Some(pending) = list.0.first_mut() else {
                break;
            };
            match pending.pop() {
                Some((ev, None)) => conn.out.push_shared(ev),
                Some((_, Some(frame))) => conn.out.push_owned(frame),
                None => {
                    list.0.remove(0);
                    continue;
                }
            }
            fed = true;
        }
        if let Some(list) = conn.snapshots.as_mut() {
            if list.0.first().is_some_and(|s| s.is_empty()) {
                list.0.remove(0);
            }
            if list.0.is_empty() {
                // A connection whose snapshots are sent holds no list (issue 16).
                conn.snapshots = None;
            }
        }
        fed
    }

    fn unindex(&mut self, hub: &TenantHub, channel: Channel, sel: &Selection, slot: usize) {
        if self.index.remove(&hub.id, channel, sel, slot) {
            let index = &self.index;
            let store = Store::new(
                &self.shared.hubs,
                &self.shared.config.limits,
                &self.shared.config.history,
            );
            let lost = store.leave(hub, channel, self.id, || {
                index.has_interest(&hub.id, channel)
            });
            if lost && let Some(link) = &self.shared.cluster {
                link.interest_changed(&hub.id, channel);
            }
        }
    }

    fn snapshot_reply(
        &mut self,
        slot: usize,
        channel: Channel,
        sel: &Selection,
        id: Option<&[u8]>,
        now: Now,
    ) {
        let Some(hub) = self.conns[slot].hub.clone() else {
            return;
        };
        let events = self.store().snapshot(&hub, channel, sel);
        let hard = self.shared.config.limits.max_outbound_bytes;
        let size: usize = events.iter().map(|e| e.json().len() + 1).sum();
        if size > hard / 2 {
            // One reply this large could never be queued within the bound; a subscription
            // sends the same values paced as the client reads.
            let e = ProtoError::new(
                413,
                format!(
                    "snapshot of {} values ({size} bytes) is over half the outbound bound; \
                     subscribe to {channel} instead (its snapshot is paced)",
                    events.len()
                ),
            );
            let id = id.map(<[u8]>::to_vec);
            return self.send_reply(slot, &Reply::Error { id, error: e }, now);
        }
        let id = id.map(<[u8]>::to_vec);
        self.send_reply(
            slot,
            &Reply::Snapshot {
                id,
                channel,
                events,
            },
            now,
        );
    }

    /// Queues an update a subscription's `frequency` held back (its interval has passed).
    fn deliver_held(&mut self, slot: usize, ev: Arc<Event>, view: Option<Arc<View>>) {
        let Some(conn) = self.conns.get_mut(slot).filter(|c| c.is_open()) else {
            return;
        };
        let d = conn.out.dialect();
        match view {
            None if ev.frame_in(d).is_some() => {
                let soft = self.shared.config.limits.soft_outbound_bytes;
                let conflated = conn.out.push_event(ev, soft);
                self.stats().drop(StatDrop::Conflated, conflated as u64);
            }
            None => return,
            Some(v) => match ev.view_frame(d, &v) {
                Some(f) => conn.out.push_owned(f),
                None => return,
            },
        }
        self.mark_dirty(slot);
        self.enforce_hard_bound(slot);
    }

    /// Encodes a reply in the connection's dialect and queues it ([`Shard::send_owned`]).
    fn send_reply(&mut self, slot: usize, reply: &Reply, now: Now) {
        let Some(codec) = self
            .conns
            .get(slot)
            .and_then(|c| c.session.as_ref())
            .map(Session::codec)
        else {
            return;
        };
        let ts = native::format_rfc3339_ms(now.unix_ms);
        if let Some(frame) = codec.encode_reply(reply, &ts) {
            self.send_owned(slot, frame);
        }
    }

    /// A WebSocket publish: accept it, then answer with `ack` or `error` as asked.
    fn publish(&mut self, slot: usize, p: crate::event::Publication, now: Now) {
        let Some(hub) = self.conns[slot].hub.clone() else {
            return;
        };
        let (channel, ack, id) = (p.channel, p.ack, p.id.clone());
        let outcome = self.accept_publication(&hub, p, now);
        if let Published::Pending { ticket } = outcome {
            return self.await_stored(ticket, slot, id, channel, ack);
        }
        self.answer_publish(slot, outcome, id, channel, ack, now);
    }

    /// Answers a publish with `ack` or `error` as asked.
    fn answer_publish(
        &mut self,
        slot: usize,
        outcome: Published,
        id: Option<Vec<u8>>,
        channel: Channel,
        ack: bool,
        now: Now,
    ) {
        let reply = match outcome {
            Published::Accepted { .. } | Published::Pending { .. } if !ack => return,
            Published::Pending { .. } => return,
            Published::Accepted { seq } => Reply::Ack {
                id,
                channel,
                seq: Some(seq),
            },
            Published::Duplicate => Reply::Ack {
                id,
                channel,
                seq: None,
            },
            Published::Refused(error) => Reply::Error { id, error },
        };
        self.send_reply(slot, &reply, now);
    }

    fn store(&self) -> Store<'_> {
        let c = &self.shared.config;
        Store::new(&self.shared.hubs, &c.limits, &c.history).with_units(&c.telemetry.units)
    }

    /// A fresh event id, unique in this run of the node: `"evt_<epoch>_<shard>_<n>"`.
    fn fresh_id(&mut self) -> Vec<u8> {
        self.next_event += 1;
        format!(
            "\"evt_{:x}_{}_{}\"",
            self.shared.hubs.epoch, self.id, self.next_event
        )
        .into_bytes()
    }

    /// Hands a validated publication to the store, routes it to the shards with
    /// subscribers and counts the outcome.
    fn accept_publication(&mut self, hub: &TenantHub, p: Publication, now: Now) -> Published {
        let fresh = self.fresh_id();
        let shared = self.shared.clone();
        let channel = p.channel;
        if channel.is_event() && shared.cluster.is_some() {
            return self.store_in_cluster(hub, p, fresh, now);
        }
        let (me, mut wake) = (self.id, 0);
        let mut counted = Counted::default();
        let mut accepted = None;
        let out = self
            .store()
            .accept(hub, p, &fresh, now, &mut counted, |ev, mask| {
                if shared.cluster.is_some() {
                    accepted = Some(ev.clone());
                }
                wake = route(&shared, me, ev, mask)
            });
        self.wake_mask |= wake;
        if let (Some(link), Some(ev)) = (&shared.cluster, accepted) {
            // Delivered here already; the other nodes get it through NATS.
            let _ = link.send(crate::cluster::Out::Forward(ev));
        }
        let stats = self.stats();
        if let Some(l) = counted.breach {
            stats.breach(l);
        }
        if counted.duplicate {
            stats.drop(StatDrop::Duplicate, 1);
        }
        if counted.rate_limited {
            stats.drop(StatDrop::RateLimited, 1);
        }
        if let Published::Accepted { .. } = out {
            stats.publishes[channel.index()].fetch_add(1, Ordering::Relaxed);
            stats.published_bytes[channel.index()]
                .fetch_add(counted.accepted_bytes as u64, Ordering::Relaxed);
        }
        out
    }

    /// Shard 0's timer: derived `fleet_metrics` and `system_status`, through the store.
    fn publish_derived(&mut self, now: Now) {
        let shared = self.shared.clone();
        let mut derived = std::mem::take(&mut self.derived);
        let mut made = Vec::new();
        derived.tick(&self.store(), &shared.stats, now, |hub, p| {
            made.push((shared.hubs.tenant(&hub.id), p))
        });
        self.derived = derived;
        for (hub, p) in made {
            let fresh = self.fresh_id();
            let (me, mut wake) = (self.id, 0);
            self.store().broadcast(&hub, p, &fresh, now, |ev, mask| {
                wake = route(&shared, me, ev, mask)
            });
            self.wake_mask |= wake;
        }
    }

    /// Queues a reply (an answer, an error, a pong). Every byte queued counts against the
    /// connection's outbound bounds, whatever produced it.
    fn send_owned(&mut self, slot: usize, frame: Vec<u8>) {
        if let Some(conn) = self.conns.get_mut(slot)
            && conn.is_open()
        {
            conn.out.push_owned(frame);
            self.mark_dirty(slot);
            self.enforce_hard_bound(slot);
        }
    }

    /// Past `limits.max_outbound_bytes` of unread bytes (after giving the socket what it
    /// takes) the connection is closed with 1013, as for events. Returns true if closed.
    fn enforce_hard_bound(&mut self, slot: usize) -> bool {
        let shared = self.shared.clone();
        let stats = &shared.stats[self.id];
        let hard = shared.config.limits.max_outbound_bytes;
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        if conn.out.bytes() <= hard || !conn.is_open() {
            return false;
        }
        if !conn.out.is_blocked() {
            let before = conn.out.bytes();
            let mut written_at = WriteStamp::default();
            // A write error is left to the next flush, which drops the connection.
            let _ = conn.flush(|e| stats.publish_to_write.observe(written_at.since(e)));
            stats
                .bytes_out
                .fetch_add((before - conn.out.bytes()) as u64, Ordering::Relaxed);
            if conn.out.bytes() <= hard {
                return false;
            }
        }
        stats.breach(Limit::SlowConsumer);
        let discarded = conn.out.clear();
        stats.drop(StatDrop::SlowConsumer, discarded as u64);
        conn.snapshots = None;
        self.close_conn(slot, close::TRY_AGAIN_LATER, "slow consumer");
        true
    }

    fn close_conn(&mut self, slot: usize, code: u16, reason: &str) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match conn.phase {
            Phase::Open => {
                conn.out.push_owned(frame::close_frame(code, reason));
                let deadline = Instant::now() + CLOSE_LINGER;
                conn.phase = Phase::Closing {
                    deadline,
                    shut: false,
                };
                conn.rbuf = Vec::new();
                self.mark_dirty(slot);
                self.schedule(slot, deadline);
            }
            Phase::Handshake { .. } => self.drop_conn(slot),
            Phase::Closing { .. } | Phase::HttpClose { .. } => {}
        }
    }

    // ------------------------------------------------------------------ delivery

    fn drain_inbox(&mut self) {
        if self.shared.inbox_overflowed[self.id].swap(false, Ordering::AcqRel) {
            self.close_subscribers_after_overflow();
        }
        // Keeping up (or in the middle of a pass): route what arrived now.
        if !self.overloaded {
            for _ in 0..INBOX_PER_TURN {
                match self.inbox.try_recv() {
                    Ok(ev) => self.deliver(&ev),
                    Err(_) => return,
                }
            }
            return;
        }
        // Overloaded: deliver in batches, the next one when the last is written; in a
        // batch only the newest value of each entity's state is delivered.
        if !self.dirty.is_empty() {
            return;
        }
        let batch: Vec<Arc<Event>> = self.inbox.try_iter().take(INBOX_PER_TURN).collect();
        let keep = newest_states(&batch);
        let skipped = batch.len() - keep.iter().filter(|k| **k).count();
        self.stats().drop(StatDrop::Overload, skipped as u64);
        for (ev, keep) in batch.iter().zip(keep) {
            if keep {
                self.deliver(ev);
            }
        }
    }

    /// After an event could not be queued to this shard, its subscribers have a gap:
    /// close them with 1013 so that they resume from history with `since`.
    fn close_subscribers_after_overflow(&mut self) {
        let slots: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.is_open()
                    && c.session
                        .as_ref()
                        .is_some_and(|s| s.subscription_count() > 0)
            })
            .map(|(slot, _)| slot)
            .collect();
        tracing::warn!(
            shard = self.id,
            closed = slots.len(),
            "inbox overflowed: closing subscribers so that they resume from history"
        );
        for slot in slots {
            self.stats().breach(Limit::SlowConsumer);
            self.close_conn(slot, close::TRY_AGAIN_LATER, "server overloaded, resume");
        }
    }

    fn deliver(&mut self, ev: &Arc<Event>) {
        let shared = self.shared.clone();
        let stats = &shared.stats[self.id];
        let limits = &shared.config.limits;
        let (soft, hard) = (limits.soft_outbound_bytes, limits.max_outbound_bytes);
        let mut delivered = 0u64;
        let mut conflated = 0u64;
        let mut written = 0u64;
        let mut slow = Vec::new();
        // One clock read per event, not per subscriber.
        let marked_at = Instant::now();
        let conns = &mut self.conns;
        let dirty = &mut self.dirty;
        // Frames projected to a `metrics` filter: built once per dialect and metric list,
        // then shared by every subscriber that asked for the same (SPEC §1).
        let mut projections = Projections::new();
        let mut held = Vec::new();
        self.index
            .for_each(&ev.tenant, ev.channel, &ev.keys, |slot| {
                let Some(conn) = conns.get_mut(slot) else {
                    return;
                };
                let same_tenant = conn
                    .hub
                    .as_ref()
                    .is_some_and(|h| Arc::ptr_eq(&h.id, &ev.tenant));
                if !conn.is_open() || !same_tenant || conn.session.is_none() {
                    return;
                }
                for pending in conn.snapshots.iter_mut().flat_map(|s| s.0.iter_mut()) {
                    if pending.channel == ev.channel {
                        pending.supersede(ev);
                    }
                }
                // Over the soft bound, first give the socket what it takes (unless it was
                // found full): the bounds then count what the client has not read, not a
                // burst of events routed within one loop turn.
                if conn.out.bytes() > soft && !conn.out.is_blocked() {
                    let before = conn.out.bytes();
                    // A write error is left to the next flush, which drops the connection.
                    let mut written_at = WriteStamp::default();
                    let _ = conn.flush(|e| stats.publish_to_write.observe(written_at.since(e)));
                    written += (before - conn.out.bytes()) as u64;
                }
                let Some(session) = conn.session.as_mut() else {
                    return;
                };
                let d = conn.out.dialect();
                match session.verdict(ev, marked_at) {
                    Verdict::Skip => return,
                    Verdict::Held(until) => return held.push((slot, until)),
                    Verdict::Shared => {
                        if ev.frame_in(d).is_none() {
                            return;
                        }
                        conflated += conn.out.push_event(ev.clone(), soft) as u64
                    }
                    Verdict::Projected(m) => {
                        let frame = projections
                            .entry((d, m))
                            .or_insert_with_key(|(d, v)| ev.view_frame(*d, v).map(Arc::from));
                        let Some(frame) = frame else {
                            return;
                        };
                        conn.out.push_frame(frame.clone());
                    }
                }
                delivered += 1;
                if conn.out.bytes() > hard {
                    slow.push(slot);
                }
                if !conn.dirty {
                    conn.dirty = true;
                    conn.dirty_since = marked_at;
                    dirty.push_back(slot);
                }
            });
        stats.bytes_out.fetch_add(written, Ordering::Relaxed);
        let c = ev.channel.index();
        stats.deliveries[c].fetch_add(delivered, Ordering::Relaxed);
        stats.delivered_bytes[c].fetch_add(delivered * ev.frame.len() as u64, Ordering::Relaxed);
        stats.drop(StatDrop::Conflated, conflated);
        for (slot, until) in held {
            self.schedule(slot, until);
        }
        for slot in slow {
            stats.breach(Limit::SlowConsumer);
            let conn = &mut self.conns[slot];
            let discarded = conn.out.clear();
            stats.drop(StatDrop::SlowConsumer, discarded as u64);
            self.close_conn(slot, close::TRY_AGAIN_LATER, "slow consumer");
        }
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot)
            && !conn.dirty
        {
            conn.dirty = true;
            conn.dirty_since = Instant::now();
            self.dirty.push_back(slot);
        }
    }

    fn flush_dirty(&mut self) {
        let shared = self.shared.clone();
        let stats = &shared.stats[self.id];
        // Connections marked during this slice go to the back: written in a later turn.
        let count = self.dirty.len().min(FLUSH_PER_TURN);
        // io_uring: every plain connection's send of this slice in one submission.
        self.uring_send_pass(count);
        for _ in 0..count {
            let Some(slot) = self.dirty.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            conn.dirty = false;
            if conn.out.bytes() > 0 {
                self.cycle_lag = self.cycle_lag.max(conn.dirty_since.elapsed());
                self.cycle_wrote = true;
            }
            let before = conn.out.bytes();
            let mut written_at = WriteStamp::default();
            let on_written = |ev: &Event| stats.publish_to_write.observe(written_at.since(ev));
            let flushed = match self.uring_sent(slot, on_written) {
                None => {
                    let conn = &mut self.conns[slot];
                    conn.flush(|ev| stats.publish_to_write.observe(written_at.since(ev)))
                }
                Some(uring::Sent::NotSent) => Ok(self.conns[slot].out.bytes() == 0),
                Some(uring::Sent::Result(r)) => r,
            };
            let conn = &mut self.conns[slot];
            let done = match flushed {
                Ok(done) => done,
                Err(_) => {
                    self.drop_conn(slot);
                    continue;
                }
            };
            let written = before - conn.out.bytes();
            stats.bytes_out.fetch_add(written as u64, Ordering::Relaxed);
            if !done {
                // The socket is full; a writable event will mark it dirty again.
                continue;
            }
            if conn.snapshots.is_some() && conn.is_open() && self.feed_snapshots(slot) {
                // Written next turn, after other connections had theirs.
                self.mark_dirty(slot);
                continue;
            }
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            match conn.phase {
                Phase::HttpClose { .. } => self.drop_conn(slot),
                Phase::Closing {
                    shut: false,
                    deadline,
                } => {
                    conn.shutdown_write();
                    conn.phase = Phase::Closing {
                        deadline,
                        shut: true,
                    };
                }
                _ => {}
            }
        }
        self.judge_overload();
    }

    /// Enters overload as soon as a connection waited longer than the limit for its
    /// write; leaves it after a whole pass over the flush list in under half of it.
    fn judge_overload(&mut self) {
        let limit = Duration::from_millis(self.shared.config.limits.overload_lag_ms);
        let was = self.overloaded;
        if !self.overloaded && self.cycle_lag > limit {
            self.overloaded = true;
        }
        // A pass that wrote nothing (a stray writable event) says nothing about load.
        if self.dirty.is_empty() && self.cycle_wrote {
            if self.overloaded && self.cycle_lag < limit / 2 {
                self.overloaded = false;
            }
            self.cycle_lag = Duration::ZERO;
            self.cycle_wrote = false;
        }
        if was != self.overloaded {
            tracing::warn!(
                shard = self.id,
                lag_ms = self.cycle_lag.as_millis() as u64,
                "shard {}",
                if self.overloaded {
                    "overloaded: delivering in batches, newest state per entity"
                } else {
                    "no longer overloaded"
                }
            );
            self.stats()
                .overloaded
                .store(self.overloaded as u64, Ordering::Relaxed);
        }
    }

    // ------------------------------------------------------------------ timers

    /// Makes sure the connection's timer fires no later than `at`. A timer already due
    /// earlier stays (when it fires, the connection's next deadline is computed anew).
    fn schedule(&mut self, slot: usize, at: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        conn.timer_at = Some(at);
        self.timers.push(Reverse((at, slot, conn.generation)));
    }

    /// The deadline of the connection's phase, or its session's next one.
    fn schedule_next(&mut self, slot: usize, now: Now) {
        let Some(conn) = self.conns.get(slot) else {
            return;
        };
        let at = match conn.phase {
            Phase::Handshake { deadline }
            | Phase::Closing { deadline, .. }
            | Phase::HttpClose { deadline } => Some(deadline),
            Phase::Open => conn.session.as_ref().and_then(|s| s.next_deadline(now)),
        };
        if let Some(at) = at {
            self.schedule(slot, at);
        }
    }

    /// Runs the connections' timers that are due, at most `TIMERS_PER_TURN` a turn (the
    /// rest stay due and make the next poll non-blocking). Heartbeats have a phase per
    /// connection, so a node's pings and their pongs are spread over the interval.
    fn fire_timers(&mut self) {
        let now = now();
        for _ in 0..TIMERS_PER_TURN {
            match self.timers.peek() {
                Some(Reverse((at, _, _))) if *at <= now.mono => {}
                _ => return,
            }
            let Some(Reverse((at, slot, generation))) = self.timers.pop() else {
                return;
            };
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != generation || conn.timer_at != Some(at) {
                continue; // Stale: the connection is gone or has an earlier timer.
            }
            conn.timer_at = None;
            match conn.phase {
                Phase::Handshake { deadline } if now.mono >= deadline => {
                    self.stats().breach(Limit::HandshakeTimeout);
                    self.stats().handshake(Outcome::Timeout);
                    self.note_handshake_timeout(slot);
                    self.drop_conn(slot);
                    continue;
                }
                Phase::Closing { deadline, .. } | Phase::HttpClose { deadline }
                    if now.mono >= deadline =>
                {
                    self.drop_conn(slot);
                    continue;
                }
                Phase::Open => {
                    if let Some(s) = conn.session.as_mut() {
                        s.handle_tick(now);
                    }
                    self.apply_actions(slot, now);
                }
                _ => {}
            }
            self.schedule_next(slot, now);
        }
    }

    fn on_tick(&mut self) {
        let now = now();
        let queued: usize = self.conns.iter().map(|(_, c)| c.out.bytes()).sum();
        self.stats()
            .queued_bytes
            .store(queued as u64, Ordering::Relaxed);
        if self.shutdown_deadline.is_some() {
            self.close_some_for_shutdown();
        }
        self.resume_overdue();
        if self.id == 0 && now.mono >= self.next_metrics {
            self.next_metrics =
                now.mono + Duration::from_millis(self.shared.config.history.metrics_interval_ms);
            self.publish_derived(now);
        }
    }

    fn wake_others(&mut self) {
        let mut mask = std::mem::take(&mut self.wake_mask);
        while mask != 0 {
            let shard = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let _ = self.shared.wakers[shard].wake();
        }
    }

    // ------------------------------------------------------------------ shutdown

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.uring_stop_accept();
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.stop_tls_listener();
        self.shutdown_deadline = Some(
            Instant::now() + Duration::from_millis(self.shared.config.server.shutdown_grace_ms),
        );
        self.next_tick = Instant::now();
        self.close_some_for_shutdown();
    }

    /// Sends close 1001 to a bounded number of open connections per turn.
    fn close_some_for_shutdown(&mut self) {
        let open: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_open() || matches!(c.phase, Phase::Handshake { .. }))
            .map(|(s, _)| s)
            .take(SHUTDOWN_CLOSES_PER_TURN)
            .collect();
        for slot in open {
            self.close_conn(slot, close::GOING_AWAY, "server shutting down");
        }
    }
}

/// The time of one connection's write, read from the clock once, after the write
/// returned (when its first event is counted), so that `publish_to_write` includes the
/// time spent writing to the connections before this one.
#[derive(Default)]
struct WriteStamp(Option<Instant>);

impl WriteStamp {
    fn since(&mut self, ev: &Event) -> Duration {
        self.0
            .get_or_insert_with(Instant::now)
            .saturating_duration_since(ev.accepted_at)
    }
}

/// Which events of an overloaded shard's batch to deliver: every event-channel event,
/// and of the state updates only the newest per (tenant, channel, entity): the greatest
/// timestamp, the later arrival among equal ones (the rule of the state store, so viewers
/// end on the value a snapshot would give).
fn newest_states(batch: &[Arc<Event>]) -> Vec<bool> {
    let mut best: HashMap<(&str, Channel, &str), usize> = HashMap::new();
    let mut keep = vec![true; batch.len()];
    for (i, ev) in batch.iter().enumerate() {
        if !ev.channel.is_state() {
            continue;
        }
        let Some(key) = ev.keys.state_key(ev.channel) else {
            continue;
        };
        match best.entry((&ev.tenant, ev.channel, key)) {
            Entry::Vacant(v) => {
                v.insert(i);
            }
            Entry::Occupied(mut o) => {
                let old = *o.get();
                if ev.ts_ms >= batch[old].ts_ms {
                    keep[old] = false;
                    o.insert(i);
                } else {
                    keep[i] = false;
                }
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::test_event;

    #[test]
    fn overload_batches_keep_every_event_and_the_newest_state_per_entity() {
        let t = Instant::now();
        let loc = |v: &str, seq| test_event(Channel::VehicleLocations, Some(v), seq, b"{}", t);
        let alert = |seq| test_event(Channel::Alerts, Some("v1"), seq, b"{}", t);
        let batch = vec![
            loc("v1", 1),
            alert(1),
            loc("v2", 2),
            loc("v1", 3),
            alert(2),
            loc("v2", 4),
            loc("v3", 5),
        ];
        assert_eq!(
            newest_states(&batch),
            vec![false, true, false, true, true, true, true]
        );
    }
}
