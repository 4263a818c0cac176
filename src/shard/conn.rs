//! One TCP connection as the shard sees it: socket, buffers, phase and protocol session.

use super::outbox::Outbox;
use super::snapshot::PendingSnapshot;
use super::tls::TlsConn;
use crate::event::Event;
use crate::hub::TenantHub;
use crate::session::Session;
use crate::wire::frame::FrameReader;
use mio::net::TcpStream;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request head, until `deadline`.
    Handshake { deadline: Instant },
    /// WebSocket open.
    Open,
    /// A close frame is queued; after it is written the write side is shut and the
    /// connection dropped when the peer closes or at `deadline`.
    Closing { deadline: Instant, shut: bool },
    /// An HTTP response is queued; drop after it is written.
    HttpClose { deadline: Instant },
}

pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub generation: u32,
    pub phase: Phase,
    /// Unprocessed inbound bytes (an incomplete head or frame). Empty, unallocated, when idle.
    pub rbuf: Vec<u8>,
    pub reader: FrameReader,
    pub out: Outbox,
    pub session: Option<Session>,
    pub hub: Option<Arc<TenantHub>>,
    /// In the shard's flush list already.
    pub dirty: bool,
    /// When it was put on the flush list (how long it waited is the shard's lag).
    pub dirty_since: Instant,
    /// An echo-endpoint connection (testing aid): no session.
    pub echo: bool,
    /// Snapshot values still to send, fed as the outbox drains: `None` when there are
    /// none (never an empty list), so that a connection holds 8 bytes for it (issue 16).
    pub snapshots: Option<Box<Snapshots>>,
    /// Counted as a pending (not yet upgraded or answered) connection in admission.
    pub pending: bool,
    /// What only a plain HTTP request uses: its CORS origin, a body still arriving.
    /// `None` on an open WebSocket (freed at the upgrade).
    pub http: Option<Box<HttpExtra>>,
    /// When this connection's entry in the shard's timer heap fires.
    pub timer_at: Option<Instant>,
    /// Accepted on the TLS listener: its record layer (`None`: plaintext).
    pub tls: Option<Box<TlsConn>>,
    /// io_uring driver: a one-shot `POLLOUT` is armed (the socket was full).
    pub pollout_armed: bool,
}

/// The snapshots a connection still has to send, in order.
#[derive(Default)]
pub struct Snapshots(pub Vec<PendingSnapshot>);

/// The parts of a connection only an HTTP request (not a WebSocket) uses.
#[derive(Debug, Default)]
pub struct HttpExtra {
    /// An allowed browser origin its HTTP answer echoes in CORS headers.
    pub cors: Option<Box<str>>,
    /// An HTTP request (publish, user/auth) whose body is still arriving.
    pub body: Option<PendingBody>,
}

/// What a request still waiting for its body has already decided, so that the head is
/// not parsed, nor the credential verified, again on every read.
#[derive(Debug)]
pub struct PendingBody {
    pub head: usize,
    pub len: usize,
    pub then: BodyFor,
}

/// What a complete body goes to.
#[derive(Debug)]
pub enum BodyFor {
    /// `POST /v1/publish`, by this principal.
    Publish(Arc<crate::auth::Principal>),
    /// A `user/auth` or `user/logout` call; `query`: the request's query parameters.
    User(crate::sessions::UserCall, Vec<(String, String)>),
}

impl Conn {
    pub fn new(
        stream: TcpStream,
        peer: SocketAddr,
        generation: u32,
        deadline: Instant,
        max_message: usize,
    ) -> Conn {
        Conn {
            stream,
            peer,
            generation,
            phase: Phase::Handshake { deadline },
            rbuf: Vec::new(),
            reader: FrameReader::new(max_message),
            out: Outbox::default(),
            session: None,
            hub: None,
            dirty: false,
            dirty_since: deadline,
            echo: false,
            snapshots: None,
            pending: true,
            http: None,
            timer_at: None,
            tls: None,
            pollout_armed: false,
        }
    }

    /// Writes the outbox to the socket (through the record layer on TLS: the one branch
    /// the plaintext path pays). Ok(true) when everything was written.
    pub fn flush(&mut self, on_written: impl FnMut(&Event)) -> io::Result<bool> {
        match &mut self.tls {
            None => self.out.flush(&mut self.stream, on_written),
            Some(tls) => tls.flush(&mut self.out, &mut self.stream, on_written),
        }
    }

    /// Something is waiting for the socket: queued frames, or TLS records.
    pub fn wants_write(&self) -> bool {
        self.out.bytes() > 0 || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Ends our half of the stream (after `close_notify` on TLS).
    pub fn shutdown_write(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.close_notify(&mut self.stream);
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// The HTTP-only parts, allocated now if they were not.
    pub fn http_mut(&mut self) -> &mut HttpExtra {
        self.http.get_or_insert_with(Default::default)
    }

    /// Whether an HTTP request's body is still arriving.
    pub fn awaits_body(&self) -> bool {
        self.http.as_ref().is_some_and(|h| h.body.is_some())
    }

    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }
}

#[cfg(test)]
mod size_profile {
    //! Idle-memory profile by structure (issue 16): the inline size of what every open
    //! connection holds. Printed with `cargo test size_profile -- --nocapture`; the
    //! bounds are set from the first measured values (see docs/performance.md).
    use super::*;
    use crate::auth::Principal;
    use std::mem::size_of;

    #[test]
    fn per_connection_structures() {
        let rows = [
            ("Conn", size_of::<Conn>()),
            ("Option<Session>", size_of::<Option<Session>>()),
            ("Session", size_of::<Session>()),
            ("Outbox", size_of::<Outbox>()),
            ("FrameReader", size_of::<FrameReader>()),
            ("Phase", size_of::<Phase>()),
            ("Principal", size_of::<Principal>()),
            ("Option<Principal>", size_of::<Option<Principal>>()),
            (
                "HttpExtra (boxed, HTTP requests only)",
                size_of::<HttpExtra>(),
            ),
        ];
        for (name, bytes) in rows {
            println!("size_of {name}: {bytes}");
        }
        // Upper bounds: the sizes after issue 16's shrinking (2026-12-06; before: Conn
        // 872, Session 520, FrameReader 80), see docs/performance.md.
        assert!(
            rows.iter().any(|&(n, b)| n == "Conn" && b <= 552),
            "Conn grew past 552 bytes"
        );
        assert!(
            rows.iter().any(|&(n, b)| n == "Session" && b <= 280),
            "Session grew past 280 bytes"
        );
        assert!(
            rows.iter().any(|&(n, b)| n == "Outbox" && b <= 72),
            "Outbox grew past 72 bytes"
        );
        assert!(
            rows.iter().any(|&(n, b)| n == "FrameReader" && b <= 32),
            "FrameReader grew past 32 bytes"
        );
        assert!(
            rows.iter().any(|&(n, b)| n == "Principal" && b <= 104),
            "Principal grew past 104 bytes"
        );
        // A session holds its principal as an `Arc` (shared per API key), not inline.
        assert_eq!(size_of::<Option<Arc<Principal>>>(), 8);
    }
}
