//! Node-wide admission control: connection caps per node and per user, new-connection
//! rates per user and per client address (SPEC §8), and failed logins (`user/auth`) per
//! login and per client address.
//!
//! Touched once per connection (at upgrade, authentication and close) or login, never per
//! message, so plain mutexes are fine here.

use crate::auth::Principal;
use crate::config::Limits;
use crate::metrics::Limit;
use crate::session::{self, Now, PublishBucket};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Entries a map holds before stale ones are first pruned.
const PRUNE_AT: usize = 10_000;

/// A map pruned of stale entries when it has grown to twice its size after the last
/// prune: a scan of n entries happens after at least n/2 inserts (amortized O(1) per
/// insert), never on every insert of a large map.
#[derive(Debug)]
struct Pruned<K, V> {
    map: HashMap<K, V>,
    prune_at: usize,
}

impl<K: std::hash::Hash + Eq, V> Default for Pruned<K, V> {
    fn default() -> Self {
        Pruned {
            map: HashMap::new(),
            prune_at: PRUNE_AT,
        }
    }
}

impl<K: std::hash::Hash + Eq, V> Pruned<K, V> {
    fn prune_if_due(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        if self.map.len() >= self.prune_at {
            self.map.retain(keep);
            self.prune_at = (self.map.len() * 2).max(PRUNE_AT);
        }
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64 (one host usually
/// holds a whole /64, so per-address limits keyed by the full address are no limit).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A fixed one-minute window counter.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

fn try_count<K: std::hash::Hash + Eq>(
    map: &mut Pruned<K, Window>,
    key: K,
    now: Instant,
    per_minute: u32,
) -> bool {
    map.prune_if_due(|_, w| now.saturating_duration_since(w.start) < WINDOW);
    let w = map.map.entry(key).or_insert(Window {
        start: now,
        count: 0,
    });
    if now.saturating_duration_since(w.start) >= WINDOW {
        *w = Window {
            start: now,
            count: 0,
        };
    }
    if w.count >= per_minute {
        return false;
    }
    w.count += 1;
    true
}

/// The times of the recent failures of one login or address, oldest first: at most the
/// limit's worth, none older than [`WINDOW`] once trimmed.
#[derive(Debug, Default)]
struct Failures(VecDeque<Instant>);

impl Failures {
    fn trim(&mut self, now: Instant) {
        while self
            .0
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW)
        {
            self.0.pop_front();
        }
    }

    fn is_stale(&self, now: Instant) -> bool {
        self.0
            .back()
            .is_none_or(|&t| now.saturating_duration_since(t) >= WINDOW)
    }
}

/// `Some(wait)` when `key` has `per_minute` failures within the last minute: the wait until
/// the oldest of them is a minute old.
fn blocked<K: std::hash::Hash + Eq>(
    map: &mut Pruned<K, Failures>,
    key: &K,
    now: Instant,
    per_minute: u32,
) -> Option<Duration> {
    let f = map.map.get_mut(key)?;
    f.trim(now);
    if f.0.len() < per_minute as usize {
        return None;
    }
    let oldest = *f.0.front()?;
    Some(WINDOW.saturating_sub(now.saturating_duration_since(oldest)))
}

fn record_failure<K: std::hash::Hash + Eq>(
    map: &mut Pruned<K, Failures>,
    key: K,
    now: Instant,
    per_minute: u32,
) {
    map.prune_if_due(|_, f| !f.is_stale(now));
    let f = map.map.entry(key).or_default();
    f.trim(now);
    f.0.push_back(now);
    while f.0.len() > per_minute as usize {
        f.0.pop_front();
    }
}

/// Logins are counted by digest: any string may be tried as a login, and a long one
/// must not cost memory.
fn login_key(login: &str) -> [u8; 32] {
    Sha256::digest(login.as_bytes()).into()
}

fn user_key(p: &Principal) -> String {
    format!("{}\u{0}{}", p.tenant, p.user_id)
}

/// Which per-user token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum BucketKind {
    /// Publishes, over WebSocket and HTTP together.
    Publish,
    /// HTTP polling reads (vehicles, events): large replies.
    Read,
}

pub struct NodeAdmission {
    limits: Limits,
    open: AtomicUsize,
    users: Mutex<HashMap<String, usize>>,
    /// Authenticated connections per tenant.
    tenants: Mutex<HashMap<Arc<str>, usize>>,
    user_rate: Mutex<Pruned<String, Window>>,
    ip_rate: Mutex<Pruned<IpAddr, Window>>,
    /// Per-user token buckets; an entry no session holds and that is full again is the
    /// same as a fresh one, so pruning it loses nothing.
    buckets: Mutex<Pruned<(String, BucketKind), Arc<PublishBucket>>>,
    /// Connections accepted and not yet upgraded or answered, per node and per address.
    pending: AtomicUsize,
    pending_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Failed logins in the last minute, per login (digest) and per client address.
    login_failures: Mutex<Pruned<[u8; 32], Failures>>,
    login_failures_ip: Mutex<Pruned<IpAddr, Failures>>,
}

impl NodeAdmission {
    pub fn new(limits: Limits) -> NodeAdmission {
        NodeAdmission {
            limits,
            open: AtomicUsize::new(0),
            users: Mutex::new(HashMap::new()),
            tenants: Mutex::new(HashMap::new()),
            user_rate: Mutex::new(Pruned::default()),
            ip_rate: Mutex::new(Pruned::default()),
            buckets: Mutex::new(Pruned::default()),
            pending: AtomicUsize::new(0),
            pending_ip: Mutex::new(HashMap::new()),
            login_failures: Mutex::new(Pruned::default()),
            login_failures_ip: Mutex::new(Pruned::default()),
        }
    }

