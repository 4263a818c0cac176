//! RFC 6455 frames: an incremental reader for client frames and writers for server frames.
//!
//! The header is parsed by tungstenite's `FrameHeader`; this module adds the server-side
//! rules: client frames must be masked, reserved bits must be clear, control frames must be
//! final and at most 125 bytes, continuation frames must continue something, and a message
//! is refused as soon as its announced length passes the limit, before its payload is read.

use std::io::Cursor;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Close codes used by the broker (RFC 6455 §7.4 and the application range).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The credential expired while the connection was open.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// Nothing was heard from the client for two heartbeat intervals.
    pub const HEARTBEAT_TIMEOUT: u16 = 4008;
}

/// Why a client's byte stream was refused; each maps to one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message too big")]
    TooBig,
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
}

impl FrameError {
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Protocol(_) => close::PROTOCOL_ERROR,
            FrameError::TooBig => close::TOO_BIG,
            FrameError::InvalidUtf8 => close::INVALID_PAYLOAD,
        }
    }
}

/// One complete client message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    Close(Option<u16>),
}

/// Reassembles client frames into messages. Owns only the fragments of an unfinished
/// message; complete frames are decoded in place from the caller's buffer.
#[derive(Debug, Default)]
pub struct FrameReader {
    max_message: usize,
    /// Opcode (text?) and bytes of a fragmented message in progress.
    fragments: Option<(bool, Vec<u8>)>,
}

impl FrameReader {
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            max_message,
            fragments: None,
        }
    }

    /// Decodes every complete frame at the start of `buf`, calling `on_message` for each
    /// complete message; stops early when `on_message` returns false. Returns the number of
    /// bytes consumed; the rest is an incomplete frame to be retried with more bytes.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        mut on_message: impl FnMut(Message<'_>) -> bool,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        loop {
            let mut cur = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(pos),
                Err(_) => return Err(FrameError::Protocol("reserved opcode")),
            };
            let header_len = cur.position() as usize;
            self.check(&header, len)?;
            let len = len as usize;
            if buf.len() - pos - header_len < len {
                return Ok(pos);
            }
            let start = pos + header_len;
            let payload = &mut buf[start..start + len];
            if let Some(mask) = header.mask {
                unmask(payload, mask);
            }
            pos = start + len;
            let go_on = match header.opcode {
                OpCode::Control(Control::Ping) => on_message(Message::Ping(payload)),
                OpCode::Control(Control::Pong) => on_message(Message::Pong),
                OpCode::Control(Control::Close) => {
                    on_message(Message::Close(parse_close(payload)?))
                }
                OpCode::Data(Data::Continue) => {
                    let (text, mut data) = self.fragments.take().expect("checked in check()");
                    data.extend_from_slice(payload);
                    if header.is_final {
                        deliver(text, &data, &mut on_message)?
                    } else {
                        self.fragments = Some((text, data));
                        true
                    }
                }
                OpCode::Data(d) => {
                    let text = d == Data::Text;
                    if header.is_final {
                        deliver(text, payload, &mut on_message)?
                    } else {
                        self.fragments = Some((text, payload.to_vec()));
                        true
                    }
                }
                OpCode::Control(Control::Reserved(_)) => unreachable!("rejected by parse"),
            };
            if !go_on {
                return Ok(pos);
            }
        }
    }

    fn check(&self, h: &FrameHeader, len: u64) -> Result<(), FrameError> {
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        if h.mask.is_none() {
            return Err(FrameError::Protocol("client frame not masked"));
        }
        match h.opcode {
            OpCode::Control(_) => {
                if !h.is_final {
                    return Err(FrameError::Protocol("fragmented control frame"));
                }
                if len > 125 {
                    return Err(FrameError::Protocol("control frame over 125 bytes"));
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some((_, data)) = &self.fragments else {
                    return Err(FrameError::Protocol("continuation without a message"));
                };
                if len > (self.max_message - data.len()) as u64 {
                    return Err(FrameError::TooBig);
                }
            }
            OpCode::Data(_) => {
                if self.fragments.is_some() {
                    return Err(FrameError::Protocol("new message inside a fragmented one"));
                }
                if len > self.max_message as u64 {
                    return Err(FrameError::TooBig);
                }
            }
        }
        Ok(())
    }
}

