//! iTrack sessions (`user/auth`, SPEC §6): the users who log in with a password, the
//! session hashes they are given, the store that keeps those hashes, and the two HTTP
//! calls (`user/auth`, `user/logout`) as pure functions from request fields to response
//! bytes.
//!
//! ```text
//!  user/auth {login, password} --verify (argon2)--> SessionStore::create --> {hash}
//!  WebSocket {hash}  --Authenticator::session--> SessionStore::get --> Principal (viewer)
//!  user/logout {hash} ----------------------------> SessionStore::revoke
//! ```
//!
//! Times are arguments (UNIX milliseconds); no clock is read here. The randomness of
//! hashes and salts comes from the OS (getrandom). Verifying a password costs what its
//! argon2 parameters say (tens of milliseconds with the defaults): the caller decides
//! where that runs.

use crate::auth::{DeviceScope, Principal};
use crate::config::LoginUser;
use crate::model::Role;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use simd_json::prelude::*;
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Length of a session hash: 16 random bytes as lowercase hex (Navixy's shape).
pub const HASH_LEN: usize = 32;

/// Sessions one login may hold at once; creating one more ends its oldest. Bounds the
/// store at this many entries per configured user, whatever a client does (a script that
/// logs in every minute and never logs out).
pub const MAX_SESSIONS_PER_LOGIN: usize = 1_000;

/// How often the in-memory store drops expired sessions (a scan of the whole map).
pub const PRUNE_EVERY_MS: u64 = 60_000;

/// A fresh session hash: 32 lowercase hex characters from the OS random source.
pub fn new_session_hash() -> String {
    let mut bytes = [0u8; HASH_LEN / 2];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    let mut out = String::with_capacity(HASH_LEN);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// What a live session hash stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub login: Arc<str>,
    /// UNIX ms at which the hash stops being valid.
    pub expires_at_ms: u64,
}

/// Where session hashes live. One interface, so that a cluster can keep them where
/// every node sees them; the node uses [`MemorySessions`].
///
/// A hash is valid from `create` until `now_ms >= expires_at_ms` or `revoke`, whichever
/// comes first. Implementations must not reveal, by their answer or its timing, how much
/// of an unknown hash was right.
pub trait SessionStore: Send + Sync {
    /// Starts a session for `login`, valid for `ttl_ms`; returns its new hash
    /// ([`HASH_LEN`] hex characters).
    fn create(&self, login: &str, now_ms: u64, ttl_ms: u64) -> String;

    /// The session of `hash` if it is live at `now_ms` (unknown, expired and revoked
    /// hashes are all `None`).
    fn get(&self, hash: &str, now_ms: u64) -> Option<StoredSession>;

    /// Ends the session of `hash`; `true` when it was live.
    fn revoke(&self, hash: &str, now_ms: u64) -> bool;
}

pub type Digest32 = [u8; 32];

/// Hashes are kept by their SHA-256 digest, so a lookup's time does not depend on how
/// many leading characters of a guess were right.
pub fn digest(hash: &str) -> Digest32 {
    Sha256::digest(hash.as_bytes()).into()
}

/// The node's session store: a mutex'd map, pruned of expired sessions at most every
/// [`PRUNE_EVERY_MS`] (by whichever call comes first after that), and at most
/// [`MAX_SESSIONS_PER_LOGIN`] sessions per login. Touched once per login, logout and
/// WebSocket authentication, never per message.
#[derive(Default)]
pub struct MemorySessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<Digest32, StoredSession>,
    /// Each login's sessions, oldest first (to end the oldest past the cap).
    by_login: HashMap<Arc<str>, VecDeque<Digest32>>,
    next_prune_ms: u64,
}

impl Inner {
    fn prune_if_due(&mut self, now_ms: u64) {
        if now_ms < self.next_prune_ms {
            return;
        }
        self.next_prune_ms = now_ms.saturating_add(PRUNE_EVERY_MS);
        self.sessions.retain(|_, s| now_ms < s.expires_at_ms);
        let sessions = &self.sessions;
        self.by_login.retain(|_, list| {
            list.retain(|d| sessions.contains_key(d));
            !list.is_empty()
        });
    }