    /// Before a password is verified: refused (with the limit and how long until an
    /// attempt may succeed) when `login`, or the address, failed its limit's worth of
    /// times within the last minute. The password is then not looked at: a right one is
    /// refused too, so guessing gains nothing past the limit.
    pub fn check_login(
        &self,
        login: &str,
        ip: IpAddr,
        now: Instant,
    ) -> Result<(), (Limit, Duration)> {
        let l = &self.limits;
        if let Some(wait) = blocked(
            &mut self.login_failures.lock(),
            &login_key(login),
            now,
            l.login_failures_per_minute_per_login,
        ) {
            return Err((Limit::LoginRatePerLogin, wait));
        }
        if let Some(wait) = blocked(
            &mut self.login_failures_ip.lock(),
            &client_key(ip),
            now,
            l.login_failures_per_minute_per_ip,
        ) {
            return Err((Limit::LoginRatePerIp, wait));
        }
        Ok(())
    }

    /// A login failed (unknown login or wrong password): counted against the login and
    /// the address. Successes are not counted and clear nothing.
    pub fn login_failed(&self, login: &str, ip: IpAddr, now: Instant) {
        let l = &self.limits;
        record_failure(
            &mut self.login_failures.lock(),
            login_key(login),
            now,
            l.login_failures_per_minute_per_login,
        );
        record_failure(
            &mut self.login_failures_ip.lock(),
            client_key(ip),
            now,
            l.login_failures_per_minute_per_ip,
        );
    }

    fn bucket(&self, p: &Principal, kind: BucketKind, now: Instant) -> Arc<PublishBucket> {
        let rate = match kind {
            BucketKind::Publish => self.limits.for_role(p.role).publishes_per_second,
            BucketKind::Read => self.limits.requests_per_second,
        };
        let mut map = self.buckets.lock();
        map.prune_if_due(|_, b| Arc::strong_count(b) > 1 || !b.is_full(now));
        map.map
            .entry((user_key(p), kind))
            .or_insert_with(|| Arc::new(PublishBucket::new(rate, now)))
            .clone()
    }

