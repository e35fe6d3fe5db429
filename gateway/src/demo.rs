//! The demo app at `/demo`: static files from one folder (the TypeScript SDK's demo,
//! `clients/typescript/demo`, built), served only when a folder is given
//! (`ultrasync dev` does). Plain files, no directory listing, nothing outside the
//! folder: a path with `..`, a hidden segment or a backslash is not found.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::AppState;

/// The routes under `/demo`, serving files from `dir`.
pub fn routes(dir: &Path) -> Router<Arc<AppState>> {
    let dir = Arc::new(dir.to_path_buf());
    let files = {
        let dir = dir.clone();
        move |_: State<Arc<AppState>>, uri: Uri| serve(dir.clone(), uri)
    };
    Router::new()
        .route("/demo", get(|| async { Redirect::permanent("/demo/") }))
        .route("/demo/", get(files.clone()))
        .route("/demo/{*path}", get(files))
}

/// The file under `dir` that a request path names, if it is a plain relative path.
fn resolve(dir: &Path, request_path: &str) -> Option<PathBuf> {
    // `/demo` or `/demo/…`, one slash: `/demo//etc/passwd` has an empty segment and
    // `/demoX` is another route.
    let rest = request_path.strip_prefix("/demo")?;
    let rel = match rest {
        "" => "",
        r => r.strip_prefix('/')?,
    };
    let rel = if rel.is_empty() || rel.ends_with('/') {
        format!("{rel}index.html")
    } else {
        rel.to_owned()
    };
    let mut path = dir.to_path_buf();
    for segment in rel.split('/') {
        if segment.is_empty() || segment.starts_with('.') || segment.contains('\\') {
            return None;
        }
        path.push(segment);
    }
    Some(path)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        _ => "text/plain; charset=utf-8",
    }
}

async fn serve(dir: Arc<PathBuf>, uri: Uri) -> Response {
    let Some(path) = resolve(&dir, uri.path()) else {
        return (StatusCode::NOT_FOUND, "no such demo file").into_response();
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type(&path)),
                // A rebuilt demo shows on the next reload.
                (header::CACHE_CONTROL, "no-cache"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such demo file").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_inside_the_folder_resolve() {
        let dir = Path::new("/srv/demo");
        assert_eq!(
            resolve(dir, "/demo/"),
            Some(PathBuf::from("/srv/demo/index.html"))
        );
        assert_eq!(
            resolve(dir, "/demo/dist/app.js"),
            Some(PathBuf::from("/srv/demo/dist/app.js"))
        );
        for bad in [
            "/demo/../secret",
            "/demo/dist/../../x",
            "/demo/.env",
            "/demo//etc/passwd",
            "/demo/a\\b",
            "/other",
        ] {
            assert_eq!(resolve(dir, bad), None, "{bad}");
        }
        assert_eq!(
            content_type(Path::new("a.js")),
            "text/javascript; charset=utf-8"
        );
    }
}
