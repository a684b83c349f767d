//! `GET/POST /oauth/authorize`: validates the authorization request, renders the
//! sign-in page (server-rendered, no external assets, no script), checks the
//! credentials and answers 303 to the redirect URI with a single-use code.
//!
//! An unknown or inactive client, or a redirect URI that is not registered, gets an
//! error page and never a redirect; other errors are redirected with `error=` (RFC
//! 6749 §4.1.2.1). The form is CSRF-safe: a `SameSite=Strict`, `HttpOnly` cookie holds
//! a random value, the form carries its HMAC under a key derived from the signing key,
//! and a cross-origin `Origin` is refused. Wrong credentials get one generic message.
//!
//! Each attempt is counted and checked against the account's and the IP's lock
//! ([`super::throttle`]) before the password is hashed: while locked, 429 with
//! `retry-after` and no hash. Hashing goes through the bounded [`password::Hashers`]:
//! when every hasher is busy and its queue is full, 503 with `retry-after` (and the
//! attempt is not counted).

use std::sync::OnceLock;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use uuid::Uuid;

use super::clients::{self, Client};
use super::throttle::{ip_subject, Throttle, Verdict};
use super::{ct_eq, no_store, password, random_token, sha256, Params, PeerAddr};
use crate::state::AppState;

const CSRF_COOKIE: &str = "tollgate_csrf";
const MAX_EMAIL: usize = 255;
const MAX_PASSWORD: usize = 1024;

/// A validated authorization request.
struct AuthRequest {
    client: Client,
    redirect_uri: String,
    state: String,
    challenge: String,
    scope: String,
}

enum Refusal {
    /// Shown to the user; never redirected (client or redirect URI not trusted).
    Page(StatusCode, &'static str, String),
    /// Sent back to the client's redirect URI (RFC 6749 §4.1.2.1).
    Redirect {
        uri: String,
        error: &'static str,
        description: &'static str,
        state: Option<String>,
    },
}

fn pkce_challenge_ok(c: &str) -> bool {
    // BASE64URL(SHA256(verifier)): 43 characters of the base64url alphabet.
    c.len() == 43
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn validate(state: &AppState, p: &Params) -> Result<AuthRequest, Refusal> {
    let client_id = p.get("client_id").unwrap_or_default();
    let client = clients::find(&state.db, client_id)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "authorize: client lookup failed");
            Refusal::Page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in is temporarily unavailable",
                "Please try again in a moment.".into(),
            )
        })?
        .ok_or_else(|| {
            Refusal::Page(
                StatusCode::BAD_REQUEST,
                "Unknown application",
                "The application that sent you here is not registered or has been disabled.".into(),
            )
        })?;
    let redirect_uri = p.get("redirect_uri").unwrap_or_default();
    if !client.allows_redirect(redirect_uri) {
        return Err(Refusal::Page(
            StatusCode::BAD_REQUEST,
            "Invalid redirect address",
            "The application asked to be sent back to an address it has not registered, so \
             sign-in cannot continue."
                .into(),
        ));
    }
    let st = p.get("state").map(str::to_owned);
    let redirect = |error, description| Refusal::Redirect {
        uri: redirect_uri.to_owned(),
        error,
        description,
        state: st.clone(),
    };
    if p.get("response_type") != Some("code") || !client.response_types.iter().any(|r| r == "code")
    {
        return Err(redirect(
            "unsupported_response_type",
            "response_type must be code",
        ));
    }
    if !client.grant_types.iter().any(|g| g == "authorization_code") {
        return Err(redirect(
            "unauthorized_client",
            "the client may not use the authorization code grant",
        ));
    }
    let Some(challenge) = p.get("code_challenge") else {
        return Err(redirect("invalid_request", "code_challenge is required"));
    };
    if p.get("code_challenge_method") != Some("S256") {
        return Err(redirect(
            "invalid_request",
            "code_challenge_method must be S256",
        ));
    }
    if !pkce_challenge_ok(challenge) {
        return Err(redirect(
            "invalid_request",
            "code_challenge must be BASE64URL(SHA256(code_verifier))",
        ));
    }
    let Some(state_value) = st.clone() else {
        return Err(redirect("invalid_request", "state is required"));
    };
    if state_value.len() > 1024 {
        return Err(redirect("invalid_request", "state is too long"));
    }
    let Some(scope) = client.grant_scope(p.get("scope")) else {
        return Err(redirect(
            "invalid_scope",
            "the requested scope is not registered for this client",
        ));
    };
    Ok(AuthRequest {
        redirect_uri: redirect_uri.to_owned(),
        state: state_value,
        challenge: challenge.to_owned(),
        scope,
        client,
    })
}

