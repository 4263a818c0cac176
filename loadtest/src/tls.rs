//! `wss://`: a rustls client session per connection, driven by the same mio loop as
//! plaintext connections. Trust comes from `--ca-file` (PEM), ALPN `http/1.1`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// What every TLS connection of a run shares.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl TlsTarget {
    /// Trusts the certificates in `ca_file`; `host` (without the port) is the name the
    /// server's certificate must carry.
    pub fn new(ca_file: &Path, host: &str) -> anyhow::Result<TlsTarget> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", ca_file.display()))?
        {
            let cert = cert.map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", ca_file.display()))?;
            roots.add(cert)?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "--ca-file {}: no certificate",
            ca_file.display()
        );
        // ring, as the broker (no cmake for aws-lc-rs); X25519 first, as browsers (ring's
        // default order starts with P-384, several times as costly).
        use rustls::crypto::ring::kx_group;
        #[allow(deprecated)]
        let mut provider = rustls::crypto::ring::default_provider();
        provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
        let provider = Arc::new(provider);
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| anyhow::anyhow!("{host} is not a TLS server name: {e}"))?;
        Ok(TlsTarget {
            config: Arc::new(config),
            name,
        })
    }

    pub fn session(&self) -> io::Result<ClientConnection> {
        ClientConnection::new(self.config.clone(), self.name.clone()).map_err(io::Error::other)
    }
}

/// Writes pending records; Ok(false) when the socket is full.
pub fn drain(tls: &mut ClientConnection, sock: &mut impl Write) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Encrypts `out` (as much as rustls buffers) and writes the records. Returns the
/// plaintext bytes taken; the records not written wait for a writable event.
pub fn write(tls: &mut ClientConnection, sock: &mut impl Write, out: &[u8]) -> io::Result<usize> {
    let mut taken = 0;
    loop {
        if !drain(tls, sock)? || taken == out.len() {
            return Ok(taken);
        }
        let n = tls.writer().write(&out[taken..])?;
        if n == 0 {
            return Ok(taken);
        }
        taken += n;
    }
}

/// Reads decrypted bytes into `buf`: Ok(0) at the end (close_notify or EOF),
/// WouldBlock when neither rustls nor the socket has more.
pub fn read(
    tls: &mut ClientConnection,
    sock: &mut (impl Read + Write),
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        match tls.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if tls.read_tls(sock)? == 0 {
            return Ok(0);
        }
        tls.process_new_packets().map_err(io::Error::other)?;
        // Handshake flights and alerts go out at once.
        drain(tls, sock)?;
    }
}
