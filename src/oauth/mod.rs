//! The OAuth 2.0 authorization server the desktop app signs in with: authorization
//! code + PKCE (S256 only) with a server-rendered sign-in page, rotating refresh tokens,
//! revocation, metadata and the JWKS. It runs beside the request path, never on it:
//! the only thing the request path consults is the in-memory [`Revocations`] set.
//!
//! Standards followed: RFC 6749 (errors per §4.1.2.1 and §5.2), RFC 7636 (PKCE),
//! RFC 8252 (native apps: loopback redirects on any port), RFC 9700 (security BCP),
//! RFC 9068 (JWT access tokens), RFC 7009 (revocation), RFC 8414 (metadata),
//! RFC 9207 (`iss` on the authorization response).

pub mod authorize;
pub mod clients;
pub mod revocation;
pub mod throttle;
pub mod token;

use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, StatusCode};

pub use revocation::Revocations;

pub use crate::authenticate::external;
pub use crate::error::{no_store, OAuthError};
pub use crate::password;

use crate::state::AppState;

/// The routes of the authorization server (public: no token).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/oauth/authorize",
            get(authorize::show).post(authorize::submit),
        )
        .route("/oauth/token", post(token::token))
        .route("/oauth/revoke", post(token::revoke))
        .route(
            "/.well-known/oauth-authorization-server",
            get(token::metadata),
        )
        .route("/.well-known/jwks.json", get(token::jwks))
}

/// The peer address of the connection a request came on (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// `n` random bytes, base64url without padding.
pub fn random_token(n: usize) -> Result<String, crate::error::ApiError> {
    let mut buf = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| crate::error::ApiError::internal("rng"))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// SHA-256 of a secret: what is stored for codes and refresh tokens.
pub fn sha256(s: &str) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes())
        .as_ref()
        .to_vec()
}

/// Constant-time comparison.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// Form or query parameters, each at most once (RFC 6749 §3.1); empty values count
/// as absent.
pub struct Params(Vec<(String, String)>);

/// A parameter given more than once: refused as `invalid_request`.
#[derive(Debug, thiserror::Error)]
#[error("the parameter `{0}` is repeated")]
pub struct RepeatedParameter(pub String);

impl From<RepeatedParameter> for OAuthError {
    fn from(e: RepeatedParameter) -> OAuthError {
        OAuthError::invalid_request(e.to_string())
    }
}

impl Params {
    pub fn parse(pairs: Vec<(String, String)>) -> Result<Params, RepeatedParameter> {
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &pairs {
            if !seen.insert(k.as_str()) {
                return Err(RepeatedParameter(k.clone()));
            }
        }
        Ok(Params(pairs))
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, v)| key == k && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }
}

/// A JSON answer with `no-store`.
pub fn json_no_store(v: &serde_json::Value) -> Response {
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response();
    no_store(r.headers_mut());
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn repeated_parameters_are_refused() {
        let p = |v: &[(&str, &str)]| {
            Params::parse(
                v.iter()
                    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                    .collect(),
            )
        };
        assert!(p(&[("a", "1"), ("a", "2")]).is_err());
        let ok = p(&[("a", "1"), ("b", "")]).unwrap();
        assert_eq!(ok.get("a"), Some("1"));
        assert_eq!(ok.get("b"), None);
    }

    #[test]
    fn random_tokens_carry_256_bits() {
        let t = random_token(32).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&t).unwrap().len(), 32);
        assert_ne!(t, random_token(32).unwrap());
    }
}