/// `uri` with query parameters appended.
fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let mut out = uri.to_owned();
    let mut sep = if uri.contains('?') { '&' } else { '?' };
    for (k, v) in params {
        out.push(sep);
        out.push_str(k);
        out.push('=');
        out.push_str(&percent_encode(v));
        sep = '&';
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(v) => {
            let mut r = StatusCode::SEE_OTHER.into_response();
            r.headers_mut().insert(header::LOCATION, v);
            no_store(r.headers_mut());
            r
        }
        Err(_) => page(
            StatusCode::BAD_REQUEST,
            "Invalid redirect address",
            "The redirect address cannot be used.",
        ),
    }
}

fn refuse(r: Refusal, issuer: &str) -> Response {
    match r {
        Refusal::Page(status, title, message) => page(status, title, &message),
        Refusal::Redirect {
            uri,
            error,
            description,
            state,
        } => {
            let mut q = vec![("error", error), ("error_description", description)];
            if let Some(s) = state.as_deref() {
                q.push(("state", s));
            }
            q.push(("iss", issuer));
            see_other(&with_query(&uri, &q))
        }
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{margin:0;font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;\
background:#f4f5f7;color:#1d2330;display:flex;min-height:100vh;align-items:center;justify-content:center}\
main{background:#fff;border-radius:12px;box-shadow:0 2px 12px rgba(0,0,0,.08);padding:32px;width:100%;max-width:360px;margin:16px}\
h1{font-size:22px;margin:0 0 4px}p{margin:0 0 16px}.sub{color:#5b6475}\
label{display:block;font-weight:600;margin:12px 0 4px}\
input{box-sizing:border-box;width:100%;padding:10px 12px;border:1px solid #c5cad3;border-radius:8px;font:inherit}\
input:focus{outline:2px solid #3563e9;border-color:#3563e9}\
button{margin-top:20px;width:100%;padding:11px;border:0;border-radius:8px;background:#3563e9;color:#fff;font:inherit;font-weight:600;cursor:pointer}\
button:hover{background:#2a50c0}.error{background:#fdecec;color:#a21b1b;border-radius:8px;padding:10px 12px}\
.fine{color:#5b6475;font-size:13px;margin:16px 0 0}";

fn html_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: with it browsers send `Origin: null` on the form's POST.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    no_store(h);
}

fn document(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Tollgate</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>",
        escape(title)
    )
}

/// An error page.
fn page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!(
        "<h1>{}</h1><p class=\"error\" role=\"alert\" id=\"error\">{}</p>\
         <p class=\"fine\">You can close this window and start signing in again from the app.</p>",
        escape(title),
        escape(message)
    );
    let mut r = (status, document(title, &body)).into_response();
    html_headers(r.headers_mut());
    r
}

fn csrf_field(state: &AppState, cookie: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, state.auth.form_secret());
    URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&key, cookie.as_bytes()).as_ref())
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == CSRF_COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 43)
}

/// The sign-in form for `req`.
fn form(
    state: &AppState,
    req: &AuthRequest,
    cookie: &str,
    status: StatusCode,
    email: &str,
    error: Option<&str>,
) -> Response {
    let hidden = [
        ("client_id", req.client.client_id.as_str()),
        ("redirect_uri", &req.redirect_uri),
        ("response_type", "code"),
        ("code_challenge", &req.challenge),
        ("code_challenge_method", "S256"),
        ("state", &req.state),
        ("scope", &req.scope),
        ("csrf", &csrf_field(state, cookie)),
    ];
    let mut fields = String::new();
    for (k, v) in hidden {
        fields.push_str(&format!(
            "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
            escape(v)
        ));
    }
    let error = error
        .map(|e| {
            format!(
                "<p class=\"error\" role=\"alert\" id=\"error\">{}</p>",
                escape(e)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in</h1><p class=\"sub\">to continue to <strong>{name}</strong></p>{error}\
         <form method=\"post\" action=\"/oauth/authorize\" id=\"signin\">{fields}\
         <label for=\"email\">Email</label>\
         <input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" maxlength=\"{MAX_EMAIL}\" required autofocus value=\"{email}\">\
         <label for=\"password\">Password</label>\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" maxlength=\"{MAX_PASSWORD}\" required>\
         <button type=\"submit\" id=\"submit\">Sign in</button></form>\
         <p class=\"fine\">After signing in you will be sent back to {name}.</p>",
        name = escape(&req.client.name),
        email = escape(email),
    );
    let mut r = (status, document("Sign in", &body)).into_response();
    html_headers(r.headers_mut());
    let secure = if state.auth.issuer().starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{CSRF_COOKIE}={cookie}; Path=/oauth/authorize; HttpOnly; SameSite=Strict; Max-Age=3600{secure}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn bad_parameters(e: impl std::fmt::Display) -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "Invalid sign-in request",
        &format!("The sign-in request is malformed ({e})."),
    )
}

/// `GET /oauth/authorize`: the sign-in page.
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let pairs = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad_parameters(e),
    };
    let params = match Params::parse(pairs) {
        Ok(p) => p,
        Err(e) => return bad_parameters(e),
    };
    let req = match validate(&state, &params).await {
        Ok(r) => r,
        Err(r) => return refuse(r, state.auth.issuer()),
    };
    let cookie = match cookie_value(&headers) {
        Some(c) => c,
        None => match random_token(32) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        },
    };
    form(&state, &req, &cookie, StatusCode::OK, "", None)
}

/// Whether a browser-sent `Origin` (if any) is this server.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

static DUMMY_HASH: OnceLock<String> = OnceLock::new();

/// Why the credentials could not be checked (nothing says they were wrong).
enum CheckError {
    /// Every password hasher is busy and the queue is full.
    Busy,
    Unavailable(String),
}

impl<E: std::fmt::Display> From<E> for CheckError {
    fn from(e: E) -> Self {
        CheckError::Unavailable(e.to_string())
    }
}

/// Checks the credentials. Returns the user id if they are right and the user may sign
/// in; rehashes the password when the configured parameters rose.
async fn check_credentials(
    state: &AppState,
    email: &str,
    password: &str,
) -> Result<Option<Uuid>, CheckError> {
    let row = state
        .db
        .get()
        .await?
        .query_opt(
            "SELECT id, password_hash, is_active AND deleted_at IS NULL
               FROM users WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await?;
    let (id, stored, active) = match &row {
        Some(r) => (
            Some(r.get::<_, Uuid>(0)),
            r.get::<_, Option<String>>(1),
            r.get::<_, bool>(2),
        ),
        None => (None, None, false),
    };
    let params = state.cfg.passwords.argon2.clone();
    let pw = password.to_owned();
    let stored_c = stored.clone();
    // No pooled connection is held while Argon2 runs.
    let (ok, rehash) = match state
        .hashers
        .run(password::Purpose::SignIn, move || {
            let hash = match stored_c {
                Some(h) => h,
                None => DUMMY_HASH
                    .get_or_init(|| password::dummy_hash(&params))
                    .clone(),
            };
            let ok = password::verify(&pw, &hash);
            let rehash = if ok && password::needs_rehash(&hash, &params) {
                password::hash(&pw, &params).ok()
            } else {
                None
            };
            (ok, rehash)
        })
        .await
    {
        Ok(r) => r,
        Err(password::HashError::Busy) => return Err(CheckError::Busy),
        Err(e) => return Err(e.into()),
    };
    let (Some(id), true, true, Some(_)) = (id, ok, active, stored) else {
        return Ok(None);
    };
    state
        .db
        .get()
        .await?
        .execute(
            "UPDATE users SET last_login_at = now(), password_hash = coalesce($2, password_hash)
          WHERE id = $1",
            &[&id, &rehash],
        )
        .await?;
    Ok(Some(id))
}

/// Stores a new authorization code; returns it.
async fn issue_code(
    state: &AppState,
    req: &AuthRequest,
    user: &Uuid,
) -> Result<String, crate::error::ApiError> {
    let code = random_token(32)?;
    let ttl = f64::from(u32::try_from(state.cfg.oauth.code_ttl.as_secs()).unwrap_or(60));
    let conn = state.db.get().await?;
    conn.execute(
        "INSERT INTO oauth_authorization_codes
            (code_hash, client_id, user_id, redirect_uri, code_challenge, scope, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))",
        &[
            &sha256(&code),
            &req.client.client_id,
            user,
            &req.redirect_uri,
            &req.challenge,
            &req.scope,
            &ttl,
        ],
    )
    .await?;
    Ok(code)
}

const WRONG: &str = "Incorrect email or password.";

/// `POST /oauth/authorize`: checks the credentials; 303 to the client with a code.
pub async fn submit(
    State(state): State<AppState>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    submitted: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let peer = peer
        .map(|Extension(p)| ip_subject(p.0.ip()))
        .unwrap_or_else(|| "unknown".into());
    let pairs = match submitted {
        Ok(Form(f)) => f,
        Err(e) => return bad_parameters(e),
    };
    let params = match Params::parse(pairs) {
        Ok(p) => p,
        Err(e) => return bad_parameters(e),
    };
    let csrf_ok = same_origin(&headers)
        && cookie_value(&headers).is_some_and(|c| {
            ct_eq(
                csrf_field(&state, &c).as_bytes(),
                params.get("csrf").unwrap_or_default().as_bytes(),
            )
        });
    if !csrf_ok {
        return page(
            StatusCode::FORBIDDEN,
            "Sign-in form expired",
            "This sign-in form has expired or did not come from this site. Start signing in \
             again from the app.",
        );
    }
    let auth_req = match validate(&state, &params).await {
        Ok(r) => r,
        Err(r) => return refuse(r, state.auth.issuer()),
    };
    let cookie = cookie_value(&headers).unwrap_or_default();
    let email = params.get("email").unwrap_or_default().trim().to_owned();
    let password = params.get("password").unwrap_or_default();
    let show = |status, error| form(&state, &auth_req, &cookie, status, &email, Some(error));
    if email.is_empty() || password.is_empty() {
        return show(StatusCode::BAD_REQUEST, "Enter your email and password.");
    }
    if email.len() > MAX_EMAIL || password.len() > MAX_PASSWORD {
        return show(StatusCode::OK, WRONG);
    }
    let throttle = Throttle::new(state.ledger.conn(), &state.cfg.redis.key_prefix);
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "sign-in unavailable");
        page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is temporarily unavailable",
            "Please try again in a moment.",
        )
    };
    // Counted (and refused while locked) before the password is hashed.
    let ticket = match throttle.attempt(&email, &peer, &state.cfg.oauth).await {
        Ok(Verdict::Admitted(t)) => t,
        Ok(Verdict::Locked { by, retry_after }) => {
            metrics::counter!("tollgate_signin_locked_total", "subject" => by.label()).increment(1);
            let mut r = show(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed sign-in attempts. Wait a little, then try again.",
            );
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Err(e) => return unavailable(&e),
    };
    let user = match check_credentials(&state, &email, password).await {
        Ok(u) => u,
        Err(e) => {
            // Not checked: the attempt does not count against the account or the IP.
            throttle.unchecked(&email, &peer, ticket).await;
            return match e {
                CheckError::Busy => {
                    let mut r = page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Sign-in is busy",
                        "Too many people are signing in right now. Please try again in a moment.",
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    r
                }
                CheckError::Unavailable(e) => unavailable(&e),
            };
        }
    };
    let Some(user) = user else {
        // A wrong password: its attempt stays counted.
        throttle
            .failed(&email, &peer, ticket, &state.cfg.oauth)
            .await;
        tracing::info!(client_id = %auth_req.client.client_id, "sign-in refused");
        return show(StatusCode::OK, WRONG);
    };
    throttle.succeeded(&email, &peer, ticket).await;
    let code = match issue_code(&state, &auth_req, &user).await {
        Ok(c) => c,
        Err(_) => return unavailable(&"the authorization code could not be stored"),
    };
    tracing::info!(user = %user, client_id = %auth_req.client.client_id, "signed in");
    see_other(&with_query(
        &auth_req.redirect_uri,
        &[
            ("code", &code),
            ("state", &auth_req.state),
            ("iss", state.auth.issuer()),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded_and_html_escaped() {
        assert_eq!(
            with_query(
                "http://127.0.0.1:5/cb",
                &[("code", "a b&c"), ("state", "x")]
            ),
            "http://127.0.0.1:5/cb?code=a%20b%26c&state=x"
        );
        assert_eq!(
            with_query("app://cb?k=1", &[("code", "z")]),
            "app://cb?k=1&code=z"
        );
        assert_eq!(
            escape("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert!(pkce_challenge_ok(
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_challenge_ok("short"));
    }
}
