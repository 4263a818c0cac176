//! TLS settings and state that outlive one connection: `[server.tls]`, loading the
//! certificate chain and key, the live rustls `ServerConfig` that SIGHUP replaces, and
//! the TLS counters. The per-connection record layer is in `shard/tls.rs`.

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// `[server.tls]`: a TLS listener beside the plain one (`server.listen`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener (`wss://`, `https://`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// TLS handshake steps a shard runs per loop turn; the rest wait for the next turn,
    /// so a handshake storm cannot starve delivery (as `accept` is bounded).
    #[serde(default = "default_handshakes_per_turn")]
    pub handshakes_per_turn: usize,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8443".parse().expect("static address")
}

fn default_handshakes_per_turn() -> usize {
    32
}

/// rustls with ring (no C toolchain beyond cc; aws-lc-rs needs cmake). Its provider has
/// no post-quantum key exchange, hence the deprecation. Its default order puts P-384
/// first, which costs the server about ten times X25519 per handshake: X25519 first.
pub fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::kx_group;
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    p
}

/// The ALPN protocol spoken: HTTP/1.1 (the WebSocket upgrade and the HTTP API).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Reads the chain and key and builds the server configuration: TLS 1.2 and 1.3 only,
/// ALPN `http/1.1`. The error names the file and what is wrong with it.
pub fn load(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let cert_path = cfg.cert_file.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| format!("server.tls.cert_file {cert_path}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("server.tls.cert_file {cert_path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert_file {cert_path}: no CERTIFICATE block found"
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| format!("server.tls.key_file {}: {e}", cfg.key_file.display()))?;
    let provider = Arc::new(provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("server.tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "server.tls: certificate {cert_path} and key {} are not usable together: {e}",
                cfg.key_file.display()
            )
        })?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// The node's TLS state: its settings and the configuration new connections get.
pub struct TlsState {
    pub settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsState {
    pub fn new(settings: TlsConfig) -> Result<TlsState, String> {
        let current = RwLock::new(load(&settings)?);
        Ok(TlsState { settings, current })
    }

    /// The configuration for a connection accepted now (read once per accept).
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().clone()
    }

    /// Reads the certificate and key files again (SIGHUP). Open connections keep the
    /// configuration they started with; new ones get the new one. A file that does not
    /// load is refused, logged, and the certificate in use stays.
    pub fn reload(&self) -> Result<(), String> {
        match load(&self.settings) {
            Ok(config) => {
                *self.current.write() = config;
                tracing::info!(
                    cert_file = %self.settings.cert_file.display(),
                    "TLS certificate and key reloaded; new connections use them"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!("TLS reload refused, the current certificate stays in use: {e}");
                Err(e)
            }
        }
    }
}

/// Why a TLS connection was closed before or outside the protocol, counted in
/// `fleetcast_tls_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Bytes that are not TLS records (not a ClientHello).
    Garbage,
    /// A plaintext HTTP request on the TLS port (answered 400 in clear text).
    Plaintext,
    /// The TLS handshake did not finish within `limits.handshake_timeout_ms`.
    Timeout,
    /// A record longer than TLS allows.
    Oversized,
    /// Any other TLS failure: no common version, cipher or ALPN protocol, a bad
    /// Finished, a record that does not decrypt...
    Protocol,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Garbage,
        Refusal::Plaintext,
        Refusal::Timeout,
        Refusal::Oversized,
        Refusal::Protocol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::Garbage => "garbage",
            Refusal::Plaintext => "plaintext",
            Refusal::Timeout => "timeout",
            Refusal::Oversized => "oversized",
            Refusal::Protocol => "protocol",
        }
    }

    /// The refusal a rustls error stands for.
    pub fn of(e: &rustls::Error) -> Refusal {
        use rustls::{Error, InvalidMessage};
        match e {
            Error::InvalidMessage(
                InvalidMessage::MessageTooLarge | InvalidMessage::HandshakePayloadTooLarge,
            ) => Refusal::Oversized,
            Error::InvalidMessage(_) => Refusal::Garbage,
            _ => Refusal::Protocol,
        }
    }
}

/// A shard's TLS counters.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes: AtomicU64,
    /// Handshake steps left for a later loop turn (`handshakes_per_turn` reached).
    pub deferred: AtomicU64,
    pub refused: [AtomicU64; Refusal::ALL.len()],
}

