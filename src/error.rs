//! The one error type of the request path, and the one place that turns it into an
//! OpenAI-shaped response: `{"error":{"message","type","param","code"}}` (or, for the
//! OAuth endpoints' [`OAuthError`], RFC 6749's shape). It sits at the bottom of the
//! module layers: the modules whose errors answer 503 (`db`, `ledger`) hold their own
//! `From` conversions into [`ApiError`].

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

#[derive(Debug)]
pub enum ApiError {
    /// No bearer token, or one that does not verify. Carries the RFC 6750 error code.
    Unauthenticated {
        code: &'static str,
        message: String,
    },
    /// The token is valid but lacks the scope the route requires (RFC 6750 §3.1).
    InsufficientScope {
        scope: &'static str,
    },
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    BodyTooLarge {
        limit: usize,
    },
    ModelNotFound {
        model: String,
    },
    NotFound,
    MethodNotAllowed,
    InsufficientQuota,
    /// The user's subscription is expired or suspended.
    SubscriptionInactive,
    /// A per-minute limit of the user's tier; `retry_after` is `None` when the request
    /// is larger than the whole limit (it can never pass).
    RateLimited {
        message: String,
        retry_after: Option<u64>,
    },
    /// The provider of this model is not wired yet.
    ProviderNotImplemented {
        provider: String,
    },
    /// The provider answered with an error of its own (status and OpenAI-shaped body passed on).
    Upstream {
        status: StatusCode,
        body: bytes::Bytes,
    },
    /// The provider is rate-limiting the gateway (its own 429): retry later.
    UpstreamBusy {
        retry_after: Option<http::HeaderValue>,
    },
    /// The provider could not be reached or answered garbage.
    BadGateway {
        message: String,
    },
    /// The request was sent and the provider did not answer in time (it may still be
    /// running it, so it is not retried).
    UpstreamTimeout {
        message: String,
    },
    /// Redis or PostgreSQL is unavailable.
    Unavailable {
        message: String,
    },
    /// The provider answered, but its usage could not be recorded yet (the ledger and
    /// PostgreSQL both failed): it will be charged once they are back, so a retry would
    /// pay twice (`x-should-retry: false`).
    UsageNotRecorded,
    Internal {
        message: String,
    },
    /// An OAuth token or revocation endpoint error, rendered per RFC 6749 §5.2.
    OAuth(OAuthError),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            ApiError::InsufficientScope { .. } => StatusCode::FORBIDDEN,
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ModelNotFound { .. } | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::SubscriptionInactive => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InsufficientQuota | ApiError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::ProviderNotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            ApiError::Upstream { status, .. } => *status,
            ApiError::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unavailable { .. } | ApiError::UsageNotRecorded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::OAuth(e) => e.status_code(),
        }
    }

    /// A low-cardinality label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated { .. } => "unauthenticated",
            ApiError::InsufficientScope { .. } => "insufficient_scope",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InsufficientQuota => "insufficient_quota",
            ApiError::SubscriptionInactive => "subscription_inactive",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::ProviderNotImplemented { .. } => "provider_not_implemented",
            ApiError::Upstream { .. } => "upstream_status",
            ApiError::BadGateway { .. } => "bad_gateway",
            ApiError::UpstreamTimeout { .. } => "upstream_timeout",
            ApiError::UpstreamBusy { .. } => "upstream_busy",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::UsageNotRecorded => "usage_not_recorded",
            ApiError::Internal { .. } => "internal",
            ApiError::OAuth(_) => "oauth",
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn unavailable(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "{what} unavailable");
        ApiError::Unavailable {
            message: format!("{what} is temporarily unavailable; retry shortly"),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError::Internal {
            message: "internal error".into(),
        }
    }

    /// (message, type, param, code)
    fn parts(
        &self,
    ) -> (
        String,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    ) {
        match self {
            ApiError::Unauthenticated { code, message } => (
                message.clone(),
                "invalid_request_error",
                None,
                Some(if *code == "invalid_token" {
                    "invalid_api_key"
                } else {
                    "missing_api_key"
                }),
            ),
            ApiError::InsufficientScope { scope } => (
                format!("The access token lacks the `{scope}` scope this endpoint requires."),
                "invalid_request_error",
                None,
                Some("insufficient_scope"),
            ),
            ApiError::InvalidRequest { message, param } => {
                (message.clone(), "invalid_request_error", *param, None)
            }
            ApiError::BodyTooLarge { limit } => (
                format!("request body is larger than the {limit}-byte limit"),
                "invalid_request_error",
                None,
                Some("request_too_large"),
            ),
            ApiError::ModelNotFound { model } => (
                format!("The model `{model}` does not exist or you do not have access to it."),
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            ApiError::NotFound => (
                "unknown URL".into(),
                "invalid_request_error",
                None,
                Some("unknown_url"),
            ),
            ApiError::MethodNotAllowed => (
                "method not allowed for this URL".into(),
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
            ),
            ApiError::InsufficientQuota => (
                "You exceeded your current quota: your credit balance does not cover this request."
                    .into(),
                "insufficient_quota",
                None,
                Some("insufficient_quota"),
            ),
            ApiError::SubscriptionInactive => (
                "Your subscription is not active (expired or suspended): renew it to make requests."
                    .into(),
                "permission_error",
                None,
                Some("subscription_inactive"),
            ),
            ApiError::RateLimited { message, .. } => (
                message.clone(),
                "requests",
                None,
                Some("rate_limit_exceeded"),
            ),
            ApiError::ProviderNotImplemented { provider } => (
                format!("models of provider `{provider}` are not served yet"),
                "invalid_request_error",
                Some("model"),
                Some("provider_not_implemented"),
            ),
            ApiError::Upstream { status, .. } => (
                format!("upstream provider answered {status}"),
                "upstream_error",
                None,
                None,
            ),
            ApiError::BadGateway { message } => {
                (message.clone(), "upstream_error", None, Some("bad_gateway"))
            }
            ApiError::UpstreamTimeout { message } => (
                message.clone(),
                "upstream_error",
                None,
                Some("upstream_timeout"),
            ),
            ApiError::UpstreamBusy { .. } => (
                "The upstream provider is busy; retry after the time in `retry-after`.".into(),
                "server_error",
                None,
                Some("upstream_rate_limited"),
            ),
            ApiError::Unavailable { message } => (
                message.clone(),
                "server_error",
                None,
                Some("service_unavailable"),
            ),
            ApiError::UsageNotRecorded => (
                "The provider answered, but the usage could not be recorded; it will be charged when the ledger is back. Do not retry: a retry would be charged again."
                    .into(),
                "server_error",
                None,
                Some("usage_not_recorded"),
            ),
            ApiError::Internal { message } => (message.clone(), "server_error", None, None),
            ApiError::OAuth(e) => (e.description.clone(), "invalid_request_error", None, None),
        }
    }
}

