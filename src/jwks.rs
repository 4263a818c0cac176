//! The issuer's public keys as a JWK Set (RFC 7517), chosen by `kid` (`[auth] jwks_file`
//! or `jwks_url`).
//!
//! - [`KeySet`]: a parsed set (pure: bytes in, keys out).
//! - [`Jwks`]: what shards share: the current set behind a cheap snapshot, the way to ask
//!   for a refresh (never blocking, never fetching on a shard) and the counters.
//! - [`Pacer`]: when the background thread fetches (periodically, and on demand when a
//!   token names an unknown `kid`), at most once per `jwks_min_refresh_interval_ms`
//!   whatever asks, so that a flood of forged `kid`s cannot make this node hammer the
//!   issuer. Pure, driven by the caller's clock.
//! - [`refresher`]: the thread that fetches (a file, or HTTP(S) with ureq) and swaps the
//!   set in; a failed fetch keeps the previous set.

pub mod refresher;

use crossbeam_channel::{Receiver, Sender};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Largest JWK Set accepted (a real one is a few KiB).
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// Verification keys by `kid`, each with the one algorithm it verifies.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.keys.iter().map(|(k, (a, _))| (k, a)).collect();
        kids.sort_by(|a, b| a.0.cmp(b.0));
        f.debug_struct("KeySet").field("keys", &kids).finish()
    }
}

impl KeySet {
    /// Parses a JWK Set. Keys this node cannot use (another type or curve, `use` other
    /// than `sig`, no `kid`) are skipped; a set with no usable key at all is an error,
    /// so that an issuer's bad answer does not replace a working set.
    pub fn parse(json: &[u8]) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Raw {
            keys: Vec<simd_json::OwnedValue>,
        }
        let mut copy = json.to_vec();
        let raw: Raw = simd_json::serde::from_slice(&mut copy)
            .map_err(|e| format!("not a JWK Set ({{\"keys\":[...]}}): {e}"))?;
        let mut keys = HashMap::new();
        let mut skipped = Vec::new();
        for (i, v) in raw.keys.into_iter().enumerate() {
            let parsed = simd_json::serde::from_owned_value::<Jwk>(v)
                .map_err(|e| e.to_string())
                .and_then(|jwk| usable(&jwk).map(|k| (jwk.common.key_id.clone(), k)));
            match parsed {
                Ok((Some(kid), key)) => {
                    keys.insert(kid, key);
                }
                Ok((None, _)) => skipped.push(format!("key {i}: no kid")),
                Err(e) => skipped.push(format!("key {i}: {e}")),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable key (RS256, ES256 on P-256, EdDSA on Ed25519, with a kid){}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(": {}", skipped.join("; "))
                }
            ));
        }
        Ok(KeySet { keys })
    }

    /// Reads and parses a JWK Set file.
    pub fn read(path: &Path) -> Result<KeySet, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        KeySet::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key `kid` names and the algorithm it verifies.
    pub fn get(&self, kid: &str) -> Option<&(Algorithm, DecodingKey)> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The algorithm and decoding key of a JWK this node verifies with. A key's algorithm is
/// its `alg` when given, else what its type implies; a token must be signed with exactly
/// it (no algorithm confusion between key types).
fn usable(jwk: &Jwk) -> Result<(Algorithm, DecodingKey), String> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return Err("not a signature key (use)".into());
    }
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return Err("unsupported key type or curve".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => implied,
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => implied,
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => implied,
        Some(KeyAlgorithm::EdDSA) if implied == Algorithm::EdDSA => implied,
        Some(other) => return Err(format!("alg {other:?} not accepted for this key")),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok((alg, key))
}

/// Why the refresher fetched; a label of `fleetcast_jwks_fetches_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Startup,
    Periodic,
    UnknownKid,
    Retry,
}

impl Reason {
    const ALL: [Reason; 4] = [
        Reason::Startup,
        Reason::Periodic,
        Reason::UnknownKid,
        Reason::Retry,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Periodic => "periodic",
            Reason::UnknownKid => "unknown_kid",
            Reason::Retry => "retry",
        }
    }
}

/// The set every shard reads, and the refresher's inbox. Reading is a read lock held for
/// an `Arc` clone; the refresher holds the write lock for a pointer swap.
pub struct Jwks {
    current: RwLock<Arc<KeySet>>,
    ask: Sender<()>,
    asks: Receiver<()>,
    stop: AtomicBool,
    /// Tokens whose `kid` was not in the set (each asked for a refresh).
    pub unknown_kid: AtomicU64,
    /// Fetches by reason ([`Reason::ALL`] order), succeeded and failed.
    pub fetched_ok: [AtomicU64; 4],
    pub fetched_err: [AtomicU64; 4],
}