impl TlsStats {
    pub fn refuse(&self, r: Refusal) {
        self.refused[r as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The TLS lines of `/metrics`.
pub fn render<'a>(out: &mut String, shards: impl Iterator<Item = &'a TlsStats> + Clone) {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP fleetcast_tls_handshakes_total TLS handshakes completed\n\
         # TYPE fleetcast_tls_handshakes_total counter"
    );
    for (i, s) in shards.clone().enumerate() {
        let _ = writeln!(
            out,
            "fleetcast_tls_handshakes_total{{shard=\"{i}\"}} {}",
            load(&s.handshakes)
        );
    }
    let _ = writeln!(
        out,
        "# HELP fleetcast_tls_handshakes_deferred_total TLS handshake steps left for a later \
         loop turn (server.tls.handshakes_per_turn)\n\
         # TYPE fleetcast_tls_handshakes_deferred_total counter"
    );
    for (i, s) in shards.clone().enumerate() {
        let _ = writeln!(
            out,
            "fleetcast_tls_handshakes_deferred_total{{shard=\"{i}\"}} {}",
            load(&s.deferred)
        );
    }
    let _ = writeln!(
        out,
        "# HELP fleetcast_tls_refused_total TLS connections closed for bad input, by reason\n\
         # TYPE fleetcast_tls_refused_total counter"
    );
    for (i, s) in shards.enumerate() {
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "fleetcast_tls_refused_total{{shard=\"{i}\",reason=\"{}\"}} {}",
                r.name(),
                load(&s.refused[r as usize])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key as PEM; a second key that does not match.
    fn pems() -> (String, String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        (cert.pem(), key.serialize_pem(), other.serialize_pem())
    }

    fn files(tag: &str, cert: &str, key: &str) -> TlsConfig {
        let dir = std::env::temp_dir().join(format!("fleetcast-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        TlsConfig {
            listen: default_listen(),
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            handshakes_per_turn: default_handshakes_per_turn(),
        }
    }

    #[test]
    fn tls_load_accepts_a_matching_pair_with_alpn_http11() {
        let (cert, key, _) = pems();
        let config = load(&files("good", &cert, &key)).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn tls_load_refuses_bad_files_naming_them() {
        let (cert, key, other) = pems();
        let e = load(&files("nocert", "not a certificate\n", &key)).unwrap_err();
        assert!(
            e.contains("server.tls.cert_file") && e.contains("cert.pem"),
            "{e}"
        );
        let e = load(&files("nokey", &cert, "")).unwrap_err();
        assert!(
            e.contains("server.tls.key_file") && e.contains("key.pem"),
            "{e}"
        );
        let e = load(&files("mismatch", &cert, &other)).unwrap_err();
        assert!(e.contains("not usable together"), "{e}");
        let mut missing = files("missing", &cert, &key);
        missing.cert_file = missing.cert_file.with_file_name("absent.pem");
        let e = load(&missing).unwrap_err();
        assert!(e.contains("absent.pem"), "{e}");
    }

    #[test]
    fn tls_reload_keeps_the_current_config_when_the_new_files_fail() {
        let (cert, key, other) = pems();
        let settings = files("reload", &cert, &key);
        let state = TlsState::new(settings.clone()).unwrap();
        let before = state.current();
        std::fs::write(&settings.key_file, other).unwrap();
        assert!(state.reload().is_err());
        assert!(Arc::ptr_eq(&before, &state.current()));
        std::fs::write(&settings.key_file, key).unwrap();
        state.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &state.current()));
    }

    #[test]
    fn tls_refusal_reasons_of_rustls_errors() {
        use rustls::{Error, InvalidMessage, PeerIncompatible};
        let of = |e: Error| Refusal::of(&e);
        assert_eq!(
            of(Error::InvalidMessage(InvalidMessage::MessageTooLarge)),
            Refusal::Oversized
        );
        assert_eq!(
            of(Error::InvalidMessage(InvalidMessage::InvalidContentType)),
            Refusal::Garbage
        );
        assert_eq!(
            of(Error::PeerIncompatible(
                PeerIncompatible::SupportedVersionsExtensionRequired
            )),
            Refusal::Protocol
        );
        assert_eq!(of(Error::NoApplicationProtocol), Refusal::Protocol);
    }
}
