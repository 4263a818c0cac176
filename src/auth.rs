//! Credentials to principals (SPEC §2): API keys from the config, JWTs, and the session
//! hashes of iTrack login users (`user/auth`, see [`crate::sessions`]).
//!
//! Pure: the caller passes the current UNIX time; no clock is read here.

use crate::config::{AuthConfig, ItrackConfig};
use crate::jwks::{Jwks, KeySet};
use crate::model::Role;
use crate::revocation::Revocations;
use crate::sessions::{Logins, MemorySessions, SessionStore};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Arc<str>,
    pub tenant: Arc<str>,
    pub role: Role,
    /// What a device may name in what it publishes (other roles: unused).
    pub scope: Arc<DeviceScope>,
    /// UNIX seconds after which the credential is no longer valid.
    pub expires_at: Option<u64>,
    /// Which credential this is, to find the connections of a revoked one.
    pub credential: CredentialId,
}

/// The identity of the credential a principal was authenticated with: what a revocation
/// names (`crate::revocation`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CredentialId {
    /// A credential no revocation list names (iTrack session hashes, internal users).
    #[default]
    Other,
    /// An API key, by the SHA-256 it is looked up by.
    ApiKey([u8; 32]),
    /// A JWT, by its `jti` claim when it has one.
    Token { jti: Option<Arc<str>> },
}

/// The entities a device credential covers. It fails closed: a device whose credential
/// names no vehicle may publish for none; `*` in its vehicle list means any vehicle of
/// its tenant (likewise for drivers and trips). Drivers and trips listed here are allowed besides those the broker binds
/// to the device's vehicles (the vehicle's current trip, from a service's `trip_event`).
///
/// For a `restricted` viewer (an iTrack login user) the vehicles are what it may follow:
/// it subscribes only to those (all of its tenant's when `any_vehicle`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceScope {
    pub any_vehicle: bool,
    pub any_driver: bool,
    pub any_trip: bool,
    pub vehicles: Box<[Box<str>]>,
    pub drivers: Box<[Box<str>]>,
    pub trips: Box<[Box<str>]>,
    /// A viewer that may follow only the vehicles listed here (unless `any_vehicle`);
    /// other viewers follow their whole tenant.
    pub restricted: bool,
}

impl DeviceScope {
    /// Every vehicle of the tenant (services, tests, benches).
    pub fn any() -> Arc<DeviceScope> {
        Arc::new(DeviceScope {
            any_vehicle: true,
            any_driver: true,
            any_trip: true,
            ..Default::default()
        })
    }

    /// The scope of a login user following `trackers` (`*`: every vehicle of its tenant).
    pub fn listed_trackers(trackers: &[String]) -> DeviceScope {
        DeviceScope {
            restricted: true,
            ..DeviceScope::from_lists(trackers.to_vec(), Vec::new(), Vec::new())
        }
    }

    fn from_lists(vehicles: Vec<String>, drivers: Vec<String>, trips: Vec<String>) -> Self {
        let any = |l: &[String]| l.iter().any(|v| v == "*");
        let boxed = |l: Vec<String>| {
            l.into_iter()
                .filter(|v| v != "*")
                .map(String::into_boxed_str)
                .collect()
        };
        DeviceScope {
            any_vehicle: any(&vehicles),
            any_driver: any(&drivers),
            any_trip: any(&trips),
            vehicles: boxed(vehicles),
            drivers: boxed(drivers),
            trips: boxed(trips),
            restricted: false,
        }
    }
}

impl Principal {
    pub fn may_act_for_vehicle(&self, vehicle: &str) -> bool {
        self.scope.any_vehicle || self.scope.vehicles.iter().any(|v| &**v == vehicle)
    }

    pub fn lists_driver(&self, driver: &str) -> bool {
        self.scope.any_driver || self.scope.drivers.iter().any(|d| &**d == driver)
    }

    pub fn lists_trip(&self, trip: &str) -> bool {
        self.scope.any_trip || self.scope.trips.iter().any(|t| &**t == trip)
    }

    /// Why this principal may not follow (subscribe to, or request the state of) these
    /// entities: a restricted viewer follows only its listed vehicles, so it must name
    /// them, and only them (`all`: no entity named). `None`: it may. The reason names the
    /// first vehicle refused and never says whether that vehicle exists.
    pub fn refusal_to_follow(
        &self,
        all: bool,
        vehicles: &[Box<str>],
        trips_or_drivers: bool,
    ) -> Option<String> {
        let s = &self.scope;
        if self.role == Role::Device || !s.restricted || s.any_vehicle {
            return None;
        }
        if let Some(v) = vehicles.iter().find(|v| !s.vehicles.contains(v)) {
            return Some(format!(
                "access denied to tracker {v}: this user follows only its listed trackers"
            ));
        }
        if all || trips_or_drivers {
            return Some(
                "access denied: this user follows only its listed trackers; name them".into(),
            );
        }
        None
    }

