//! A directory of the user's own static pages (`pages_dir`), served read-only under
//! `/pages/`: a form or a results page posts to `/ingest` and reads
//! `/topics/{topic}/stream` from the same origin, with no web server beside Freshet.
//!
//! Only regular files under the directory are served: a path with a `..`, a hidden
//! component (`.git`), a backslash or a NUL is refused, and a symbolic link that
//! leads outside the directory is not followed. A directory answers its
//! `index.html`; there are no listings. Files larger than `pages_max_file_bytes` get
//! `413`.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::Gateway;

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/pages", get(|| async { redirect() }))
        .route("/pages/", get(page))
        .route("/pages/{*path}", get(page))
}

fn redirect() -> Response {
    let mut response = axum::http::StatusCode::MOVED_PERMANENTLY.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/pages/"));
    response
}

/// The content type of a file, by its extension.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("txt" | "md" | "csv") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// The file `relative` names under `root`, or why not: `None` for a path that is not
/// a plain relative path of visible components.
pub(crate) fn resolve(root: &Path, relative: &str) -> Option<PathBuf> {
    if relative.contains(['\\', '\0']) {
        return None;
    }
    let mut path = root.to_path_buf();
    for part in relative.split('/').filter(|p| !p.is_empty()) {
        let mut components = Path::new(part).components();
        match (components.next(), components.next()) {
            (Some(Component::Normal(c)), None) if !part.starts_with('.') => path.push(c),
            _ => return None,
        }
    }
    Some(path)
}

async fn page(State(gateway): State<Arc<Gateway>>, uri: Uri) -> Result<Response, ApiError> {
    let Some(root) = gateway.config.pages_dir.clone() else {
        return Err(ApiError::not_found(
            0,
            "no pages are served here (set pages_dir)",
        ));
    };
    let max = gateway.config.pages_max_file_bytes;
    let relative = uri.path().trim_start_matches("/pages").to_string();
    let relative = percent_decode(&relative)
        .ok_or_else(|| ApiError::bad_request("the path is not valid percent-encoded UTF-8"))?;
    let not_found = || ApiError::not_found(0, format!("no page {}", uri.path()));
    let path = resolve(&root, &relative).ok_or_else(not_found)?;
    let read = tokio::task::spawn_blocking(move || -> Result<Option<(PathBuf, Vec<u8>)>, u64> {
        let (Ok(root), Ok(mut file)) = (root.canonicalize(), path.canonicalize()) else {
            return Ok(None);
        };
        if !file.starts_with(&root) {
            return Ok(None); // a link out of the directory
        }
        if file.is_dir() {
            file.push("index.html");
        }
        let Ok(meta) = std::fs::metadata(&file) else {
            return Ok(None);
        };
        if !meta.is_file() {
            return Ok(None);
        }
        if meta.len() > max {
            return Err(meta.len());
        }
        Ok(std::fs::read(&file).ok().map(|body| (file, body)))
    })
    .await
    .map_err(|e| ApiError::busy(e.to_string()))?;
    match read {
        Ok(Some((file, body))) => {
            let mut response = body.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&file)),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            Ok(response)
        }
        Ok(None) => Err(not_found()),
        Err(size) => Err(ApiError::too_large(format!(
            "{} is {size} bytes, over pages_max_file_bytes ({max})",
            uri.path()
        ))),
    }
}

/// `%XX` sequences decoded; None when they do not make UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_visible_paths_resolve() {
        let root = Path::new("/srv/pages");
        assert_eq!(
            resolve(root, "/form/index.html"),
            Some(PathBuf::from("/srv/pages/form/index.html"))
        );
        assert_eq!(resolve(root, "/"), Some(PathBuf::from("/srv/pages")));
        assert_eq!(
            resolve(root, "//a//b"),
            Some(PathBuf::from("/srv/pages/a/b"))
        );
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/.git/config",
            "/a/.env",
            "/a\\..\\b",
            "/a\0b",
            "/./a",
        ] {
            assert_eq!(resolve(root, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/a%20b.html").as_deref(), Some("/a b.html"));
        assert_eq!(percent_decode("/%2e%2e/x").as_deref(), Some("/../x"));
        assert_eq!(percent_decode("/%zz"), None);
        assert_eq!(percent_decode("/%ff"), None);
        assert_eq!(percent_decode("/%4"), None);
    }

    proptest::proptest! {
        /// Whatever the path, what resolves stays under the root and has no `..`.
        #[test]
        fn resolved_paths_stay_under_the_root(path in "[a-z./\\\\%0-9]{0,40}") {
            let root = Path::new("/srv/pages");
            if let Some(p) = percent_decode(&path).and_then(|d| resolve(root, &d)) {
                proptest::prop_assert!(p.starts_with(root));
                proptest::prop_assert!(!p.components().any(|c| c == Component::ParentDir));
            }
        }
    }
}