    /// Holds session `d` of `login`, ending the login's oldest past
    /// [`MAX_SESSIONS_PER_LOGIN`].
    fn insert(&mut self, d: Digest32, login: &str, expires_at_ms: u64) {
        let login: Arc<str> = self
            .by_login
            .get_key_value(login)
            .map_or_else(|| login.into(), |(k, _)| k.clone());
        let list = self.by_login.entry(login.clone()).or_default();
        list.push_back(d);
        let evicted = (list.len() > MAX_SESSIONS_PER_LOGIN).then(|| list.pop_front());
        if let Some(Some(old)) = evicted {
            self.sessions.remove(&old);
        }
        self.sessions.insert(
            d,
            StoredSession {
                login,
                expires_at_ms,
            },
        );
    }

    fn remove(&mut self, d: &Digest32) -> Option<StoredSession> {
        let s = self.sessions.remove(d)?;
        if let Some(list) = self.by_login.get_mut(&s.login) {
            list.retain(|x| x != d);
            if list.is_empty() {
                self.by_login.remove(&s.login);
            }
        }
        Some(s)
    }
}

impl MemorySessions {
    pub fn new() -> MemorySessions {
        MemorySessions::default()
    }

    /// Holds a session another node created (cluster mode), by its hash's digest: the
    /// hash itself never leaves the node that made it.
    pub fn insert_digest(&self, d: Digest32, login: &str, expires_at_ms: u64, now_ms: u64) {
        let mut inner = self.inner.lock();
        inner.prune_if_due(now_ms);
        if now_ms >= expires_at_ms || inner.sessions.contains_key(&d) {
            return;
        }
        inner.insert(d, login, expires_at_ms);
    }

    /// Ends a session another node ended (cluster mode).
    pub fn remove_digest(&self, d: &Digest32) {
        self.inner.lock().remove(d);
    }

    /// Sessions held, expired ones not yet pruned included.
    pub fn len(&self) -> usize {
        self.inner.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionStore for MemorySessions {
    fn create(&self, login: &str, now_ms: u64, ttl_ms: u64) -> String {
        let mut inner = self.inner.lock();
        inner.prune_if_due(now_ms);
        let (hash, d) = loop {
            let hash = new_session_hash();
            let d = digest(&hash);
            // 128 random bits do not collide; were they to, the old session is not
            // handed to someone else.
            if !inner.sessions.contains_key(&d) {
                break (hash, d);
            }
        };
        inner.insert(d, login, now_ms.saturating_add(ttl_ms));
        hash
    }

    fn get(&self, hash: &str, now_ms: u64) -> Option<StoredSession> {
        let mut inner = self.inner.lock();
        inner.prune_if_due(now_ms);
        inner
            .sessions
            .get(&digest(hash))
            .filter(|s| now_ms < s.expires_at_ms)
            .cloned()
    }

    fn revoke(&self, hash: &str, now_ms: u64) -> bool {
        let mut inner = self.inner.lock();
        inner.prune_if_due(now_ms);
        inner
            .remove(&digest(hash))
            .is_some_and(|s| now_ms < s.expires_at_ms)
    }
}

// ------------------------------------------------------------------ passwords

/// The argon2 hash (PHC string, `$argon2id$v=19$m=19456,t=2,p=1$...`) of `password`,
/// with the crate's default parameters and a random salt (`fleetcast hash-password`).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    hash_with(password, &Argon2::default())
}

fn hash_with(password: &str, argon: &Argon2<'_>) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(argon
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
        .to_string())
}

/// Why a configured `password_hash` is not usable: not a PHC string, not argon2, or
/// parameters argon2 refuses.
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    argon_for(phc).map(|_| ())
}

