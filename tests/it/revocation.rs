//! Stored credentials (issue 15): API keys kept as SHA-256 digests (`key_sha256`,
//! `fleetcast hash-key`), and revocation on SIGHUP of the real binary: exactly the
//! connections of revoked credentials are closed with 4001.

use crate::support::*;
use fleetcast::auth::mint_hs256;
use fleetcast::config::ApiKeyConfig;
use fleetcast::model::Role;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const HASHED_KEY: &str = "hashed-viewer-key-0123456789";

#[test]
fn a_key_stored_as_sha256_logs_in_and_a_near_miss_does_not() {
    let mut cfg = config(1);
    cfg.auth.api_keys.push(ApiKeyConfig {
        key: String::new(),
        key_sha256: Some(sha256_hex(HASHED_KEY).to_uppercase()),
        user_id: "hashed-viewer".into(),
        tenant: "fleet_a".into(),
        role: Role::Viewer,
        vehicles: vec![],
        drivers: vec![],
        trips: vec![],
    });
    let b = Broker::start(cfg);
    let mut c = b.connect_key(HASHED_KEY);
    c.send(json!({"type":"auth","id":"who","payload":{}}));
    let m = c.expect("auth_success");
    assert_eq!(m["payload"]["user_id"], "hashed-viewer", "{m}");
    // In an auth message too.
    let mut c = b.connect_auth(HASHED_KEY);
    c.expect_nothing_more("auth message");
    // The digest itself is not a key, nor is a near miss.
    for wrong in [
        sha256_hex(HASHED_KEY),
        HASHED_KEY[..HASHED_KEY.len() - 1].to_string(),
        format!("{HASHED_KEY}0"),
    ] {
        match Client::try_connect(&b.url(&format!("/v1/streaming/websocket?api_key={wrong}"))) {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 401, "{wrong}")
            }
            Ok(_) => panic!("{wrong}: accepted"),
            Err(e) => panic!("{wrong}: {e}"),
        }
    }
}

#[test]
fn hash_key_prints_the_sha256_from_stdin_or_the_flag() {
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .arg("hash-key")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8(out.stdout).unwrap())
    };
    let want = format!("{}\n", sha256_hex(HASHED_KEY));
    assert_eq!(run(&[], &format!("{HASHED_KEY}\n")), (true, want.clone()));
    assert_eq!(run(&[], &format!("{HASHED_KEY}\r\n")), (true, want.clone()));
    assert_eq!(run(&["--key", HASHED_KEY], ""), (true, want));
    // A key too short to be accepted in clear is not hashed either.
    assert!(!run(&[], "short\n").0);
}

/// `fleetcast serve --config FILE` as a child process.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn serve(config: &std::path::Path) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fleetcast");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Killed and waited for when dropped, even if it never says where it listens.
        let mut p = Proc {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("a listening line");
            if let Some(rest) = line.strip_prefix("listening on ") {
                p.addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                return p;
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
    }

    /// The status of an upgrade with this query (101: upgraded).
    fn status(&self, query: &str) -> u16 {
        match Client::try_connect(&self.url(&format!("/v1/streaming/websocket?{query}"))) {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("{query}: {e}"),
        }
    }

    fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }
}

const SECRET_LINE: &str = "jwt_hs256_secret = \"revocation-test-secret-0123456789\"";

fn key_entry(key: &str, user: &str) -> String {
    format!(
        "[[auth.api_keys]]\nkey = \"{key}\"\nuser_id = \"{user}\"\ntenant = \"fleet_a\"\nrole = \"viewer\"\n\n"
    )
}

fn hashed_entry(key: &str, user: &str) -> String {
    format!(
        "[[auth.api_keys]]\nkey_sha256 = \"{}\"\nuser_id = \"{user}\"\ntenant = \"fleet_a\"\nrole = \"viewer\"\n\n",
        sha256_hex(key)
    )
}

/// The config file: three clear keys, a hashed one, and the given revocation lines.
fn config_text(revocations: &str, extra_keys: &str) -> String {
    format!(
        "[server]\nshards = 2\n\n[limits]\nnew_connections_per_minute_per_ip = 10000\n\
         new_connections_per_minute_per_user = 10000\n\n[auth]\n{SECRET_LINE}\n\
         jwt_leeway_s = 0\n{revocations}\n\n{}{}{}{}{extra_keys}",
        key_entry("revoked-by-user-0123456789", "bad-user"),
        key_entry("revoked-by-hash-0123456789", "hash-revoked"),
        key_entry("kept-clear-key-0123456789", "good-user"),
        hashed_entry("kept-hashed-key-0123456789", "good-hashed"),
    )
}

