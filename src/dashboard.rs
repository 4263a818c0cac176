//! The dashboard: one page and its assets, embedded in the binary at build time (no
//! file system, nothing fetched from the internet). `GET /` serves it; it signs in with
//! an API key or token and speaks the native dialect like any client (assets/dashboard/).

/// `[dashboard]`: what the page may show besides the broker's own data.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// A map tile URL with `{z}`, `{x}` and `{y}` (Web Mercator tiles, as OpenStreetMap
    /// serves them) drawn under the fleet map. Off by default: fleetcast assumes no
    /// internet, and a tile server sees where the fleet is.
    pub tile_url: Option<String>,
    /// Shown in the map's corner when tiles are drawn (tile licences ask for it).
    pub tile_attribution: Option<String>,
}

impl DashboardConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(url) = &self.tile_url {
            let placeholders = ["{z}", "{x}", "{y}"].iter().all(|p| url.contains(p));
            let scheme = ["http://", "https://", "/"]
                .iter()
                .any(|s| url.starts_with(s));
            if !placeholders || !scheme {
                out.push(format!(
                    "dashboard.tile_url {url:?}: an http(s) URL (or a path) with {{z}}, {{x}} and {{y}}"
                ));
            }
        }
        out
    }

    /// `GET /dashboard/config.json`: the page's settings.
    pub fn json(&self) -> Vec<u8> {
        let mut o = b"{\"tile_url\":".to_vec();
        match &self.tile_url {
            Some(u) => crate::json::write_str(&mut o, u),
            None => o.extend_from_slice(b"null"),
        }
        o.extend_from_slice(b",\"tile_attribution\":");
        match &self.tile_attribution {
            Some(a) => crate::json::write_str(&mut o, a),
            None => o.extend_from_slice(b"null"),
        }
        o.push(b'}');
        o
    }
}

/// One embedded file.
#[derive(PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

impl std::fmt::Debug for Asset {
    /// Its type and size, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Asset({}, {} bytes)", self.content_type, self.body.len())
    }
}

static INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../assets/dashboard/index.html"),
};
static SCRIPT: Asset = Asset {
    content_type: "text/javascript; charset=utf-8",
    body: include_bytes!("../assets/dashboard/app.js"),
};
static STYLE: Asset = Asset {
    content_type: "text/css; charset=utf-8",
    body: include_bytes!("../assets/dashboard/style.css"),
};

/// The embedded file served at `path`, if any.
pub fn asset(path: &str) -> Option<&'static Asset> {
    match path {
        "/" | "/index.html" => Some(&INDEX),
        "/dashboard/app.js" => Some(&SCRIPT),
        "/dashboard/style.css" => Some(&STYLE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_urls_need_their_placeholders() {
        let ok = DashboardConfig {
            tile_url: Some("https://tiles.example/{z}/{x}/{y}.png".into()),
            tile_attribution: Some("© \"Example\"".into()),
        };
        assert!(ok.problems().is_empty());
        assert_eq!(
            String::from_utf8(ok.json()).unwrap(),
            r#"{"tile_url":"https://tiles.example/{z}/{x}/{y}.png","tile_attribution":"© \"Example\""}"#
        );
        let bad = DashboardConfig {
            tile_url: Some("ftp://tiles/{z}/{x}.png".into()),
            ..Default::default()
        };
        assert_eq!(bad.problems().len(), 1);
        assert_eq!(
            DashboardConfig::default().json(),
            br#"{"tile_url":null,"tile_attribution":null}"#
        );
    }

    #[test]
    fn the_page_names_only_embedded_assets() {
        let page = std::str::from_utf8(INDEX.body).unwrap();
        for src in ["/dashboard/app.js", "/dashboard/style.css"] {
            assert!(page.contains(src), "index.html does not load {src}");
            assert!(asset(src).is_some());
        }
        // Nothing from elsewhere: closed networks have no internet.
        assert!(!page.contains("http://") && !page.contains("https://"));
        let script = std::str::from_utf8(SCRIPT.body).unwrap();
        assert!(!script.contains("http://") && !script.contains("https://"));
    }
}
