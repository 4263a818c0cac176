//! Closing the connections of revoked credentials. When the authenticator's credentials
//! are reloaded (SIGHUP) its generation changes; each shard notices on its next loop turn
//! and walks its own connections, at most `CHECKS_PER_TURN` slots a turn, asking for each
//! authenticated session whether its credential is still good. Those that are not get
//! error 401 and close 4001 (`Session::handle_revoked`).

use super::{Shard, now};
use std::sync::atomic::Ordering;

/// Connection slots checked per loop turn during a walk (bounded work per turn).
const CHECKS_PER_TURN: usize = 1024;

/// Where a shard is in its walk over its connections.
#[derive(Debug, Default)]
pub(super) struct RevocationWalk {
    /// The credentials generation last walked for.
    seen: u64,
    /// The next slot to check; `None`: no walk in progress.
    next: Option<usize>,
}

impl Shard {
    /// Whether a walk is in progress (the loop then does not block in poll).
    pub(super) fn revocation_walk_pending(&self) -> bool {
        self.revocation.next.is_some()
    }

    /// Starts a walk when the credentials changed, and goes on with it.
    pub(super) fn check_revocations(&mut self) {
        let generation = self.shared.auth.generation();
        if generation != self.revocation.seen {
            self.revocation.seen = generation;
            self.revocation.next = Some(0);
        }
        let Some(start) = self.revocation.next else {
            return;
        };
        let end = start
            .saturating_add(CHECKS_PER_TURN)
            .min(self.conns.capacity());
        let auth = &self.shared.auth;
        let revoked: Vec<usize> = (start..end)
            .filter(|&slot| {
                self.conns.get(slot).is_some_and(|c| {
                    c.is_open()
                        && c.session
                            .as_ref()
                            .and_then(|s| s.principal())
                            .is_some_and(|p| auth.is_revoked(p))
                })
            })
            .collect();
        self.revocation.next = (end < self.conns.capacity()).then_some(end);
        if !revoked.is_empty() {
            tracing::info!(
                shard = self.id,
                closed = revoked.len(),
                "closing connections of revoked credentials"
            );
            auth.revoked_closed
                .fetch_add(revoked.len() as u64, Ordering::Relaxed);
        }
        let now = now();
        for slot in revoked {
            if let Some(s) = self.conns[slot].session.as_mut() {
                s.handle_revoked(now);
            }
            self.apply_actions(slot, now);
        }
    }
}
