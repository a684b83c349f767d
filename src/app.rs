//! The HTTP application: its routes and their middleware, nothing else. Two routers,
//! merged:
//!
//! - **public**: ops (`/health`, `/livez`, `/readyz`, `/metrics`) and the OAuth
//!   authorization server's routes — no token;
//! - **authenticated**: everything else, including the fallbacks (an unknown path or
//!   method asks for a token first, so it reveals nothing without one). Its
//!   [`authenticate`] layer verifies the bearer JWT locally (stage 2); each group of
//!   its routes then requires one OAuth [`scope`](crate::scope), before its handler
//!   reads the body.
//!
//! Around both: a request id (UUIDv7, returned as `x-request-id` on every response;
//! the key of the hold, the settle and the `usage_history` row) and the request
//! metrics. The stages a model request then goes through are listed in
//! ARCHITECTURE.md ("Follow one request").

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderValue};
use uuid::Uuid;

use crate::error::ApiError;
use crate::scope::Scope;
use crate::state::{AppState, RequestId};
use crate::{account, endpoints, ops, telemetry};

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(public())
        .merge(authenticated(state.clone()))
        .layer(axum::middleware::from_fn(telemetry::track))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

/// Routes reachable without a token.
fn public() -> Router<AppState> {
    Router::new()
        .route("/health", get(ops::health))
        .route("/livez", get(ops::livez))
        .route("/metrics", get(telemetry::render))
        .route("/readyz", get(ops::readyz))
        .merge(crate::oauth::routes())
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

/// Routes that require a valid access token, each group one scope.
fn authenticated(state: AppState) -> Router<AppState> {
    let need = |s: Scope| axum::middleware::from_fn_with_state(s, crate::scope::require);
    let inference = Router::new()
        .route("/v1/chat/completions", post(endpoints::chat_completions))
        .route("/v1/completions", post(endpoints::completions))
        .route("/v1/embeddings", post(endpoints::embeddings))
        .route_layer(need(Scope::LlmInference));
    let models = Router::new()
        .route("/v1/models", get(endpoints::list_models))
        .route("/v1/models/{id}", get(endpoints::get_model))
        .route_layer(need(Scope::ModelsRead));
    let credits = Router::new()
        .route("/v1/credits", get(account::credits))
        .route("/v1/usage", get(account::usage))
        .route_layer(need(Scope::CreditsRead));
    let user = Router::new()
        .route("/v1/users/me", get(account::me))
        .route(
            "/v1/users/me/preferences",
            get(account::get_preferences).put(account::put_preferences),
        )
        .route_layer(need(Scope::UserInfo));
    Router::new()
        .merge(inference)
        .merge(models)
        .merge(credits)
        .merge(user)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // After the fallbacks: they are authenticated too.
        .layer(axum::middleware::from_fn_with_state(state, authenticate))
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = Uuid::now_v7();
    req.extensions_mut().insert(RequestId(id));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Stage 2: the bearer JWT, verified locally; the [`Principal`](crate::authenticate::Principal)
/// goes into the request's extensions for the scope check and the handler.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match state
        .auth
        .verify_header_async(req.headers().get(header::AUTHORIZATION))
        .await
    {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}
