//! The `Origin` allow-list (`server.allowed_origins`): which web pages may open a
//! WebSocket to this node, and which get CORS headers on the HTTP API.
//!
//! Pure: a list of patterns in, a yes or no per `Origin` header out.
//!
//! A browser sends `Origin` with every WebSocket upgrade and cross-origin request; other
//! clients (devices, backends, the load generator) send none, and are never refused for
//! it: the header protects browser users from pages of another site riding on their
//! credentials, it is not an authentication.
//!
//! Patterns: an exact origin (`https://app.example.com`, `http://localhost:3000`), a
//! wildcard subdomain (`https://*.example.com`: any host under `example.com`, at any
//! depth, but not `example.com` itself), or `*` (any origin). Scheme and host compare
//! case-insensitively; a port is part of the origin (`https://x:8443` is not `https://x`),
//! and a scheme's default port is the same origin as none (`https://x:443` = `https://x`).
//! `null` (sandboxed frames, `file:` pages) matches only a literal `null` entry.

use serde::Deserialize;

/// The configured allow-list. Empty (the default): every origin is allowed to upgrade
/// (fleetcast's behaviour before the list existed), and no CORS header is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct AllowedOrigins {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Null,
    Exact(Origin),
    /// `scheme://*.suffix[:port]`: `host` is the suffix, without the leading dot.
    Subdomains(Origin),
}

/// A parsed `scheme://host[:port]`, lowercased, with the scheme's default port dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    fn parse(s: &str) -> Result<Origin, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?} is not scheme://host[:port]"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+')
        {
            return Err(format!("{s:?}: bad scheme"));
        }
        if rest.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{s:?}: an origin has no path, query or user (scheme://host[:port])"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 literal's colons are inside brackets.
            Some((h, p)) if !p.contains(']') => {
                let port: u16 = p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?;
                (h, Some(port))
            }
            _ => (rest, None),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        let default_port = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port: port.filter(|p| Some(*p) != default_port),
        })
    }
}

impl AllowedOrigins {
    /// Parses the configured patterns; an error names the entry at fault.
    pub fn new<S: AsRef<str>>(list: &[S]) -> Result<AllowedOrigins, String> {
        let mut patterns = Vec::with_capacity(list.len());
        for (i, p) in list.iter().enumerate() {
            let p = p.as_ref().trim();
            let parsed = match p {
                "*" => Ok(Pattern::Any),
                "null" => Ok(Pattern::Null),
                _ => match p.split_once("://*.") {
                    Some((scheme, suffix)) => {
                        let o = Origin::parse(&format!("{scheme}://{suffix}"))?;
                        if o.host.contains('*') || o.host.starts_with('.') {
                            Err(format!("{p:?}: one wildcard, at the start of the host"))
                        } else {
                            Ok(Pattern::Subdomains(o))
                        }
                    }
                    None if p.contains('*') => Err(format!(
                        "{p:?}: a wildcard must be the whole first label (https://*.example.com)"
                    )),
                    None => Origin::parse(p).map(Pattern::Exact),
                },
            };
            patterns.push(parsed.map_err(|e| format!("server.allowed_origins[{i}]: {e}"))?);
        }
        Ok(AllowedOrigins { patterns })
    }

    /// No list configured: every upgrade is allowed, and CORS is off.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether a WebSocket upgrade carrying this `Origin` header (`None`: no header, not a
    /// browser) may go on.
    pub fn allows_upgrade(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(_) if self.is_empty() => true,
            Some(o) => self.lists(o),
        }
    }

    /// Whether the HTTP API answers this origin with CORS headers: only origins the list
    /// names (an empty list opens CORS to none; `*` to every origin).
    pub fn allows_cors(&self, origin: &str) -> bool {
        self.lists(origin)
    }

    fn lists(&self, origin: &str) -> bool {
        let origin = origin.trim();
        let parsed = Origin::parse(origin).ok();
        self.patterns.iter().any(|p| match (p, &parsed) {
            (Pattern::Any, _) => true,
            (Pattern::Null, _) => origin == "null",
            (Pattern::Exact(want), Some(o)) => want == o,
            (Pattern::Subdomains(want), Some(o)) => {
                o.scheme == want.scheme
                    && o.port == want.port
                    && o.host.len() > want.host.len() + 1
                    && o.host.ends_with(&want.host)
                    && o.host.as_bytes()[o.host.len() - want.host.len() - 1] == b'.'
            }
            _ => false,
        })
    }
}

