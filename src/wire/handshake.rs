//! The HTTP request head that opens every connection: WebSocket upgrade or plain HTTP.
//!
//! Pure: bytes in, a parsed request (or a reason to refuse) out; response bytes built here.

/// Where a request goes, by path (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    /// A file of the dashboard (`GET /` and its assets, embedded in the binary).
    Asset(&'static crate::dashboard::Asset),
    /// The dashboard's settings (`[dashboard]`), `GET /dashboard/config.json`.
    DashboardConfig,
    Metrics,
    /// The echo endpoint (a testing aid, off unless `testing.echo_endpoint`).
    Echo,
    /// `POST /v1/publish`.
    Publish,
    /// `GET /v1/fleets/{fleet_id}/vehicles`.
    FleetVehicles(Box<str>),
    /// `GET /v1/fleets/{fleet_id}/events`.
    FleetEvents(Box<str>),
    /// iTrack sessions: `GET|POST /v2/user/auth`, `/v2/user/logout` (also without `/v2`).
    User(crate::sessions::UserCall),
    /// The native (Bookovia-style) streaming endpoint, with its entity scope.
    Native(Scope),
    /// Another dialect's streaming endpoint, and the channel it subscribes once the
    /// connection is authenticated (Valtronics `/ws/alerts`).
    Stream(crate::dialect::DialectId, Option<crate::model::Channel>),
    NotFound,
}

/// An entity named by the endpoint path; it scopes every subscription of the connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    #[default]
    None,
    Fleet(Box<str>),
    Vehicle(Box<str>),
    Trip(Box<str>),
}

impl Endpoint {
    pub fn classify(path: &str) -> Endpoint {
        const NATIVE: &str = "/v1/streaming/websocket";
        if let Some(a) = crate::dashboard::asset(path) {
            return Endpoint::Asset(a);
        }
        match path {
            "/dashboard/config.json" => return Endpoint::DashboardConfig,
            "/healthz" => return Endpoint::Healthz,
            "/readyz" => return Endpoint::Readyz,
            "/metrics" => return Endpoint::Metrics,
            "/echo" => return Endpoint::Echo,
            "/v1/publish" => return Endpoint::Publish,
            NATIVE | "/v1/streaming/websocket/" => return Endpoint::Native(Scope::None),
            _ => {}
        }
        if let Some(e) = crate::dialect::endpoint(path) {
            return e;
        }
        if let Some(call) = crate::sessions::UserCall::at(path) {
            return Endpoint::User(call);
        }
        if let Some(rest) = path.strip_prefix("/v1/fleets/") {
            return match rest.split_once('/') {
                Some((id, "vehicles")) if !id.is_empty() => {
                    Endpoint::FleetVehicles(percent_decode(id).into())
                }
                Some((id, "events")) if !id.is_empty() => {
                    Endpoint::FleetEvents(percent_decode(id).into())
                }
                _ => Endpoint::NotFound,
            };
        }
        let Some(rest) = path.strip_prefix(NATIVE).and_then(|r| r.strip_prefix('/')) else {
            return Endpoint::NotFound;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let Some((kind, id)) = rest.split_once('/') else {
            return Endpoint::NotFound;
        };
        if id.is_empty() || id.contains('/') {
            return Endpoint::NotFound;
        }
        let id = percent_decode(id).into_boxed_str();
        match kind {
            "fleet" => Endpoint::Native(Scope::Fleet(id)),
            "vehicle" => Endpoint::Native(Scope::Vehicle(id)),
            "trip" => Endpoint::Native(Scope::Trip(id)),
            _ => Endpoint::NotFound,
        }
    }

    pub fn is_websocket(&self) -> bool {
        matches!(
            self,
            Endpoint::Native(_) | Endpoint::Stream(..) | Endpoint::Echo
        )
    }

    /// The methods this endpoint answers, as a CORS preflight lists them.
    pub fn methods(&self) -> &'static str {
        match self {
            Endpoint::Publish => "POST",
            Endpoint::User(_) => "GET, POST",
            _ => "GET",
        }
    }

    /// Whether this endpoint answers `method` (405 otherwise).
    pub fn allows(&self, method: &str) -> bool {
        match self {
            Endpoint::Publish => method == "POST",
            // Navixy-style calls take their parameters by GET or POST.
            Endpoint::User(_) => method == "GET" || method == "POST",
            // Health checks and the page answer HEAD too (load balancers probe with it).
            Endpoint::Healthz | Endpoint::Readyz | Endpoint::Asset(_) => {
                method == "GET" || method == "HEAD"
            }
            _ => method == "GET",
        }
    }
}