impl Jwks {
    pub fn new(initial: KeySet) -> Jwks {
        let (ask, asks) = crossbeam_channel::bounded(1);
        Jwks {
            current: RwLock::new(Arc::new(initial)),
            ask,
            asks,
            stop: AtomicBool::new(false),
            unknown_kid: AtomicU64::new(0),
            fetched_ok: Default::default(),
            fetched_err: Default::default(),
        }
    }

    /// The current set (a snapshot: a refresh meanwhile does not change it).
    pub fn snapshot(&self) -> Arc<KeySet> {
        self.current.read().clone()
    }

    /// A token named a `kid` the set lacks: counts it and asks the refresher for a fetch.
    /// Never blocks: when a request is already waiting, this one is folded into it.
    pub fn ask_refresh(&self) {
        self.unknown_kid.fetch_add(1, Ordering::Relaxed);
        let _ = self.ask.try_send(());
    }

    /// Records a fetch; a new set replaces the current one only when the fetch worked.
    pub fn fetched(&self, reason: Reason, result: Result<KeySet, String>) {
        let i = reason as usize;
        match result {
            Ok(set) => {
                self.fetched_ok[i].fetch_add(1, Ordering::Relaxed);
                *self.current.write() = Arc::new(set);
            }
            Err(_) => {
                self.fetched_err[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Stops the refresher (at its next wake-up; a fetch in flight completes first).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.ask.try_send(());
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Prometheus lines for the JWKS counters.
    pub fn render_metrics(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP fleetcast_jwks_unknown_kid_total Tokens naming a kid not in the JWK Set \
             (each asks for a rate-limited refresh).\n\
             # TYPE fleetcast_jwks_unknown_kid_total counter\n\
             fleetcast_jwks_unknown_kid_total {}",
            load(&self.unknown_kid)
        );
        let _ = writeln!(
            out,
            "# HELP fleetcast_jwks_fetches_total JWK Set fetches by reason and result.\n\
             # TYPE fleetcast_jwks_fetches_total counter"
        );
        for r in Reason::ALL {
            for (result, a) in [
                ("ok", &self.fetched_ok[r as usize]),
                ("error", &self.fetched_err[r as usize]),
            ] {
                let _ = writeln!(
                    out,
                    "fleetcast_jwks_fetches_total{{reason=\"{}\",result=\"{result}\"}} {}",
                    r.name(),
                    load(a)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP fleetcast_jwks_keys Keys in the JWK Set in use.\n\
             # TYPE fleetcast_jwks_keys gauge\nfleetcast_jwks_keys {}",
            self.snapshot().len()
        );
    }
}

/// When to fetch: periodically every `every`, soon after a refresh was asked for, after a
/// failure again, and never twice within `min_gap`. Pure: the caller passes the time.
///
/// Call order: `handle_ask` when a request arrives; `poll_fetch(now)`: `Some(reason)` when
/// a fetch is due now (the caller fetches, then calls `handle_fetched`); `poll_timeout`:
/// when to call `poll_fetch` again at the latest.
#[derive(Debug)]
pub struct Pacer {
    every: Duration,
    min_gap: Duration,
    last_fetch: Option<Instant>,
    next_periodic: Instant,
    asked: bool,
    failed: bool,
}

impl Pacer {
    /// `last`: when the set was last fetched (or read), and whether that worked (`None`:
    /// never, fetch at once).
    pub fn new(
        every: Duration,
        min_gap: Duration,
        last: Option<(Instant, bool)>,
        now: Instant,
    ) -> Pacer {
        Pacer {
            every,
            min_gap,
            last_fetch: last.map(|(t, _)| t),
            next_periodic: last.map_or(now, |(t, _)| t) + every,
            asked: last.is_none(),
            failed: last.is_some_and(|(_, ok)| !ok),
        }
    }

    pub fn handle_ask(&mut self) {
        self.asked = true;
    }

    pub fn handle_fetched(&mut self, now: Instant, ok: bool) {
        self.last_fetch = Some(now);
        self.next_periodic = now + self.every;
        self.asked = false;
        self.failed = !ok;
    }

    /// The earliest time a fetch is allowed.
    fn allowed_at(&self) -> Option<Instant> {
        self.last_fetch.map(|t| t + self.min_gap)
    }

    /// What is wanted and from when: a request or a retry at the rate limit, else the
    /// periodic refresh.
    fn due(&self) -> (Instant, Reason) {
        let allowed = self.allowed_at();
        if self.asked {
            let reason = if self.last_fetch.is_none() {
                Reason::Startup
            } else {
                Reason::UnknownKid
            };
            return (allowed.unwrap_or(self.next_periodic - self.every), reason);
        }
        if self.failed {
            let at = allowed.expect("a failure follows a fetch");
            return (at.min(self.next_periodic), Reason::Retry);
        }
        (self.next_periodic, Reason::Periodic)
    }

    pub fn poll_fetch(&mut self, now: Instant) -> Option<Reason> {
        let (at, reason) = self.due();
        (now >= at && self.allowed_at().is_none_or(|a| now >= a)).then_some(reason)
    }

    pub fn poll_timeout(&self) -> Instant {
        let (at, _) = self.due();
        self.allowed_at().map_or(at, |a| at.max(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_JWK: &str = r#"{"kty":"RSA","kid":"r1","use":"sig","n":"u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw","e":"AQAB"}"#;
    const EC_JWK: &str = r#"{"kty":"EC","kid":"e1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
    const ED_JWK: &str = r#"{"kty":"OKP","kid":"d1","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;

    #[test]
    fn parses_rsa_ec_and_ed25519_keys_by_kid() {
        let set = KeySet::parse(format!(r#"{{"keys":[{RSA_JWK},{EC_JWK},{ED_JWK}]}}"#).as_bytes())
            .unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.get("r1").unwrap().0, Algorithm::RS256);
        assert_eq!(set.get("e1").unwrap().0, Algorithm::ES256);
        assert_eq!(set.get("d1").unwrap().0, Algorithm::EdDSA);
        assert!(set.get("nope").is_none());
    }

    #[test]
    fn unusable_keys_are_skipped_and_a_set_without_any_is_refused() {
        let p384 = r#"{"kty":"EC","kid":"p384","crv":"P-384","x":"AA","y":"AA"}"#;
        let no_kid = EC_JWK.replace(r#""kid":"e1","#, "");
        let enc = RSA_JWK.replace(r#""use":"sig""#, r#""use":"enc""#);
        let wrong_alg = EC_JWK.replace(r#""kid":"e1""#, r#""kid":"e2","alg":"RS256""#);
        let oct = r#"{"kty":"oct","kid":"h","k":"c2VjcmV0"}"#;
        let text = format!(
            r#"{{"keys":[{p384},{no_kid},{enc},{wrong_alg},{oct},{ED_JWK},{{"kty":"weird"}}]}}"#
        );
        let set = KeySet::parse(text.as_bytes()).unwrap();
        assert_eq!(set.len(), 1, "{set:?}");
        assert!(set.get("d1").is_some());
        let none = format!(r#"{{"keys":[{p384},{oct}]}}"#);
        let e = KeySet::parse(none.as_bytes()).unwrap_err();
        assert!(e.contains("no usable key"), "{e}");
        assert!(KeySet::parse(b"[]").is_err());
        assert!(KeySet::parse(b"not json").is_err());
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_flood_of_asks_fetches_once_per_min_gap() {
        let t0 = Instant::now();
        let mut p = Pacer::new(secs(300), secs(10), Some((t0, true)), t0);
        assert_eq!(p.poll_fetch(t0), None);
        // Asked right after the startup fetch: deferred to t0 + 10 s, however often.
        for s in 1..10 {
            p.handle_ask();
            assert_eq!(p.poll_fetch(t0 + secs(s)), None);
        }
        assert_eq!(p.poll_timeout(), t0 + secs(10));
        assert_eq!(p.poll_fetch(t0 + secs(10)), Some(Reason::UnknownKid));
        p.handle_fetched(t0 + secs(10), true);
        p.handle_ask();
        assert_eq!(p.poll_fetch(t0 + secs(19)), None);
        assert_eq!(p.poll_fetch(t0 + secs(20)), Some(Reason::UnknownKid));
        p.handle_fetched(t0 + secs(20), true);
        // Nobody asks: the next fetch is the periodic one.
        assert_eq!(p.poll_timeout(), t0 + secs(320));
        assert_eq!(p.poll_fetch(t0 + secs(319)), None);
        assert_eq!(p.poll_fetch(t0 + secs(320)), Some(Reason::Periodic));
    }

    #[test]
    fn failures_are_retried_at_the_rate_limit_and_startup_fetches_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(secs(300), secs(10), None, t0);
        assert_eq!(p.poll_fetch(t0), Some(Reason::Startup));
        p.handle_fetched(t0, false);
        assert_eq!(p.poll_fetch(t0 + secs(9)), None);
        assert_eq!(p.poll_timeout(), t0 + secs(10));
        assert_eq!(p.poll_fetch(t0 + secs(10)), Some(Reason::Retry));
        p.handle_fetched(t0 + secs(10), true);
        assert_eq!(p.poll_fetch(t0 + secs(20)), None);
    }
}