/// The argon2 instance (algorithm, version, parameters) a PHC string was made with.
fn argon_for(phc: &str) -> Result<Argon2<'static>, String> {
    let parsed = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    let algorithm = argon2::Algorithm::try_from(parsed.algorithm)
        .map_err(|_| format!("{} is not an argon2 algorithm", parsed.algorithm))?;
    let version = parsed
        .version
        .map(argon2::Version::try_from)
        .transpose()
        .map_err(|e| format!("argon2 version: {e}"))?
        .unwrap_or_default();
    let params = Params::try_from(&parsed).map_err(|e| format!("argon2 parameters: {e}"))?;
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("no salt or hash in the PHC string".into());
    }
    Ok(Argon2::new(algorithm, version, params))
}

/// Whether `password` matches the PHC string (constant time in the comparison; the
/// cost is the hash's parameters).
fn verify(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

struct User {
    phc: String,
    principal: Principal,
}

/// The configured login users (`[[itrack.users]]`) and what each may see.
#[derive(Default)]
pub struct Logins {
    users: HashMap<Box<str>, User>,
    /// A hash of a random password made with the first user's parameters: a login that
    /// does not exist is verified against it, so the time of an answer does not tell
    /// which logins exist.
    dummy: Option<String>,
}

impl Logins {
    /// Parses every user's hash (a config that `Config::validate` accepted parses).
    pub fn new(users: &[LoginUser]) -> anyhow::Result<Logins> {
        let mut out = Logins::default();
        for (n, u) in users.iter().enumerate() {
            argon_for(&u.password_hash).map_err(|e| {
                anyhow::anyhow!("itrack.users[{n}] ({}): password_hash: {e}", u.login)
            })?;
            let principal = Principal {
                user_id: u.login.as_str().into(),
                tenant: u.tenant.as_str().into(),
                role: Role::Viewer,
                scope: Arc::new(DeviceScope::listed_trackers(&u.trackers)),
                expires_at: None,
                credential: Default::default(),
            };
            let user = User {
                phc: u.password_hash.clone(),
                principal,
            };
            anyhow::ensure!(
                out.users.insert(u.login.as_str().into(), user).is_none(),
                "itrack.users[{n}]: login {:?} is listed twice",
                u.login
            );
        }
        if let Some(first) = users.first() {
            let argon = argon_for(&first.password_hash).map_err(|e| anyhow::anyhow!(e))?;
            out.dummy = Some(hash_with(&new_session_hash(), &argon)?);
        }
        Ok(out)
    }

    /// The principal of `login` when `password` is its password. Runs one argon2
    /// verification whether or not the login exists (none when no user is configured).
    pub fn verify(&self, login: &str, password: &str) -> Option<&Principal> {
        match self.users.get(login) {
            Some(u) => verify(&u.phc, password).then_some(&u.principal),
            None => {
                if let Some(d) = &self.dummy {
                    verify(d, password);
                }
                None
            }
        }
    }

    /// The principal of a configured login (its session's expiry not set).
    pub fn principal(&self, login: &str) -> Option<&Principal> {
        self.users.get(login).map(|u| &u.principal)
    }

    pub fn knows_tenant(&self, tenant: &str) -> bool {
        self.users.values().any(|u| &*u.principal.tenant == tenant)
    }
}

// ------------------------------------------------------------------ HTTP calls

/// The two session calls on the broker's HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCall {
    /// `user/auth`: login and password to a session hash.
    Auth,
    /// `user/logout`: ends a session hash.
    Logout,
}

impl UserCall {
    /// The call at `path`: `/v2/user/auth`, `/user/auth` and the same for `logout`, with
    /// or without a trailing `/`.
    pub fn at(path: &str) -> Option<UserCall> {
        let path = path.strip_suffix('/').unwrap_or(path);
        let path = path.strip_prefix("/v2").unwrap_or(path);
        match path {
            "/user/auth" => Some(UserCall::Auth),
            "/user/logout" => Some(UserCall::Logout),
            _ => None,
        }
    }
}

