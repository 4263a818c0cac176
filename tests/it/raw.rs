//! A raw WebSocket client for misbehaving on purpose: a hand-made HTTP upgrade over a
//! std `TcpStream`, then hand-built frames (masked or not, any RSV bits, opcode, length
//! or fragmentation) and a server-frame reader that checks what the server sends.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The RFC 6455 sample key and its accept value.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub const RSV1: u8 = 0x40;
pub const RSV2: u8 = 0x20;
pub const RSV3: u8 = 0x10;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Bytes of one frame. `first_extra` is OR-ed into the first byte (RSV bits);
/// `mask` false sends the payload unmasked (a protocol error from a client).
pub fn frame_bytes(fin: bool, first_extra: u8, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | first_extra | (opcode & 0x0f)];
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=65535 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A final, masked frame: what a well-behaved client sends.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_bytes(true, 0, opcode, payload, true)
}

/// The payload of a close frame.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// One frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// The three RSV bits, in place (0x70 mask of the first byte).
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("server text is UTF-8")
    }
}

/// How reading the next server frame ended, when it did not yield one.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// The server closed the TCP connection (EOF).
    Eof,
    /// The connection was reset.
    Reset,
    Timeout,
}

/// The raw HTTP response to an upgrade request that was refused.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

pub struct Raw {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed into frames.
    buf: Vec<u8>,
}

/// The request head of an upgrade to `path_and_query`.
pub fn upgrade_request(path_and_query: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

impl Raw {
    /// Upgrades to `path_and_query`; panics unless the server answers 101.
    pub fn connect(addr: SocketAddr, path_and_query: &str) -> Raw {
        Raw::try_connect(addr, path_and_query)
            .unwrap_or_else(|r| panic!("upgrade to {path_and_query} refused: {r:?}"))
    }

    /// Upgrades to `path_and_query`; a refusal returns the HTTP status and body.
    pub fn try_connect(addr: SocketAddr, path_and_query: &str) -> Result<Raw, Refused> {
        let mut stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(upgrade_request(path_and_query).as_bytes())
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) => break buf.len(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading the upgrade response: {e}"),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status != 101 {
            // An HTTP error: the body follows, then the server closes.
            let mut rest = buf[head_end..].to_vec();
            let _ = stream.read_to_end(&mut rest);
            return Err(Refused {
                status,
                body: String::from_utf8_lossy(&rest).into_owned(),
            });
        }
        let accept_ok = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == WS_ACCEPT
            })
        });
        assert!(accept_ok, "bad Sec-WebSocket-Accept in {head:?}");
        Ok(Raw {
            stream,
            buf: buf[head_end..].to_vec(),
        })
    }

    /// Writes raw bytes; errors (the server may already have closed) are returned.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends a final, masked frame; panics if the write fails.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_raw(&frame(opcode, payload)).expect("write frame");
    }

    pub fn send_text(&mut self, s: &str) {
        self.send(OP_TEXT, s.as_bytes());
    }

    /// The next server frame, within `timeout`.
    pub fn read_frame(&mut self, timeout: Duration) -> Result<Frame, ReadEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((f, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadEnd::Timeout);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    assert!(
                        self.buf.is_empty(),
                        "EOF inside a server frame: {:02x?}",
                        self.buf
                    );
                    return Err(ReadEnd::Eof);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ReadEnd::Timeout);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Err(ReadEnd::Reset);
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The next frame other than a server heartbeat ping, within 5 s.
    pub fn next(&mut self) -> Frame {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                Ok(f) if f.opcode == OP_PING => continue,
                Ok(f) => return f,
                Err(e) => panic!("expected a frame within 5 s: {e:?}"),
            }
        }
    }

    /// The next JSON text message (heartbeat pings skipped), within 5 s.
    pub fn next_json(&mut self) -> Value {
        let f = self.next();
        assert_eq!(f.opcode, OP_TEXT, "expected a text frame, got {f:?}");
        assert!(f.fin, "server text is not fragmented");
        serde_json::from_slice(&f.payload).expect("server sends JSON")
    }

    /// Reads until the server's close frame (text and pings before it are skipped) and
    /// returns its code; then asserts that the server closes the TCP connection.
    pub fn expect_close(&mut self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let code = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                Ok(f) if f.opcode == OP_CLOSE => {
                    assert!(f.fin && f.rsv == 0, "bad close frame {f:?}");
                    break f.close_code().expect("close frame carries a code");
                }
                Ok(_) => continue,
                Err(e) => panic!("expected a close frame within 5 s: {e:?}"),
            }
        };
        self.expect_eof();
        code
    }

    /// Asserts that the server closes the TCP connection within 5 s with nothing more sent
    /// (heartbeat pings aside).
    pub fn expect_eof(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                Ok(f) if f.opcode == OP_PING => continue,
                Ok(f) => panic!("expected EOF, got {f:?}"),
                Err(ReadEnd::Eof) | Err(ReadEnd::Reset) => return,
                Err(ReadEnd::Timeout) => panic!("the server did not close within 5 s"),
            }
        }
    }

    /// Sends a WebSocket ping and expects the pong with the same payload next.
    pub fn assert_ping_pong(&mut self, payload: &[u8]) {
        self.send(OP_PING, payload);
        let f = self.next();
        assert_eq!(f.opcode, OP_PONG, "expected a pong, got {f:?}");
        assert!(f.fin);
        assert_eq!(f.payload, payload);
    }

    /// Closes the socket with SO_LINGER 0, so that the peer sees a TCP reset.
    pub fn reset(self) {
        reset(self.stream);
    }
}

/// Drops `stream` with SO_LINGER 0: the kernel sends RST instead of FIN.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

/// Parses one complete server frame at the start of `buf`: (frame, bytes used).
/// Server frames must not be masked.
pub fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    assert_eq!(
        b1 & 0x80,
        0,
        "server frames must not be masked: {b0:02x} {b1:02x}"
    );
    let (len, header) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return None;
    }
    Some((
        Frame {
            fin: b0 & 0x80 != 0,
            rsv: b0 & 0x70,
            opcode: b0 & 0x0f,
            payload: buf[header..header + len].to_vec(),
        },
        header + len,
    ))
}
