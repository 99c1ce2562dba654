//! The students' chat page at `/chat` (the dashboard at `/` is the teacher's).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /chat` | the page (bundled into the binary; works offline) |
//! | `GET /chat/{chat.js,stream.js,store.js,chat.css}` | its ES modules and style |
//!
//! The page itself only talks to the OpenAI-compatible routes of the same
//! node: `GET /v1/models` to pick a model, `POST /v1/chat/completions`
//! (streamed, `stream_options.include_usage`) to answer. Under each answer it
//! shows the node that answered (the `x-shoal-node` response header), how
//! much of the prompt came from the prefix cache
//! (`usage.prompt_tokens_details.cached_tokens` of `prompt_tokens`), the time
//! to first token and the decode rate. Conversations stay in the browser
//! (`localStorage`); an API key, when the node needs one, in `sessionStorage`.
//!
//! Every response carries a strict Content-Security-Policy ([`CSP`]): scripts,
//! styles and fetches from this origin only, no inline code, no frames. The
//! page never writes model text as HTML (`textContent` only).

use axum::Router;
use axum::routing::get;

/// The Content-Security-Policy of the page and its assets.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("chat/index.html");
const CHAT_JS: &str = include_str!("chat/chat.js");
const STREAM_JS: &str = include_str!("chat/stream.js");
const STORE_JS: &str = include_str!("chat/store.js");
const CHAT_CSS: &str = include_str!("chat/chat.css");

/// `(path, content type, body)` of every file of the page.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("/chat", "text/html; charset=utf-8", INDEX_HTML),
    ("/chat/chat.js", "text/javascript; charset=utf-8", CHAT_JS),
    (
        "/chat/stream.js",
        "text/javascript; charset=utf-8",
        STREAM_JS,
    ),
    ("/chat/store.js", "text/javascript; charset=utf-8", STORE_JS),
    ("/chat/chat.css", "text/css; charset=utf-8", CHAT_CSS),
];

/// The chat page's routes (no state of their own).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    // `/chat/` too, as people type it.
    super::static_files(ASSETS).route(
        "/chat/",
        get(|| async { super::static_file("text/html; charset=utf-8", INDEX_HTML) }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use axum::response::Response;
    use tower::ServiceExt;

    async fn get(path: &str) -> Response {
        routes::<()>()
            .oneshot(Request::get(path).body(Body::empty()).expect("a request"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn page_and_assets_have_their_type_and_a_strict_csp() {
        let mut paths: Vec<(&str, &str)> = ASSETS.iter().map(|a| (a.0, a.1)).collect();
        paths.push(("/chat/", "text/html; charset=utf-8"));
        for (path, ty) in paths {
            let r = get(path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], ty, "{path}");
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().expect("ascii");
            for part in [
                "default-src 'none'",
                "script-src 'self'",
                "connect-src 'self'",
                "frame-ancestors 'none'",
            ] {
                assert!(csp.contains(part), "{path}: {csp}");
            }
            assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            let body = axum::body::to_bytes(r.into_body(), 1 << 20)
                .await
                .expect("body");
            assert!(!body.is_empty(), "{path}");
        }
        assert_eq!(get("/chat/nope.js").await.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_has_no_inline_code_and_loads_only_its_own_files() {
        crate::api::check_static_page(
            INDEX_HTML,
            &[
                ("chat.js", CHAT_JS),
                ("stream.js", STREAM_JS),
                ("store.js", STORE_JS),
            ],
            ASSETS,
            "/chat/",
        );
        for (path, _, _) in ASSETS.iter().skip(1) {
            let file = path.trim_start_matches("/chat/");
            assert!(
                INDEX_HTML.contains(path) || CHAT_JS.contains(&format!("./{file}")),
                "{path} is served but never loaded"
            );
        }
    }
}
