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
    /// The credential was revoked (`[auth] revoked_*`, on SIGHUP) while it was open.
    pub const CREDENTIAL_REVOKED: u16 = 4001;
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
///
/// The UTF-8 of a text message is checked as its bytes arrive: each fragment when it is
/// complete, and the received part of an incomplete frame each time `decode` sees more of
/// it, so invalid text is refused (1007) as soon as the bytes that make it invalid are
/// in, not when the message ends. Every payload byte is validated once.
#[derive(Debug, Default)]
pub struct FrameReader {
    max_message: usize,
    /// Opcode (text?) and bytes of a fragmented message in progress.
    /// Boxed, as `partial`: an idle connection holds neither (issue 16).
    fragments: Option<Box<(bool, Vec<u8>)>>,
    /// UTF-8 state after the last complete fragment of the text message in progress.
    utf8: Utf8Stream,
    /// The text frame that was incomplete at the end of the buffer last time: the caller
    /// passes its bytes again, with more, at the start of the next call.
    partial: Option<Box<PartialText>>,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message
    /// (`crate::wire::deflate`).
    deflate: bool,
    /// The fragmented message in progress is compressed (its first frame had RSV1).
    compressed: bool,
}

/// How far the payload of an incomplete text frame has been validated.
#[derive(Debug, Clone, Copy)]
struct PartialText {
    /// Identifies the frame (with `len`) when it comes back.
    mask: [u8; 4],
    len: usize,
    /// Payload bytes validated (they are still masked in the caller's buffer).
    checked: usize,
    /// UTF-8 state after those bytes.
    utf8: Utf8Stream,
}