    /// The user's publish bucket (WebSocket and HTTP publishes share it).
    pub fn user_publish_bucket(&self, p: &Principal, now: Instant) -> Arc<PublishBucket> {
        self.bucket(p, BucketKind::Publish, now)
    }

    /// Takes one token for an HTTP polling read (vehicles, events) of this user.
    pub fn http_read(&self, p: &Principal, now: Instant) -> bool {
        self.bucket(p, BucketKind::Read, now).try_take(now)
    }

    /// Counts a freshly accepted TCP connection that has not been upgraded yet. On `Ok`
    /// it counts until [`NodeAdmission::pending_done`].
    pub fn pending_open(&self, ip: IpAddr) -> Result<(), Limit> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.limits.max_pending_connections {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::PendingConnections);
        }
        let mut per_ip = self.pending_ip.lock();
        let n = per_ip.entry(client_key(ip)).or_insert(0);
        if *n >= self.limits.max_pending_connections_per_ip {
            drop(per_ip);
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::PendingConnectionsPerIp);
        }
        *n += 1;
        Ok(())
    }

    /// A pending connection was upgraded, answered or dropped.
    pub fn pending_done(&self, ip: IpAddr) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        let key = client_key(ip);
        let mut per_ip = self.pending_ip.lock();
        if let Some(n) = per_ip.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&key);
            }
        }
    }

    pub fn pending_connections(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Checks the node cap and the address's new-connection rate before an upgrade.
    /// On `Ok` the connection counts as open until [`NodeAdmission::close`].
    pub fn open(&self, ip: IpAddr, now: Instant) -> Result<(), Limit> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::ConnectionsPerNode);
        }
        if !try_count(
            &mut self.ip_rate.lock(),
            client_key(ip),
            now,
            self.limits.new_connections_per_minute_per_ip,
        ) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Limit::NewConnectionsPerIp);
        }
        Ok(())
    }

    pub fn close(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts an authenticated connection against its user.
    pub fn admit_user(&self, p: &Principal, now: Instant) -> Result<(), Limit> {
        let l = self.limits.for_role(p.role);
        let key = user_key(p);
        let mut users = self.users.lock();
        let n = users.get(&key).copied().unwrap_or(0);
        if n >= l.max_connections_per_user {
            return Err(Limit::ConnectionsPerUser);
        }
        let mut tenants = self.tenants.lock();
        let in_tenant = tenants.get(&p.tenant).copied().unwrap_or(0);
        if in_tenant >= self.limits.max_connections_per_tenant {
            return Err(Limit::ConnectionsPerTenant);
        }
        if !try_count(
            &mut self.user_rate.lock(),
            key.clone(),
            now,
            l.new_connections_per_minute_per_user,
        ) {
            return Err(Limit::NewConnectionsPerUser);
        }
        users.insert(key, n + 1);
        tenants.insert(p.tenant.clone(), in_tenant + 1);
        Ok(())
    }

    /// Releases a connection admitted by [`NodeAdmission::admit_user`].
    pub fn release_user(&self, p: &Principal) {
        let key = user_key(p);
        let mut users = self.users.lock();
        if let Some(n) = users.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                users.remove(&key);
            }
        }
        let mut tenants = self.tenants.lock();
        if let Some(n) = tenants.get_mut(&p.tenant) {
            *n -= 1;
            if *n == 0 {
                tenants.remove(&p.tenant);
            }
        }
    }
}

impl session::Admission for NodeAdmission {
    fn admit(&self, principal: &Principal, now: Now) -> Result<(), Limit> {
        self.admit_user(principal, now.mono)
    }

