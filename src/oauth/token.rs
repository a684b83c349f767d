//! `POST /oauth/token` (authorization code with PKCE S256, refresh token with
//! rotation), `POST /oauth/revoke` (RFC 7009), the RFC 8414 metadata and the JWKS.
//!
//! Refresh tokens are opaque random strings stored as SHA-256 hashes. Every use
//! rotates the token; presenting a rotated token again revokes its whole family (the
//! sign-in), as does redeeming an authorization code twice. Revoked families are also
//! refused on the request path through [`Revocations`](super::Revocations).

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http::{header, HeaderMap, StatusCode};
use uuid::Uuid;

use super::clients::{self, Client};
use super::{ct_eq, json_no_store, no_store, password, random_token, sha256, OAuthError, Params};
use crate::error::ApiError;
use crate::state::AppState;

type Result<T> = std::result::Result<T, ApiError>;

fn db_unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "oauth: database unavailable");
    OAuthError::new(
        "temporarily_unavailable",
        "the authorization server is temporarily unavailable; retry shortly",
    )
    .into()
}

fn form_params(
    form: std::result::Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Params> {
    let Form(pairs) = form.map_err(|e| {
        OAuthError::invalid_request(format!(
            "the body must be application/x-www-form-urlencoded ({e})"
        ))
    })?;
    Ok(Params::parse(pairs).map_err(OAuthError::from)?)
}

/// Client authentication (RFC 6749 §2.3): public clients send `client_id`; clients with
/// a secret send it by HTTP Basic or `client_secret`.
async fn authenticate_client(state: &AppState, headers: &HeaderMap, p: &Params) -> Result<Client> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .map(|b| {
            STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|s| s.split_once(':').map(|(a, b)| (a.to_owned(), b.to_owned())))
                .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))
        })
        .transpose()?;
    let (client_id, secret) = match (&basic, p.get("client_id")) {
        (Some((id, _)), Some(body)) if id != body => {
            return Err(
                OAuthError::invalid_request("client_id differs from the Basic credentials").into(),
            )
        }
        (Some((id, s)), _) => (id.clone(), Some(s.clone())),
        (None, Some(id)) => (id.to_owned(), p.get("client_secret").map(str::to_owned)),
        (None, None) => return Err(OAuthError::invalid_client("client_id is required").into()),
    };
    let client = clients::find(&state.db, &client_id)
        .await
        .map_err(db_unavailable)?
        .ok_or_else(|| OAuthError::invalid_client("unknown or inactive client"))?;
    if let Some(hash) = client.secret_hash.clone() {
        let Some(secret) = secret else {
            return Err(OAuthError::invalid_client("client authentication is required").into());
        };
        let ok = state
            .hashers
            .run(password::Purpose::ClientSecret, move || {
                password::verify(&secret, &hash)
            })
            .await
            .map_err(|e| match e {
                password::HashError::Busy => ApiError::from(OAuthError::new(
                    "temporarily_unavailable",
                    "too many client authentications are in progress; retry shortly",
                )),
                password::HashError::Failed(e) => ApiError::internal(e),
            })?;
        if !ok {
            return Err(OAuthError::invalid_client("client authentication failed").into());
        }
    }
    Ok(client)
}