/// Decodes the `%XX` escapes of a path segment (`+` stays `+` in a path).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The parts of a request head the broker uses.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub authorization: Option<String>,
    pub content_length: Option<usize>,
    pub chunked: bool,
    /// The `Origin` header: sent by browsers (`crate::origin`).
    pub origin: Option<String>,
    /// `Access-Control-Request-Method`: an `OPTIONS` request with it is a CORS preflight.
    pub cors_request_method: Option<String>,
    /// Every `Sec-WebSocket-Extensions` value, joined with commas (the offers, in order).
    pub extensions: Option<String>,
}

impl Request {
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The bearer credential of an `Authorization` header, if any.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.authorization.as_deref()?.trim();
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// Not a full head yet; read more.
    Partial,
    /// A full head of this many bytes.
    Complete(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head too large")]
    TooLarge,
    #[error("malformed request")]
    Malformed,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::Malformed => 400,
        }
    }
}

const MAX_HEADERS: usize = 32;

/// Parses the request head at the start of `buf`.
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<(Head, Request), HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let len = match status {
        httparse::Status::Partial if buf.len() >= max_head => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok((Head::Partial, Request::default())),
        httparse::Status::Complete(n) if n > max_head => return Err(HeadError::TooLarge),
        httparse::Status::Complete(n) => n,
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect(),
        ..Request::default()
    };
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HeadError::Malformed)?;
        let has_token = |t: &str| value.split(',').any(|p| p.trim().eq_ignore_ascii_case(t));
        match h.name.to_ascii_lowercase().as_str() {
            "upgrade" => out.upgrade_websocket = has_token("websocket"),
            "connection" => out.connection_upgrade = has_token("upgrade"),
            "sec-websocket-key" => out.ws_key = Some(value.trim().to_string()),
            "sec-websocket-version" => out.ws_version = Some(value.trim().to_string()),
            "authorization" if out.authorization.is_some() => return Err(HeadError::Malformed),
            "authorization" => out.authorization = Some(value.to_string()),
            // A repeated length (or credential) is how requests are smuggled past a
            // proxy that reads the other one: refused (RFC 9112 section 6.3).
            "content-length" if out.content_length.is_some() => return Err(HeadError::Malformed),
            "content-length" => {
                let v = value.trim();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HeadError::Malformed);
                }
                out.content_length = Some(v.parse().map_err(|_| HeadError::Malformed)?)
            }
            "transfer-encoding" => out.chunked = has_token("chunked"),
            // Two origins cannot both be checked against the allow-list: refused.
            "origin" if out.origin.is_some() => return Err(HeadError::Malformed),
            "origin" => out.origin = Some(value.trim().to_string()),
            "sec-websocket-extensions" => match &mut out.extensions {
                Some(all) => {
                    all.push(',');
                    all.push_str(value);
                }
                None => out.extensions = Some(value.to_string()),
            },
            "access-control-request-method" => {
                out.cors_request_method = Some(value.trim().to_string())
            }
            _ => {}
        }
    }
    if out.chunked && out.content_length.is_some() {
        return Err(HeadError::Malformed);
    }
    Ok((Head::Complete(len), out))
}

/// A complete HTTP/1.1 response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    response_full(status, content_type, "", body, 1)
}

/// The same with extra header lines (each ending with CRLF), such as CORS headers.
pub fn response_with_headers(status: u16, content_type: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    response_full(status, content_type, extra, body, 1)
}

/// [`response`], with `Retry-After: retry_after_secs` on a 429 or 503.
pub fn response_retry(
    status: u16,
    content_type: &str,
    body: &[u8],
    retry_after_secs: u64,
) -> Vec<u8> {
    response_full(status, content_type, "", body, retry_after_secs)
}

fn response_full(
    status: u16,
    content_type: &str,
    extra: &str,
    body: &[u8],
    retry_after_secs: u64,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}",
        reason(status),
        body.len()
    );
    if status == 426 {
        out.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n");
    }
    // Every refusal for load or rate says when to try again at the earliest (RFC 9110
    // §10.2.3); a client backs off further if it is refused again.
    if status == 429 || status == 503 {
        out.push_str(&format!("Retry-After: {}\r\n", retry_after_secs.max(1)));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A response to `HEAD`: the headers of `response`, without its body.
pub fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// A JSON error body: `{"error":{"code":..,"message":..}}`.
pub fn json_error_body(status: u16, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + message.len());
    body.extend_from_slice(b"{\"error\":{\"code\":");
    crate::json::write_u64(&mut body, status as u64);
    body.extend_from_slice(b",\"message\":");
    crate::json::write_str(&mut body, message);
    body.extend_from_slice(b"}}");
    body
}

