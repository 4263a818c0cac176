//! Node-wide admission control: connection caps per node and per user, and new-connection
//! rates per user and per client address (SPEC §8).
//!
//! Touched once per connection (at upgrade, authentication and close), never per message,
//! so plain mutexes are fine here.

use crate::auth::Principal;
use crate::config::Limits;
use crate::metrics::Limit;
use crate::session::{self, Now};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Rate windows kept before stale ones are pruned.
const PRUNE_AT: usize = 10_000;

/// A fixed one-minute window counter.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

fn try_count<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Window>,
    key: K,
    now: Instant,
    per_minute: u32,
) -> bool {
    if map.len() >= PRUNE_AT {
        map.retain(|_, w| now.saturating_duration_since(w.start) < WINDOW);
    }
    let w = map.entry(key).or_insert(Window {
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

fn user_key(p: &Principal) -> String {
    format!("{}\u{0}{}", p.tenant, p.user_id)
}

pub struct NodeAdmission {
    limits: Limits,
    open: AtomicUsize,
    users: Mutex<HashMap<String, usize>>,
    user_rate: Mutex<HashMap<String, Window>>,
    ip_rate: Mutex<HashMap<IpAddr, Window>>,
    /// HTTP publishes: tokens and last refill per user (the role's messages per second).
    http_rate: Mutex<HashMap<String, (f64, Instant)>>,
}

impl NodeAdmission {
    pub fn new(limits: Limits) -> NodeAdmission {
        NodeAdmission {
            limits,
            open: AtomicUsize::new(0),
            users: Mutex::new(HashMap::new()),
            user_rate: Mutex::new(HashMap::new()),
            ip_rate: Mutex::new(HashMap::new()),
            http_rate: Mutex::new(HashMap::new()),
        }
    }

    /// Takes up to `n` message tokens from the user's HTTP publish bucket (one second of
    /// burst at the role's rate); returns how many it got.
    pub fn http_messages(&self, p: &Principal, n: usize, now: Instant) -> usize {
        let rate = self.limits.for_role(p.role).messages_per_second as f64;
        let mut map = self.http_rate.lock();
        if map.len() >= PRUNE_AT {
            map.retain(|_, (_, t)| now.saturating_duration_since(*t) < WINDOW);
        }
        let (tokens, last) = map.entry(user_key(p)).or_insert((rate, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        let got = (n as f64).min(tokens.floor()).max(0.0);
        *tokens -= got;
        got as usize
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
            ip,
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
        if !try_count(
            &mut self.user_rate.lock(),
            key.clone(),
            now,
            l.new_connections_per_minute_per_user,
        ) {
            return Err(Limit::NewConnectionsPerUser);
        }
        users.insert(key, n + 1);
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
    }
}

impl session::Admission for NodeAdmission {
    fn admit(&self, principal: &Principal, now: Now) -> Result<(), Limit> {
        self.admit_user(principal, now.mono)
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
            vehicles: None,
            expires_at: None,
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
}