fn verifier_ok(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Revokes a sign-in: every refresh token of the family, and (here at once, on other
/// replicas at their next reload) every access token that carries it.
async fn revoke_family(
    state: &AppState,
    c: &tokio_postgres::Transaction<'_>,
    family: &Uuid,
) -> std::result::Result<(), tokio_postgres::Error> {
    c.execute(
        "UPDATE oauth_refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
        &[family],
    )
    .await?;
    state.auth.revocations().revoke_session(*family);
    Ok(())
}

struct Issued {
    access: String,
    refresh: String,
    scope: String,
}

impl Issued {
    fn response(&self, state: &AppState) -> Response {
        json_no_store(&serde_json::json!({
            "access_token": self.access,
            "token_type": "Bearer",
            "expires_in": state.auth.ttl_secs(),
            "refresh_token": self.refresh,
            "scope": self.scope,
        }))
    }
}

/// Inserts a refresh token of `family`; its idle expiry never passes the family's
/// absolute one (`family_expires` = None starts a new family).
async fn insert_refresh(
    state: &AppState,
    tx: &tokio_postgres::Transaction<'_>,
    family: &Uuid,
    client_id: &str,
    user: &Uuid,
    scope: &str,
    family_expires: Option<chrono::DateTime<chrono::Utc>>,
) -> std::result::Result<String, ApiError> {
    let token = random_token(32)?;
    let o = &state.cfg.oauth;
    tx.execute(
        "INSERT INTO oauth_refresh_tokens
            (token_hash, family_id, client_id, user_id, scope, expires_at, family_expires_at)
         SELECT $1, $2, $3, $4, $5, least(now() + make_interval(secs => $6), fe), fe
           FROM (SELECT coalesce($7::timestamptz, now() + make_interval(secs => $8)) AS fe) f",
        &[
            &sha256(&token),
            family,
            &client_id,
            user,
            &scope,
            &secs(o.refresh_idle_ttl),
            &family_expires,
            &secs(o.refresh_absolute_ttl),
        ],
    )
    .await
    .map_err(db_unavailable)?;
    Ok(token)
}

fn access_token(
    state: &AppState,
    user: &Uuid,
    client: &str,
    scope: &str,
    family: &Uuid,
) -> Result<String> {
    state
        .auth
        .issue_for_session(user, client, scope, None, Some(family))
        .map_err(ApiError::internal)
}

async fn user_active(tx: &tokio_postgres::Transaction<'_>, user: &Uuid) -> Result<bool> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM users WHERE id = $1 AND is_active AND deleted_at IS NULL",
            &[user],
        )
        .await
        .map_err(db_unavailable)?
        .is_some())
}

async fn authorization_code(state: &AppState, client: &Client, p: &Params) -> Result<Issued> {
    let code = p
        .get("code")
        .ok_or_else(|| OAuthError::invalid_request("code is required"))?;
    let redirect_uri = p
        .get("redirect_uri")
        .ok_or_else(|| OAuthError::invalid_request("redirect_uri is required"))?;
    let verifier = p
        .get("code_verifier")
        .ok_or_else(|| OAuthError::invalid_request("code_verifier is required (PKCE)"))?;
    if !verifier_ok(verifier) {
        return Err(OAuthError::invalid_request(
            "code_verifier must be 43 to 128 characters of [A-Za-z0-9-._~]",
        )
        .into());
    }
    let hash = sha256(code);
    let mut conn = state.db.get().await.map_err(db_unavailable)?;
    let tx = conn.transaction().await.map_err(db_unavailable)?;
    let row = tx
        .query_opt(
            "UPDATE oauth_authorization_codes SET used_at = now()
              WHERE code_hash = $1 AND used_at IS NULL
              RETURNING client_id, user_id, redirect_uri, code_challenge, scope, expires_at > now()",
            &[&hash],
        )
        .await
        .map_err(db_unavailable)?;
    let Some(row) = row else {
        // Unknown, or redeemed before: a replay revokes what the first redemption got.
        let used = tx
            .query_opt(
                "SELECT family_id FROM oauth_authorization_codes WHERE code_hash = $1",
                &[&hash],
            )
            .await
            .map_err(db_unavailable)?;
        if let Some(used) = used {
            if let Some(family) = used.get::<_, Option<Uuid>>(0) {
                revoke_family(state, &tx, &family)
                    .await
                    .map_err(db_unavailable)?;
            }
            tx.commit().await.map_err(db_unavailable)?;
            tracing::warn!(client_id = %client.client_id, "authorization code replayed; its tokens are revoked");
            return Err(OAuthError::invalid_grant(
                "the authorization code was already used; the tokens issued for it are revoked",
            )
            .into());
        }
        return Err(OAuthError::invalid_grant("unknown authorization code").into());
    };
    let code_client: String = row.get(0);
    let user: Uuid = row.get(1);
    let code_redirect: String = row.get(2);
    let challenge: String = row.get(3);
    let scope: String = row.get(4);
    let fresh: bool = row.get(5);
    let computed = URL_SAFE_NO_PAD.encode(sha256(verifier));
    let refusal = if code_client != client.client_id {
        Some("the authorization code was issued to another client")
    } else if !fresh {
        Some("the authorization code has expired")
    } else if code_redirect != redirect_uri {
        Some("redirect_uri differs from the one of the authorization request")
    } else if !ct_eq(computed.as_bytes(), challenge.as_bytes()) {
        Some("code_verifier does not match the code_challenge")
    } else if !user_active(&tx, &user).await? {
        Some("the user is disabled")
    } else {
        None
    };
    if let Some(why) = refusal {
        // The code stays spent.
        tx.commit().await.map_err(db_unavailable)?;
        return Err(OAuthError::invalid_grant(why).into());
    }
    let family = Uuid::new_v4();
    let refresh =
        insert_refresh(state, &tx, &family, &client.client_id, &user, &scope, None).await?;
    tx.execute(
        "UPDATE oauth_authorization_codes SET family_id = $2 WHERE code_hash = $1",
        &[&hash, &family],
    )
    .await
    .map_err(db_unavailable)?;
    let access = access_token(state, &user, &client.client_id, &scope, &family)?;
    tx.commit().await.map_err(db_unavailable)?;
    Ok(Issued {
        access,
        refresh,
        scope,
    })
}

