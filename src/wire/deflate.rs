//! permessage-deflate (RFC 7692): the negotiation, the shared compressor of outbound
//! event frames and the bounded inflater of inbound messages.
//!
//! The broker always answers an acceptable offer with
//! `permessage-deflate; server_no_context_takeover; client_no_context_takeover`.
//! RFC 7692 §7.1.1.1 and §7.1.1.2 let a server include both parameters even when the offer
//! did not ask for them, and a client must then comply. So:
//!
//! - every server message is deflated from an empty window: an event's compressed frame
//!   does not depend on the connection and is built once per event and dialect
//!   ([`crate::event::Event::wire_frame`]), shared like the plain frame;
//! - every client message is inflated from an empty window: no per-connection inflater
//!   (a 32 KiB window each) exists; one per shard thread is reset for each message, and
//!   its output is bounded by the message limit.
//!
//! Pure: no sockets, no clock.

use super::frame::FrameError;
use flate2::{Compress, Compression, FlushCompress};
use std::cell::RefCell;

/// The extension line of the 101 answer when permessage-deflate was negotiated.
pub const RESPONSE_HEADER: &str = "Sec-WebSocket-Extensions: permessage-deflate; \
     server_no_context_takeover; client_no_context_takeover\r\n";

/// The empty stored block a sync flush ends with; RFC 7692 §7.2.1 strips it from the
/// frame and the receiver appends it again (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Deflate level of event frames: 6 is zlib's default; events are compressed once and
/// shared by every subscriber, so the level costs per event, not per delivery.
const LEVEL: u32 = 6;

/// Whether one of the offers of `Sec-WebSocket-Extensions` (every value of the header,
/// joined with commas) is an acceptable permessage-deflate offer (RFC 7692 §5, §7.1).
///
/// An offer is declined (the next one is tried; none left: no compression, the upgrade
/// still succeeds) when a parameter is unknown, repeated or has an invalid value, or when
/// it asks for `server_max_window_bits` below 15: the compressor (miniz_oxide) always
/// uses a 32 KiB window and cannot promise a smaller one.
pub fn negotiate(offers: &str) -> bool {
    offers.split(',').any(acceptable)
}

fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    // Seen: server_no_context_takeover, client_no_context_takeover,
    // server_max_window_bits, client_max_window_bits.
    let mut seen = [false; 4];
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let (i, ok) = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => (0, value.is_none()),
            "client_no_context_takeover" => (1, value.is_none()),
            // Only 15 can be honoured (see above).
            "server_max_window_bits" => (2, value.and_then(window_bits) == Some(15)),
            // Any window the client uses is within the inflater's 32 KiB.
            "client_max_window_bits" => (3, value.is_none_or(|v| window_bits(v).is_some())),
            _ => return false,
        };
        if !ok || seen[i] {
            return false;
        }
        seen[i] = true;
    }
    true
}

/// A window size parameter: 8 to 15, decimal digits without leading zeros (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    /// One compressor and one inflater per thread (each shard's), reset per message: no
    /// message shares a window with another, in either direction.
    static DEFLATER: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
    static INFLATER: RefCell<Box<miniz_oxide::inflate::core::DecompressorOxide>> =
        RefCell::new(Box::default());
}

/// The payload of a complete unmasked server frame (our own: FIN, no mask).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let hl = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(hl..).unwrap_or_default()
}

/// The compressed form of a complete server data frame (RSV1 set, the message deflated
/// from an empty window, sync-flushed, without the final `00 00 ff ff`). `None` when it
/// would not be smaller: the plain frame is sent instead (RFC 7692 lets each message
/// choose).
pub fn compress_frame(frame: &[u8]) -> Option<Box<[u8]>> {
    let payload = payload_of(frame);
    let first = *frame.first()?;
    let body = DEFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset();
        deflate_raw(&mut d, payload)
    })?;
    let mut out = Vec::with_capacity(body.len() + 10);
    out.push(first | 0x40);
    match body.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=65535 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&body);
    (out.len() < frame.len()).then(|| out.into_boxed_slice())
}

