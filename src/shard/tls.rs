//! TLS inside the shard loop: the TLS listener, each connection's rustls record layer
//! driven non-blocking by the same `Poll`, bounded handshake work per loop turn, and the
//! refusal of input that is not TLS.
//!
//! Above the record layer a TLS connection is like any other: the decrypted bytes go to
//! `Shard::on_bytes`, and the outbox is written through `TlsConn::flush`, which encrypts
//! the shared frames (the encode-once `Arc<Event>`) into records for this connection
//! only. Plaintext connections have `Conn::tls == None` and never enter this file.

use super::outbox::Outbox;
use super::{ACCEPTS_PER_TURN, READ_BUDGET, Shard};
use crate::event::Event;
use crate::tls::{Refusal, TlsState};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};
use rustls::ServerConnection;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub const TLS_LISTENER: Token = Token(usize::MAX - 3);

/// TLS record content type of a handshake message: the first byte of a ClientHello.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The answer to a plaintext HTTP request on the TLS port.
const PLAINTEXT_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
Content-Length: 44\r\nConnection: close\r\n\r\nThis port speaks TLS: use https:// or wss://\n";

/// A shard's TLS listener and handshake budget.
pub struct ShardTls {
    listener: Option<TcpListener>,
    state: Arc<TlsState>,
    accept_pending: bool,
    /// Handshake steps left in this loop turn.
    budget: usize,
    /// Handshaking connections that had input when the budget ran out, oldest first
    /// (slot, generation): served first next turn.
    backlog: VecDeque<(usize, u32)>,
}

/// One connection's record layer.
pub struct TlsConn {
    conn: ServerConnection,
    /// The first byte was looked at (TLS or something else).
    sniffed: bool,
    /// In the shard's handshake backlog.
    queued: bool,
}

impl TlsConn {
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes pending records; Ok(false) when the socket is full.
    fn drain(&mut self, sock: &mut TcpStream) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Encrypts the outbox into records (up to rustls' 64 KiB buffer at a time, many
    /// frames per record) and writes them. Ok(true) when everything was written.
    pub fn flush(
        &mut self,
        out: &mut Outbox,
        sock: &mut TcpStream,
        mut on_written: impl FnMut(&Event),
    ) -> io::Result<bool> {
        loop {
            if !self.drain(sock)? {
                out.set_blocked();
                return Ok(false);
            }
            // Nothing can be encrypted before the handshake ends (nothing is queued then).
            if out.is_empty() || self.conn.is_handshaking() {
                return Ok(out.is_empty());
            }
            out.flush(&mut Plaintext(&mut self.conn), &mut on_written)?;
        }
    }

    /// Sends `close_notify`, best effort (the socket is being closed).
    pub fn close_notify(&mut self, sock: &mut TcpStream) {
        self.conn.send_close_notify();
        let _ = self.drain(sock);
    }
}

/// The plaintext side of a connection as a writer: it takes what rustls buffers and
/// says WouldBlock when its buffer is full (the records must go out first).
struct Plaintext<'a>(&'a mut ServerConnection);

impl Write for Plaintext<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.writer().write(buf)? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.0.writer().write_vectored(bufs)? {
            0 if bufs.iter().any(|b| !b.is_empty()) => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ShardTls {
    pub fn new(listener: TcpListener, state: Arc<TlsState>) -> ShardTls {
        ShardTls {
            listener: Some(listener),
            budget: state.settings.handshakes_per_turn,
            state,
            accept_pending: false,
            backlog: VecDeque::new(),
        }
    }

    /// Work left for the next turn (the poll must not block).
    pub fn busy(&self) -> bool {
        self.accept_pending || !self.backlog.is_empty()
    }
}

impl Shard {
    /// Adds the TLS listener (`[server.tls]`) to this shard.
    pub fn with_tls(mut self, listener: TcpListener, state: Arc<TlsState>) -> io::Result<Shard> {
        let mut listener = listener;
        self.poll
            .registry()
            .register(&mut listener, TLS_LISTENER, Interest::READABLE)?;
        self.tls = Some(Box::new(ShardTls::new(listener, state)));
        Ok(self)
    }

    pub(super) fn tls_listener_ready(&mut self) {
        if let Some(t) = &mut self.tls {
            t.accept_pending = true;
        }
    }

    pub(super) fn stop_tls_listener(&mut self) {
        if let Some(mut l) = self.tls.as_mut().and_then(|t| t.listener.take()) {
            let _ = self.poll.registry().deregister(&mut l);
        }
    }

    /// Start of a loop turn: a fresh handshake budget, spent first on the connections
    /// that waited since the last turn.
    pub(super) fn tls_turn(&mut self) {
        let Some(t) = &mut self.tls else {
            return;
        };
        t.budget = t.state.settings.handshakes_per_turn;
        for _ in 0..t.backlog.len() {
            let Some(t) = &mut self.tls else {
                return;
            };
            if t.budget == 0 {
                return;
            }
            let Some((slot, generation)) = t.backlog.pop_front() else {
                return;
            };
            let Some(tls) = self
                .conns
                .get_mut(slot)
                .filter(|c| c.generation == generation)
                .and_then(|c| c.tls.as_mut())
            else {
                continue;
            };
            tls.queued = false;
            self.on_readable_tls(slot);
        }
    }

