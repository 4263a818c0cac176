//! The JWKS refresher: one background thread per node that fetches the issuer's JWK Set
//! (re-reads the file, or GETs the URL with ureq over rustls) when the [`Pacer`] says so,
//! and swaps it into [`Jwks`]. Shards never wait for it: a token with an unknown `kid`
//! fails at once and asks for a refresh; the next token with that `kid` after the
//! refresh succeeds.

use super::{Jwks, KeySet, MAX_JWKS_BYTES, Pacer, Reason};
use crossbeam_channel::RecvTimeoutError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the set comes from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Url(String),
}

/// How the refresher fetches and paces.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: Source,
    pub every: Duration,
    pub min_gap: Duration,
    pub timeout: Duration,
}

impl Source {
    fn fetch(&self, agent: &ureq::Agent) -> Result<KeySet, String> {
        match self {
            Source::File(path) => KeySet::read(path),
            Source::Url(url) => {
                let mut resp = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_JWKS_BYTES)
                    .read_to_vec()
                    .map_err(|e| format!("{url}: {e}"))?;
                KeySet::parse(&body).map_err(|e| format!("{url}: {e}"))
            }
        }
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(true)
        .max_redirects(3)
        .build()
        .into()
}

/// Fetches the set once, now (node start with a URL): false when that failed, after
/// logging why; the node then starts with no JWKS key and the refresher retries.
pub fn fetch_at_start(jwks: &Jwks, s: &Settings) -> bool {
    let result = s.source.fetch(&agent(s.timeout));
    log(Reason::Startup, &result);
    let ok = result.is_ok();
    jwks.fetched(Reason::Startup, result);
    ok
}

/// Starts the refresher thread. `last`: when the set in `jwks` was fetched and whether
/// that worked (`None`: never, fetch at once). It runs until [`Jwks::stop`].
pub fn spawn(
    jwks: Arc<Jwks>,
    s: Settings,
    last: Option<(Instant, bool)>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fleetcast-jwks".into())
        .spawn(move || run(&jwks, &s, last))
}

fn run(jwks: &Jwks, s: &Settings, last: Option<(Instant, bool)>) {
    let agent = agent(s.timeout);
    let mut pacer = Pacer::new(s.every, s.min_gap, last, Instant::now());
    loop {
        if jwks.stopping() {
            return;
        }
        if let Some(reason) = pacer.poll_fetch(Instant::now()) {
            let result = s.source.fetch(&agent);
            log(reason, &result);
            pacer.handle_fetched(Instant::now(), result.is_ok());
            jwks.fetched(reason, result);
            // Requests that arrived during the fetch asked for what it just fetched.
            while jwks.asks.try_recv().is_ok() {}
            continue;
        }
        let wait = pacer
            .poll_timeout()
            .saturating_duration_since(Instant::now());
        match jwks.asks.recv_timeout(wait) {
            Ok(()) => pacer.handle_ask(),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn log(reason: Reason, result: &Result<KeySet, String>) {
    match result {
        Ok(set) => tracing::info!(reason = reason.name(), keys = set.len(), "JWKS fetched"),
        Err(e) => tracing::warn!(
            reason = reason.name(),
            "JWKS fetch failed, the previous key set stays in use: {e}"
        ),
    }
}
