//! A shard: one thread, one mio `Poll`, one slab of connections, one subscriber index.
//!
//! The shard is the thin IO driver around the pure core: it moves bytes between sockets
//! and [`Session`]s and applies the actions sessions return. The path of one message:
//!
//! ```text
//! socket --read--> FrameReader --Message--> Session --Action::Publish--> hub lock:
//!   seq+1, encode once (Event), record state, push Arc<Event> to every shard in the mask
//! shard inbox --Deliver(Arc<Event>)--> SubscriberIndex (bitset union) --> Session::verdict
//!   --> Outbox (Arc clone, no copy) --writev--> socket
//! ```
//!
//! Work per loop turn is bounded: accepts, bytes read per connection, inbox messages.

pub mod conn;
pub mod outbox;

use crate::dialect::native::Parser;
use crate::event::Event;
use crate::hub::TenantHub;
use crate::json;
use crate::metrics::ShardStats;
use crate::node::Shared;
use crate::session::{Action, Ctx, Now, Selection, Session, Verdict};
use crate::wire::frame::{self, close};
use crate::wire::handshake::{self, Endpoint, Head};
use crate::{auth::Credential, model::Channel};
use conn::{Conn, Phase};
use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);

/// Messages other threads send a shard.
#[derive(Debug)]
pub enum ShardMsg {
    Deliver(Arc<Event>),
    Shutdown,
}

/// Accepts per loop turn, so a connect storm cannot starve delivery.
const ACCEPTS_PER_TURN: usize = 256;
/// Bytes read from one connection per loop turn.
const READ_BUDGET: usize = 64 * 1024;
/// Inbox messages handled per loop turn.
const INBOX_PER_TURN: usize = 8192;
/// Time a peer gets to answer our close frame, or to read an HTTP response.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Connections sent their close frame per turn during shutdown (no reconnect storm).
const SHUTDOWN_CLOSES_PER_TURN: usize = 500;
/// Tick interval during shutdown: 500 closes per 10 ms is 50 000 per second.
const SHUTDOWN_TICK: Duration = Duration::from_millis(10);