fn deliver(
    text: bool,
    data: &[u8],
    on_message: &mut impl FnMut(Message<'_>) -> bool,
) -> Result<bool, FrameError> {
    if text {
        simdutf8::basic::from_utf8(data).map_err(|_| FrameError::InvalidUtf8)?;
        Ok(on_message(Message::Text(data)))
    } else {
        Ok(on_message(Message::Binary(data)))
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(FrameError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !allowed {
                return Err(FrameError::Protocol("invalid close code"));
            }
            simdutf8::basic::from_utf8(&payload[2..]).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

fn write_header(out: &mut Vec<u8>, opcode: OpCode, len: usize) {
    let h = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    h.format(len as u64, out)
        .expect("writing to a Vec cannot fail");
}

/// Appends an unmasked, final server frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    write_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// A complete text frame around `json`.
pub fn text_frame(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 10);
    write_frame(&mut out, OpCode::Data(Data::Text), json);
    out
}

pub fn ping_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 2);
    write_frame(&mut out, OpCode::Control(Control::Ping), payload);
    out
}

pub fn pong_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 2);
    write_frame(&mut out, OpCode::Control(Control::Pong), payload);
    out
}

pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    let mut out = Vec::with_capacity(payload.len() + 2);
    write_frame(&mut out, OpCode::Control(Control::Close), &payload);
    out
}

/// Length of the header `write_frame` produces for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked, with the given first byte (FIN/RSV/opcode).
    pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(r: &mut FrameReader, bytes: &[u8]) -> Result<(usize, Vec<String>), FrameError> {
        let mut buf = bytes.to_vec();
        let mut seen = Vec::new();
        let n = r.decode(&mut buf, |m| {
            seen.push(match m {
                Message::Text(t) => format!("text:{}", String::from_utf8_lossy(t)),
                Message::Binary(b) => format!("bin:{}", b.len()),
                Message::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                Message::Pong => "pong".into(),
                Message::Close(c) => format!("close:{c:?}"),
            });
            true
        })?;
        Ok((n, seen))
    }

    #[test]
    fn text_and_control_frames() {
        let mut r = FrameReader::new(1024);
        let mut bytes = client_frame(0x81, b"hello");
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x88, &[0x03, 0xe8]));
        let (n, seen) = decode_all(&mut r, &bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(seen, vec!["text:hello", "ping:p", "close:Some(1000)"]);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut r = FrameReader::new(1024);
        let f = client_frame(0x81, b"hello world");
        for cut in 0..f.len() {
            let (n, seen) = decode_all(&mut r, &f[..cut]).unwrap();
            assert_eq!((n, seen.len()), (0, 0), "cut at {cut}");
        }
    }

    #[test]
    fn fragments_reassemble_with_interleaved_ping() {
        let mut r = FrameReader::new(1024);
        let mut bytes = client_frame(0x01, b"hel");
        bytes.extend(client_frame(0x89, b""));
        bytes.extend(client_frame(0x00, b"lo "));
        bytes.extend(client_frame(0x80, "wörld".as_bytes()));
        let (_, seen) = decode_all(&mut r, &bytes).unwrap();
        assert_eq!(seen, vec!["ping:", "text:hello wörld"]);
    }

    #[test]
    fn violations_map_to_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client_frame(0xC1, b"x"), 1002),                       // RSV1
            (client_frame(0x83, b"x"), 1002),                       // reserved data opcode
            (client_frame(0x8B, b"x"), 1002),                       // reserved control opcode
            (client_frame(0x09, b"x"), 1002),                       // fragmented ping
            (client_frame(0x89, &[0u8; 126]), 1002),                // control > 125
            (client_frame(0x80, b"x"), 1002),                       // continuation of nothing
            (client_frame(0x81, &[0xff, 0xfe]), 1007),              // invalid UTF-8
            (client_frame(0x81, &[b'a'; 1025]), 1009),              // too big
            (client_frame(0x88, &[0x03]), 1002),                    // 1-byte close
            (client_frame(0x88, &[0x03, 0xED]), 1002),              // close code 1005 not allowed
            (vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], 1002), // unmasked
        ];
        for (bytes, code) in cases {
            let mut r = FrameReader::new(1024);
            let err = decode_all(&mut r, &bytes).unwrap_err();
            assert_eq!(err.close_code(), code, "{bytes:02x?}: {err}");
        }
    }

    #[test]
    fn announced_huge_length_is_refused_before_payload() {
        let mut r = FrameReader::new(1024);
        let mut hdr = vec![0x81, 0x80 | 127];
        hdr.extend_from_slice(&(1u64 << 40).to_be_bytes());
        hdr.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(decode_all(&mut r, &hdr).unwrap_err(), FrameError::TooBig);
        let mut r = FrameReader::new(1024);
        let mut bytes = client_frame(0x01, &[b'a'; 1000]);
        bytes.extend(client_frame(0x80, &[b'a'; 30]));
        assert_eq!(decode_all(&mut r, &bytes).unwrap_err(), FrameError::TooBig);
    }

    #[test]
    fn server_frames_roundtrip_header_len() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            write_frame(&mut out, OpCode::Data(Data::Text), &vec![b'x'; n]);
            assert_eq!(out.len(), header_len(n) + n);
        }
        assert_eq!(close_frame(1001, "bye")[..4], [0x88, 5, 0x03, 0xE9]);
    }
}