    /// Same identity (used to answer a repeated `auth` idempotently).
    pub fn same_identity(&self, other: &Principal) -> bool {
        self.user_id == other.user_id && self.tenant == other.tenant && self.role == other.role
    }
}

/// A credential as presented by a client.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    ApiKey(&'a str),
    Token(&'a str),
    /// `Authorization: Bearer x`: a JWT if it looks like one, else an API key.
    Bearer(&'a str),
    /// A session hash from `user/auth` (iTrack).
    SessionHash(&'a str),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown API key")]
    UnknownApiKey,
    /// A session hash that is unknown, expired or ended (iTrack "Wrong user hash").
    #[error("wrong user hash")]
    WrongHash,
    /// `user/auth` with an unknown login or a wrong password (one answer for both).
    #[error("wrong login or password")]
    WrongLogin,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token has no tenant claim (tenant, fleet_id, company_id or instance_id)")]
    NoTenant,
    #[error("token has no valid role claim")]
    NoRole,
    #[error("token has no exp claim, and this broker requires one")]
    NoExpiry,
    #[error("no JWT verification key configured for {0:?}")]
    NoKeyForAlgorithm(Algorithm),
    /// A `kid` the JWK Set lacks: a refresh is asked for (rate limited), and a token
    /// with that `kid` is accepted once the issuer's set has it.
    #[error("unknown key id (kid) {0:?}: not in the issuer's key set (a refresh was requested)")]
    UnknownKid(String),
    #[error("credential revoked")]
    Revoked,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(alias = "fleet_id", alias = "company_id", alias = "instance_id")]
    tenant: Option<String>,
    role: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    jti: Option<String>,
    vehicle_id: Option<String>,
    vehicles: Option<Vec<String>>,
    driver_id: Option<String>,
    drivers: Option<Vec<String>>,
    trip_id: Option<String>,
    trips: Option<Vec<String>>,
}

/// Verifies credentials against the configured keys.
pub struct Authenticator {
    /// API keys by digest; replaced whole when the config is reloaded (SIGHUP).
    /// Each key's principal is shared by every connection authenticated with it.
    api_keys: RwLock<Arc<HashMap<[u8; 32], Arc<Principal>>>>,
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    es256: Option<DecodingKey>,
    /// The issuer's JWK Set (`auth.jwks_file` or `jwks_url`), refreshed by its thread.
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Vec<String>,
    leeway_s: u64,
    require_exp: bool,
    revoked: RwLock<Arc<Revocations>>,
    /// Bumped at every reload of keys and revocations: shards then walk their
    /// connections (`Authenticator::is_revoked`).
    generation: AtomicU64,
    /// Connections closed because their credential was revoked (`/metrics`).
    pub revoked_closed: AtomicU64,
    /// iTrack login users, their session hashes, and how long a hash lives.
    logins: Logins,
    sessions: Arc<dyn SessionStore>,
    session_ttl_ms: u64,
}

impl Authenticator {
    /// Whether `tenant` is a fleet this node knows: one an API key or a login user is
    /// configured for. (A token may name any fleet; one that names `tenant` is checked
    /// before this.)
    pub fn knows_tenant(&self, tenant: &str) -> bool {
        self.api_keys.read().values().any(|p| &*p.tenant == tenant)
            || self.logins.knows_tenant(tenant)
    }
}

fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The SHA-256 of an API key in lowercase hex: the `key_sha256` of a config that does not
/// hold the key itself (`fleetcast hash-key`).
pub fn sha256_hex(key: &str) -> String {
    key_digest(key).iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets in time independent of where they differ (their digests, so
/// the length is not revealed either).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db): ([u8; 32], [u8; 32]) = (Sha256::digest(a).into(), Sha256::digest(b).into());
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Public keys for asymmetric JWTs, already read and parsed: `Config::validate` loads
/// them from the files the config names, so nothing here touches the file system.
#[derive(Debug, Clone, Default)]
pub struct JwtKeys {
    pub rs256: Option<DecodingKey>,
    pub es256: Option<DecodingKey>,
    /// The set of `auth.jwks_file` (a URL's set is fetched when the node starts).
    pub jwks: Option<KeySet>,
}

/// The configured API keys by digest (of `key`, or `key_sha256` decoded). Refuses an
/// API key listed twice, and one with neither `key` nor a valid `key_sha256`.
fn key_map(cfg: &AuthConfig) -> anyhow::Result<HashMap<[u8; 32], Arc<Principal>>> {
    // Keys are looked up by their SHA-256 digest: the comparison time depends only on the
    // digest of the guess, never on how many leading bytes of a key a guess got right,
    // and a config may hold the digest alone (`key_sha256`).
    let mut api_keys = HashMap::with_capacity(cfg.api_keys.len());
    for k in &cfg.api_keys {
        let digest = k.digest().ok_or_else(|| {
            anyhow::anyhow!("api key of user {:?} has no key nor key_sha256", k.user_id)
        })?;
        let scope = DeviceScope::from_lists(k.vehicles.clone(), k.drivers.clone(), k.trips.clone());
        let p = Principal {
            user_id: k.user_id.as_str().into(),
            tenant: k.tenant.as_str().into(),
            role: k.role,
            scope: Arc::new(scope),
            expires_at: None,
            credential: CredentialId::ApiKey(digest),
        };
        if let Some(other) = api_keys.insert(digest, Arc::new(p)) {
            anyhow::bail!(
                "api key listed twice (users {:?} and {:?})",
                other.user_id,
                k.user_id
            );
        }
    }
    Ok(api_keys)
}

impl Authenticator {
    /// An authenticator for API keys and HS256 only. A config naming RS256 or ES256 key
    /// files is refused: their keys are read by `Config::validate`, which gives them to
    /// `with_keys`.
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Authenticator> {
        for (key, set) in [
            (
                "auth.jwt_rs256_public_key_file",
                &cfg.jwt_rs256_public_key_file,
            ),
            (
                "auth.jwt_es256_public_key_file",
                &cfg.jwt_es256_public_key_file,
            ),
            ("auth.jwks_file", &cfg.jwks_file),
        ] {
            anyhow::ensure!(
                set.is_none(),
                "{key} is set: load it with Config::validate and pass the keys to \
                 Authenticator::with_keys"
            );
        }
        Authenticator::with_keys(cfg, JwtKeys::default())
    }

    /// An authenticator for the config's API keys and HS256 secret and the given public
    /// keys (the paths in `cfg` are not read). Refuses an API key listed twice.
    pub fn with_keys(cfg: &AuthConfig, keys: JwtKeys) -> anyhow::Result<Authenticator> {
        let jwks = (cfg.jwks_file.is_some() || cfg.jwks_url.is_some())
            .then(|| Arc::new(Jwks::new(keys.jwks.unwrap_or_default())));
        Ok(Authenticator {
            api_keys: RwLock::new(Arc::new(key_map(cfg)?)),
            hs256: cfg
                .jwt_hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            rs256: keys.rs256,
            es256: keys.es256,
            jwks,
            issuer: cfg.jwt_issuer.clone(),
            audience: cfg.jwt_audience.clone(),
            leeway_s: cfg.jwt_leeway_s,
            require_exp: cfg.require_exp,
            revoked: RwLock::new(Arc::new(Revocations::new(cfg))),
            generation: AtomicU64::new(0),
            revoked_closed: AtomicU64::new(0),
            logins: Logins::default(),
            sessions: Arc::new(MemorySessions::new()),
            session_ttl_ms: ItrackConfig::default().session_ttl_ms,
        })
    }

    /// The JWK Set, when one is configured (the node starts its refresher).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Replaces the API keys and the revocation lists with those of `cfg` (SIGHUP, after
    /// the whole config validated), and bumps the generation shards watch. Everything
    /// else in `cfg` is ignored.
    pub fn reload_credentials(&self, cfg: &AuthConfig) -> anyhow::Result<()> {
        let keys = key_map(cfg)?;
        *self.api_keys.write() = Arc::new(keys);
        *self.revoked.write() = Arc::new(Revocations::new(cfg));
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes at every reload of the credentials.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a connection authenticated as `p` must be closed: its credential is
    /// revoked, or it is an API key the config no longer lists.
    pub fn is_revoked(&self, p: &Principal) -> bool {
        if let CredentialId::ApiKey(d) = &p.credential
            && !self.api_keys.read().contains_key(d)
        {
            return true;
        }
        self.revoked.read().revokes(p)
    }

    /// Appends the credential counters (revocations, JWKS) to a `/metrics` body.
    pub fn render_metrics(&self, out: &mut String) {
        out.push_str(
            "# HELP fleetcast_revoked_connections_closed_total Connections closed (4001) \
             because their credential was revoked or removed.\n\
             # TYPE fleetcast_revoked_connections_closed_total counter\n",
        );
        out.push_str(&format!(
            "fleetcast_revoked_connections_closed_total {}\n",
            self.revoked_closed.load(Ordering::Relaxed)
        ));
        if let Some(j) = &self.jwks {
            j.render_metrics(out);
        }
    }

    /// The same authenticator with the `[itrack]` login users, keeping their session
    /// hashes in `store`. Parses every user's password hash, and makes the dummy hash
    /// unknown logins are verified against (one argon2 hash when users are configured).
    pub fn with_logins(
        mut self,
        cfg: &ItrackConfig,
        store: Arc<dyn SessionStore>,
    ) -> anyhow::Result<Authenticator> {
        self.logins = Logins::new(&cfg.users)?;
        self.sessions = store;
        self.session_ttl_ms = cfg.session_ttl_ms;
        Ok(self)
    }

    /// `user/auth`: a new session hash when `password` is `login`'s. Runs one argon2
    /// verification (tens of ms with the default parameters) whether or not the login
    /// exists, so neither the answer nor its time tells which logins exist. Rate limits
    /// are the caller's (`NodeAdmission::check_login`).
    pub fn login(&self, login: &str, password: &str, now_ms: u64) -> Result<String, AuthError> {
        match self.logins.verify(login, password) {
            Some(_) => Ok(self.sessions.create(login, now_ms, self.session_ttl_ms)),
            None => Err(AuthError::WrongLogin),
        }
    }

    /// `user/logout`: ends a session hash; `false` when it was not live.
    pub fn logout(&self, hash: &str, now_ms: u64) -> bool {
        self.sessions.revoke(hash, now_ms)
    }

    pub fn authenticate(
        &self,
        cred: Credential<'_>,
        now_unix: u64,
    ) -> Result<Arc<Principal>, AuthError> {
        // An API key's principal is shared (one per key, not one per connection).
        match cred {
            Credential::ApiKey(k) => self.api_key(k),
            Credential::Token(t) => self.jwt(t, now_unix).map(Arc::new),
            Credential::Bearer(b) if b.matches('.').count() == 2 => {
                self.jwt(b, now_unix).map(Arc::new)
            }
            Credential::Bearer(b) => self.api_key(b),
            Credential::SessionHash(h) => self.session(h, now_unix).map(Arc::new),
        }
    }

    /// The principal of a live session hash: its user, a viewer of the user's tenant that
    /// follows only the user's trackers, expiring with the session.
    ///
    /// Checked with the start of the current second (`now_unix` is whole seconds), so a
    /// hash is accepted until the second in which it expires ends, and `expires_at` is
    /// that second rounded up: a connection is closed at the same instant a new
    /// authentication starts being refused.
    fn session(&self, hash: &str, now_unix: u64) -> Result<Principal, AuthError> {
        let s = self
            .sessions
            .get(hash, now_unix.saturating_mul(1000))
            .ok_or(AuthError::WrongHash)?;
        // A login no longer configured has no session, whatever the store says.
        let mut p = self
            .logins
            .principal(&s.login)
            .cloned()
            .ok_or(AuthError::WrongHash)?;
        p.expires_at = Some(s.expires_at_ms.div_ceil(1000));
        Ok(p)
    }

    fn api_key(&self, key: &str) -> Result<Arc<Principal>, AuthError> {
        let keys = self.api_keys.read().clone();
        let p = keys
            .get(&key_digest(key))
            .cloned()
            .ok_or(AuthError::UnknownApiKey)?;
        if self.revoked.read().revokes(&p) {
            return Err(AuthError::Revoked);
        }
        Ok(p)
    }

    fn jwt(&self, token: &str, now: u64) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        // An asymmetric token naming a `kid` is verified with that key of the JWK Set,
        // when one is configured; others (HS256 ones too: a JWK Set holds no shared
        // secret here) with the key configured for their algorithm.
        if let (Some(kid), Some(jwks)) = (&header.kid, &self.jwks)
            && header.alg != Algorithm::HS256
        {
            let set = jwks.snapshot();
            let Some((alg, key)) = set.get(kid) else {
                // Never fetched here (a shard must not block): the refresher is asked.
                jwks.ask_refresh();
                return Err(AuthError::UnknownKid(kid.clone()));
            };
            if header.alg != *alg {
                return Err(AuthError::InvalidToken(format!(
                    "token algorithm {:?} is not {alg:?}, the algorithm of key {kid:?}",
                    header.alg
                )));
            }
            return self.verify(token, *alg, key, now);
        }
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            Algorithm::ES256 => self.es256.as_ref(),
            other => {
                return Err(AuthError::InvalidToken(format!(
                    "algorithm {other:?} not accepted"
                )));
            }
        }
        .ok_or(AuthError::NoKeyForAlgorithm(header.alg))?;
        self.verify(token, header.alg, key, now)
    }

    /// Checks the signature with `key`, then `iss`, `aud`, and `exp`/`nbf` against
    /// `now` with the configured leeway.
    fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        key: &DecodingKey,
        now: u64,
    ) -> Result<Principal, AuthError> {
        let mut v = Validation::new(alg);
        // Time claims are checked below against the caller's clock.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.required_spec_claims.clear();
        if let Some(iss) = &self.issuer {
            // Configured: a token must carry it (jsonwebtoken checks only one present).
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        if self.audience.is_empty() {
            // Not configured: a token's `aud` is not checked (jsonwebtoken would refuse
            // every token that has one).
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            v.required_spec_claims.insert("aud".into());
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &v)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let c = data.claims;
        if self.require_exp && c.exp.is_none() {
            return Err(AuthError::NoExpiry);
        }
        // The leeway allows for the issuer's clock being off from ours: a token is valid
        // from `nbf - leeway` until `exp + leeway` (when its connection is closed).
        let expires_at = c.exp.map(|exp| exp.saturating_add(self.leeway_s));
        if let Some(exp) = expires_at
            && now >= exp
        {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = c.nbf
            && now.saturating_add(self.leeway_s) < nbf
        {
            return Err(AuthError::NotYetValid);
        }
        if let Some(jti) = &c.jti
            && self.revoked.read().revokes_token_id(jti)
        {
            return Err(AuthError::Revoked);
        }
        let tenant = c
            .tenant
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::NoTenant)?;
        let role = c
            .role
            .as_deref()
            .and_then(Role::parse)
            .ok_or(AuthError::NoRole)?;
        let list = |many: Option<Vec<String>>, one: Option<String>| {
            let mut l = many.unwrap_or_default();
            l.extend(one);
            l
        };
        let scope = DeviceScope::from_lists(
            list(c.vehicles, c.vehicle_id),
            list(c.drivers, c.driver_id),
            list(c.trips, c.trip_id),
        );
        Ok(Principal {
            user_id: c.sub.unwrap_or_else(|| format!("token:{tenant}")).into(),
            tenant: tenant.into(),
            role,
            scope: Arc::new(scope),
            expires_at,
            credential: CredentialId::Token {
                jti: c.jti.map(Into::into),
            },
        })
    }
}

/// Mints an HS256 development token (`fleetcast token`, tests).
pub fn mint_hs256(
    secret: &str,
    sub: &str,
    tenant: &str,
    role: Role,
    exp: u64,
    vehicle: Option<&str>,
) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        sub: &'a str,
        tenant: &'a str,
        role: &'a str,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        vehicle_id: Option<&'a str>,
    }
    let claims = Out {
        sub,
        tenant,
        role: role.name(),
        exp,
        vehicle_id: vehicle,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            jwt_hs256_secret: Some("s3cret-s3cret-s3cret".into()),
            // Expiry to the second here; the leeway has its own test.
            jwt_leeway_s: 0,
            api_keys: vec![ApiKeyConfig {
                key: "dev-viewer-0123456789".into(),
                key_sha256: None,
                user_id: "v1".into(),
                tenant: "fleet_001".into(),
                role: Role::Viewer,
                vehicles: vec![],
                drivers: vec![],
                trips: vec![],
            }],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn api_keys() {
        let a = auth();
        let p = a
            .authenticate(Credential::ApiKey("dev-viewer-0123456789"), 0)
            .unwrap();
        assert_eq!(&*p.tenant, "fleet_001");
        assert_eq!(p.role, Role::Viewer);
        assert_eq!(
            a.authenticate(Credential::ApiKey("dev-viewer-012345678"), 0),
            Err(AuthError::UnknownApiKey)
        );
        assert!(
            a.authenticate(Credential::Bearer("dev-viewer-0123456789"), 0)
                .is_ok()
        );
    }

    #[test]
    fn jwt_claims_expiry_and_signature() {
        let a = auth();
        let t = mint_hs256(
            "s3cret-s3cret-s3cret",
            "d1",
            "fleet_9",
            Role::Device,
            1000,
            Some("veh_1"),
        )
        .unwrap();
        let p = a.authenticate(Credential::Token(&t), 999).unwrap();
        assert_eq!(
            (&*p.user_id, &*p.tenant, p.role),
            ("d1", "fleet_9", Role::Device)
        );
        assert!(p.may_act_for_vehicle("veh_1") && !p.may_act_for_vehicle("veh_2"));
        assert_eq!(p.expires_at, Some(1000));
        assert_eq!(
            a.authenticate(Credential::Token(&t), 1000),
            Err(AuthError::Expired)
        );
        let forged = mint_hs256(
            "other-secret-other",
            "d1",
            "fleet_9",
            Role::Admin,
            1000,
            None,
        )
        .unwrap();
        assert!(matches!(
            a.authenticate(Credential::Bearer(&forged), 0),
            Err(AuthError::InvalidToken(_))
        ));
        assert!(matches!(
            a.authenticate(Credential::Token("not.a.jwt"), 0),
            Err(AuthError::InvalidToken(_))
        ));
    }
}

#[cfg(test)]
mod construction_tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    fn key(key: &str, user: &str) -> ApiKeyConfig {
        ApiKeyConfig {
            key: key.into(),
            key_sha256: None,
            user_id: user.into(),
            tenant: "fleet_001".into(),
            role: Role::Viewer,
            vehicles: vec![],
            drivers: vec![],
            trips: vec![],
        }
    }

    #[test]
    fn new_refuses_key_file_paths_instead_of_reading_them() {
        for cfg in [
            AuthConfig {
                jwt_rs256_public_key_file: Some("/nonexistent/rs.pem".into()),
                ..Default::default()
            },
            AuthConfig {
                jwt_es256_public_key_file: Some("/nonexistent/es.pem".into()),
                ..Default::default()
            },
        ] {
            let err = Authenticator::new(&cfg).err().expect("refused").to_string();
            assert!(err.contains("public_key_file is set"), "{err}");
            // The paths are not read: with loaded keys (none here) it is accepted.
            assert!(Authenticator::with_keys(&cfg, JwtKeys::default()).is_ok());
        }
    }

    #[test]
    fn an_api_key_listed_twice_is_refused() {
        let cfg = AuthConfig {
            api_keys: vec![
                key("shared-key-0123456789", "tenant-a-viewer"),
                key("other-key-0123456789", "x"),
                key("shared-key-0123456789", "tenant-b-service"),
            ],
            ..Default::default()
        };
        let err = Authenticator::new(&cfg).err().expect("refused").to_string();
        assert!(
            err.contains("listed twice") && err.contains("tenant-b-service"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod asymmetric_tests {
    use super::*;

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn sign(alg: Algorithm, key: jsonwebtoken::EncodingKey, tenant: &str) -> String {
        let claims = serde_json::json!({"sub":"svc","fleet_id":tenant,"role":"service","exp":2000});
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap()
    }

    #[test]
    fn rs256_and_es256_tokens_verify_with_configured_public_keys() {
        let pem = |name: &str| std::fs::read(fixture(name)).unwrap();
        let keys = JwtKeys {
            rs256: Some(DecodingKey::from_rsa_pem(&pem("rs256-public.pem")).unwrap()),
            es256: Some(DecodingKey::from_ec_pem(&pem("es256-public.pem")).unwrap()),
            jwks: None,
        };
        let a = Authenticator::with_keys(&AuthConfig::default(), keys).unwrap();
        let rsa = std::fs::read(fixture("rs256-private.pem")).unwrap();
        let ec = std::fs::read(fixture("es256-private.pem")).unwrap();
        let t = sign(
            Algorithm::RS256,
            jsonwebtoken::EncodingKey::from_rsa_pem(&rsa).unwrap(),
            "fleet_r",
        );
        let p = a.authenticate(Credential::Bearer(&t), 1000).unwrap();
        assert_eq!((&*p.tenant, p.role), ("fleet_r", Role::Service));
        let t = sign(
            Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_pem(&ec).unwrap(),
            "fleet_e",
        );
        assert_eq!(
            &*a.authenticate(Credential::Token(&t), 1000).unwrap().tenant,
            "fleet_e"
        );
        // An HS256 token is refused when no HS256 secret is configured.
        let hs = mint_hs256(
            "whatever-secret-123",
            "x",
            "fleet_r",
            Role::Admin,
            2000,
            None,
        )
        .unwrap();
        assert_eq!(
            a.authenticate(Credential::Token(&hs), 1000),
            Err(AuthError::NoKeyForAlgorithm(Algorithm::HS256))
        );
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;
    use crate::config::LoginUser;
    use crate::sessions::cheap_hash;

    fn user(login: &str, trackers: &[&str]) -> LoginUser {
        LoginUser {
            login: login.into(),
            password_hash: cheap_hash(&format!("pw-{login}")),
            tenant: "fleet_9".into(),
            trackers: trackers.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn authenticator() -> Authenticator {
        let cfg = ItrackConfig {
            users: vec![user("ops", &["15564", "77"]), user("boss", &["*"])],
            session_ttl_ms: 1_500,
            ..Default::default()
        };
        Authenticator::new(&AuthConfig::default())
            .unwrap()
            .with_logins(&cfg, Arc::new(MemorySessions::new()))
            .unwrap()
    }

    #[test]
    fn a_session_hash_authenticates_as_its_user_until_it_expires() {
        let a = authenticator();
        let h = a.login("ops", "pw-ops", 10_000).unwrap();
        let p = a.authenticate(Credential::SessionHash(&h), 10).unwrap();
        assert_eq!(
            (&*p.user_id, &*p.tenant, p.role),
            ("ops", "fleet_9", Role::Viewer)
        );
        assert!(p.scope.restricted && !p.scope.any_vehicle);
        assert_eq!(&*p.scope.vehicles, &["15564".into(), "77".into()]);
        // Valid until 11.5 s: accepted in second 11, refused from second 12, and the
        // connection's expiry is second 12.
        assert_eq!(p.expires_at, Some(12));
        assert!(a.authenticate(Credential::SessionHash(&h), 11).is_ok());
        assert_eq!(
            a.authenticate(Credential::SessionHash(&h), 12),
            Err(AuthError::WrongHash)
        );
        assert!(a.knows_tenant("fleet_9"));
    }

    #[test]
    fn wrong_passwords_unknown_logins_unknown_and_ended_hashes() {
        let a = authenticator();
        assert_eq!(a.login("ops", "pw-boss", 0), Err(AuthError::WrongLogin));
        assert_eq!(a.login("ghost", "pw-ops", 0), Err(AuthError::WrongLogin));
        assert_eq!(
            a.authenticate(Credential::SessionHash(&"0".repeat(32)), 0),
            Err(AuthError::WrongHash)
        );
        let h = a.login("boss", "pw-boss", 0).unwrap();
        let boss = a.authenticate(Credential::SessionHash(&h), 0).unwrap();
        assert!(boss.scope.restricted && boss.scope.any_vehicle);
        assert!(a.logout(&h, 1));
        assert_eq!(
            a.authenticate(Credential::SessionHash(&h), 0),
            Err(AuthError::WrongHash)
        );
        assert!(!a.logout(&h, 1), "a second logout finds nothing");
        // Another credential type never reads the session store.
        assert_eq!(
            a.authenticate(Credential::ApiKey(&h), 0),
            Err(AuthError::UnknownApiKey)
        );
    }

    #[test]
    fn a_restricted_viewer_follows_only_its_trackers() {
        let a = authenticator();
        let h = a.login("ops", "pw-ops", 0).unwrap();
        let p = a.authenticate(Credential::SessionHash(&h), 0).unwrap();
        let v = |ids: &[&str]| ids.iter().map(|&i| i.into()).collect::<Vec<Box<str>>>();
        assert_eq!(
            p.refusal_to_follow(false, &v(&["15564", "77"]), false),
            None
        );
        let why = p
            .refusal_to_follow(false, &v(&["77", "99"]), false)
            .unwrap();
        assert!(why.contains("tracker 99") && !why.contains("77"), "{why}");
        assert!(
            p.refusal_to_follow(true, &[], false).is_some(),
            "all vehicles"
        );
        assert!(p.refusal_to_follow(false, &[], true).is_some(), "by trip");
        let boss = a.login("boss", "pw-boss", 0).unwrap();
        let boss = a.authenticate(Credential::SessionHash(&boss), 0).unwrap();
        assert_eq!(boss.refusal_to_follow(true, &[], true), None);
        // API-key viewers follow their whole tenant.
        let key_viewer = Principal {
            user_id: "v".into(),
            tenant: "fleet_9".into(),
            role: Role::Viewer,
            scope: Arc::new(DeviceScope::default()),
            expires_at: None,
            credential: Default::default(),
        };
        assert_eq!(key_viewer.refusal_to_follow(true, &v(&["99"]), true), None);
    }
}

#[cfg(test)]
mod claims_tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    const SECRET: &str = "claims-secret-claims-secret-0123";

    fn token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn auth(cfg: AuthConfig) -> Authenticator {
        Authenticator::new(&AuthConfig {
            jwt_hs256_secret: Some(SECRET.into()),
            ..cfg
        })
        .unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({"sub":"s","tenant":"fleet_a","role":"viewer","exp":1000})
    }

    fn with(mut v: serde_json::Value, k: &str, x: serde_json::Value) -> serde_json::Value {
        v[k] = x;
        v
    }

    #[test]
    fn the_leeway_extends_exp_and_nbf_and_the_connection_expiry() {
        let a = auth(AuthConfig::default());
        assert_eq!(AuthConfig::default().jwt_leeway_s, 30);
        let t = token(base());
        let p = a.authenticate(Credential::Token(&t), 1029).unwrap();
        assert_eq!(p.expires_at, Some(1030));
        assert_eq!(
            a.authenticate(Credential::Token(&t), 1030),
            Err(AuthError::Expired)
        );
        let early = token(with(base(), "nbf", 500.into()));
        assert!(a.authenticate(Credential::Token(&early), 470).is_ok());
        assert_eq!(
            a.authenticate(Credential::Token(&early), 469),
            Err(AuthError::NotYetValid)
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let open = auth(AuthConfig::default());
        let with_aud = token(with(base(), "aud", "someone".into()));
        // Not configured: a token's aud is not checked.
        assert!(open.authenticate(Credential::Token(&with_aud), 0).is_ok());
        let strict = auth(AuthConfig {
            jwt_issuer: Some("https://issuer.example".into()),
            jwt_audience: vec!["fleetcast".into(), "other".into()],
            ..Default::default()
        });
        let good = with(
            with(base(), "iss", "https://issuer.example".into()),
            "aud",
            serde_json::json!(["x", "fleetcast"]),
        );
        assert!(
            strict
                .authenticate(Credential::Token(&token(good.clone())), 0)
                .is_ok()
        );
        for bad in [
            with(good.clone(), "iss", "https://evil.example".into()),
            with(good.clone(), "aud", "someone".into()),
            {
                let mut g = good.clone();
                g.as_object_mut().unwrap().remove("aud");
                g
            },
            {
                let mut g = good.clone();
                g.as_object_mut().unwrap().remove("iss");
                g
            },
        ] {
            assert!(
                matches!(
                    strict.authenticate(Credential::Token(&token(bad.clone())), 0),
                    Err(AuthError::InvalidToken(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn revoked_token_ids_and_keys_are_refused_and_reload_swaps_the_lists() {
        let key = |key: &str, hash: bool, user: &str| ApiKeyConfig {
            key: if hash { String::new() } else { key.into() },
            key_sha256: hash.then(|| {
                Sha256::digest(key.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }),
            user_id: user.into(),
            tenant: "fleet_a".into(),
            role: Role::Viewer,
            vehicles: vec![],
            drivers: vec![],
            trips: vec![],
        };
        let mut cfg = AuthConfig {
            api_keys: vec![
                key("clear-key-0123456789", false, "clear"),
                key("hashed-key-0123456789", true, "hashed"),
            ],
            ..Default::default()
        };
        let a = auth(cfg.clone());
        let hashed = a
            .authenticate(Credential::ApiKey("hashed-key-0123456789"), 0)
            .unwrap();
        assert_eq!(&*hashed.user_id, "hashed");
        assert_eq!(
            a.authenticate(Credential::ApiKey("hashed-key-012345678"), 0),
            Err(AuthError::UnknownApiKey)
        );
        let t = token(with(base(), "jti", "j-1".into()));
        let by_token = a.authenticate(Credential::Token(&t), 0).unwrap();
        assert!(!a.is_revoked(&by_token) && !a.is_revoked(&hashed));
        let g = a.generation();
        cfg.revoked_token_ids = vec!["j-1".into()];
        cfg.revoked_keys = vec!["hashed".into()];
        a.reload_credentials(&AuthConfig {
            jwt_hs256_secret: Some(SECRET.into()),
            ..cfg.clone()
        })
        .unwrap();
        assert_ne!(a.generation(), g);
        assert!(a.is_revoked(&by_token) && a.is_revoked(&hashed));
        assert_eq!(
            a.authenticate(Credential::Token(&t), 0),
            Err(AuthError::Revoked)
        );
        assert_eq!(
            a.authenticate(Credential::ApiKey("hashed-key-0123456789"), 0),
            Err(AuthError::Revoked)
        );
        let clear = a
            .authenticate(Credential::ApiKey("clear-key-0123456789"), 0)
            .unwrap();
        assert!(!a.is_revoked(&clear));
        // A key no longer listed is as good as revoked for its open connections.
        cfg.api_keys.remove(0);
        a.reload_credentials(&cfg).unwrap();
        assert!(a.is_revoked(&clear));
    }

    #[test]
    fn hs256_tokens_with_a_kid_use_the_secret_when_a_jwks_is_configured() {
        let a = Authenticator::with_keys(
            &AuthConfig {
                jwt_hs256_secret: Some(SECRET.into()),
                jwks_url: Some("http://127.0.0.1:9/jwks.json".into()),
                ..Default::default()
            },
            JwtKeys::default(),
        )
        .unwrap();
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("hmac-1".into());
        let t = jsonwebtoken::encode(
            &h,
            &base(),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(a.authenticate(Credential::Token(&t), 0).is_ok());
        // An ES256 token's kid goes to the (here empty) JWK Set, which asks for a refresh.
        let jwks = a.jwks().unwrap();
        let ec = std::fs::read(format!(
            "{}/tests/fixtures/es256-private.pem",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some("ec-1".into());
        let t = jsonwebtoken::encode(
            &h,
            &base(),
            &jsonwebtoken::EncodingKey::from_ec_pem(&ec).unwrap(),
        )
        .unwrap();
        assert_eq!(
            a.authenticate(Credential::Token(&t), 0),
            Err(AuthError::UnknownKid("ec-1".into()))
        );
        assert_eq!(
            jwks.unknown_kid.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
