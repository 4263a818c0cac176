//! The echo endpoint (`testing.echo_endpoint`): a testing aid through which conformance
//! suites (Autobahn) exercise the same frame reader and writer that serve clients.

use crate::raw::*;
use crate::support::*;
use std::time::{Duration, Instant};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

const ECHO_MAX: usize = 4096;

fn echo_broker() -> Broker {
    let mut cfg = config(2);
    cfg.testing.echo_endpoint = true;
    cfg.testing.echo_max_message_bytes = ECHO_MAX;
    Broker::start(cfg)
}

fn echo(b: &Broker) -> Raw {
    Raw::connect(b.addr, "/echo")
}

/// The next frame must be a final one of `opcode` carrying `payload`.
#[track_caller]
fn expect_frame(r: &mut Raw, opcode: u8, payload: &[u8]) {
    let f = r.read_frame(Duration::from_secs(5)).expect("a frame");
    assert_eq!(
        (f.fin, f.rsv, f.opcode),
        (true, 0, opcode),
        "unexpected frame {f:?}"
    );
    assert!(f.payload == payload, "payload {:02x?}", &f.payload);
}

fn open_echo_connections(b: &Broker) -> u64 {
    let (_, body) = b.get("/metrics");
    body.lines()
        .filter(|l| l.starts_with("fleetcast_connections_open{") && l.contains("dialect=\"echo\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn echo_is_404_unless_enabled() {
    let b = Broker::with_shards(1);
    let refused = Raw::try_connect(b.addr, "/echo")
        .err()
        .expect("no echo endpoint by default");
    assert_eq!(refused.status, 404, "{refused:?}");
    assert_eq!(b.get("/echo").0, 404);
    assert!(Client::try_connect(&b.url("/echo")).is_err());

    let e = echo_broker();
    echo(&e).assert_ping_pong(b"on");
}

#[test]
fn echo_text_and_binary() {
    let b = echo_broker();
    let mut c = Client::connect(&b.url("/echo"));
    c.set_timeout(Duration::from_secs(5));
    let text = [
        String::new(),
        "hello w\u{f6}rld \u{1F69A}".to_string(),
        // Not interpreted: a broker message comes back as it went.
        r#"{"type":"auth","payload":{"api_key":"nope"}}"#.to_string(),
        "x".repeat(ECHO_MAX),
    ];
    for t in text {
        c.ws.send(Message::text(t.clone())).unwrap();
        match c.ws.read().unwrap() {
            Message::Text(got) => assert_eq!(got.as_str(), t),
            other => panic!("expected text, got {other:?}"),
        }
    }
    let binary: [Vec<u8>; 3] = [vec![], vec![0, 1, 2, 0xff, 0xfe], vec![0xc3; ECHO_MAX]];
    for bin in binary {
        c.ws.send(Message::binary(bin.clone())).unwrap();
        match c.ws.read().unwrap() {
            Message::Binary(got) => assert_eq!(&got[..], &bin[..]),
            other => panic!("expected binary, got {other:?}"),
        }
    }
    assert_eq!(open_echo_connections(&b), 1);
    c.ws.close(None).unwrap();
    loop {
        match c.ws.read() {
            Ok(Message::Close(f)) => {
                assert_eq!(f.map(|f| f.code), Some(CloseCode::Normal));
            }
            Ok(other) => panic!("after close: {other:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_echo_connections(&b) != 0 {
        assert!(Instant::now() < deadline, "echo connection still counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn echo_reassembles_fragments_and_answers_pings_between_them() {
    let b = echo_broker();
    let mut r = echo(&b);
    // Three text fragments with a ping between: a pong, then one reassembled text.
    r.send_raw(&frame_bytes(false, 0, OP_TEXT, b"Hel", true))
        .unwrap();
    r.send_raw(&frame_bytes(false, 0, OP_CONT, b"lo, ", true))
        .unwrap();
    r.send(OP_PING, b"between");
    r.send_raw(&frame_bytes(
        true,
        0,
        OP_CONT,
        "w\u{f6}rld".as_bytes(),
        true,
    ))
    .unwrap();
    expect_frame(&mut r, OP_PONG, b"between");
    expect_frame(&mut r, OP_TEXT, "Hello, w\u{f6}rld".as_bytes());
    // A character split across fragments.
    r.send_raw(&frame_bytes(false, 0, OP_TEXT, b"caf\xc3", true))
        .unwrap();
    r.send_raw(&frame_bytes(true, 0, OP_CONT, b"\xa9", true))
        .unwrap();
    expect_frame(&mut r, OP_TEXT, "caf\u{e9}".as_bytes());
    // Empty fragments, binary fragments.
    r.send_raw(&frame_bytes(false, 0, OP_BINARY, b"", true))
        .unwrap();
    r.send_raw(&frame_bytes(false, 0, OP_CONT, &[0xff, 0x00], true))
        .unwrap();
    r.send_raw(&frame_bytes(true, 0, OP_CONT, b"", true))
        .unwrap();
    expect_frame(&mut r, OP_BINARY, &[0xff, 0x00]);
    // Many small frames in one write.
    let mut bytes = Vec::new();
    for i in 0..50u8 {
        bytes.extend(frame(OP_TEXT, &[b'a' + i % 26]));
    }
    r.send_raw(&bytes).unwrap();
    for i in 0..50u8 {
        expect_frame(&mut r, OP_TEXT, &[b'a' + i % 26]);
    }
    r.send(OP_CLOSE, &close_payload(1000, b""));
    assert_eq!(r.expect_close(), 1000);
}

#[test]
fn echo_ping_gets_pong_with_same_payload() {
    let b = echo_broker();
    let mut r = echo(&b);
    r.assert_ping_pong(b"ping-1");
    r.assert_ping_pong(b"");
    r.assert_ping_pong(&[0xffu8; 125]);
    // An unsolicited pong is ignored.
    r.send(OP_PONG, b"unasked");
    r.assert_ping_pong(b"after-pong");
    // tungstenite, too.
    let mut c = Client::connect(&b.url("/echo"));
    c.set_timeout(Duration::from_secs(5));
    c.ws.send(Message::Ping(b"tung".to_vec().into())).unwrap();
    match c.ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"tung"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[test]
fn echo_close_is_echoed() {
    let b = echo_broker();
    for (sent, echoed) in [
        (close_payload(1000, b"bye"), 1000),
        (close_payload(1001, b""), 1001),
        (close_payload(3000, "d\u{e9}j\u{e0}".as_bytes()), 3000),
        (close_payload(4999, b""), 4999),
        // No code: answered with 1000.
        (vec![], 1000),
    ] {
        let mut r = echo(&b);
        r.send(OP_CLOSE, &sent);
        assert_eq!(r.expect_close(), echoed, "{sent:02x?}");
    }
    // Invalid close payloads.
    for sent in [
        vec![0x03],               // one byte
        close_payload(1005, b""), // reserved, never on the wire
        close_payload(1006, b""), // reserved, never on the wire
        close_payload(999, b""),  // below the range
        close_payload(1004, b""), // reserved
        close_payload(1016, b""), // unassigned
        close_payload(5000, b""), // above the range
    ] {
        let mut r = echo(&b);
        r.send(OP_CLOSE, &sent);
        assert_eq!(r.expect_close(), 1002, "{sent:02x?}");
    }
    // tungstenite's close handshake completes.
    let mut c = Client::connect(&b.url("/echo"));
    c.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .unwrap();
    assert_eq!(c.expect_close(), Some(1000));
}

#[test]
fn echo_invalid_utf8_closes_1007() {
    let b = echo_broker();
    let mut r = echo(&b);
    r.send(OP_TEXT, b"valid then \xff");
    assert_eq!(r.expect_close(), 1007);
    // Split across fragments: each fragment's bytes could start or end a character,
    // the message as a whole is invalid.
    let split: [[&[u8]; 3]; 4] = [
        [b"caf\xc3", b"(", b"!"],
        [b"ok", b"\xed\xa0", b"\x80"], // surrogate
        [b"ok", b"", b"\xe2\x82"],     // truncated at the end
        [b"\xc0", b"\xaf", b""],       // overlong
    ];
    for parts in split {
        let mut r = echo(&b);
        r.send_raw(&frame_bytes(false, 0, OP_TEXT, parts[0], true))
            .unwrap();
        r.send_raw(&frame_bytes(false, 0, OP_CONT, parts[1], true))
            .unwrap();
        r.send_raw(&frame_bytes(true, 0, OP_CONT, parts[2], true))
            .unwrap();
        assert_eq!(r.expect_close(), 1007, "{parts:02x?}");
    }
    // The close reason, too.
    let mut r = echo(&b);
    r.send(OP_CLOSE, &close_payload(1000, b"\xff"));
    assert_eq!(r.expect_close(), 1007);
    // Binary messages may hold any bytes.
    let mut r = echo(&b);
    r.send(OP_BINARY, b"\xff\xfe");
    expect_frame(&mut r, OP_BINARY, b"\xff\xfe");
}

#[test]
fn echo_message_over_the_limit_closes_1009() {
    let b = echo_broker();
    for opcode in [OP_TEXT, OP_BINARY] {
        let mut r = echo(&b);
        let _ = r.send_raw(&frame(opcode, &vec![b'a'; ECHO_MAX + 1]));
        assert_eq!(r.expect_close(), 1009);
        // In fragments, each under the limit.
        let mut r = echo(&b);
        let part = vec![b'a'; 2000];
        let _ = r.send_raw(&frame_bytes(false, 0, opcode, &part, true));
        let _ = r.send_raw(&frame_bytes(false, 0, OP_CONT, &part, true));
        let _ = r.send_raw(&frame_bytes(true, 0, OP_CONT, &part, true));
        assert_eq!(r.expect_close(), 1009);
    }
    // Announced, not sent.
    let mut r = echo(&b);
    let mut hdr = vec![0x82, 0x80 | 127];
    hdr.extend_from_slice(&(1u64 << 62).to_be_bytes());
    hdr.extend_from_slice(&[9, 9, 9, 9]);
    r.send_raw(&hdr).unwrap();
    assert_eq!(r.expect_close(), 1009);
}

#[test]
fn echo_protocol_errors_close_1002() {
    let b = echo_broker();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("rsv1", frame_bytes(true, RSV1, OP_TEXT, b"x", true)),
        ("rsv2", frame_bytes(true, RSV2, OP_BINARY, b"x", true)),
        ("rsv3", frame_bytes(true, RSV3, OP_PING, b"x", true)),
        ("opcode 3", frame(0x3, b"x")),
        ("opcode 7", frame(0x7, b"x")),
        ("opcode 0xB", frame(0xB, b"x")),
        ("opcode 0xF", frame(0xF, b"x")),
        ("unmasked", frame_bytes(true, 0, OP_TEXT, b"x", false)),
        ("ping 126", frame(OP_PING, &[0u8; 126])),
        (
            "fragmented ping",
            frame_bytes(false, 0, OP_PING, b"x", true),
        ),
        ("continuation of nothing", frame(OP_CONT, b"x")),
    ];
    for (what, bytes) in cases {
        let mut r = echo(&b);
        r.send_raw(&bytes).unwrap();
        assert_eq!(r.expect_close(), 1002, "{what}");
    }
    let mut r = echo(&b);
    r.send_raw(&frame_bytes(false, 0, OP_TEXT, b"a", true))
        .unwrap();
    r.send(OP_TEXT, b"b");
    assert_eq!(r.expect_close(), 1002, "text inside a fragmented message");
}
