//! The dashboard: one page and its assets, embedded in the binary at build time (no
//! file system, nothing fetched from the internet). `GET /` serves it; it signs in with
//! an API key or token and speaks the native dialect like any client (assets/dashboard/).

/// One embedded file.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
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
