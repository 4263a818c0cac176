//! The smallest WebSocket client codec that does the job: an HTTP/1.1 upgrade written
//! by hand, masked client frames, and a parser for server frames that hands out slices
//! of the read buffer (no copy, no allocation).

use base64::Engine;
use sha1::{Digest, Sha1};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A `Sec-WebSocket-Key` from 16 bytes.
pub fn client_key(bytes: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The `Sec-WebSocket-Accept` a server must answer to `key`.
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The upgrade request for `target` (path and query).
pub fn upgrade_request(host: &str, target: &str, key: &str) -> Vec<u8> {
    upgrade_request_with(host, target, key, false)
}

/// The same, offering permessage-deflate when `deflate` (no context takeover in either
/// direction: the generator only inflates, and never sends compressed frames).
pub fn upgrade_request_with(host: &str, target: &str, key: &str, deflate: bool) -> Vec<u8> {
    let ext = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
         client_no_context_takeover\r\n"
    } else {
        ""
    };
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: fleetcast-load\r\n{ext}\r\n"
    )
    .into_bytes()
}

thread_local! {
    /// The inflater and its output buffer (one per I/O thread), reset per message.
    static INFLATE: std::cell::RefCell<(flate2::Decompress, Vec<u8>)> =
        std::cell::RefCell::new((flate2::Decompress::new(false), Vec::new()));
}

/// Inflates one permessage-deflate message (RFC 7692 §7.2.2: the payload plus
/// `00 00 ff ff`, from an empty window) and hands it to `f`.
pub fn with_inflated(payload: &[u8], f: impl FnOnce(&[u8])) -> Result<(), &'static str> {
    let mut buf = INFLATE.with(|i| {
        let mut i = i.borrow_mut();
        i.0.reset(false);
        let mut out = std::mem::take(&mut i.1);
        out.clear();
        for input in [payload, &[0, 0, 0xff, 0xff][..]] {
            let start = i.0.total_in();
            // Each round consumes input or grows the output (to MAX_FRAME at most).
            loop {
                let done = (i.0.total_in() - start) as usize;
                if out.capacity() - out.len() < 4096 {
                    out.reserve(out.capacity().max(4096));
                }
                let before = out.len();
                i.0.decompress_vec(&input[done..], &mut out, flate2::FlushDecompress::Sync)
                    .map_err(|_| "invalid deflate data")?;
                let done_now = (i.0.total_in() - start) as usize;
                if out.len() > MAX_FRAME {
                    return Err("inflated message over 64 MiB");
                }
                if done_now == input.len() && out.len() < out.capacity() {
                    break;
                }
                if done_now == done && out.len() == before {
                    return Err("inflate made no progress");
                }
            }
        }
        Ok(out)
    })?;
    f(&buf);
    buf.clear();
    INFLATE.with(|i| i.borrow_mut().1 = buf);
    Ok(())
}

/// A parsed response head.
#[derive(Debug, PartialEq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head including the blank line; WebSocket frames may follow.
    pub len: usize,
    pub accept: Option<String>,
}

/// Parses an HTTP response head; `Ok(None)` while incomplete.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            return Err("response head over 16 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP response: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut accept = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("sec-websocket-accept")
        {
            accept = Some(value.trim().to_string());
        }
    }
    Ok(Some(ResponseHead {
        status,
        len: end + 4,
        accept,
    }))
}

