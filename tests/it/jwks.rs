//! JWKS (issue 15): the issuer's keys from a JWK Set served over HTTP on loopback by the
//! test itself, chosen by `kid`; RS256, ES256 and EdDSA; rotation; a flood of unknown
//! `kid`s rate limited; the issuer unreachable while the old keys stay in use; `iss`,
//! `aud` and the clock leeway.

use crate::support::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fleetcast::config::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::client::IntoClientRequest;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signing key made by the test, and its public half as a JWK.
struct TestKey {
    kid: String,
    alg: Algorithm,
    enc: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_key(kid: &str) -> TestKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
    let der = key.to_pkcs1_der().unwrap();
    TestKey {
        kid: kid.into(),
        alg: Algorithm::RS256,
        enc: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({"kty":"RSA","kid":kid,"alg":"RS256","use":"sig",
            "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())}),
    }
}

fn ec_key(kid: &str) -> TestKey {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::EncodePrivateKey;
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let der = key.to_pkcs8_der().unwrap();
    let point = key.public_key().to_encoded_point(false);
    TestKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        enc: EncodingKey::from_ec_der(der.as_bytes()),
        jwk: json!({"kty":"EC","kid":kid,"crv":"P-256",
            "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
    }
}

fn ed_key(kid: &str) -> TestKey {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let der = key.to_pkcs8_der().unwrap();
    TestKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        enc: EncodingKey::from_ed_der(der.as_bytes()),
        jwk: json!({"kty":"OKP","kid":kid,"crv":"Ed25519","alg":"EdDSA",
            "x": b64(key.verifying_key().as_bytes())}),
    }
}

impl TestKey {
    /// A viewer token of fleet_a signed with this key, naming `kid` in its header.
    fn token_as(&self, kid: &str, claims: Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &self.enc).unwrap()
    }

    fn token(&self, claims: Value) -> String {
        self.token_as(&self.kid, claims)
    }

    fn viewer_token(&self) -> String {
        self.token(viewer_claims())
    }
}

fn viewer_claims() -> Value {
    json!({"sub":"dash","tenant":"fleet_a","role":"viewer","exp":unix_now() + 600})
}

/// The issuer: a tiny HTTP server on loopback that serves the JWK Set the test sets, and
/// records when it was asked. `stop` closes its port.
struct Issuer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Issuer {
    fn start(keys: &[&TestKey]) -> Issuer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(String::new()));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, h, s) = (body.clone(), hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: it runs until the test stops it or drops it (at most 2 minutes).
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Acquire) && Instant::now() < deadline {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if !head.starts_with(b"GET /jwks.json ") {
                    let _ = conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                h.lock().unwrap().push(Instant::now());
                let body = b.lock().unwrap().clone();
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        let issuer = Issuer {
            addr,
            body,
            hits,
            stop,
            thread: Some(thread),
        };
        issuer.serve(keys);
        issuer
    }

    fn serve(&self, keys: &[&TestKey]) {
        let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        *self.body.lock().unwrap() = set.to_string();
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn hits(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().clone()
    }

    /// Stops serving and closes the port: fetches now fail.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A one-shard broker that takes its keys from `issuer` (no HS256 secret, no API keys
/// needed), refreshing at most every `min_gap_ms`.
fn broker(issuer: &Issuer, min_gap_ms: u64, tweak: impl FnOnce(&mut Config)) -> Broker {
    let mut cfg = config(1);
    cfg.auth.jwt_hs256_secret = None;
    cfg.auth.jwks_url = Some(issuer.url());
    cfg.auth.jwks_min_refresh_interval_ms = min_gap_ms;
    cfg.auth.jwks_refresh_interval_ms = 3_600_000;
    tweak(&mut cfg);
    Broker::start(cfg)
}

/// Upgrades with `?token=`: Ok, or the refusal's status and message.
fn connect(b: &Broker, token: &str) -> Result<Client, (u16, String)> {
    let req = b
        .url(&format!("/v1/streaming/websocket?token={token}"))
        .into_client_request()
        .unwrap();
    match Client::try_connect_request(req) {
        Ok(c) => Ok(c),
        Err(tungstenite::Error::Http(resp)) => {
            let body: Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            let msg = body["error"]["message"].as_str().unwrap_or("").to_string();
            Err((resp.status().as_u16(), msg))
        }
        Err(e) => panic!("connect: {e}"),
    }
}

#[track_caller]
fn accepted(b: &Broker, token: &str, what: &str) {
    let mut c = connect(b, token).unwrap_or_else(|e| panic!("{what}: refused {e:?}"));
    c.send(json!({"type":"auth","id":"who","payload":{}}));
    let m = c.expect("auth_success");
    assert_eq!(
        (&m["payload"]["fleet_id"], &m["payload"]["role"]),
        (&json!("fleet_a"), &json!("viewer")),
        "{what}: {m}"
    );
}

#[track_caller]
fn refused(b: &Broker, token: &str, what: &str) -> String {
    match connect(b, token) {
        Ok(_) => panic!("{what}: accepted, expected a refusal"),
        Err((status, msg)) => {
            assert_eq!(status, 401, "{what}: {msg}");
            msg
        }
    }
}

#[test]
fn rs256_es256_and_eddsa_tokens_are_verified_with_the_key_their_kid_names() {
    let (rsa, ec, ed) = (rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1"));
    let issuer = Issuer::start(&[&rsa, &ec, &ed]);
    let b = broker(&issuer, 10_000, |_| {});
    for k in [&rsa, &ec, &ed] {
        accepted(&b, &k.viewer_token(), &format!("{:?}", k.alg));
    }
    // Signed by one key but naming another of the same algorithm: bad signature.
    let ec2 = ec_key("ec-2");
    let msg = refused(&b, &ec2.token_as("ec-1", viewer_claims()), "forged ec-1");
    assert!(msg.contains("invalid token"), "{msg}");
    // Naming a key of another algorithm: refused before any verification.
    let msg = refused(&b, &ec.token_as("rsa-1", viewer_claims()), "ES256 as rsa-1");
    assert!(msg.contains("is not RS256"), "{msg}");
    // Unknown kid: a clear error.
    let msg = refused(&b, &ec2.viewer_token(), "unknown kid");
    assert!(
        msg.contains("unknown key id") && msg.contains("ec-2"),
        "{msg}"
    );
    assert_eq!(b.metric("fleetcast_jwks_keys", ""), 3);
}

#[test]
fn a_rotated_key_is_accepted_after_the_refresh_its_kid_asks_for() {
    let (old, new) = (ec_key("2026-01"), ed_key("2026-02"));
    let issuer = Issuer::start(&[&old]);
    let b = broker(&issuer, 500, |cfg| {
        cfg.auth.jwks_refresh_interval_ms = 1_500
    });
    assert_eq!(issuer.hits().len(), 1, "fetched once at start");
    accepted(&b, &old.viewer_token(), "old key");
    // The issuer rotates: the new key appears beside the old one.
    issuer.serve(&[&old, &new]);
    let msg = refused(&b, &new.viewer_token(), "before the refresh");
    assert!(msg.contains("unknown key id"), "{msg}");
    // The refresh it asked for comes within the rate limit (500 ms after the start).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tries = 1;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        tries += 1;
        match connect(&b, &new.viewer_token()) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "new key never accepted: {e:?}"),
        }
    }
    assert_eq!(
        issuer.hits().len(),
        2,
        "{tries} tries with the new kid made one refresh"
    );
    accepted(&b, &new.viewer_token(), "new key");
    accepted(&b, &old.viewer_token(), "old key, still served");
    // The old key is withdrawn: the periodic refresh (1.5 s) drops it.
    issuer.serve(&[&new]);
    let deadline = Instant::now() + Duration::from_secs(6);
    while connect(&b, &old.viewer_token()).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the withdrawn key is still accepted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    accepted(&b, &new.viewer_token(), "new key after the old one left");
    assert!(
        b.metric(
            "fleetcast_jwks_fetches_total",
            "reason=\"periodic\",result=\"ok\""
        ) >= 1
    );
}