    /// Accepts from the TLS listener, within the same per-turn bound as plain accepts.
    pub(super) fn accept_tls(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(t) = &mut self.tls else {
                return;
            };
            if !t.accept_pending {
                return;
            }
            let Some(listener) = &t.listener else {
                t.accept_pending = false;
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    t.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(shard = self.id, "TLS accept failed: {e}; retrying in 50 ms");
                    t.accept_pending = false;
                    self.accept_retry_at = Some(std::time::Instant::now() + super::ACCEPT_RETRY);
                    return;
                }
            };
            let config = t.state.current();
            let Some(slot) = self.add_conn(stream, peer, false) else {
                continue;
            };
            match ServerConnection::new(config) {
                Ok(conn) => {
                    self.conns[slot].tls = Some(Box::new(TlsConn {
                        conn,
                        sniffed: false,
                        queued: false,
                    }));
                }
                Err(e) => {
                    tracing::warn!("TLS session not created: {e}");
                    self.drop_conn(slot);
                }
            }
        }
    }

    /// Reads records, runs the handshake (within the turn's budget) and hands the
    /// decrypted bytes to the connection's phase.
    pub(super) fn on_readable_tls(&mut self, slot: usize) {
        let mut plain = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(conn) = self.conns.get_mut(slot) {
            let Some(tls) = conn.tls.as_mut() else {
                break;
            };
            let handshaking = tls.conn.is_handshaking();
            if handshaking {
                let Some(st) = self.tls.as_mut() else {
                    break;
                };
                if st.budget == 0 {
                    if !tls.queued {
                        tls.queued = true;
                        st.backlog.push_back((slot, conn.generation));
                        self.shared.stats[self.id]
                            .tls
                            .deferred
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
            }
            if budget == 0 {
                self.pending_reads.push(slot);
                break;
            }
            if !tls.sniffed {
                let mut first = [0u8; 1];
                match conn.stream.peek(&mut first) {
                    Ok(0) => {
                        self.drop_conn(slot);
                        break;
                    }
                    Ok(_) => {
                        tls.sniffed = true;
                        if first[0] != HANDSHAKE_RECORD && first[0].is_ascii_uppercase() {
                            self.refuse_plaintext(slot);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.drop_conn(slot);
                        break;
                    }
                }
            }
            let n = match tls.conn.read_tls(&mut conn.stream) {
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
            budget = budget.saturating_sub(n);
            let stats = &self.shared.stats[self.id];
            stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            if handshaking && let Some(st) = self.tls.as_mut() {
                st.budget -= 1;
            }
            if let Err(e) = tls.conn.process_new_packets() {
                self.refuse_tls(slot, Refusal::of(&e), &e);
                break;
            }
            if handshaking && !tls.conn.is_handshaking() {
                stats.tls.handshakes.fetch_add(1, Ordering::Relaxed);
            }
            if tls.conn.wants_write() {
                self.mark_dirty(slot);
            }
            if !self.deliver_plaintext(slot, &mut plain) {
                break;
            }
        }
        self.scratch = plain;
    }

    /// Hands the decrypted bytes to the connection. False when it is gone or the peer
    /// sent `close_notify`.
    fn deliver_plaintext(&mut self, slot: usize, plain: &mut [u8]) -> bool {
        loop {
            let Some(tls) = self.conns.get_mut(slot).and_then(|c| c.tls.as_mut()) else {
                return false;
            };
            match tls.conn.reader().read(plain) {
                Ok(0) => {
                    // close_notify: the peer is done; answer it as a closed socket.
                    self.drop_conn(slot);
                    return false;
                }
                Ok(n) => self.on_bytes(slot, &mut plain[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    self.drop_conn(slot);
                    return false;
                }
            }
        }
    }

    /// Closes a connection whose TLS failed: its alert goes out (best effort), counted.
    fn refuse_tls(&mut self, slot: usize, why: Refusal, e: &rustls::Error) {
        tracing::debug!(
            shard = self.id,
            slot,
            reason = why.name(),
            "TLS refused: {e}"
        );
        self.shared.stats[self.id].tls.refuse(why);
        if let Some(conn) = self.conns.get_mut(slot)
            && let Some(tls) = conn.tls.as_mut()
        {
            let _ = tls.drain(&mut conn.stream);
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            // The alert is the last word: no close_notify after it.
            conn.tls = None;
        }
        self.drop_conn(slot);
    }

    /// A plaintext HTTP request on the TLS port: reads what came, answers 400 in clear
    /// text saying to use TLS, closes.
    fn refuse_plaintext(&mut self, slot: usize) {
        self.shared.stats[self.id].tls.refuse(Refusal::Plaintext);
        if let Some(conn) = self.conns.get_mut(slot) {
            let mut sink = [0u8; 4096];
            for _ in 0..16 {
                match conn.stream.read(&mut sink) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            let _ = conn.stream.write(PLAINTEXT_REPLY);
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.tls = None;
        }
        self.drop_conn(slot);
    }

    /// The handshake deadline passed: a TLS handshake that never finished is counted.
    pub(super) fn note_handshake_timeout(&self, slot: usize) {
        if self
            .conns
            .get(slot)
            .and_then(|c| c.tls.as_ref())
            .is_some_and(|t| t.conn.is_handshaking())
        {
            self.shared.stats[self.id].tls.refuse(Refusal::Timeout);
        }
    }
}