#[test]
fn sighup_closes_exactly_the_connections_of_revoked_credentials_with_4001() {
    let path = std::env::temp_dir().join(format!(
        "fleetcast-it-{}-revocation.toml",
        std::process::id()
    ));
    std::fs::write(&path, config_text("", "")).unwrap();
    let p = Proc::serve(&path);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = |jti: &str| {
        let claims = json!({"sub":"t","tenant":"fleet_a","role":"viewer","exp":exp,"jti":jti});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"revocation-test-secret-0123456789"),
        )
        .unwrap()
    };
    let by_query = |q: String| Client::connect(&p.url(&format!("/v1/streaming/websocket?{q}")));
    let by_message = |payload: serde_json::Value| {
        let mut c = Client::connect(&p.url("/v1/streaming/websocket"));
        c.send(json!({"type":"auth","id":"a","payload":payload}));
        c.expect("auth_success");
        c
    };
    let mut doomed = [
        (
            "key revoked by user",
            by_query("api_key=revoked-by-user-0123456789".into()),
        ),
        (
            "same, auth message",
            by_message(json!({"api_key":"revoked-by-user-0123456789"})),
        ),
        (
            "key revoked by sha256",
            by_query("api_key=revoked-by-hash-0123456789".into()),
        ),
        (
            "token revoked by jti",
            by_query(format!("token={}", token("jti-bad"))),
        ),
        (
            "same, auth message",
            by_message(json!({"token": token("jti-bad")})),
        ),
    ];
    let mut kept = [
        (
            "clear key",
            by_query("api_key=kept-clear-key-0123456789".into()),
        ),
        (
            "hashed key",
            by_query("api_key=kept-hashed-key-0123456789".into()),
        ),
        (
            "token with another jti",
            by_query(format!("token={}", token("jti-good"))),
        ),
        (
            "token without jti",
            by_query(format!(
                "token={}",
                mint_hs256(
                    "revocation-test-secret-0123456789",
                    "t",
                    "fleet_a",
                    Role::Viewer,
                    exp,
                    None
                )
                .unwrap()
            )),
        ),
    ];
    for (what, c) in doomed.iter_mut().chain(kept.iter_mut()) {
        c.expect_nothing_more(what);
    }

    // A file that does not validate changes nothing, and closes nothing.
    std::fs::write(&path, config_text("revoked_token_ids = [\"\"]", "")).unwrap();
    p.sighup();
    std::thread::sleep(Duration::from_millis(300));
    for (what, c) in doomed.iter_mut().chain(kept.iter_mut()) {
        c.expect_nothing_more(what);
    }

    let revocations = format!(
        "revoked_token_ids = [\"jti-bad\"]\nrevoked_keys = [\"bad-user\", \"{}\"]",
        sha256_hex("revoked-by-hash-0123456789")
    );
    std::fs::write(
        &path,
        config_text(
            &revocations,
            &key_entry("new-key-after-reload-0123", "newcomer"),
        ),
    )
    .unwrap();
    p.sighup();
    for (what, c) in doomed.iter_mut() {
        let m = c.expect("error");
        assert_eq!(m["payload"]["code"], 401, "{what}: {m}");
        assert_eq!(c.expect_close(), Some(4001), "{what}");
    }
    for (what, c) in kept.iter_mut() {
        c.expect_nothing_more(what);
    }
    assert_eq!(
        p.metric("fleetcast_revoked_connections_closed_total"),
        doomed.len() as u64
    );
    // New connections: the revoked are refused before the upgrade, the others and the
    // key the reload added are accepted.
    assert_eq!(p.status("api_key=revoked-by-user-0123456789"), 401);
    assert_eq!(p.status("api_key=revoked-by-hash-0123456789"), 401);
    assert_eq!(p.status(&format!("token={}", token("jti-bad"))), 401);
    assert_eq!(p.status(&format!("token={}", token("jti-good"))), 101);
    assert_eq!(p.status("api_key=kept-hashed-key-0123456789"), 101);
    assert_eq!(p.status("api_key=new-key-after-reload-0123"), 101);
    let _ = std::fs::remove_file(&path);
}