async fn refresh_token(state: &AppState, client: &Client, p: &Params) -> Result<Issued> {
    let token = p
        .get("refresh_token")
        .ok_or_else(|| OAuthError::invalid_request("refresh_token is required"))?;
    let hash = sha256(token);
    let mut conn = state.db.get().await.map_err(db_unavailable)?;
    let tx = conn.transaction().await.map_err(db_unavailable)?;
    let row = tx
        .query_opt(
            "SELECT family_id, client_id, user_id, scope, expires_at > now() AND family_expires_at > now(),
                    used_at IS NOT NULL, revoked_at IS NOT NULL, family_expires_at
               FROM oauth_refresh_tokens WHERE token_hash = $1 FOR UPDATE",
            &[&hash],
        )
        .await
        .map_err(db_unavailable)?
        .ok_or_else(|| OAuthError::invalid_grant("unknown refresh token"))?;
    let family: Uuid = row.get(0);
    let token_client: String = row.get(1);
    let user: Uuid = row.get(2);
    let granted: String = row.get(3);
    let fresh: bool = row.get(4);
    let used: bool = row.get(5);
    let revoked: bool = row.get(6);
    let family_expires: chrono::DateTime<chrono::Utc> = row.get(7);
    if token_client != client.client_id {
        return Err(
            OAuthError::invalid_grant("the refresh token was issued to another client").into(),
        );
    }
    if revoked {
        return Err(OAuthError::invalid_grant("the refresh token is revoked").into());
    }
    if used {
        revoke_family(state, &tx, &family)
            .await
            .map_err(db_unavailable)?;
        tx.commit().await.map_err(db_unavailable)?;
        tracing::warn!(client_id = %client.client_id, user = %user, "refresh token reused; the sign-in is revoked");
        return Err(OAuthError::invalid_grant(
            "the refresh token was already used; the sign-in is revoked",
        )
        .into());
    }
    if !fresh {
        return Err(OAuthError::invalid_grant("the refresh token has expired").into());
    }
    if !user_active(&tx, &user).await? {
        revoke_family(state, &tx, &family)
            .await
            .map_err(db_unavailable)?;
        tx.commit().await.map_err(db_unavailable)?;
        return Err(OAuthError::invalid_grant("the user is disabled").into());
    }
    let scope = match p.get("scope") {
        None => granted,
        Some(req) => {
            let have: Vec<&str> = granted.split(' ').collect();
            if req
                .split(' ')
                .filter(|s| !s.is_empty())
                .any(|s| !have.contains(&s))
            {
                return Err(OAuthError::new(
                    "invalid_scope",
                    "the requested scope exceeds the one granted",
                )
                .into());
            }
            req.split(' ')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    tx.execute(
        "UPDATE oauth_refresh_tokens SET used_at = now() WHERE token_hash = $1",
        &[&hash],
    )
    .await
    .map_err(db_unavailable)?;
    let refresh = insert_refresh(
        state,
        &tx,
        &family,
        &client.client_id,
        &user,
        &scope,
        Some(family_expires),
    )
    .await?;
    let access = access_token(state, &user, &client.client_id, &scope, &family)?;
    tx.commit().await.map_err(db_unavailable)?;
    Ok(Issued {
        access,
        refresh,
        scope,
    })
}

/// `POST /oauth/token`.
pub async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: std::result::Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response> {
    let p = form_params(form)?;
    let grant = p
        .get("grant_type")
        .ok_or_else(|| OAuthError::invalid_request("grant_type is required"))?
        .to_owned();
    if grant != "authorization_code" && grant != "refresh_token" {
        return Err(OAuthError::new(
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token",
        )
        .into());
    }
    let client = authenticate_client(&state, &headers, &p).await?;
    if !client.grant_types.contains(&grant) {
        return Err(OAuthError::new(
            "unauthorized_client",
            "the client may not use this grant type",
        )
        .into());
    }
    let issued = if grant == "authorization_code" {
        authorization_code(&state, &client, &p).await?
    } else {
        refresh_token(&state, &client, &p).await?
    };
    Ok(issued.response(&state))
}

/// `POST /oauth/revoke` (RFC 7009): revokes the sign-in a refresh or access token
/// belongs to. Answers 200 for unknown tokens too.
pub async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: std::result::Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response> {
    let p = form_params(form)?;
    let client = authenticate_client(&state, &headers, &p).await?;
    let token = p
        .get("token")
        .ok_or_else(|| OAuthError::invalid_request("token is required"))?;
    let family = if token.contains('.') {
        // An access token: its sign-in, if it is ours and the client's.
        state
            .auth
            .verify(token)
            .ok()
            .filter(|pr| *pr.client_id == *client.client_id)
            .and_then(|pr| pr.session)
    } else {
        let conn = state.db.get().await.map_err(db_unavailable)?;
        conn.query_opt(
            "SELECT family_id, client_id FROM oauth_refresh_tokens WHERE token_hash = $1",
            &[&sha256(token)],
        )
        .await
        .map_err(db_unavailable)?
        .filter(|r| r.get::<_, String>(1) == client.client_id)
        .map(|r| r.get::<_, Uuid>(0))
    };
    if let Some(family) = family {
        let mut conn = state.db.get().await.map_err(db_unavailable)?;
        let tx = conn.transaction().await.map_err(db_unavailable)?;
        revoke_family(&state, &tx, &family)
            .await
            .map_err(db_unavailable)?;
        tx.commit().await.map_err(db_unavailable)?;
        tracing::info!(client_id = %client.client_id, "sign-in revoked");
    }
    let mut r = StatusCode::OK.into_response();
    no_store(r.headers_mut());
    Ok(r)
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
pub async fn metadata(State(state): State<AppState>) -> Response {
    let iss = state.auth.issuer().trim_end_matches('/');
    let auth_methods = ["none", "client_secret_basic", "client_secret_post"];
    let v = serde_json::json!({
        "issuer": state.auth.issuer(),
        "authorization_endpoint": format!("{iss}/oauth/authorize"),
        "token_endpoint": format!("{iss}/oauth/token"),
        "revocation_endpoint": format!("{iss}/oauth/revoke"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "authorization_response_iss_parameter_supported": true,
    });
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        v.to_string(),
    )
        .into_response()
}

/// `GET /.well-known/jwks.json`: every key that verifies, the signing key first.
pub async fn jwks(State(state): State<AppState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        state.auth.jwks().to_string(),
    )
        .into_response()
}
