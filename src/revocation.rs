//! Revoked credentials (`[auth] revoked_token_ids`, `revoked_keys`): refused when
//! presented, and, when the list changes (SIGHUP), the open connections authenticated
//! with them are closed with 4001.
//!
//! Pure: the lists in, a verdict per principal out. Which connections to walk, and when,
//! is the shard's business (`shard::revoke`).

use crate::auth::{CredentialId, Principal};
use crate::config::{AuthConfig, parse_sha256_hex};
use std::collections::HashSet;

/// The revocation lists of one config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    token_ids: HashSet<String>,
    /// `revoked_keys` entries, matched against a key's `user_id`.
    key_users: HashSet<String>,
    /// `revoked_keys` entries that are a SHA-256 in hex, matched against a key's digest.
    key_digests: HashSet<[u8; 32]>,
}

impl Revocations {
    pub fn new(cfg: &AuthConfig) -> Revocations {
        Revocations {
            token_ids: cfg.revoked_token_ids.iter().cloned().collect(),
            key_users: cfg.revoked_keys.iter().cloned().collect(),
            key_digests: cfg
                .revoked_keys
                .iter()
                .filter_map(|k| parse_sha256_hex(k))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty() && self.key_users.is_empty() && self.key_digests.is_empty()
    }

    pub fn revokes_token_id(&self, jti: &str) -> bool {
        self.token_ids.contains(jti)
    }

    /// Whether the credential this principal was authenticated with is revoked: a token
    /// by its `jti`, an API key by its user id or its digest. Other credentials (iTrack
    /// session hashes, which `user/logout` ends) are never revoked here.
    pub fn revokes(&self, p: &Principal) -> bool {
        match &p.credential {
            CredentialId::Token { jti: Some(jti) } => self.revokes_token_id(jti),
            CredentialId::Token { jti: None } | CredentialId::Other => false,
            CredentialId::ApiKey(digest) => {
                self.key_digests.contains(digest) || self.key_users.contains(&*p.user_id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::DeviceScope;
    use crate::model::Role;
    use sha2::{Digest, Sha256};

    fn principal(user: &str, credential: CredentialId) -> Principal {
        Principal {
            user_id: user.into(),
            tenant: "fleet_a".into(),
            role: Role::Viewer,
            scope: DeviceScope::any(),
            expires_at: None,
            credential,
        }
    }

    #[test]
    fn tokens_by_jti_and_keys_by_user_or_digest() {
        let digest: [u8; 32] = Sha256::digest(b"the-key-0123456789").into();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let r = Revocations::new(&AuthConfig {
            revoked_token_ids: vec!["jti-1".into()],
            revoked_keys: vec!["bob".into(), hex.to_uppercase()],
            ..Default::default()
        });
        let jwt = |jti: Option<&str>| CredentialId::Token {
            jti: jti.map(Into::into),
        };
        assert!(r.revokes(&principal("x", jwt(Some("jti-1")))));
        assert!(!r.revokes(&principal("x", jwt(Some("jti-2")))));
        assert!(!r.revokes(&principal("bob", jwt(None))), "a token of bob");
        assert!(r.revokes(&principal("bob", CredentialId::ApiKey([7; 32]))));
        assert!(r.revokes(&principal("alice", CredentialId::ApiKey(digest))));
        assert!(!r.revokes(&principal("alice", CredentialId::ApiKey([7; 32]))));
        assert!(!r.revokes(&principal("bob", CredentialId::Other)));
        assert!(Revocations::new(&AuthConfig::default()).is_empty());
    }
}