/// An OpenAI-shaped error body.
pub fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> bytes::Bytes {
    let v = serde_json::json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    bytes::Bytes::from(v.to_string())
}

/// An error of the token or revocation endpoint, rendered per RFC 6749 §5.2:
/// `{"error": code, "error_description": text}`.
#[derive(Debug)]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            error,
            description: description.into(),
        }
    }

    pub fn invalid_request(d: impl Into<String>) -> OAuthError {
        Self::new("invalid_request", d)
    }

    pub fn invalid_grant(d: impl Into<String>) -> OAuthError {
        Self::new("invalid_grant", d)
    }

    pub fn invalid_client(d: impl Into<String>) -> OAuthError {
        Self::new("invalid_client", d)
    }

    pub fn status_code(&self) -> StatusCode {
        match self.error {
            "invalid_client" => StatusCode::UNAUTHORIZED,
            "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
            "temporarily_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn body(&self) -> bytes::Bytes {
        bytes::Bytes::from(
            serde_json::json!({"error": self.error, "error_description": self.description})
                .to_string(),
        )
    }

    /// Headers every §5.2 answer carries (and `WWW-Authenticate` for a failed client,
    /// `Retry-After` for a temporarily unavailable server).
    pub fn add_headers(&self, h: &mut http::HeaderMap) {
        no_store(h);
        match self.error {
            "invalid_client" => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"tollgate\""),
                );
            }
            "temporarily_unavailable" => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
    }
}

impl From<OAuthError> for ApiError {
    fn from(e: OAuthError) -> Self {
        ApiError::OAuth(e)
    }
}

/// `Cache-Control: no-store` and `Pragma: no-cache` (tokens, codes, sign-in pages).
pub fn no_store(h: &mut http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("tollgate_errors_total", "error" => self.label()).increment(1);
        let status = self.status_code();
        let body = match &self {
            // The provider's own OpenAI-shaped body is passed on when it is one.
            ApiError::Upstream { body, .. }
                if serde_json::from_slice::<serde_json::Value>(body)
                    .map(|v| v.get("error").is_some())
                    .unwrap_or(false) =>
            {
                body.clone()
            }
            ApiError::OAuth(e) => e.body(),
            _ => {
                let (message, kind, param, code) = self.parts();
                error_body(&message, kind, param, code)
            }
        };
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            ApiError::Unauthenticated { code, .. } => {
                // RFC 6750 §3: no error code when no credentials were sent.
                let v = match *code {
                    "invalid_token" => HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    "invalid_request" => {
                        HeaderValue::from_static("Bearer error=\"invalid_request\"")
                    }
                    _ => HeaderValue::from_static("Bearer"),
                };
                h.insert(header::WWW_AUTHENTICATE, v);
            }
            ApiError::InsufficientScope { scope } => {
                let v = format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\"");
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::InsufficientQuota
            | ApiError::SubscriptionInactive
            | ApiError::UsageNotRecorded
            | ApiError::RateLimited {
                retry_after: None, ..
            } => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            ApiError::RateLimited {
                retry_after: Some(secs),
                ..
            } => {
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    h.insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::UpstreamBusy { retry_after } => {
                h.insert(
                    header::RETRY_AFTER,
                    retry_after.clone().unwrap_or(HeaderValue::from_static("1")),
                );
            }
            ApiError::OAuth(e) => e.add_headers(h),
            _ => {}
        }
        resp
    }
}