/// Deflates `input` (raw deflate, sync flush) and strips the trailing empty block.
fn deflate_raw(d: &mut Compress, input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    let start_in = d.total_in();
    // Each round either consumes input or fills the output; the bound is generous.
    for _ in 0..64 + input.len() / 256 {
        let consumed = (d.total_in() - start_in) as usize;
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64));
        }
        d.compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .ok()?;
        let consumed = (d.total_in() - start_in) as usize;
        // A sync flush is complete when all input is in and the output did not fill up.
        if consumed == input.len() && out.len() < out.capacity() {
            if out.ends_with(&TAIL) {
                out.truncate(out.len() - TAIL.len());
            }
            return Some(out);
        }
    }
    None
}

/// Inflates one client message (its frames' payloads concatenated) into `out`, refusing
/// it with [`FrameError::TooBig`] as soon as the output passes `limit` bytes: at most
/// `limit + 1` bytes are ever inflated (a deflate bomb costs no more than an honest
/// message). Invalid deflate data is a protocol error (1002).
///
/// The decoder writes into `out` alone, which it treats as the whole window (miniz_oxide's
/// non-wrapping mode): a back-reference before the start of the message (a client using
/// the context takeover it was refused) is an error, never a read of an earlier message's
/// bytes. The streaming inflater (`flate2::Decompress`) keeps a 32 KiB window that a
/// reset does not clear, which would let such a reference copy another connection's data.
pub fn inflate(compressed: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    use miniz_oxide::inflate::TINFLStatus;
    use miniz_oxide::inflate::core::{decompress, inflate_flags};
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
        | inflate_flags::TINFL_FLAG_HAS_MORE_INPUT;
    // Room for the limit plus the one byte that tells a message over it, grown by
    // doubling from a guess (an honest message rarely inflates more than 4x).
    let max = limit.saturating_add(1);
    out.clear();
    out.resize((compressed.len().saturating_mul(4) + 64).min(max), 0);
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.init();
        let mut written = 0;
        for input in [compressed, &TAIL[..]] {
            let mut consumed = 0;
            // Each round consumes input, or doubles the output (bounded by `max`).
            for _ in 0..=input.len() + 64 {
                let (status, n_in, n_out) =
                    decompress(&mut d, &input[consumed..], out, written, flags);
                consumed += n_in;
                written += n_out;
                match status {
                    TINFLStatus::Done => {
                        out.truncate(written);
                        return Ok(());
                    }
                    TINFLStatus::NeedsMoreInput => break,
                    TINFLStatus::HasMoreOutput if out.len() >= max => {
                        return Err(FrameError::TooBig);
                    }
                    TINFLStatus::HasMoreOutput => {
                        let grown = out.len().saturating_mul(2).min(max);
                        out.resize(grown, 0);
                    }
                    _ => return Err(FrameError::Protocol("invalid deflate data")),
                }
            }
        }
        if written > limit {
            return Err(FrameError::TooBig);
        }
        out.truncate(written);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::text_frame;

    fn inflate_all(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        inflate(body, 1 << 20, &mut out).unwrap();
        out
    }

    #[test]
    fn deflate_negotiation_accepts_plain_offers() {
        assert!(negotiate("permessage-deflate"));
        assert!(negotiate("permessage-deflate; client_max_window_bits"));
        assert!(negotiate(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ));
        assert!(negotiate(
            "permessage-deflate; server_max_window_bits=15; client_max_window_bits=10"
        ));
        assert!(negotiate(
            "permessage-deflate; client_max_window_bits=\"12\""
        ));
        assert!(negotiate("PerMessage-Deflate"));
    }

    #[test]
    fn deflate_negotiation_declines_bad_offers() {
        assert!(!negotiate(""));
        assert!(!negotiate("x-webkit-deflate-frame"));
        assert!(!negotiate("permessage-deflate; foo"));
        assert!(!negotiate(
            "permessage-deflate; server_no_context_takeover=1"
        ));
        assert!(!negotiate(
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
        ));
        assert!(!negotiate("permessage-deflate; server_max_window_bits"));
        assert!(!negotiate("permessage-deflate; server_max_window_bits=10"));
        assert!(!negotiate("permessage-deflate; client_max_window_bits=7"));
        assert!(!negotiate("permessage-deflate; client_max_window_bits=16"));
        assert!(!negotiate("permessage-deflate; client_max_window_bits=010"));
        assert!(!negotiate("permessage-deflate; client_max_window_bits=ab"));
    }

    #[test]
    fn deflate_negotiation_falls_back_to_a_later_offer() {
        // The first offer asks for a window we cannot promise; the second is plain.
        assert!(negotiate(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ));
        assert!(negotiate("foo, permessage-deflate; client_max_window_bits"));
    }

    #[test]
    fn deflate_frame_round_trips_and_sets_rsv1() {
        let json = br#"{"type":"event","channel":"vehicle_locations","data":{"vehicle_id":"v-1","lat":52.1,"lon":4.3,"vehicle_id2":"v-1","lat2":52.1}}"#;
        let plain = text_frame(json);
        let z = compress_frame(&plain).expect("repetitive JSON shrinks");
        assert_eq!(z[0], 0x80 | 0x40 | 0x1, "FIN, RSV1, text");
        assert!(z.len() < plain.len());
        let body = payload_of(&z);
        assert!(!body.ends_with(&TAIL), "tail stripped");
        assert_eq!(inflate_all(body), json);
        // The same bytes every time: the frame does not depend on an earlier message.
        assert_eq!(compress_frame(&plain).unwrap(), z);
    }

    #[test]
    fn deflate_declines_what_does_not_shrink() {
        assert!(compress_frame(&text_frame(b"hi")).is_none());
    }

    #[test]
    fn deflate_large_frames_use_long_lengths() {
        let json: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{},", i % 977).into_bytes())
            .collect();
        let plain = text_frame(&json);
        let z = compress_frame(&plain).unwrap();
        let out = inflate_all(payload_of(&z));
        assert_eq!(out, json);
    }

    #[test]
    fn deflate_bomb_stops_at_the_limit() {
        let zeros = vec![b'a'; 10 << 20];
        let plain = text_frame(&zeros);
        let z = compress_frame(&plain).unwrap();
        let body = payload_of(&z);
        assert!(
            body.len() < 20_000,
            "10 MiB of one byte deflates to {}",
            body.len()
        );
        let mut out = Vec::new();
        assert_eq!(inflate(body, 1024, &mut out), Err(FrameError::TooBig));
        assert!(out.len() <= 1025, "inflated {} bytes", out.len());
        // Exactly at the limit is fine.
        let plain = text_frame(&zeros[..1024]);
        let z = compress_frame(&plain).unwrap();
        inflate(payload_of(&z), 1024, &mut out).unwrap();
        assert_eq!(out.len(), 1024);
    }

    #[test]
    fn deflate_invalid_data_is_a_protocol_error() {
        let mut out = Vec::new();
        // BTYPE 11 (reserved) in the first block header.
        assert!(matches!(
            inflate(&[0xff, 0xff, 0xff], 1024, &mut out),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn deflate_accepts_a_final_block_and_an_empty_message() {
        // An empty message: a single empty stored block without the tail is `00`.
        let mut out = Vec::new();
        inflate(&[0x00], 1024, &mut out).unwrap();
        assert!(out.is_empty());
        // BFINAL set (what a compressor that finishes the stream sends): "hi" fixed-Huffman.
        let mut c = Compress::new(Compression::new(6), false);
        let mut z = Vec::with_capacity(64);
        c.compress_vec(b"hello", &mut z, FlushCompress::Finish)
            .unwrap();
        inflate(&z, 1024, &mut out).unwrap();
        assert_eq!(out, b"hello");
    }
}

/// The frame reader with permessage-deflate negotiated: Autobahn-style cases of sections
/// 12 and 13 (compressed messages of many sizes, fragmented compressed messages, control
/// frames between fragments, no context takeover) and the refusals around RSV1.
#[cfg(test)]
mod reader_tests {
    use super::*;
    use crate::wire::frame::{FrameReader, Message};

    /// A masked client frame with the given first byte (FIN/RSV/opcode).
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0xa1, 0x07, 0x3c, 0x5e];
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

    /// What a client compressor sends: `msg` deflated (sync flush, tail stripped) by `c`,
    /// which the caller resets (no context takeover) or not (context takeover).
    fn client_deflate(c: &mut Compress, msg: &[u8]) -> Vec<u8> {
        deflate_raw(c, msg).unwrap()
    }

    fn fresh() -> Compress {
        Compress::new(Compression::new(9), false)
    }

    fn reader() -> FrameReader {
        let mut r = FrameReader::new(1024);
        r.set_deflate(true);
        r
    }

    fn decode(r: &mut FrameReader, bytes: &[u8]) -> Result<(usize, Vec<String>), FrameError> {
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

    fn text_of(len: usize, seed: usize) -> String {
        // JSON-like text, partly repetitive (as telemetry is).
        let mut s = String::new();
        let mut i = seed;
        while s.len() < len {
            s.push_str(&format!(
                "{{\"v\":\"veh-{}\",\"speed\":{}}}",
                i % 7,
                i % 131
            ));
            i += 1;
        }
        s.truncate(len);
        s
    }

    #[test]
    fn deflate_reader_messages_of_many_sizes() {
        // Autobahn 12.1.x / 13.x: sizes from empty up to the limit, text and binary.
        for len in [0, 1, 16, 64, 125, 126, 127, 200, 500, 1000, 1024] {
            let mut r = reader();
            let msg = text_of(len, len);
            let z = client_deflate(&mut fresh(), msg.as_bytes());
            let mut bytes = client_frame(0xC1, &z);
            bytes.extend(client_frame(0xC2, &z));
            let (n, seen) = decode(&mut r, &bytes).unwrap();
            assert_eq!(n, bytes.len());
            assert_eq!(
                seen,
                vec![format!("text:{msg}"), format!("bin:{len}")],
                "len {len}"
            );
        }
    }

    #[test]
    fn deflate_reader_no_context_takeover_sequence() {
        // 13.x with client_no_context_takeover: every message from an empty window,
        // interleaved with uncompressed ones (RSV1 clear is allowed on a deflate connection).
        let mut r = reader();
        let mut bytes = Vec::new();
        let mut expect = Vec::new();
        for i in 0..50 {
            let msg = text_of(100 + i * 17, i);
            if i % 5 == 4 {
                bytes.extend(client_frame(0x81, msg.as_bytes()));
            } else {
                bytes.extend(client_frame(
                    0xC1,
                    &client_deflate(&mut fresh(), msg.as_bytes()),
                ));
            }
            expect.push(format!("text:{msg}"));
        }
        let (n, seen) = decode(&mut r, &bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(seen, expect);
    }

    #[test]
    fn deflate_reader_fragmented_messages_with_pings_between() {
        // 12.x/13.x with fragmentation: RSV1 on the first frame only, the compressed bytes
        // split anywhere (even inside a code point of the inflated text).
        let msg = format!("{}ü€{}", text_of(300, 3), text_of(300, 9));
        let z = client_deflate(&mut fresh(), msg.as_bytes());
        for pieces in [2, 3, 7, z.len()] {
            let chunk = z.len().div_ceil(pieces);
            let parts: Vec<&[u8]> = z.chunks(chunk).collect();
            let mut bytes = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                let fin = if i + 1 == parts.len() { 0x80 } else { 0 };
                let first = if i == 0 { 0x40 | 0x01 } else { 0x00 };
                bytes.extend(client_frame(fin | first, p));
                if i == 0 {
                    bytes.extend(client_frame(0x89, b"between"));
                }
            }
            let mut r = reader();
            let (n, seen) = decode(&mut r, &bytes).unwrap();
            assert_eq!(n, bytes.len());
            assert_eq!(
                seen,
                vec!["ping:between".to_string(), format!("text:{msg}")]
            );
            // Byte by byte: nothing is delivered twice or early.
            let mut r = reader();
            let mut got = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            for b in &bytes {
                pending.push(*b);
                let (n, seen) = decode(&mut r, &pending).unwrap();
                pending.drain(..n);
                got.extend(seen);
            }
            assert_eq!(got, vec!["ping:between".to_string(), format!("text:{msg}")]);
        }
    }

    #[test]
    fn deflate_reader_refuses_rsv1_where_it_does_not_belong() {
        let z = client_deflate(&mut fresh(), b"hello hello hello");
        // Not negotiated: RSV1 is a protocol error, as before.
        let mut plain = FrameReader::new(1024);
        assert_eq!(
            decode(&mut plain, &client_frame(0xC1, &z)).map(|_| ()),
            Err(FrameError::Protocol("reserved bits set"))
        );
        // Control frames are never compressed.
        for op in [0xC9u8, 0xCA, 0xC8] {
            let err = decode(&mut reader(), &client_frame(op, b"")).unwrap_err();
            assert_eq!(err.close_code(), 1002, "opcode byte {op:#x}");
        }
        // RSV1 on a continuation frame.
        let mut bytes = client_frame(0x41, &z[..3]);
        bytes.extend(client_frame(0xC0, &z[3..]));
        assert_eq!(
            decode(&mut reader(), &bytes).unwrap_err().close_code(),
            1002
        );
        // RSV2 and RSV3 stay reserved.
        for first in [0xA1u8, 0x91, 0xE1] {
            assert_eq!(
                decode(&mut reader(), &client_frame(first, &z))
                    .unwrap_err()
                    .close_code(),
                1002
            );
        }
    }

    #[test]
    fn deflate_reader_bomb_is_refused_with_1009() {
        // 1 MiB of one byte deflates to about a kilobyte: under the compressed bound, far
        // over the message limit once inflated. Refused, single frame or fragmented.
        let z = client_deflate(&mut fresh(), &vec![b'{'; 1 << 20]);
        assert!(z.len() < 1024 + 1024 / 8 + 64, "bomb of {} bytes", z.len());
        let err = decode(&mut reader(), &client_frame(0xC1, &z)).unwrap_err();
        assert_eq!(err, FrameError::TooBig);
        assert_eq!(err.close_code(), 1009);
        let mut bytes = client_frame(0x41, &z[..z.len() / 2]);
        bytes.extend(client_frame(0x80, &z[z.len() / 2..]));
        assert_eq!(
            decode(&mut reader(), &bytes).unwrap_err(),
            FrameError::TooBig
        );
        // A 1025-byte message is over by one; 1024 is accepted.
        let over = client_deflate(&mut fresh(), text_of(1025, 1).as_bytes());
        assert_eq!(
            decode(&mut reader(), &client_frame(0xC1, &over)).unwrap_err(),
            FrameError::TooBig
        );
    }

    #[test]
    fn deflate_reader_bounds_compressed_bytes_before_buffering() {
        // A compressed frame announcing more than the compressed bound is refused from
        // its header alone, as an oversized plain frame is.
        let mut header = vec![0xC1, 0x80 | 126];
        header.extend_from_slice(&4000u16.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            decode(&mut reader(), &header).unwrap_err(),
            FrameError::TooBig
        );
        // And so is a continuation that takes the message past it.
        let mut bytes = client_frame(0x41, &[0u8; 1000]);
        bytes.extend(client_frame(0x80, &[0u8; 300]));
        assert_eq!(
            decode(&mut reader(), &bytes).unwrap_err(),
            FrameError::TooBig
        );
    }

    #[test]
    fn deflate_reader_invalid_utf8_and_invalid_data() {
        let z = client_deflate(&mut fresh(), b"ok \xff\xfe not utf-8");
        let err = decode(&mut reader(), &client_frame(0xC1, &z)).unwrap_err();
        assert_eq!(err.close_code(), 1007);
        // The same bytes as binary are fine.
        let (_, seen) = decode(&mut reader(), &client_frame(0xC2, &z)).unwrap();
        assert_eq!(seen, vec!["bin:15"]);
        let err = decode(&mut reader(), &client_frame(0xC1, &[0xff, 0xff, 0xff])).unwrap_err();
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn deflate_reader_refuses_context_takeover_it_did_not_grant() {
        // The broker answers client_no_context_takeover: a client that keeps its window
        // anyway sends back-references into a message the inflater never saw.
        let mut c = fresh();
        let msg = text_of(400, 5);
        let first = client_deflate(&mut c, msg.as_bytes());
        let second = client_deflate(&mut c, msg.as_bytes());
        assert!(
            second.len() < first.len() / 4,
            "the second refers to the first"
        );
        let mut r = reader();
        let (_, seen) = decode(&mut r, &client_frame(0xC1, &first)).unwrap();
        assert_eq!(seen.len(), 1);
        let err = decode(&mut r, &client_frame(0xC1, &second)).unwrap_err();
        assert_eq!(err.close_code(), 1002);
    }
}