    fn publish_bucket(&self, principal: &Principal, now: Now) -> Option<Arc<PublishBucket>> {
        Some(self.user_publish_bucket(principal, now.mono))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn principal(user: &str, role: Role) -> Principal {
        Principal {
            user_id: user.into(),
            tenant: "t".into(),
            role,
            scope: crate::auth::DeviceScope::any(),
            expires_at: None,
            credential: Default::default(),
        }
    }

    #[test]
    fn caps_and_rates() {
        let limits = Limits {
            max_connections: 3,
            max_connections_per_user: 2,
            new_connections_per_minute_per_user: 3,
            new_connections_per_minute_per_ip: 4,
            ..Limits::default()
        };
        let a = NodeAdmission::new(limits);
        let t0 = Instant::now();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            a.open(ip, t0).unwrap();
        }
        assert_eq!(a.open(ip, t0), Err(Limit::ConnectionsPerNode));
        a.close();
        a.open(ip, t0).unwrap();
        a.close();
        assert_eq!(a.open(ip, t0), Err(Limit::NewConnectionsPerIp));
        assert!(a.open(ip, t0 + WINDOW).is_ok());

        let u = principal("u", Role::Viewer);
        a.admit_user(&u, t0).unwrap();
        a.admit_user(&u, t0).unwrap();
        assert_eq!(a.admit_user(&u, t0), Err(Limit::ConnectionsPerUser));
        a.release_user(&u);
        a.admit_user(&u, t0).unwrap();
        a.release_user(&u);
        assert_eq!(a.admit_user(&u, t0), Err(Limit::NewConnectionsPerUser));
        a.admit_user(&u, t0 + WINDOW).unwrap();
    }

    #[test]
    fn failed_logins_are_limited_per_login_and_per_address() {
        let a = NodeAdmission::new(Limits {
            login_failures_per_minute_per_login: 2,
            login_failures_per_minute_per_ip: 3,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let (ip, other_ip): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        a.check_login("ann", ip, t0).unwrap();
        a.login_failed("ann", ip, t0);
        a.login_failed("ann", other_ip, t0 + Duration::from_secs(10));
        // Two failures of "ann" within the minute, from any address: refused until the
        // first is a minute old.
        assert_eq!(
            a.check_login(
                "ann",
                "10.0.0.3".parse().unwrap(),
                t0 + Duration::from_secs(20)
            ),
            Err((Limit::LoginRatePerLogin, Duration::from_secs(40)))
        );
        assert!(a.check_login("ann", ip, t0 + WINDOW).is_ok());
        // The address: three failures within a minute, over any logins.
        let t1 = t0 + WINDOW;
        for name in ["bo", "cy", "dee"] {
            a.login_failed(name, ip, t1);
        }
        assert_eq!(
            a.check_login("eve", ip, t1).map_err(|e| e.0),
            Err(Limit::LoginRatePerIp)
        );
        assert!(a.check_login("eve", other_ip, t1).is_ok());
        // IPv6 addresses of one /64 count together.
        for n in 1..=3 {
            let v6: IpAddr = format!("2001:db8::{n}").parse().unwrap();
            a.login_failed(&format!("u{n}"), v6, t1);
        }
        assert_eq!(
            a.check_login("z", "2001:db8::ffff".parse().unwrap(), t1)
                .map_err(|e| e.0),
            Err(Limit::LoginRatePerIp)
        );
    }

    #[test]
    fn tenant_cap_counts_every_user_of_the_tenant() {
        let a = NodeAdmission::new(Limits {
            max_connections_per_tenant: 2,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let (u1, u2) = (principal("u1", Role::Viewer), principal("u2", Role::Device));
        a.admit_user(&u1, t0).unwrap();
        a.admit_user(&u2, t0).unwrap();
        assert_eq!(a.admit_user(&u1, t0), Err(Limit::ConnectionsPerTenant));
        let mut other = principal("u3", Role::Viewer);
        other.tenant = "other".into();
        a.admit_user(&other, t0).unwrap();
        a.release_user(&u2);
        a.admit_user(&u1, t0).unwrap();
    }
}