impl FrameReader {
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            max_message,
            ..FrameReader::default()
        }
    }

    /// permessage-deflate was negotiated for this connection.
    pub fn set_deflate(&mut self, on: bool) {
        self.deflate = on;
    }

    /// The largest compressed message accepted on the wire: the limit itself applies to
    /// the inflated size; this only bounds what is buffered before inflating (deflate
    /// expands incompressible data by a few bytes per block).
    fn max_compressed(&self) -> usize {
        self.max_message + self.max_message / 8 + 64
    }

    /// Decodes every complete frame at the start of `buf`, calling `on_message` for each
    /// complete message; stops early when `on_message` returns false. Returns the number of
    /// bytes consumed; the rest is an incomplete frame to be retried with more bytes (its
    /// bytes unchanged: the received part of a text frame is validated, not unmasked).
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        mut on_message: impl FnMut(Message<'_>) -> bool,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        // Only the first frame of this call can be the one left incomplete last time.
        let mut resume = self.partial.take();
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
            let mask = header.mask.expect("checked in check()");
            let start = pos + header_len;
            let available = buf.len() - start;
            // A compressed message's UTF-8 is checked once it is inflated.
            let compressed = match header.opcode {
                OpCode::Data(Data::Continue) => self.compressed,
                OpCode::Data(_) => header.rsv1,
                OpCode::Control(_) => false,
            };
            let text = !compressed
                && match header.opcode {
                    OpCode::Data(Data::Text) => true,
                    OpCode::Data(Data::Continue) => {
                        matches!(self.fragments.as_deref(), Some((true, _)))
                    }
                    _ => false,
                };
            // The UTF-8 state before the payload bytes not validated yet.
            let (mut utf8, checked) = match resume.take() {
                Some(p) if text && p.mask == mask && p.len == len && p.checked <= available => {
                    (p.utf8, p.checked)
                }
                _ if header.opcode == OpCode::Data(Data::Continue) => (self.utf8, 0),
                _ => (Utf8Stream::default(), 0),
            };
            if available < len {
                if text {
                    feed_masked(&mut utf8, &buf[start + checked..], mask, checked)?;
                    self.partial = Some(Box::new(PartialText {
                        mask,
                        len,
                        checked: available,
                        utf8,
                    }));
                }
                return Ok(pos);
            }
            let payload = &mut buf[start..start + len];
            unmask(payload, mask);
            if text {
                utf8.feed(&payload[checked..])?;
            }
            pos = start + len;
            let go_on = match header.opcode {
                OpCode::Control(Control::Ping) => on_message(Message::Ping(payload)),
                OpCode::Control(Control::Pong) => on_message(Message::Pong),
                OpCode::Control(Control::Close) => {
                    on_message(Message::Close(parse_close(payload)?))
                }
                OpCode::Data(Data::Continue) => {
                    let (text, mut data) = *self.fragments.take().expect("checked in check()");
                    data.extend_from_slice(payload);
                    if header.is_final && compressed {
                        self.compressed = false;
                        deliver_compressed(text, &data, self.max_message, &mut on_message)?
                    } else if header.is_final {
                        self.utf8 = Utf8Stream::default();
                        deliver(text, utf8, &data, &mut on_message)?
                    } else {
                        self.utf8 = utf8;
                        self.fragments = Some(Box::new((text, data)));
                        true
                    }
                }
                OpCode::Data(d) => {
                    let text = d == Data::Text;
                    if header.is_final && compressed {
                        deliver_compressed(text, payload, self.max_message, &mut on_message)?
                    } else if header.is_final {
                        deliver(text, utf8, payload, &mut on_message)?
                    } else {
                        self.compressed = compressed;
                        self.utf8 = utf8;
                        self.fragments = Some(Box::new((text, payload.to_vec())));
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
        if h.rsv2 || h.rsv3 || (h.rsv1 && !self.deflate) {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        // RFC 7692 §6: RSV1 marks the first frame of a compressed data message only.
        if h.rsv1 {
            match h.opcode {
                OpCode::Control(_) => return Err(FrameError::Protocol("compressed control frame")),
                OpCode::Data(Data::Continue) => {
                    return Err(FrameError::Protocol("RSV1 on a continuation frame"));
                }
                OpCode::Data(_) => {}
            }
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
                let Some((_, data)) = self.fragments.as_deref() else {
                    return Err(FrameError::Protocol("continuation without a message"));
                };
                let max = if self.compressed {
                    self.max_compressed()
                } else {
                    self.max_message
                };
                if len > max.saturating_sub(data.len()) as u64 {
                    return Err(FrameError::TooBig);
                }
            }
            OpCode::Data(_) => {
                if self.fragments.is_some() {
                    return Err(FrameError::Protocol("new message inside a fragmented one"));
                }
                let max = if h.rsv1 {
                    self.max_compressed()
                } else {
                    self.max_message
                };
                if len > max as u64 {
                    return Err(FrameError::TooBig);
                }
            }
        }
        Ok(())
    }
}

/// Hands a complete message over; `utf8` has validated all of a text message's bytes
/// but may hold the start of a code point its last fragment did not finish.
fn deliver(
    text: bool,
    utf8: Utf8Stream,
    data: &[u8],
    on_message: &mut impl FnMut(Message<'_>) -> bool,
) -> Result<bool, FrameError> {
    if text {
        utf8.finish()?;
        Ok(on_message(Message::Text(data)))
    } else {
        Ok(on_message(Message::Binary(data)))
    }
}

/// Inflates a complete compressed message (bounded by `max_message`, see
/// [`super::deflate::inflate`]), checks a text message's UTF-8 and hands it over.
fn deliver_compressed(
    text: bool,
    compressed: &[u8],
    max_message: usize,
    on_message: &mut impl FnMut(Message<'_>) -> bool,
) -> Result<bool, FrameError> {
    let mut plain = Vec::new();
    super::deflate::inflate(compressed, max_message, &mut plain)?;
    if text {
        let mut utf8 = Utf8Stream::default();
        utf8.feed(&plain)?;
        deliver(true, utf8, &plain, on_message)
    } else {
        deliver(false, Utf8Stream::default(), &plain, on_message)
    }
}

/// Validates UTF-8 piece by piece (fragments, or the part of a frame received so far).
/// A piece whose bytes make the text invalid is refused at once; an incomplete code point
/// at the end of a piece (at most 3 bytes) is carried over to the next. Each byte is
/// validated once, whatever the number of pieces.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Utf8Stream {
    carry: [u8; 3],
    carry_len: u8,
}

impl Utf8Stream {
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FrameError> {
        if self.carry_len > 0 {
            // Finish the carried code point first, with as many bytes as it lacks.
            let have = self.carry_len as usize;
            let width = match self.carry[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - have).min(bytes.len());
            let mut cp = [0u8; 4];
            cp[..have].copy_from_slice(&self.carry[..have]);
            cp[have..have + take].copy_from_slice(&bytes[..take]);
            match simdutf8::compat::from_utf8(&cp[..have + take]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still incomplete: this piece was too short to finish it.
                    self.carry[..have + take].copy_from_slice(&cp[..have + take]);
                    self.carry_len = (have + take) as u8;
                    return Ok(());
                }
                Err(_) => return Err(FrameError::InvalidUtf8),
            }
            bytes = &bytes[take..];
        }
        // The fast check first (every message goes through here); the one that locates
        // the error only when there is one or the piece ends inside a code point.
        if simdutf8::basic::from_utf8(bytes).is_ok() {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &bytes[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }

    /// The message ends here: a code point left unfinished is invalid.
    fn finish(self) -> Result<(), FrameError> {
        if self.carry_len == 0 {
            Ok(())
        } else {
            Err(FrameError::InvalidUtf8)
        }
    }
}

/// Feeds still-masked payload bytes (starting at payload offset `offset`) to `utf8`,
/// unmasking a copy in small chunks: the caller's bytes stay as they are, to be passed
/// again when the frame is complete.
fn feed_masked(
    utf8: &mut Utf8Stream,
    masked: &[u8],
    mask: [u8; 4],
    offset: usize,
) -> Result<(), FrameError> {
    let mut chunk = [0u8; 1024];
    let mut at = offset;
    for piece in masked.chunks(chunk.len()) {
        let out = &mut chunk[..piece.len()];
        for (i, (o, b)) in out.iter_mut().zip(piece).enumerate() {
            *o = b ^ mask[(at + i) % 4];
        }
        utf8.feed(out)?;
        at += piece.len();
    }
    Ok(())
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
    use proptest::prelude::*;

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

    // ------------------------------------------------------------ UTF-8, fail fast

    /// A message as `feed_pieces` saw it (data messages only).
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Text(Vec<u8>),
        Binary(Vec<u8>),
    }

    /// Feeds `stream` to `r` in the pieces `cuts` delimit, as the shard does: bytes not
    /// consumed are kept and passed again, with the next piece after them. Returns the
    /// data messages, and the error with the index of the piece that brought it.
    fn feed_pieces(
        r: &mut FrameReader,
        stream: &[u8],
        cuts: &[usize],
    ) -> (Vec<Got>, Option<(usize, FrameError)>) {
        let mut kept: Vec<u8> = Vec::new();
        let mut messages = Vec::new();
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
        bounds.push(stream.len());
        let mut from = 0;
        for (piece, &to) in bounds.iter().enumerate() {
            let to = to.max(from);
            kept.extend_from_slice(&stream[from..to]);
            from = to;
            let result = r.decode(&mut kept, |m| {
                match m {
                    Message::Text(t) => messages.push(Got::Text(t.to_vec())),
                    Message::Binary(b) => messages.push(Got::Binary(b.to_vec())),
                    _ => {}
                }
                true
            });
            match result {
                Ok(used) => {
                    kept.drain(..used);
                }
                Err(e) => return (messages, Some((piece, e))),
            }
        }
        (messages, None)
    }

    /// A text message as fragments (one frame each; one fragment: unfragmented).
    fn text_fragments(fragments: &[&[u8]]) -> Vec<Vec<u8>> {
        let last = fragments.len() - 1;
        fragments
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let opcode = if i == 0 { 0x01 } else { 0x00 };
                let fin = if i == last { 0x80 } else { 0 };
                client_frame(fin | opcode, f)
            })
            .collect()
    }

    /// Decodes each frame with its own call; the error and the frame that brought it.
    fn frame_by_frame(frames: &[Vec<u8>]) -> Result<Vec<String>, (usize, FrameError)> {
        let mut r = FrameReader::new(1 << 20);
        let mut seen = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let (n, mut s) = decode_all(&mut r, f).map_err(|e| (i, e))?;
            assert_eq!(n, f.len());
            seen.append(&mut s);
        }
        Ok(seen)
    }

    const KOSME: &str = "κόσμε";

    #[test]
    fn autobahn_6_4_1_invalid_fragment_closes_before_the_final_one() {
        // Fragment 2 holds a whole invalid sequence (a UTF-16 surrogate, ED A0 80).
        let frames = text_fragments(&[KOSME.as_bytes(), b"\xed\xa0\x80", b"edited"]);
        let (at, e) = frame_by_frame(&frames).unwrap_err();
        assert_eq!((at, e.close_code()), (1, 1007));
    }

    #[test]
    fn autobahn_6_4_2_invalid_byte_split_from_its_lead_closes_on_its_fragment() {
        // ED is a valid start; A0 after it is what makes the text invalid.
        let mut first = KOSME.as_bytes().to_vec();
        first.push(0xed);
        let frames = text_fragments(&[&first, b"\xa0", b"\x80edited"]);
        let (at, e) = frame_by_frame(&frames).unwrap_err();
        assert_eq!((at, e.close_code()), (1, 1007));
    }

    #[test]
    fn autobahn_6_4_3_and_6_4_4_one_frame_in_pieces_fails_when_the_bad_bytes_arrive() {
        let kosme = KOSME.as_bytes();
        let mut payload = kosme.to_vec();
        payload.extend_from_slice(b"\xed\xa0\x80edited");
        let frame = client_frame(0x81, &payload);
        let header = frame.len() - payload.len();
        // 6.4.3: "κόσμε" | ED A0 80 | "edited".
        let cuts = [header + kosme.len(), header + kosme.len() + 3];
        let (seen, err) = feed_pieces(&mut FrameReader::new(1024), &frame, &cuts);
        assert!(seen.is_empty());
        assert_eq!(err, Some((1, FrameError::InvalidUtf8)));
        // 6.4.4: "κόσμε" ED | A0 | 80 "edited".
        let cuts = [header + kosme.len() + 1, header + kosme.len() + 2];
        let (seen, err) = feed_pieces(&mut FrameReader::new(1024), &frame, &cuts);
        assert!(seen.is_empty());
        assert_eq!(err, Some((1, FrameError::InvalidUtf8)));
        // Byte by byte: the error comes with A0, not before, not after.
        let cuts: Vec<usize> = (1..frame.len()).collect();
        let (_, err) = feed_pieces(&mut FrameReader::new(1024), &frame, &cuts);
        assert_eq!(
            err,
            Some((header + kosme.len() + 1, FrameError::InvalidUtf8))
        );
    }

    #[test]
    fn code_points_split_across_fragments_and_pieces_are_valid() {
        let text = "wö€😀!";
        let bytes = text.as_bytes();
        // Every byte its own fragment: each multi-byte code point spans 2 to 4 fragments.
        let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
        let frames = text_fragments(&pieces);
        assert_eq!(
            frame_by_frame(&frames).unwrap(),
            vec![format!("text:{text}")]
        );
        // Interleaved control frames do not disturb the carried bytes.
        let mut with_pings = Vec::new();
        for f in &frames {
            with_pings.push(f.clone());
            with_pings.push(client_frame(0x89, b""));
        }
        assert_eq!(frame_by_frame(&with_pings).unwrap().len(), frames.len() + 1);
        // Fragments of two bytes, each delivered byte by byte.
        let stream: Vec<u8> = text_fragments(&bytes.chunks(2).collect::<Vec<_>>()).concat();
        let cuts: Vec<usize> = (1..stream.len()).collect();
        let (seen, err) = feed_pieces(&mut FrameReader::new(1024), &stream, &cuts);
        assert_eq!((seen, err), (vec![Got::Text(bytes.to_vec())], None));
    }

    #[test]
    fn a_code_point_left_unfinished_at_the_end_is_invalid() {
        let frames = text_fragments(&[b"w", b"\xc3"]);
        assert_eq!(frame_by_frame(&frames), Err((1, FrameError::InvalidUtf8)));
        let frames = text_fragments(&[b"w\xe2\x82", b""]);
        assert_eq!(frame_by_frame(&frames), Err((1, FrameError::InvalidUtf8)));
        let mut r = FrameReader::new(1024);
        assert_eq!(
            decode_all(&mut r, &client_frame(0x81, b"\xf0\x9f\x98")),
            Err(FrameError::InvalidUtf8)
        );
    }

    #[test]
    fn binary_messages_are_not_validated_and_reset_nothing() {
        let mut stream = client_frame(0x02, b"\xff");
        stream.extend(client_frame(0x80, b"\xed\xa0"));
        stream.extend(client_frame(0x81, "ok ö".as_bytes()));
        let cuts: Vec<usize> = (1..stream.len()).collect();
        let (seen, err) = feed_pieces(&mut FrameReader::new(1024), &stream, &cuts);
        assert_eq!(err, None);
        assert_eq!(
            seen,
            vec![
                Got::Binary(b"\xff\xed\xa0".to_vec()),
                Got::Text("ok ö".as_bytes().to_vec())
            ]
        );
    }

    #[test]
    fn partial_progress_is_dropped_when_the_caller_passes_another_frame() {
        // A caller that does not pass the incomplete frame back (not the shard) gets
        // the next frame validated from its start, not from the stale progress.
        let mut r = FrameReader::new(1024);
        let bad = client_frame(0x81, b"abc\xff");
        let (n, seen) = decode_all(&mut r, &bad[..bad.len() - 1]).unwrap();
        assert_eq!((n, seen.len()), (0, 0));
        let (_, seen) = decode_all(&mut r, &client_frame(0x81, b"fine")).unwrap();
        assert_eq!(seen, vec!["text:fine"]);
    }

    /// Index of the first byte after which `bytes` is no longer the start of any valid
    /// UTF-8 (None: it is valid, or only unfinished at the end).
    fn first_invalid_byte(bytes: &[u8]) -> Option<usize> {
        (0..bytes.len())
            .find(|&i| std::str::from_utf8(&bytes[..=i]).is_err_and(|e| e.error_len().is_some()))
    }

    /// Mostly text with a few stray bytes: invalid in every way, at any place.
    fn text_ish() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            4 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
            1 => any::<u8>().prop_map(|b| vec![b]),
            1 => prop::sample::select(vec![
                b"\xed\xa0\x80".to_vec(), b"\xc0\xaf".to_vec(), b"\xf4\x90".to_vec(),
                b"\xe0\x80".to_vec(), b"\xf0\x9f".to_vec(), b"\xc3".to_vec(),
            ]),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Any fragmentation and any TCP pieces give the verdict of validating the whole
        /// message, and an error comes with the piece holding the first byte that makes
        /// the text invalid (or, for a code point unfinished at the end, with the last
        /// byte of the message).
        #[test]
        fn fragments_and_pieces_agree_with_whole_validation(
            bytes in text_ish(),
            fragment_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
            piece_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut cuts: Vec<usize> =
                fragment_cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort();
            let mut fragments: Vec<&[u8]> = Vec::new();
            let mut from = 0;
            for &c in &cuts {
                fragments.push(&bytes[from..c]);
                from = c;
            }
            fragments.push(&bytes[from..]);
            // Where each payload byte lands in the stream of frames.
            let frames = text_fragments(&fragments);
            let mut offsets = Vec::new();
            let mut at = 0;
            for (f, frame) in fragments.iter().zip(&frames) {
                let header = frame.len() - f.len();
                offsets.extend((0..f.len()).map(|i| at + header + i));
                at += frame.len();
            }
            let stream = frames.concat();
            let mut pieces: Vec<usize> =
                piece_cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            pieces.sort();
            // The piece that brings stream byte `b`.
            let piece_of = |b: usize| pieces.iter().filter(|&&c| c <= b).count();

            let (seen, err) = feed_pieces(&mut FrameReader::new(1 << 20), &stream, &pieces);
            match std::str::from_utf8(&bytes) {
                Ok(_) => {
                    prop_assert_eq!(err, None);
                    prop_assert_eq!(seen, vec![Got::Text(bytes.clone())]);
                }
                Err(_) => {
                    prop_assert!(seen.is_empty());
                    let expected = match first_invalid_byte(&bytes) {
                        Some(i) => piece_of(offsets[i]),
                        None => piece_of(stream.len() - 1),
                    };
                    prop_assert_eq!(err, Some((expected, FrameError::InvalidUtf8)));
                }
            }

            // Whole fragments, one per call: the error comes with the fragment holding
            // the first invalid byte.
            let verdict = frame_by_frame(&frames);
            match first_invalid_byte(&bytes) {
                Some(i) => {
                    let fragment = cuts.iter().filter(|&&c| c <= i).count();
                    prop_assert_eq!(verdict, Err((fragment, FrameError::InvalidUtf8)));
                }
                None if std::str::from_utf8(&bytes).is_err() => {
                    prop_assert_eq!(verdict, Err((frames.len() - 1, FrameError::InvalidUtf8)));
                }
                None => prop_assert!(verdict.is_ok()),
            }
        }

        /// Fed in any pieces, the stream validator agrees with `std` on every prefix.
        #[test]
        fn utf8_stream_matches_std(
            bytes in text_ish(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort();
            let mut v = Utf8Stream::default();
            let mut from = 0;
            for &c in &cuts {
                let fed = v.feed(&bytes[from..c]);
                let std_says = match std::str::from_utf8(&bytes[..c]) {
                    Ok(_) => true,
                    Err(e) => e.error_len().is_none(),
                };
                prop_assert_eq!(fed.is_ok(), std_says, "prefix of {} bytes", c);
                if fed.is_err() {
                    return Ok(());
                }
                from = c;
            }
            prop_assert_eq!(v.finish().is_ok(), std::str::from_utf8(&bytes).is_ok());
        }
    }
}
