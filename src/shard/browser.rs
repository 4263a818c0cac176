//! Browsers at the door: the `Origin` allow-list before a WebSocket upgrade, and CORS
//! for the HTTP API (`server.allowed_origins`, `crate::origin`).

use super::Shard;
use crate::wire::handshake::{Endpoint, Request};

impl Shard {
    /// Decides what a browser may do before the request is routed. Returns true when the
    /// request was answered here (403 for an origin not allowed, or a CORS preflight);
    /// otherwise it goes on, and an HTTP answer carries CORS headers for an allowed origin.
    pub(super) fn browser_gate(&mut self, slot: usize, req: &Request, endpoint: &Endpoint) -> bool {
        let shared = self.shared.clone();
        let origins = &shared.config.server.allowed_origins;
        let origin = req.origin.as_deref();
        if endpoint.is_websocket() {
            if origins.allows_upgrade(origin) {
                return false;
            }
            let message = format!(
                "origin {:?} is not allowed to connect (server.allowed_origins)",
                origin.unwrap_or_default()
            );
            self.http_error(slot, 403, &message);
            return true;
        }
        let Some(origin) = origin.filter(|o| origins.allows_cors(o)) else {
            if let (Some(o), "OPTIONS", Some(_)) =
                (origin, req.method.as_str(), &req.cors_request_method)
            {
                let message =
                    format!("origin {o:?} may not call this API (server.allowed_origins)");
                self.http_error(slot, 403, &message);
                return true;
            }
            return false;
        };
        if endpoint == &Endpoint::NotFound {
            return false;
        }
        if let ("OPTIONS", Some(method)) = (req.method.as_str(), &req.cors_request_method) {
            if !endpoint.allows(method) {
                self.http_error(slot, 405, "method not allowed");
                return true;
            }
            let headers = crate::origin::preflight_headers(origin, endpoint.methods());
            self.http_reply_with(slot, 204, "text/plain", &headers, b"");
            return true;
        }
        self.conns[slot].http_mut().cors = Some(origin.into());
        false
    }
}
