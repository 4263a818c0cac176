//! One TCP connection as the shard sees it: socket, buffers, phase and protocol session.

use super::outbox::Outbox;
use super::snapshot::PendingSnapshot;
use crate::hub::TenantHub;
use crate::session::Session;
use crate::wire::frame::FrameReader;
use mio::net::TcpStream;
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
    /// Snapshot values still to send, fed as the outbox drains.
    pub snapshots: Vec<PendingSnapshot>,
    /// Counted as a pending (not yet upgraded or answered) connection in admission.
    pub pending: bool,
    /// An HTTP request (publish, user/auth) whose body is still arriving.
    pub http_body: Option<Box<PendingBody>>,
    /// When this connection's entry in the shard's timer heap fires.
    pub timer_at: Option<Instant>,
    /// An allowed browser origin its HTTP answer echoes in CORS headers.
    pub cors: Option<Box<str>>,
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
    Publish(crate::auth::Principal),
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
            snapshots: Vec::new(),
            pending: true,
            http_body: None,
            timer_at: None,
            cors: None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }
}