pub struct Shard {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<ShardMsg>,
    shared: Arc<Shared>,
    conns: Slab<Conn>,
    index: crate::route::index::SubscriberIndex,
    parser: Parser,
    scratch: Vec<u8>,
    dirty: Vec<usize>,
    /// Slots whose read budget ran out with data possibly left (edge-triggered).
    pending_reads: Vec<usize>,
    /// Other shards to wake at the end of this turn.
    wake_mask: u64,
    accept_pending: bool,
    next_generation: u32,
    next_event: u64,
    next_tick: Instant,
    shutdown_deadline: Option<Instant>,
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

impl Shard {
    pub fn new(
        id: usize,
        poll: Poll,
        listener: TcpListener,
        inbox: Receiver<ShardMsg>,
        shared: Arc<Shared>,
    ) -> io::Result<Shard> {
        let mut listener = listener;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Shard {
            id,
            poll,
            listener: Some(listener),
            inbox,
            shared,
            conns: Slab::new(),
            index: Default::default(),
            parser: Parser::default(),
            scratch: vec![0; READ_BUDGET],
            dirty: Vec::new(),
            pending_reads: Vec::new(),
            wake_mask: 0,
            accept_pending: false,
            next_generation: 0,
            next_event: 0,
            next_tick: Instant::now(),
            shutdown_deadline: None,
        })
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.id]
    }

    /// Runs the event loop until shutdown completes.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let tick = Session::tick_interval(&self.shared.config.limits);
        loop {
            let busy =
                self.accept_pending || !self.pending_reads.is_empty() || !self.inbox.is_empty();
            let timeout = if busy {
                Duration::ZERO
            } else {
                self.next_tick.saturating_duration_since(Instant::now())
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(shard = self.id, "poll failed: {e}");
                return;
            }
            let turn_start = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_pending = true,
                    WAKER => {}
                    Token(slot) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(slot);
                        }
                        if ev.is_writable() {
                            self.mark_dirty(slot);
                        }
                    }
                }
            }
            if self.accept_pending {
                self.accept();
            }
            for slot in std::mem::take(&mut self.pending_reads) {
                self.on_readable(slot);
            }
            self.drain_inbox();
            self.flush_dirty();
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
            stats
                .busy_ns
                .fetch_add(turn_start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if let Some(deadline) = self.shutdown_deadline
                && (self.conns.is_empty() || Instant::now() >= deadline)
            {
                tracing::debug!(shard = self.id, left = self.conns.len(), "shard stopped");
                return;
            }
        }
    }

    // ------------------------------------------------------------------ accept

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = &self.listener else {
                self.accept_pending = false;
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.add_conn(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) => {
                    // EMFILE and friends: retry on a later turn rather than spin.
                    tracing::warn!(shard = self.id, "accept failed: {e}");
                    self.accept_pending = false;
                    return;
                }
            }
        }
        // Budget spent with connections possibly still queued: continue next turn.
    }

    fn add_conn(&mut self, mut stream: TcpStream, peer: std::net::SocketAddr) {
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        if slot >= WAKER.0 {
            return;
        }
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!("register failed: {e}");
            return;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let limits = &self.shared.config.limits;
        entry.insert(Conn::new(
            stream,
            peer,
            self.next_generation,
            Instant::now() + limits.handshake_timeout(),
            limits.max_message_bytes,
        ));
        self.stats()
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
    }

    fn drop_conn(&mut self, slot: usize) {
        if !self.conns.contains(slot) {
            return;
        }
        let mut conn = self.conns.remove(slot);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if let (Some(session), Some(hub)) = (&conn.session, &conn.hub) {
            let subs: Vec<(Channel, Selection)> = session
                .subscriptions()
                .map(|(c, s)| (c, s.clone()))
                .collect();
            for (channel, sel) in subs {
                self.unindex(hub, channel, &sel, slot);
            }
        }
        if conn.session.is_some() {
            self.stats()
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    // ------------------------------------------------------------------ read

    fn on_readable(&mut self, slot: usize) {
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
                self.on_handshake_bytes(slot);
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
        let now = now();
        let shared = self.shared.clone();
        let mut ctx = Ctx {
            limits: &shared.config.limits,
            auth: &shared.auth,
            parser: &mut self.parser,
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
                self.close_conn(slot, e.close_code(), &e.to_string());
                return buf.len();
            }
        };
        self.apply_actions(slot, now);
        used
    }

    fn on_handshake_bytes(&mut self, slot: usize) {
        let limits = &self.shared.config.limits;
        let conn = &mut self.conns[slot];
        let (head, req) = match handshake::parse_request(&conn.rbuf, limits.max_handshake_bytes) {
            Ok((Head::Partial, _)) => return,
            Ok((Head::Complete(n), req)) => (n, req),
            Err(e) => {
                self.stats()
                    .handshakes_failed
                    .fetch_add(1, Ordering::Relaxed);
                return self.http_reply(slot, handshake::json_error(e.status(), &e.to_string()));
            }
        };
        let endpoint = Endpoint::classify(&req.path);
        if req.method != "GET" && endpoint != Endpoint::NotFound {
            return self.http_reply(slot, handshake::json_error(405, "method not allowed"));
        }
        let scope = match endpoint {
            Endpoint::Healthz => {
                return self.http_reply(slot, handshake::response(200, "text/plain", b"ok\n"));
            }
            Endpoint::Readyz => {
                let (status, body) = self.shared.readiness();
                return self.http_reply(
                    slot,
                    handshake::response(status, "text/plain", body.as_bytes()),
                );
            }
            Endpoint::Metrics => {
                let body = self.shared.render_metrics();
                return self.http_reply(
                    slot,
                    handshake::response(200, "text/plain; version=0.0.4", body.as_bytes()),
                );
            }
            Endpoint::NotFound => {
                return self.http_reply(slot, handshake::json_error(404, "not found"));
            }
            Endpoint::Native(scope) => scope,
        };
        if !(req.upgrade_websocket && req.connection_upgrade) {
            return self.http_reply(
                slot,
                handshake::json_error(426, "this endpoint speaks WebSocket only"),
            );
        }
        let Some(key) = req
            .ws_key
            .as_deref()
            .filter(|_| req.ws_version.as_deref() == Some("13"))
        else {
            self.stats()
                .handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            return self.http_reply(
                slot,
                handshake::json_error(400, "Sec-WebSocket-Key and version 13 required"),
            );
        };
        let cred = req
            .query_param("token")
            .map(Credential::Token)
            .or_else(|| req.query_param("api_key").map(Credential::ApiKey))
            .or_else(|| req.bearer().map(Credential::Bearer));
        let principal = match cred {
            None => None,
            Some(c) => match self.shared.auth.authenticate(c, now().unix_secs()) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.stats()
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    return self.http_reply(slot, handshake::json_error(401, &e.to_string()));
                }
            },
        };
        if let Some(p) = &principal {
            let fleet = req.query_param("fleet_id");
            let scoped_fleet = match &scope {
                handshake::Scope::Fleet(f) => Some(&**f),
                _ => None,
            };
            if fleet.or(scoped_fleet).is_some_and(|f| f != &*p.tenant)
                || scoped_fleet.is_some_and(|f| f != &*p.tenant)
            {
                self.stats()
                    .handshakes_failed
                    .fetch_add(1, Ordering::Relaxed);
                return self.http_reply(
                    slot,
                    handshake::json_error(403, "credential does not belong to this fleet"),
                );
            }
        }
        let conn = &mut self.conns[slot];
        conn.out.push_owned(handshake::switching_protocols(key));
        let conn_id = format!("c{}-{}-{}", self.id, slot, conn.generation).into_boxed_str();
        conn.session = Some(Session::new(
            conn_id,
            scope,
            principal,
            Instant::now(),
            limits,
        ));
        conn.phase = Phase::Open;
        let rest = conn.rbuf.split_off(head);
        conn.rbuf = Vec::new();
        self.stats()
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        self.stats().handshakes_ok.fetch_add(1, Ordering::Relaxed);
        self.mark_dirty(slot);
        self.apply_actions(slot, now());
        if !rest.is_empty() {
            let mut rest = rest;
            self.on_bytes(slot, &mut rest);
        }
    }

    fn http_reply(&mut self, slot: usize, response: Vec<u8>) {
        let conn = &mut self.conns[slot];
        conn.rbuf = Vec::new();
        conn.out.push_owned(response);
        conn.phase = Phase::HttpClose {
            deadline: Instant::now() + CLOSE_LINGER,
        };
        self.mark_dirty(slot);
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
                Action::Send(frame) => {
                    conn.out.push_owned(frame);
                    self.mark_dirty(slot);
                }
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
                } => self.subscribe(slot, channel, &added, &snapshot),
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
                Action::Close { code, reason } => self.close_conn(slot, code, reason),
            }
        }
    }

    fn subscribe(
        &mut self,
        slot: usize,
        channel: Channel,
        added: &Selection,
        snapshot: &Selection,
    ) {
        let Some(hub) = self.conns[slot].hub.clone() else {
            return;
        };
        let first = self.index.add(&hub.id, channel, added, slot);
        let mut ch = hub.channel(channel).lock();
        if first {
            ch.shard_mask |= 1 << self.id;
        }
        let (events, fence) = if channel.is_state() {
            ch.snapshot(snapshot)
        } else {
            Default::default()
        };
        drop(ch);
        let conn = &mut self.conns[slot];
        let session = conn.session.as_mut().expect("open");
        for ev in events {
            match session.verdict(&ev) {
                Verdict::Skip => {}
                Verdict::Shared => conn.out.push_shared(ev),
                Verdict::Projected(m) => conn.out.push_owned(ev.projected_frame(&m)),
            }
        }
        session.set_fence(channel, fence);
        self.mark_dirty(slot);
    }

    fn unindex(&mut self, hub: &TenantHub, channel: Channel, sel: &Selection, slot: usize) {
        if self.index.remove(&hub.id, channel, sel, slot) {
            let mut ch = hub.channel(channel).lock();
            // Re-check under the lock: nothing else on this shard can add meanwhile.
            if !self.index.has_interest(&hub.id, channel) {
                ch.shard_mask &= !(1 << self.id);
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
        let (events, _) = hub.channel(channel).lock().snapshot(sel);
        let ts = crate::dialect::native::format_rfc3339_ms(now.unix_ms);
        let json = crate::dialect::native::reply("snapshot", id, &ts, |o| {
            o.extend_from_slice(b"{\"channel\":");
            json::write_str(o, channel.name());
            o.extend_from_slice(b",\"items\":[");
            for (i, ev) in events.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                o.extend_from_slice(ev.json());
            }
            o.extend_from_slice(b"]}");
        });
        self.conns[slot].out.push_owned(frame::text_frame(&json));
        self.mark_dirty(slot);
    }

    fn publish(&mut self, slot: usize, p: crate::event::Publication, _now: Now) {
        let Some(hub) = self.conns[slot].hub.clone() else {
            return;
        };
        self.next_event += 1;
        let mut fresh = Vec::with_capacity(32);
        fresh.extend_from_slice(b"\"evt_");
        fresh.extend_from_slice(
            format!(
                "{:x}_{}_{}",
                self.shared.hubs.epoch, self.id, self.next_event
            )
            .as_bytes(),
        );
        fresh.push(b'"');
        let channel = p.channel;
        let mut ch = hub.channel(channel).lock();
        ch.seq += 1;
        let ev = Arc::new(Event::encode(
            hub.id.clone(),
            p,
            ch.seq,
            self.shared.hubs.epoch,
            &fresh,
            Instant::now(),
        ));
        ch.record_state(&ev);
        let mut mask = ch.shard_mask;
        while mask != 0 {
            let shard = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let _ = self.shared.mesh[shard].send(ShardMsg::Deliver(ev.clone()));
            if shard != self.id {
                self.wake_mask |= 1 << shard;
            }
        }
        drop(ch);
        self.stats().publishes.fetch_add(1, Ordering::Relaxed);
    }

    fn close_conn(&mut self, slot: usize, code: u16, reason: &str) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match conn.phase {
            Phase::Open => {
                conn.out.push_owned(frame::close_frame(code, reason));
                conn.phase = Phase::Closing {
                    deadline: Instant::now() + CLOSE_LINGER,
                    shut: false,
                };
                conn.rbuf = Vec::new();
                self.mark_dirty(slot);
            }
            Phase::Handshake { .. } => self.drop_conn(slot),
            Phase::Closing { .. } | Phase::HttpClose { .. } => {}
        }
    }

    // ------------------------------------------------------------------ delivery

    fn drain_inbox(&mut self) {
        for _ in 0..INBOX_PER_TURN {
            match self.inbox.try_recv() {
                Ok(ShardMsg::Deliver(ev)) => self.deliver(&ev),
                Ok(ShardMsg::Shutdown) => self.begin_shutdown(),
                Err(_) => return,
            }
        }
    }

    fn deliver(&mut self, ev: &Arc<Event>) {
        let max_out = self.shared.config.limits.max_outbound_bytes;
        let mut delivered = 0u64;
        let mut slow = Vec::new();
        let conns = &mut self.conns;
        let dirty = &mut self.dirty;
        self.index
            .for_each(&ev.tenant, ev.channel, &ev.keys, |slot| {
                let Some(conn) = conns.get_mut(slot) else {
                    return;
                };
                if !conn.is_open()
                    || conn
                        .hub
                        .as_ref()
                        .is_none_or(|h| !Arc::ptr_eq(&h.id, &ev.tenant))
                {
                    return;
                }
                let Some(session) = conn.session.as_mut() else {
                    return;
                };
                match session.verdict(ev) {
                    Verdict::Skip => return,
                    Verdict::Shared => conn.out.push_shared(ev.clone()),
                    Verdict::Projected(m) => conn.out.push_owned(ev.projected_frame(&m)),
                }
                delivered += 1;
                if conn.out.bytes() > max_out {
                    slow.push(slot);
                }
                if !conn.dirty {
                    conn.dirty = true;
                    dirty.push(slot);
                }
            });
        self.stats()
            .deliveries
            .fetch_add(delivered, Ordering::Relaxed);
        for slot in slow {
            self.stats()
                .slow_consumers_closed
                .fetch_add(1, Ordering::Relaxed);
            self.conns[slot].out.clear();
            self.close_conn(slot, close::TRY_AGAIN_LATER, "slow consumer");
        }
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    fn flush_dirty(&mut self) {
        for slot in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            conn.dirty = false;
            let before = conn.out.bytes();
            let done = match conn.out.flush(&mut conn.stream) {
                Ok(done) => done,
                Err(_) => {
                    self.drop_conn(slot);
                    continue;
                }
            };
            let written = before - conn.out.bytes();
            self.shared.stats[self.id]
                .bytes_out
                .fetch_add(written as u64, Ordering::Relaxed);
            if !done {
                // The socket is full; a writable event will mark it dirty again.
                continue;
            }
            match conn.phase {
                Phase::HttpClose { .. } => self.drop_conn(slot),
                Phase::Closing {
                    shut: false,
                    deadline,
                } => {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    conn.phase = Phase::Closing {
                        deadline,
                        shut: true,
                    };
                }
                _ => {}
            }
        }
    }

    // ------------------------------------------------------------------ timers

    fn on_tick(&mut self) {
        let now = now();
        let mut expired = Vec::new();
        let mut ticked = Vec::new();
        for (slot, conn) in self.conns.iter() {
            match conn.phase {
                Phase::Handshake { deadline }
                | Phase::Closing { deadline, .. }
                | Phase::HttpClose { deadline }
                    if now.mono >= deadline =>
                {
                    expired.push(slot)
                }
                Phase::Open => ticked.push(slot),
                _ => {}
            }
        }
        for slot in expired {
            self.drop_conn(slot);
        }
        for slot in ticked {
            if let Some(s) = self.conns[slot].session.as_mut() {
                s.handle_tick(now);
            }
            self.apply_actions(slot, now);
        }
        if self.shutdown_deadline.is_some() {
            self.close_some_for_shutdown();
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
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
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
