//! OAuth scopes, checked per route: each group of routes in [`app`](crate::app)
//! carries a [`require`] layer naming the one scope it needs. The check runs after
//! authentication and before the handler — before the body is read, a limit counted or
//! anything held — so a refused request costs nothing. Refusal: 403 `insufficient_scope`
//! with `WWW-Authenticate: Bearer error="insufficient_scope", scope="…"` (RFC 6750 §3.1).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::authenticate::Principal;
use crate::error::ApiError;

/// A scope a route can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: spends credits.
    LlmInference,
    /// `GET /v1/models`, `GET /v1/models/{id}`.
    ModelsRead,
    /// `GET /v1/credits`, `GET /v1/usage`.
    CreditsRead,
    /// `GET /v1/users/me`, `GET|PUT /v1/users/me/preferences`.
    UserInfo,
}

impl Scope {
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::LlmInference => "llm.inference",
            Scope::ModelsRead => "models.read",
            Scope::CreditsRead => "credits.read",
            Scope::UserInfo => "user.info",
        }
    }
}

/// Whether a token's `scope` claim (space-separated values, RFC 6749 §3.3) grants
/// `required`: whole values only, compared exactly.
pub fn grants(scope: &str, required: Scope) -> bool {
    scope.split(' ').any(|s| s == required.as_str())
}

/// Route middleware: refuses a principal whose token lacks the route's scope. Use as
/// `.route_layer(from_fn_with_state(Scope::…, scope::require))`.
pub async fn require(State(required): State<Scope>, req: Request, next: Next) -> Response {
    let granted = req
        .extensions()
        .get::<Principal>()
        .is_some_and(|p| grants(&p.scope, required));
    if granted {
        next.run(req).await
    } else {
        // No principal cannot happen behind `authenticate`; it is refused all the same.
        ApiError::InsufficientScope {
            scope: required.as_str(),
        }
        .into_response()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::routing::post;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn principal(scope: &str) -> Principal {
        Principal {
            user_id: uuid::Uuid::nil(),
            client_id: "c".into(),
            scope: scope.into(),
            session: None,
        }
    }

    /// A route that counts the calls that reach its handler.
    fn app(reached: Arc<AtomicUsize>) -> Router {
        Router::new()
            .route(
                "/x",
                post(move |body: String| async move {
                    reached.fetch_add(1, Ordering::SeqCst);
                    body
                }),
            )
            .route_layer(axum::middleware::from_fn_with_state(
                Scope::LlmInference,
                require,
            ))
    }

    async fn call(app: Router, p: Option<Principal>) -> Response {
        let mut req = Request::post("/x")
            .body(axum::body::Body::from("hi"))
            .unwrap();
        if let Some(p) = p {
            req.extensions_mut().insert(p);
        }
        app.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn a_missing_scope_is_refused_before_the_handler() {
        let reached = Arc::new(AtomicUsize::new(0));
        for p in [None, Some(principal("openid llm.inferencex"))] {
            let resp = call(app(reached.clone()), p).await;
            assert_eq!(resp.status(), http::StatusCode::FORBIDDEN);
            assert_eq!(
                resp.headers()[http::header::WWW_AUTHENTICATE],
                "Bearer error=\"insufficient_scope\", scope=\"llm.inference\""
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["code"], "insufficient_scope");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(v["error"]["param"].is_null());
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("llm.inference"));
        }
        assert_eq!(reached.load(Ordering::SeqCst), 0);
        let resp = call(app(reached.clone()), Some(principal("llm.inference"))).await;
        assert_eq!(resp.status(), http::StatusCode::OK);
        assert_eq!(reached.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn whole_values_only() {
        let s = "openid llm.inference models.read";
        assert!(grants(s, Scope::LlmInference));
        assert!(grants(s, Scope::ModelsRead));
        assert!(!grants(s, Scope::CreditsRead));
        assert!(!grants("llm.inferencex", Scope::LlmInference));
        assert!(!grants("xllm.inference", Scope::LlmInference));
        assert!(!grants("llm.inference.extra", Scope::LlmInference));
        assert!(!grants("LLM.INFERENCE", Scope::LlmInference));
        assert!(!grants("llm inference", Scope::LlmInference));
        assert!(!grants("", Scope::UserInfo));
        assert!(grants("user.info", Scope::UserInfo));
        assert!(grants("  credits.read  ", Scope::CreditsRead));
    }
}