#[test]
fn a_flood_of_unknown_kids_is_rate_limited() {
    const MIN_GAP: Duration = Duration::from_millis(2_000);
    const FLOOD: u64 = 40;
    let key = ec_key("real");
    let issuer = Issuer::start(&[&key]);
    let started = Instant::now();
    let b = broker(&issuer, MIN_GAP.as_millis() as u64, |_| {});
    assert_eq!(issuer.hits().len(), 1);
    // Forged tokens, each with a new kid: every one is refused at once (the shard never
    // waits for the issuer) and asks for a refresh.
    let forger = ec_key("forger");
    for i in 0..FLOOD {
        let msg = refused(
            &b,
            &forger.token_as(&format!("forged-{i}"), viewer_claims()),
            "forged kid",
        );
        assert!(msg.contains("unknown key id"), "{msg}");
    }
    let flood_took = started.elapsed();
    // The real key works throughout.
    accepted(&b, &key.viewer_token(), "real key during the flood");
    // Wait past the deferred refresh, and a while more.
    std::thread::sleep(
        (MIN_GAP * 2).saturating_sub(started.elapsed()) + Duration::from_millis(500),
    );
    let hits = issuer.hits();
    let elapsed = started.elapsed();
    if flood_took < MIN_GAP - Duration::from_millis(100) {
        // The whole flood fell within one interval: exactly one refresh for all of it.
        assert_eq!(hits.len(), 2, "{FLOOD} unknown kids in {flood_took:?}");
    } else {
        // A slow machine: still at most one fetch per interval.
        let bound = 1 + elapsed.as_millis().div_ceil(MIN_GAP.as_millis()) as usize;
        assert!(hits.len() <= bound, "{} fetches in {elapsed:?}", hits.len());
    }
    for pair in hits.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= MIN_GAP - Duration::from_millis(50),
            "fetches {gap:?} apart"
        );
    }
    assert_eq!(b.metric("fleetcast_jwks_unknown_kid_total", ""), FLOOD);
    assert_eq!(
        b.metric(
            "fleetcast_jwks_fetches_total",
            "reason=\"unknown_kid\",result=\"ok\""
        ),
        hits.len() as u64 - 1
    );
}