/// Why a session call failed; [`UserApiError::code`] is the one table from reason to
/// Navixy code and HTTP status (documented in docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserApiError {
    /// A required parameter is absent or empty (7).
    Missing(&'static str),
    /// A parameter is not a string (7).
    NotAString(&'static str),
    /// The body is neither a JSON object nor a form (5).
    Format,
    /// Chunked body (5, HTTP 411).
    Chunked,
    /// Body over `limits.max_http_body_bytes` (9, HTTP 413).
    TooLarge(usize),
    /// Unknown login or wrong password: the same answer for both (102).
    WrongLogin,
    /// `user/logout` of a hash that is unknown, expired or already ended (4).
    SessionEnded,
    /// Too many failed logins for this login or from this address (15, HTTP 429).
    TooManyFailures {
        per_address: bool,
        retry_after_secs: u64,
    },
}

impl UserApiError {
    /// The Navixy error code and the HTTP status. Navixy answers errors with HTTP 400
    /// unless the error has its own status.
    pub fn code(&self) -> (u16, u16) {
        match self {
            UserApiError::Missing(_) | UserApiError::NotAString(_) => (7, 400),
            UserApiError::Format => (5, 400),
            UserApiError::Chunked => (5, 411),
            UserApiError::TooLarge(_) => (9, 413),
            UserApiError::WrongLogin => (102, 400),
            UserApiError::SessionEnded => (4, 400),
            UserApiError::TooManyFailures { .. } => (15, 429),
        }
    }

    pub fn description(&self) -> Cow<'static, str> {
        match self {
            UserApiError::Missing(p) => format!("Invalid parameters: {p} is required").into(),
            UserApiError::NotAString(p) => {
                format!("Invalid parameters: {p} must be a string").into()
            }
            UserApiError::Format => {
                "Wrong request format: the body must be a JSON object or a form".into()
            }
            UserApiError::Chunked => {
                "Wrong request format: send a Content-Length body, not chunked".into()
            }
            UserApiError::TooLarge(max) => format!("Too large request (over {max} bytes)").into(),
            UserApiError::WrongLogin => "Wrong login or password".into(),
            UserApiError::SessionEnded => "User or API key not found or session ended".into(),
            UserApiError::TooManyFailures {
                per_address,
                retry_after_secs,
            } => format!(
                "Too many requests (rate limit exceeded): too many failed logins {}; retry in \
                 {retry_after_secs} s",
                if *per_address {
                    "from this address"
                } else {
                    "for this login"
                }
            )
            .into(),
        }
    }

    /// `{"success":false,"status":{"code":..,"description":".."}}`.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(b"{\"success\":false,\"status\":{\"code\":");
        crate::json::write_u64(&mut out, self.code().0.into());
        out.extend_from_slice(b",\"description\":");
        crate::json::write_str(&mut out, &self.description());
        out.extend_from_slice(b"}}");
        out
    }
}

/// `{"success":true}`, with the session hash after a login.
pub fn success_body(hash: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"success\":true");
    if let Some(h) = hash {
        out.extend_from_slice(b",\"hash\":");
        crate::json::write_str(&mut out, h);
    }
    out.push(b'}');
    out
}

/// The named parameters of a call: the body's (a JSON object, or
/// `application/x-www-form-urlencoded`), then the query's for those the body lacks.
pub struct CallParams<'a> {
    query: &'a [(String, String)],
    body: Vec<(String, Option<String>)>,
}

impl<'a> CallParams<'a> {
    /// `body`: the request body, if any (empty is none).
    pub fn new(query: &'a [(String, String)], body: &[u8]) -> Result<Self, UserApiError> {
        let trimmed = body.trim_ascii();
        let body = if trimmed.is_empty() {
            Vec::new()
        } else if trimmed.starts_with(b"{") || trimmed.starts_with(b"[") {
            json_params(trimmed)?
        } else if std::str::from_utf8(trimmed).is_ok() {
            form_urlencoded::parse(trimmed)
                .map(|(k, v)| (k.into_owned(), Some(v.into_owned())))
                .collect()
        } else {
            return Err(UserApiError::Format);
        };
        Ok(CallParams { query, body })
    }

