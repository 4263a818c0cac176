//! Credentials to principals (SPEC §2): API keys from the config and JWTs.
//!
//! Pure: the caller passes the current UNIX time; no clock is read here.

use crate::config::AuthConfig;
use crate::model::Role;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Arc<str>,
    pub tenant: Arc<str>,
    pub role: Role,
    /// Vehicles a device may publish for; `None` means any vehicle of its tenant.
    pub vehicles: Option<Arc<[Box<str>]>>,
    /// UNIX seconds after which the credential is no longer valid.
    pub expires_at: Option<u64>,
}

impl Principal {
    pub fn may_act_for_vehicle(&self, vehicle: &str) -> bool {
        match &self.vehicles {
            None => true,
            Some(list) => list.iter().any(|v| &**v == vehicle),
        }
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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown API key")]
    UnknownApiKey,
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
    #[error("no JWT verification key configured for {0:?}")]
    NoKeyForAlgorithm(Algorithm),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(alias = "fleet_id", alias = "company_id", alias = "instance_id")]
    tenant: Option<String>,
    role: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    vehicle_id: Option<String>,
    vehicles: Option<Vec<String>>,
}

/// Verifies credentials against the configured keys.
pub struct Authenticator {
    api_keys: HashMap<[u8; 32], Principal>,
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    es256: Option<DecodingKey>,
    issuer: Option<String>,
}

fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Authenticator> {
        let read = |path: &str| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read key file {path}: {e}"))
        };
        let rs256 = match &cfg.jwt_rs256_public_key_file {
            Some(p) => Some(DecodingKey::from_rsa_pem(&read(p)?)?),
            None => None,
        };
        let es256 = match &cfg.jwt_es256_public_key_file {
            Some(p) => Some(DecodingKey::from_ec_pem(&read(p)?)?),
            None => None,
        };
        // Keys are looked up by their SHA-256 digest, so the comparison time does not
        // depend on how many leading bytes of a guess were right.
        let api_keys = cfg
            .api_keys
            .iter()
            .map(|k| {
                let vehicles = (!k.vehicles.is_empty())
                    .then(|| k.vehicles.iter().map(|v| v.as_str().into()).collect());
                let p = Principal {
                    user_id: k.user_id.as_str().into(),
                    tenant: k.tenant.as_str().into(),
                    role: k.role,
                    vehicles,
                    expires_at: None,
                };
                (key_digest(&k.key), p)
            })
            .collect();
        Ok(Authenticator {
            api_keys,
            hs256: cfg
                .jwt_hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            rs256,
            es256,
            issuer: cfg.jwt_issuer.clone(),
        })
    }

    pub fn authenticate(
        &self,
        cred: Credential<'_>,
        now_unix: u64,
    ) -> Result<Principal, AuthError> {
        match cred {
            Credential::ApiKey(k) => self.api_key(k),
            Credential::Token(t) => self.jwt(t, now_unix),
            Credential::Bearer(b) if b.matches('.').count() == 2 => self.jwt(b, now_unix),
            Credential::Bearer(b) => self.api_key(b),
        }
    }

    fn api_key(&self, key: &str) -> Result<Principal, AuthError> {
        self.api_keys
            .get(&key_digest(key))
            .cloned()
            .ok_or(AuthError::UnknownApiKey)
    }

    fn jwt(&self, token: &str, now: u64) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
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
        let mut v = Validation::new(header.alg);
        // Time claims are checked below against the caller's clock.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.required_spec_claims.clear();
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &v)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let c = data.claims;
        if let Some(exp) = c.exp
            && now >= exp
        {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = c.nbf
            && now < nbf
        {
            return Err(AuthError::NotYetValid);
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
        let mut vehicles: Vec<Box<str>> = c
            .vehicles
            .unwrap_or_default()
            .into_iter()
            .map(Into::into)
            .collect();
        if let Some(v) = c.vehicle_id {
            vehicles.push(v.into());
        }
        Ok(Principal {
            user_id: c.sub.unwrap_or_else(|| format!("token:{tenant}")).into(),
            tenant: tenant.into(),
            role,
            vehicles: (!vehicles.is_empty()).then(|| vehicles.into()),
            expires_at: c.exp,
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
            api_keys: vec![ApiKeyConfig {
                key: "dev-viewer-0123456789".into(),
                user_id: "v1".into(),
                tenant: "fleet_001".into(),
                role: Role::Viewer,
                vehicles: vec![],
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
        let a = Authenticator::new(&AuthConfig {
            jwt_rs256_public_key_file: Some(fixture("rs256-public.pem")),
            jwt_es256_public_key_file: Some(fixture("es256-public.pem")),
            ..Default::default()
        })
        .unwrap();
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