#[test]
fn the_previous_keys_stay_in_use_while_the_issuer_is_unreachable() {
    let key = ed_key("k1");
    let mut issuer = Issuer::start(&[&key]);
    let b = broker(&issuer, 200, |cfg| {
        cfg.auth.jwks_refresh_interval_ms = 300;
        cfg.auth.jwks_timeout_ms = 1_000;
    });
    accepted(&b, &key.viewer_token(), "issuer up");
    issuer.stop();
    // Refreshes now fail (periodic, and the one an unknown kid asks for).
    let stranger = ec_key("k2");
    refused(&b, &stranger.viewer_token(), "unknown kid, issuer down");
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.metric("fleetcast_jwks_fetches_total", "result=\"error\"") < 2 {
        assert!(Instant::now() < deadline, "no failed fetch counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    accepted(&b, &key.viewer_token(), "issuer down, old key");
    assert_eq!(b.metric("fleetcast_jwks_keys", ""), 1);
}

#[test]
fn issuer_audience_and_leeway_are_enforced() {
    let key = ec_key("k");
    let issuer = Issuer::start(&[&key]);
    let b = broker(&issuer, 10_000, |cfg| {
        cfg.auth.jwt_issuer = Some("https://id.example".into());
        cfg.auth.jwt_audience = vec!["fleetcast".into()];
        cfg.auth.jwt_leeway_s = 30;
    });
    let claims = |iss: &str, aud: Value, exp: u64| json!({"sub":"dash","tenant":"fleet_a","role":"viewer","iss":iss,"aud":aud,"exp":exp});
    let later = unix_now() + 600;
    accepted(
        &b,
        &key.token(claims("https://id.example", json!("fleetcast"), later)),
        "right iss and aud",
    );
    accepted(
        &b,
        &key.token(claims(
            "https://id.example",
            json!(["other", "fleetcast"]),
            later,
        )),
        "aud list naming us",
    );
    refused(
        &b,
        &key.token(claims("https://evil.example", json!("fleetcast"), later)),
        "wrong iss",
    );
    refused(
        &b,
        &key.token(claims("https://id.example", json!("someone-else"), later)),
        "wrong aud",
    );
    let mut no_aud = claims("https://id.example", json!("x"), later);
    no_aud.as_object_mut().unwrap().remove("aud");
    refused(&b, &key.token(no_aud), "no aud");
    // The leeway: expired 10 s ago is still good, 60 s ago is not.
    let now = unix_now();
    accepted(
        &b,
        &key.token(claims("https://id.example", json!("fleetcast"), now - 10)),
        "within the leeway",
    );
    let msg = refused(
        &b,
        &key.token(claims("https://id.example", json!("fleetcast"), now - 60)),
        "past the leeway",
    );
    assert!(msg.contains("expired"), "{msg}");
}

#[test]
fn a_jwks_file_is_read_at_start_and_reread_for_an_unknown_kid() {
    let (first, second) = (ed_key("file-1"), rsa_key("file-2"));
    let path = std::env::temp_dir().join(format!("fleetcast-it-{}-jwks.json", std::process::id()));
    let write = |keys: &[&TestKey]| {
        let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        std::fs::write(&path, set.to_string()).unwrap();
    };
    write(&[&first]);
    let mut cfg = config(1);
    cfg.auth.jwt_hs256_secret = None;
    cfg.auth.jwks_file = Some(path.display().to_string());
    cfg.auth.jwks_min_refresh_interval_ms = 300;
    let b = Broker::start(cfg);
    accepted(&b, &first.viewer_token(), "key from the file");
    write(&[&first, &second]);
    refused(&b, &second.viewer_token(), "before the re-read");
    let deadline = Instant::now() + Duration::from_secs(5);
    while connect(&b, &second.viewer_token()).is_err() {
        assert!(Instant::now() < deadline, "the new key never accepted");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A file that turns bad keeps the keys in use.
    std::fs::write(&path, "{not json").unwrap();
    refused(&b, &ec_key("nope").viewer_token(), "unknown kid, bad file");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metric("fleetcast_jwks_fetches_total", "result=\"error\"") < 1 {
        assert!(Instant::now() < deadline, "the bad file was never re-read");
        std::thread::sleep(Duration::from_millis(50));
    }
    accepted(&b, &second.viewer_token(), "after a bad re-read");
    let _ = std::fs::remove_file(&path);
}