    /// A required non-empty string parameter.
    pub fn required(&self, name: &'static str) -> Result<&str, UserApiError> {
        let value = match self.body.iter().find(|(k, _)| k == name) {
            Some((_, None)) => return Err(UserApiError::NotAString(name)),
            Some((_, Some(v))) => v.as_str(),
            None => self
                .query
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str()),
        };
        if value.is_empty() {
            return Err(UserApiError::Missing(name));
        }
        Ok(value)
    }
}

/// The members of a JSON object body; a member that is not a string is `None`.
fn json_params(body: &[u8]) -> Result<Vec<(String, Option<String>)>, UserApiError> {
    let mut copy = body.to_vec();
    let v = simd_json::to_borrowed_value(&mut copy).map_err(|_| UserApiError::Format)?;
    let obj = v.as_object().ok_or(UserApiError::Format)?;
    Ok(obj
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_str().map(str::to_owned)))
        .collect())
}

/// A hash with the cheapest argon2 parameters, for unit tests (the defaults cost tens of
/// ms per hash and per verification).
#[cfg(test)]
pub(crate) fn cheap_hash(password: &str) -> String {
    let params = Params::new(8, 1, 1, None).expect("valid parameters");
    let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    hash_with(password, &argon).expect("hashes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_32_hex_and_distinct() {
        let (a, b) = (new_session_hash(), new_session_hash());
        assert_eq!(a.len(), HASH_LEN);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn store_creates_gets_expires_and_revokes() {
        let s = MemorySessions::new();
        let h = s.create("alice", 1_000, 500);
        let live = s.get(&h, 1_499).expect("live");
        assert_eq!((&*live.login, live.expires_at_ms), ("alice", 1_500));
        assert_eq!(s.get(&h, 1_500), None, "expired at its expiry");
        assert_eq!(s.get("0".repeat(HASH_LEN).as_str(), 1_000), None);
        let h2 = s.create("alice", 2_000, 500);
        assert!(s.revoke(&h2, 2_100));
        assert_eq!(s.get(&h2, 2_100), None);
        assert!(!s.revoke(&h2, 2_100), "a second revoke finds nothing");
        let h3 = s.create("bob", 3_000, 500);
        assert!(!s.revoke(&h3, 3_500), "an expired session is not live");
    }

    #[test]
    fn store_prunes_expired_sessions_periodically() {
        let s = MemorySessions::new();
        s.create("a", 0, 1_000);
        let keep = s.create("b", 0, 10 * PRUNE_EVERY_MS);
        // The first call pruned (nothing) and set the next prune a period later.
        assert_eq!(s.len(), 2);
        s.get(&keep, PRUNE_EVERY_MS - 1);
        assert_eq!(s.len(), 2, "not due yet");
        assert!(s.get(&keep, PRUNE_EVERY_MS).is_some());
        assert_eq!(s.len(), 1, "the expired one is gone");
    }

    #[test]
    fn a_login_holds_at_most_the_cap_and_loses_its_oldest() {
        let s = MemorySessions::new();
        let first = s.create("busy", 0, 1_000_000);
        let second = s.create("busy", 0, 1_000_000);
        let other = s.create("calm", 0, 1_000_000);
        for _ in 2..MAX_SESSIONS_PER_LOGIN {
            s.create("busy", 0, 1_000_000);
        }
        assert!(s.get(&first, 1).is_some());
        s.create("busy", 0, 1_000_000);
        assert_eq!(s.get(&first, 1), None, "the oldest made room");
        assert!(s.get(&second, 1).is_some() && s.get(&other, 1).is_some());
        assert_eq!(s.len(), MAX_SESSIONS_PER_LOGIN + 1);
    }

    fn user(login: &str, password: &str, trackers: &[&str]) -> LoginUser {
        LoginUser {
            login: login.into(),
            password_hash: cheap_hash(password),
            tenant: "fleet_001".into(),
            trackers: trackers.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn logins_verify_passwords_and_build_restricted_viewers() {
        let l = Logins::new(&[
            user("ann", "pw-ann", &["*"]),
            user("bo", "pw-bo", &["15564", "7"]),
        ])
        .unwrap();
        assert!(l.dummy.is_some());
        let p = l.verify("bo", "pw-bo").expect("right password");
        assert_eq!(
            (&*p.user_id, &*p.tenant, p.role),
            ("bo", "fleet_001", Role::Viewer)
        );
        assert!(p.scope.restricted && !p.scope.any_vehicle);
        assert_eq!(&*p.scope.vehicles, &["15564".into(), "7".into()]);
        assert!(l.principal("ann").unwrap().scope.any_vehicle);
        assert!(l.verify("bo", "pw-ann").is_none());
        assert!(l.verify("nobody", "pw-bo").is_none());
        assert!(l.knows_tenant("fleet_001") && !l.knows_tenant("fleet_002"));
        assert!(Logins::new(&[]).unwrap().verify("x", "y").is_none());
    }

    #[test]
    fn hashes_and_bad_hashes() {
        let mut u = user("x", "p", &["*"]);
        assert!(check_password_hash(&u.password_hash).is_ok());
        for bad in [
            "$argon2id$v=19$m=8,t=1,p=1",
            "$argon2id$nonsense",
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "secret",
        ] {
            assert!(check_password_hash(bad).is_err(), "{bad}");
            u.password_hash = bad.into();
            assert!(Logins::new(std::slice::from_ref(&u)).is_err(), "{bad}");
        }
    }

    #[test]
    fn calls_by_path() {
        for (p, c) in [
            ("/v2/user/auth", Some(UserCall::Auth)),
            ("/user/auth/", Some(UserCall::Auth)),
            ("/v2/user/logout/", Some(UserCall::Logout)),
            ("/user/logout", Some(UserCall::Logout)),
            ("/v3/user/auth", None),
            ("/v2/user", None),
            ("/v2v2/user/auth", None),
        ] {
            assert_eq!(UserCall::at(p), c, "{p}");
        }
    }

    #[test]
    fn params_from_json_form_and_query() {
        let q = vec![("login".to_string(), "from-query".to_string())];
        let p = CallParams::new(&q, br#" {"password":"pw","app_key":1} "#).unwrap();
        assert_eq!(p.required("login"), Ok("from-query"));
        assert_eq!(p.required("password"), Ok("pw"));
        let p = CallParams::new(&q, b"login=a%40b&password=x+y").unwrap();
        assert_eq!(
            (p.required("login"), p.required("password")),
            (Ok("a@b"), Ok("x y"))
        );
        let p = CallParams::new(&[], br#"{"login":5,"password":""}"#).unwrap();
        assert_eq!(p.required("login"), Err(UserApiError::NotAString("login")));
        assert_eq!(
            p.required("password"),
            Err(UserApiError::Missing("password"))
        );
        assert_eq!(p.required("hash"), Err(UserApiError::Missing("hash")));
        for bad in [&b"{nope"[..], b"[1]", b"\xff\xfe"] {
            assert_eq!(CallParams::new(&[], bad).err(), Some(UserApiError::Format));
        }
    }

    #[test]
    fn response_bodies() {
        let ok: serde_json::Value = serde_json::from_slice(&success_body(Some("ab12"))).unwrap();
        assert_eq!(ok, serde_json::json!({"success":true,"hash":"ab12"}));
        let err: serde_json::Value =
            serde_json::from_slice(&UserApiError::Missing("login").body()).unwrap();
        assert_eq!(
            err,
            serde_json::json!({"success":false,"status":{"code":7,
                "description":"Invalid parameters: login is required"}})
        );
    }
}