/// The 101 answer to a valid upgrade.
pub fn switching_protocols(ws_key: &str) -> Vec<u8> {
    switching_protocols_with(ws_key, false)
}

/// The 101 answer, accepting permessage-deflate when `deflate` (see `super::deflate`).
pub fn switching_protocols_with(ws_key: &str, deflate: bool) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    let ext = if deflate {
        super::deflate::RESPONSE_HEADER
    } else {
        ""
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}\r\n"
    )
    .into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        202 => "Accepted",
        204 => "No Content",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        assert_eq!(Endpoint::classify("/healthz"), Endpoint::Healthz);
        assert_eq!(
            Endpoint::classify("/v1/streaming/websocket"),
            Endpoint::Native(Scope::None)
        );
        assert_eq!(
            Endpoint::classify("/v1/streaming/websocket/fleet/fleet_001"),
            Endpoint::Native(Scope::Fleet("fleet_001".into()))
        );
        assert_eq!(
            Endpoint::classify("/v1/streaming/websocket/vehicle/v%201/"),
            Endpoint::Native(Scope::Vehicle("v 1".into()))
        );
        assert_eq!(
            Endpoint::classify("/v1/streaming/websocket/trip/t9"),
            Endpoint::Native(Scope::Trip("t9".into()))
        );
        assert_eq!(
            Endpoint::classify("/v2/user/auth"),
            Endpoint::User(crate::sessions::UserCall::Auth)
        );
        assert!(Endpoint::classify("/user/logout/").allows("POST"));
        assert!(!Endpoint::classify("/user/auth").allows("PUT"));
        assert!(!Endpoint::Publish.allows("GET") && !Endpoint::Healthz.allows("POST"));
        // The dashboard (src/dashboard.rs) and health checks answer HEAD.
        assert!(matches!(Endpoint::classify("/"), Endpoint::Asset(_)));
        assert!(Endpoint::classify("/").allows("HEAD") && Endpoint::Readyz.allows("HEAD"));
        assert!(!Endpoint::classify("/metrics").allows("HEAD"));
        assert_eq!(
            head_only(response(200, "text/plain", b"ok\n")),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        for p in [
            "/favicon.ico",
            "/v1/streaming/websocketx",
            "/v1/streaming/websocket/fleet/",
            "/v1/streaming/websocket/car/1",
            "/v1/streaming/websocket/fleet/a/b",
        ] {
            assert_eq!(Endpoint::classify(p), Endpoint::NotFound, "{p}");
        }
    }

    #[test]
    fn parses_upgrade_with_query_and_bearer() {
        let raw = b"GET /v1/streaming/websocket?api_key=k%2B1&fleet_id=fleet_001 HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer abc\r\n\r\nextra";
        let (head, req) = parse_request(raw, 8192).unwrap();
        assert_eq!(head, Head::Complete(raw.len() - 5));
        assert!(req.upgrade_websocket && req.connection_upgrade);
        assert_eq!(req.query_param("api_key"), Some("k+1"));
        assert_eq!(req.bearer(), Some("abc"));
        let resp = String::from_utf8(switching_protocols(req.ws_key.as_deref().unwrap())).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn origin_and_preflight_headers() {
        let raw = b"OPTIONS /v1/publish HTTP/1.1\r\nOrigin:  https://a.example \r\nAccess-Control-Request-Method: POST\r\n\r\n";
        let (_, req) = parse_request(raw, 8192).unwrap();
        assert_eq!(req.origin.as_deref(), Some("https://a.example"));
        assert_eq!(req.cors_request_method.as_deref(), Some("POST"));
        let twice =
            b"GET / HTTP/1.1\r\nOrigin: https://a.example\r\nOrigin: https://b.example\r\n\r\n";
        assert_eq!(
            parse_request(twice, 8192).unwrap_err(),
            HeadError::Malformed
        );
        let r = String::from_utf8(response_with_headers(
            204,
            "text/plain",
            "Vary: Origin\r\n",
            b"",
        ))
        .unwrap();
        assert!(
            r.starts_with("HTTP/1.1 204 No Content\r\n") && r.contains("\r\nVary: Origin\r\n\r\n"),
            "{r}"
        );
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost:", 8192).unwrap().0,
            Head::Partial
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(
            parse_request(big.as_bytes(), 8192).unwrap_err(),
            HeadError::TooLarge
        );
        assert_eq!(
            parse_request(b"\x00\x01garbage\r\n\r\n", 8192).unwrap_err(),
            HeadError::Malformed
        );
    }
}