/// Appends a masked client frame (FIN set).
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// XORs `data` with the repeating mask.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// A close frame's payload: the code, then a reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// The code of a close frame payload (1005 "no status" when it has none).
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    /// A compressed (permessage-deflate) message starts here.
    pub rsv1: bool,
    pub opcode: u8,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHead {
    pub fn total(&self) -> usize {
        self.header_len + self.payload_len
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed; `Some(n)`: the whole frame is `n` bytes.
    Incomplete(Option<usize>),
    Frame(FrameHead),
}

/// Largest frame accepted from a server.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Parses the server frame at the start of `buf`. Server frames are never masked.
pub fn parse_frame(buf: &[u8]) -> Result<Parsed, &'static str> {
    if buf.len() < 2 {
        return Ok(Parsed::Incomplete(None));
    }
    let b0 = buf[0];
    let b1 = buf[1];
    // RSV1: a permessage-deflate message (checked against the negotiation by the
    // caller: the generator offers it only with --deflate).
    if b0 & 0x30 != 0 {
        return Err("reserved bits set");
    }
    let rsv1 = b0 & 0x40 != 0;
    if b1 & 0x80 != 0 {
        return Err("masked server frame");
    }
    let opcode = b0 & 0x0F;
    let fin = b0 & 0x80 != 0;
    let (header_len, payload_len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Parsed::Incomplete(None));
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as usize)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Parsed::Incomplete(None));
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n > MAX_FRAME as u64 {
                return Err("frame over 64 MiB");
            }
            (10, n as usize)
        }
        n => (2, n as usize),
    };
    if opcode >= 8 && (payload_len > 125 || !fin || rsv1) {
        return Err("bad control frame");
    }
    if rsv1 && opcode == OP_CONT {
        return Err("RSV1 on a continuation frame");
    }
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err("reserved opcode");
    }
    let head = FrameHead {
        fin,
        rsv1,
        opcode,
        header_len,
        payload_len,
    };
    if buf.len() < head.total() {
        return Ok(Parsed::Incomplete(Some(head.total())));
    }
    Ok(Parsed::Frame(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_6455_example() {
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(client_key([0; 16]), "AAAAAAAAAAAAAAAAAAAAAA==");
    }

    #[test]
    fn response_heads() {
        assert_eq!(parse_response_head(b"HTTP/1.1 101 Switch").unwrap(), None);
        let r = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: abc=\r\n\r\n\x81\x02hi";
        let h = parse_response_head(r).unwrap().unwrap();
        assert_eq!(h.status, 101);
        assert_eq!(h.accept.as_deref(), Some("abc="));
        assert_eq!(&r[h.len..], b"\x81\x02hi");
        let h =
            parse_response_head(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}")
                .unwrap()
                .unwrap();
        assert_eq!((h.status, h.accept), (429, None));
        assert!(parse_response_head(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_response_head(&vec![b'a'; 17_000]).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_round_trip() {
        for len in [0usize, 5, 125, 126, 300, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            write_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
            assert_eq!(out[0], 0x81);
            assert!(out[1] & 0x80 != 0, "mask bit");
            let (hl, plen) = match out[1] & 0x7F {
                126 => (4, u16::from_be_bytes([out[2], out[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, n as usize),
            };
            assert_eq!(plen, len);
            let mask: [u8; 4] = out[hl..hl + 4].try_into().unwrap();
            let mut body = out[hl + 4..].to_vec();
            apply_mask(&mut body, mask);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn server_frames_parse_from_partial_buffers() {
        let mut buf = vec![0x81, 5];
        buf.extend_from_slice(b"hello");
        buf.extend_from_slice(&[0x81, 126, 0x01, 0x00]);
        buf.extend(std::iter::repeat_n(b'x', 256));
        let h = match parse_frame(&buf).unwrap() {
            Parsed::Frame(h) => h,
            p => panic!("{p:?}"),
        };
        assert_eq!(
            h,
            FrameHead {
                fin: true,
                rsv1: false,
                opcode: OP_TEXT,
                header_len: 2,
                payload_len: 5
            }
        );
        let rest = &buf[h.total()..];
        let Parsed::Frame(h2) = parse_frame(rest).unwrap() else {
            panic!()
        };
        assert_eq!((h2.header_len, h2.payload_len), (4, 256));
        assert_eq!(parse_frame(&rest[..3]).unwrap(), Parsed::Incomplete(None));
        assert_eq!(
            parse_frame(&rest[..100]).unwrap(),
            Parsed::Incomplete(Some(260))
        );
        assert_eq!(parse_frame(&[0x81]).unwrap(), Parsed::Incomplete(None));
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&70_000u64.to_be_bytes());
        assert_eq!(
            parse_frame(&long).unwrap(),
            Parsed::Incomplete(Some(70_010))
        );
    }

    #[test]
    fn deflate_inflates_a_server_message() {
        // "hello hello hello" deflated from an empty window, sync flush, tail stripped.
        let mut c = flate2::Compress::new(flate2::Compression::new(6), false);
        let mut z = Vec::with_capacity(128);
        c.compress_vec(b"hello hello hello", &mut z, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(z.ends_with(&[0, 0, 0xff, 0xff]));
        z.truncate(z.len() - 4);
        for _ in 0..3 {
            let mut got = Vec::new();
            with_inflated(&z, |m| got = m.to_vec()).unwrap();
            assert_eq!(got, b"hello hello hello");
        }
        assert!(with_inflated(&[0xff, 0xff, 0xff], |_| {}).is_err());
        let req = String::from_utf8(upgrade_request_with("h:1", "/", "k", true)).unwrap();
        assert!(
            req.contains("Sec-WebSocket-Extensions: permessage-deflate; "),
            "{req}"
        );
        assert!(
            !String::from_utf8(upgrade_request("h:1", "/", "k"))
                .unwrap()
                .contains("Extensions")
        );
    }

    #[test]
    fn bad_server_frames() {
        assert!(parse_frame(&[0x81, 0x85, 0, 0, 0, 0]).is_err(), "masked");
        assert!(parse_frame(&[0xA1, 0x00]).is_err(), "rsv2");
        assert!(parse_frame(&[0x91, 0x00]).is_err(), "rsv3");
        assert!(parse_frame(&[0xC9, 0x00]).is_err(), "compressed ping");
        assert!(
            parse_frame(&[0xC0, 0x00]).is_err(),
            "rsv1 on a continuation"
        );
        // RSV1 on a data frame is permessage-deflate (the engine refuses it unless
        // --deflate offered it).
        assert!(matches!(parse_frame(&[0xC1, 0x00]), Ok(Parsed::Frame(h)) if h.rsv1));
        assert!(parse_frame(&[0x83, 0x00]).is_err(), "opcode 3");
        assert!(parse_frame(&[0x09, 0x00]).is_err(), "fragmented ping");
        assert!(parse_frame(&[0x89, 126, 0, 200]).is_err(), "long ping");
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_frame(&huge).is_err());
    }

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&close_payload(1013, "slow")), 1013);
        assert_eq!(close_code(&[]), 1005);
    }
}
