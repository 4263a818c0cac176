//! iTrack sessions in cluster mode: every node holds every live session, so a hash from
//! `user/auth` on one node opens a WebSocket on any node, and `user/logout` on any node
//! ends it everywhere.
//!
//! Each node keeps its sessions in memory as alone ([`MemorySessions`]) and the bridge
//! replicates creations and revocations through a JetStream key-value bucket
//! (`<prefix>_sessions`, values expire with `itrack.session_ttl_ms`). Only the SHA-256
//! digest of a hash is replicated (the bucket's key), never the hash: reading the bucket
//! does not let anyone use a session. Lookups stay local and never wait for NATS.

use crate::sessions::{Digest32, MemorySessions, SessionStore, StoredSession, digest};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A change to replicate.
#[derive(Debug)]
pub enum SessionOp {
    Put {
        digest: Digest32,
        login: Arc<str>,
        expires_at_ms: u64,
    },
    Del(Digest32),
}

/// A session as the bucket holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionValue {
    pub login: String,
    pub exp: u64,
}

/// The session store of a node in a cluster.
pub struct ClusterSessions {
    pub(super) local: Arc<MemorySessions>,
    pub(super) ops: tokio::sync::mpsc::UnboundedSender<SessionOp>,
}

impl SessionStore for ClusterSessions {
    fn create(&self, login: &str, now_ms: u64, ttl_ms: u64) -> String {
        let hash = self.local.create(login, now_ms, ttl_ms);
        let _ = self.ops.send(SessionOp::Put {
            digest: digest(&hash),
            login: login.into(),
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        });
        hash
    }

    fn get(&self, hash: &str, now_ms: u64) -> Option<StoredSession> {
        self.local.get(hash, now_ms)
    }

    fn revoke(&self, hash: &str, now_ms: u64) -> bool {
        let live = self.local.revoke(hash, now_ms);
        // Only a live session is replicated: random hashes sent to `user/logout` write
        // nothing to the bucket.
        if live {
            let _ = self.ops.send(SessionOp::Del(digest(hash)));
        }
        live
    }
}

/// The bucket key of a digest (lowercase hex).
pub fn key_of(d: &Digest32) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of a bucket key, if it is one.
pub fn digest_of(key: &str) -> Option<Digest32> {
    if key.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(key.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_junk() {
        let d = digest("0123456789abcdef0123456789abcdef");
        assert_eq!(digest_of(&key_of(&d)), Some(d));
        assert_eq!(digest_of("zz"), None);
        assert_eq!(digest_of(&"g".repeat(64)), None);
    }

    #[test]
    fn a_replicated_session_opens_here_and_a_revocation_replicates() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let here = ClusterSessions {
            local: Arc::new(MemorySessions::new()),
            ops: tx,
        };
        let hash = here.create("alice", 1_000, 60_000);
        let Some(SessionOp::Put {
            digest: d,
            login,
            expires_at_ms,
        }) = rx.try_recv().ok()
        else {
            panic!("creation replicated")
        };
        // Another node takes it in by digest, and knows the hash then.
        let there = MemorySessions::new();
        there.insert_digest(d, &login, expires_at_ms, 2_000);
        assert_eq!(
            there.get(&hash, 2_000).map(|s| s.login),
            Some("alice".into())
        );
        assert!(there.get(&hash, 61_000).is_none(), "expires there too");
        assert!(!here.revoke("not-a-live-hash", 3_000));
        assert!(
            rx.try_recv().is_err(),
            "nothing replicated for an unknown hash"
        );
        assert!(here.revoke(&hash, 3_000));
        assert!(matches!(rx.try_recv(), Ok(SessionOp::Del(x)) if x == d));
        there.remove_digest(&d);
        assert!(there.get(&hash, 3_000).is_none());
    }
}