impl TryFrom<Vec<String>> for AllowedOrigins {
    type Error = String;
    fn try_from(list: Vec<String>) -> Result<Self, String> {
        AllowedOrigins::new(&list)
    }
}

/// The CORS headers for an allowed origin on an HTTP API response (each line ends with
/// CRLF). `Vary: Origin` so that a cache does not give one origin's answer to another.
pub fn cors_headers(origin: &str) -> String {
    format!("Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n")
}

/// The extra headers of a `204` answer to a CORS preflight for `methods`.
pub fn preflight_headers(origin: &str, methods: &str) -> String {
    format!(
        "{}Access-Control-Allow-Methods: {methods}, OPTIONS\r\n\
         Access-Control-Allow-Headers: Authorization, Content-Type\r\n\
         Access-Control-Max-Age: 600\r\n",
        cors_headers(origin)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(l: &[&str]) -> AllowedOrigins {
        AllowedOrigins::new(l).unwrap()
    }

    #[test]
    fn an_empty_list_allows_every_upgrade_and_no_cors() {
        let l = AllowedOrigins::default();
        assert!(l.allows_upgrade(Some("https://evil.example")));
        assert!(l.allows_upgrade(None));
        assert!(!l.allows_cors("https://evil.example"));
    }

    #[test]
    fn exact_origins_compare_scheme_host_and_port() {
        let l = list(&["https://App.Example.com", "http://localhost:3000"]);
        assert!(l.allows_upgrade(Some("https://app.example.com")));
        assert!(l.allows_upgrade(Some("https://app.example.com:443")));
        assert!(l.allows_upgrade(Some("http://localhost:3000")));
        for refused in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.net",
            "https://evilapp.example.com",
            "http://localhost",
            "http://localhost:3001",
            "null",
            "",
            "garbage",
        ] {
            assert!(!l.allows_upgrade(Some(refused)), "{refused}");
        }
        // No header: not a browser, not refused.
        assert!(l.allows_upgrade(None));
        assert!(l.allows_cors("http://localhost:3000"));
    }

    #[test]
    fn wildcards_cover_subdomains_at_any_depth_but_not_the_domain() {
        let l = list(&["https://*.example.com"]);
        assert!(l.allows_upgrade(Some("https://a.example.com")));
        assert!(l.allows_upgrade(Some("https://a.b.EXAMPLE.com")));
        for refused in [
            "https://example.com",
            "https://evil-example.com",
            "https://a.example.com.evil.net",
            "http://a.example.com",
            "https://a.example.com:8443",
            "https://.example.com",
        ] {
            assert!(!l.allows_upgrade(Some(refused)), "{refused}");
        }
        let ported = list(&["https://*.example.com:8443"]);
        assert!(ported.allows_upgrade(Some("https://a.example.com:8443")));
        assert!(!ported.allows_upgrade(Some("https://a.example.com")));
    }

    #[test]
    fn star_and_null_entries() {
        assert!(list(&["*"]).allows_cors("https://anything.example"));
        assert!(list(&["null"]).allows_upgrade(Some("null")));
        assert!(!list(&["https://x.example"]).allows_upgrade(Some("null")));
    }

    #[test]
    fn bad_patterns_are_refused_naming_the_entry() {
        for bad in [
            "example.com",
            "https://example.com/app",
            "https://a.*.example.com",
            "https://ex*ample.com",
            "https://",
            "https://x:99999",
            "https://user@x",
        ] {
            let e = AllowedOrigins::new(&["https://ok.example", bad]).unwrap_err();
            assert!(e.contains("server.allowed_origins[1]"), "{bad}: {e}");
        }
    }

    #[test]
    fn deserializes_from_a_toml_list() {
        #[derive(Deserialize)]
        struct S {
            o: AllowedOrigins,
        }
        let s: S = toml::from_str("o = [\"https://*.example.com\"]").unwrap();
        assert!(s.o.allows_upgrade(Some("https://a.example.com")));
        assert!(toml::from_str::<S>("o = [\"nope\"]").is_err());
    }
}
