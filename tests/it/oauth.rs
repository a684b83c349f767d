//! OAuth 2.0 sign-in as the desktop app does it, and the gateway's token check,
//! black-box: the real binary, real PostgreSQL and Redis, the bundled mock provider,
//! and (for the sign-in page) a real headless Chromium driven over WebDriver.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const CLIENT: &str = "textassistant-desktop";
const PASSWORD: &str = "correct horse battery staple";
const WRONG: &str = "Incorrect email or password.";

// ---------------------------------------------------------------------------------
// Helpers

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    cookies: Vec<String>,
    body: String,
}

impl Resp {
    fn location(&self) -> &str {
        self.headers
            .get("location")
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no Location ({}): {}", self.status, self.body))
    }

    fn json(&self) -> serde_json::Value {
        json(self.body.as_bytes())
    }

    /// Asserts an RFC 6749 §5.2 error and its code.
    fn oauth_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        assert_eq!(v["error"], code, "{v}");
        assert!(v["error_description"].as_str().is_some(), "{v}");
        assert_eq!(self.headers["cache-control"], "no-store");
    }
}

fn client_from(ip: Option<IpAddr>) -> Client<HttpConnector, Full<Bytes>> {
    let mut c = HttpConnector::new();
    c.set_local_address(ip);
    Client::builder(TokioExecutor::new()).build(c)
}

async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
    from: Option<IpAddr>,
) -> Resp {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = client_from(from).request(req).await.expect("request");
    let status = resp.status().as_u16();
    let cookies = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        cookies,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Query parameters of a URL (percent-decoded).
fn query_of(url: &str) -> HashMap<String, String> {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce() -> Pkce {
    let verifier = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let challenge = URL_SAFE_NO_PAD.encode(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()).as_ref(),
    );
    Pkce {
        verifier,
        challenge,
    }
}

/// The desktop app's loopback redirect listener (RFC 8252 §7.3) on a random port: it
/// records the query of every request it receives.
struct Loopback {
    port: u16,
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Loopback {
    async fn start() -> Loopback {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    while n < buf.len() {
                        match s.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let target = head
                        .lines()
                        .next()
                        .and_then(|l| l.split(' ').nth(1))
                        .unwrap_or("")
                        .to_owned();
                    let page = "<!doctype html><title>Signed in</title><p id=\"done\">You are signed in.</p>";
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                                page.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    if !target.starts_with("/favicon") {
                        let _ = tx.send(target);
                    }
                });
            }
        });
        Loopback { port, rx }
    }

    fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}/callback", self.port)
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
            .await
            .expect("the loopback listener got no redirect")
            .unwrap()
    }
}

fn authorize_params<'a>(redirect: &'a str, p: &'a Pkce, state: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("response_type", "code"),
        ("client_id", CLIENT),
        ("redirect_uri", redirect),
        ("code_challenge", &p.challenge),
        ("code_challenge_method", "S256"),
        ("state", state),
        ("scope", "llm.inference models.read"),
    ]
}

fn authorize_url(gw: &Proc, params: &[(&str, &str)]) -> String {
    gw.url(&format!("/oauth/authorize?{}", form(params)))
}

/// The value of the hidden `csrf` input of a sign-in page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("no csrf field") + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

fn cookie_of(r: &Resp) -> String {
    r.cookies
        .iter()
        .find(|c| c.starts_with("tollgate_csrf="))
        .expect("no CSRF cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// Opens the sign-in page: (its CSRF cookie, its `csrf` field).
async fn sign_in_page(gw: &Proc, params: &[(&str, &str)]) -> (String, String) {
    let page = send("GET", &authorize_url(gw, params), &[], None, None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    (cookie_of(&page), csrf_of(&page.body))
}

/// Opens the sign-in page, then submits it (from `from`, if set).
async fn sign_in_from(
    gw: &Proc,
    params: &[(&str, &str)],
    email: &str,
    password: &str,
    from: Option<IpAddr>,
) -> Resp {
    let (cookie, csrf) = sign_in_page(gw, params).await;
    submit_sign_in(gw, params, (&cookie, &csrf), email, password, from).await
}

/// Submits a sign-in form whose page gave `cookie` and `csrf`.
async fn submit_sign_in(
    gw: &Proc,
    params: &[(&str, &str)],
    (cookie, csrf): (&str, &str),
    email: &str,
    password: &str,
    from: Option<IpAddr>,
) -> Resp {
    let mut fields: Vec<(&str, &str)> = params.to_vec();
    fields.push(("csrf", csrf));
    fields.push(("email", email));
    fields.push(("password", password));
    send(
        "POST",
        &gw.url("/oauth/authorize"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("cookie", cookie),
        ],
        Some(form(&fields)),
        from,
    )
    .await
}

async fn sign_in(gw: &Proc, params: &[(&str, &str)], email: &str, password: &str) -> Resp {
    sign_in_from(gw, params, email, password, None).await
}

async fn token_request(gw: &Proc, pairs: &[(&str, &str)]) -> Resp {
    send(
        "POST",
        &gw.url("/oauth/token"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form(pairs)),
        None,
    )
    .await
}

async fn redeem(gw: &Proc, code: &str, redirect: &str, verifier: &str) -> Resp {
    token_request(
        gw,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", CLIENT),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ],
    )
    .await
}

async fn refresh(gw: &Proc, token: &str) -> Resp {
    token_request(
        gw,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("refresh_token", token),
        ],
    )
    .await
}

async fn revoke(gw: &Proc, token: &str) -> Resp {
    send(
        "POST",
        &gw.url("/oauth/revoke"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form(&[("client_id", CLIENT), ("token", token)])),
        None,
    )
    .await
}

/// Creates a user with a password and exactly `credits` (no subscription); returns
/// (id, email).
async fn password_user(env: &TestEnv, credits: i32) -> (Uuid, String) {
    let email = format!(
        "u{}@example.com",
        &Uuid::new_v4().simple().to_string()[..10]
    );
    let id = Uuid::parse_str(
        &env.cli(&[
            "user",
            "create",
            "--email",
            &email,
            "--password",
            PASSWORD,
            "--no-subscription",
        ])
        .await,
    )
    .unwrap();
    env.grant(&email, credits).await;
    (id, email)
}

/// Signs in and redeems the code: (access token, refresh token, redirect uri).
async fn tokens_for(gw: &Proc, email: &str) -> (String, String) {
    let p = pkce();
    let redirect = "http://127.0.0.1:43210/callback";
    let r = sign_in(gw, &authorize_params(redirect, &p, "s"), email, PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let code = query_of(r.location())["code"].clone();
    let t = redeem(gw, &code, redirect, &p.verifier).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let v = t.json();
    (
        v["access_token"].as_str().unwrap().to_owned(),
        v["refresh_token"].as_str().unwrap().to_owned(),
    )
}

fn chat_body() -> serde_json::Value {
    json!({"model": "gpt-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
}

/// Asserts a 401 `invalid_token` from the API, with its RFC 6750 header.
fn assert_invalid_token(status: u16, headers: &HashMap<String, String>, body: &[u8], what: &str) {
    assert_eq!(status, 401, "{what}: {}", String::from_utf8_lossy(body));
    assert_eq!(
        headers["www-authenticate"], "Bearer error=\"invalid_token\"",
        "{what}"
    );
    assert_eq!(openai_error(body)["code"], "invalid_api_key", "{what}");
}

fn jwt_part(token: &str, i: usize) -> serde_json::Value {
    json(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(i).unwrap())
            .unwrap(),
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signing_key(env: &TestEnv) -> (PathBuf, EncodingKey) {
    let path = env.dir.path().join("signing.pem");
    let pem = std::fs::read(&path).expect("the gateway persisted its key");
    (path, EncodingKey::from_ed_pem(&pem).unwrap())
}

// ---------------------------------------------------------------------------------
// The desktop app's flow

#[tokio::test]
async fn desktop_app_flow_code_tokens_call_refresh_call_revoke() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, email) = password_user(&env, 1000).await;
    let mut app = Loopback::start().await;
    let redirect = app.redirect_uri();
    let p = pkce();
    let params = authorize_params(&redirect, &p, "xyz-state");

    // The sign-in page: a form with email and password, no external assets.
    let page = send("GET", &authorize_url(&gw, &params), &[], None, None).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers["cache-control"], "no-store");
    assert!(page.headers["content-security-policy"].contains("frame-ancestors 'none'"));
    for needle in [
        "name=\"email\"",
        "name=\"password\"",
        "TextAssistant Desktop",
    ] {
        assert!(page.body.contains(needle), "{needle}: {}", page.body);
    }
    for external in ["src=", "href=", "<script"] {
        assert!(!page.body.contains(external), "{external} in the page");
    }
    let cookie = page.cookies.join(";");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));

    // Sign in: 303 to the loopback redirect with code and state.
    let r = sign_in(&gw, &params, &email.to_uppercase(), PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let location = r.location().to_owned();
    assert!(
        location.starts_with(&format!("{redirect}?code=")),
        "{location}"
    );
    send("GET", &location, &[], None, None).await;
    let received = query_of(&app.next().await);
    assert_eq!(received["state"], "xyz-state");
    assert_eq!(received["iss"], "http://127.0.0.1:8080");
    let code = received["code"].clone();
    assert_eq!(URL_SAFE_NO_PAD.decode(&code).unwrap().len(), 32, "256 bits");

    // Code → tokens.
    let t = redeem(&gw, &code, &redirect, &p.verifier).await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert_eq!(t.headers["cache-control"], "no-store");
    let v = t.json();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 900);
    assert_eq!(v["scope"], "llm.inference models.read");
    let access = v["access_token"].as_str().unwrap().to_owned();
    let refresh1 = v["refresh_token"].as_str().unwrap().to_owned();
    let header = jwt_part(&access, 0);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "EdDSA");
    let claims = jwt_part(&access, 1);
    assert_eq!(claims["iss"], "http://127.0.0.1:8080");
    assert_eq!(claims["aud"], "tollgate");
    assert_eq!(claims["sub"], user.to_string());
    assert_eq!(claims["client_id"], CLIENT);
    assert_eq!(claims["scope"], "llm.inference models.read");
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(ttl <= 900, "{ttl}");
    let jwks = json(
        send("GET", &gw.url("/.well-known/jwks.json"), &[], None, None)
            .await
            .body
            .as_bytes(),
    );
    assert!(jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == header["kid"]));
    // The refresh token is stored hashed, never in the clear.
    let db = env.db().await;
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM oauth_refresh_tokens WHERE user_id = $1 AND token_hash = sha256($2::text::bytea)",
            &[&user, &refresh1],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
    let logged_in: Option<chrono::DateTime<chrono::Utc>> = db
        .query_one("SELECT last_login_at FROM users WHERE id = $1", &[&user])
        .await
        .unwrap()
        .get(0);
    assert!(logged_in.is_some(), "last_login_at is kept");

    // API call.
    let (s, _, b) = env.chat(&gw, &access, chat_body()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));

    // Refresh: a new pair, the refresh token rotated.
    let t2 = refresh(&gw, &refresh1).await;
    assert_eq!(t2.status, 200, "{}", t2.body);
    let v2 = t2.json();
    let access2 = v2["access_token"].as_str().unwrap().to_owned();
    let refresh2 = v2["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh2, refresh1);
    assert_ne!(access2, access);
    let (s, _, b) = env.chat(&gw, &access2, chat_body()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));

    // Revoke: the refresh token and the access tokens of the sign-in are refused.
    let rv = revoke(&gw, &refresh2).await;
    assert_eq!(rv.status, 200, "{}", rv.body);
    refresh(&gw, &refresh2)
        .await
        .oauth_error(400, "invalid_grant");
    let (s, h, b) = env.chat(&gw, &access2, chat_body()).await;
    assert_invalid_token(s, &h, &b, "access token of a revoked sign-in");
    // Revoking an unknown token is not an error (RFC 7009 §2.2).
    assert_eq!(revoke(&gw, "no-such-token").await.status, 200);
}

#[tokio::test]
async fn metadata_and_jwks_are_published() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let m = send(
        "GET",
        &gw.url("/.well-known/oauth-authorization-server"),
        &[],
        None,
        None,
    )
    .await;
    assert_eq!(m.status, 200);
    let m = m.json();
    assert_eq!(m["issuer"], "http://127.0.0.1:8080");
    assert_eq!(
        m["authorization_endpoint"],
        "http://127.0.0.1:8080/oauth/authorize"
    );
    assert_eq!(m["token_endpoint"], "http://127.0.0.1:8080/oauth/token");
    assert_eq!(
        m["revocation_endpoint"],
        "http://127.0.0.1:8080/oauth/revoke"
    );
    assert_eq!(m["jwks_uri"], "http://127.0.0.1:8080/.well-known/jwks.json");
    assert_eq!(m["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(m["response_types_supported"], json!(["code"]));
    assert_eq!(
        m["grant_types_supported"],
        json!(["authorization_code", "refresh_token"])
    );
    let j = send("GET", &gw.url("/.well-known/jwks.json"), &[], None, None).await;
    assert_eq!(j.status, 200);
    let keys = j.json()["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kty"], "OKP");
    assert_eq!(keys[0]["crv"], "Ed25519");
    assert_eq!(keys[0]["use"], "sig");
    assert!(keys[0].get("d").is_none(), "no private part");
}

// ---------------------------------------------------------------------------------
// Authorization request negatives

#[tokio::test]
async fn untrusted_client_or_redirect_gets_an_error_page_never_a_redirect() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let db = env.db().await;
    db.execute(
        "INSERT INTO oauth_clients (client_id, client_name, redirect_uris, grant_types, response_types, scope, is_active)
         VALUES ('old-app', 'Old App', ARRAY['http://127.0.0.1/callback'], ARRAY['authorization_code','refresh_token'], ARRAY['code'], 'llm.inference', false)",
        &[],
    )
    .await
    .unwrap();
    let p = pkce();
    let good = "http://127.0.0.1:5000/callback";
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown client", "nope".into(), good),
        ("inactive client", "old-app".into(), good),
        ("missing client", String::new(), good),
        (
            "trailing slash",
            CLIENT.into(),
            "http://127.0.0.1:5000/callback/",
        ),
        ("other path", CLIENT.into(), "http://127.0.0.1:5000/other"),
        (
            "query added",
            CLIENT.into(),
            "http://127.0.0.1:5000/callback?x=1",
        ),
        (
            "localhost by name",
            CLIENT.into(),
            "http://localhost:5000/callback",
        ),
        (
            "non-loopback http",
            CLIENT.into(),
            "http://192.168.1.10:5000/callback",
        ),
        ("other host", CLIENT.into(), "http://evil.example/callback"),
        (
            "custom scheme, other path",
            CLIENT.into(),
            "textassistant://oauth/other",
        ),
        ("missing redirect", CLIENT.into(), ""),
    ];
    for (what, client, redirect) in cases {
        let params = [
            ("response_type", "code"),
            ("client_id", client.as_str()),
            ("redirect_uri", redirect),
            ("code_challenge", p.challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("state", "s"),
        ];
        let r = send("GET", &authorize_url(&gw, &params), &[], None, None).await;
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert!(!r.headers.contains_key("location"), "{what}: redirected");
        assert!(r.body.contains("id=\"error\""), "{what}: {}", r.body);
        assert!(
            !r.body.contains("name=\"password\""),
            "{what}: a sign-in form"
        );
    }
    // The registered custom scheme and any loopback port are accepted.
    for redirect in [
        "textassistant://oauth/callback",
        "http://127.0.0.1:61234/callback",
    ] {
        let r = send(
            "GET",
            &authorize_url(&gw, &authorize_params(redirect, &p, "s")),
            &[],
            None,
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{redirect}: {}", r.body);
    }
    // The token endpoint refuses unknown and inactive clients with invalid_client.
    for client in ["nope", "old-app"] {
        let r = token_request(
            &gw,
            &[
                ("grant_type", "authorization_code"),
                ("client_id", client),
                ("code", "x"),
                ("redirect_uri", good),
                ("code_verifier", &p.verifier),
            ],
        )
        .await;
        r.oauth_error(401, "invalid_client");
        assert!(r.headers.contains_key("www-authenticate"));
    }
    // A confidential client must authenticate (Basic or client_secret).
    let params = argon2::Params::new(8 * 1024, 1, 1, None).unwrap();
    let secret_hash = tollgate::oauth::password::hash("s3cret-value", &params).unwrap();
    db.execute(
        "INSERT INTO oauth_clients (client_id, client_name, client_secret_hash, redirect_uris, grant_types, response_types, scope)
         VALUES ('backend', 'Backend', $1, ARRAY['https://app.example/cb'], ARRAY['refresh_token'], ARRAY['code'], 'llm.inference')",
        &[&secret_hash],
    )
    .await
    .unwrap();
    let basic = |id: &str, secret: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        )
    };
    let refresh_form = form(&[("grant_type", "refresh_token"), ("refresh_token", "x")]);
    for (what, auth, status, code) in [
        ("no secret", None, 401, "invalid_client"),
        (
            "wrong secret",
            Some(basic("backend", "wrong")),
            401,
            "invalid_client",
        ),
        (
            "right secret",
            Some(basic("backend", "s3cret-value")),
            400,
            "invalid_grant",
        ),
    ] {
        let mut h = vec![(
            "content-type",
            "application/x-www-form-urlencoded".to_owned(),
        )];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = if h.len() == 1 {
            format!("{refresh_form}&client_id=backend")
        } else {
            refresh_form.clone()
        };
        let r = send("POST", &gw.url("/oauth/token"), &h, Some(body), None).await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        r.oauth_error(status, code);
    }
    let r = token_request(
        &gw,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", "x"),
            ("client_id", "backend"),
            ("client_secret", "s3cret-value"),
        ],
    )
    .await;
    r.oauth_error(400, "invalid_grant");
}

#[tokio::test]
async fn other_authorization_errors_are_redirected_with_error() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let p = pkce();
    let redirect = "http://127.0.0.1:5000/callback";
    let base = authorize_params(redirect, &p, "st8");
    let with = |k: &str, v: Option<&str>| -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = base
            .iter()
            .filter(|(key, _)| *key != k)
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        if let Some(v) = v {
            out.push((k.to_owned(), v.to_owned()));
        }
        out
    };
    let cases = [
        (
            "plain",
            with("code_challenge_method", Some("plain")),
            "invalid_request",
        ),
        (
            "no method",
            with("code_challenge_method", None),
            "invalid_request",
        ),
        (
            "missing challenge",
            with("code_challenge", None),
            "invalid_request",
        ),
        (
            "malformed challenge",
            with("code_challenge", Some("abc")),
            "invalid_request",
        ),
        (
            "implicit",
            with("response_type", Some("token")),
            "unsupported_response_type",
        ),
        (
            "unregistered scope",
            with("scope", Some("llm.inference admin")),
            "invalid_scope",
        ),
    ];
    for (what, params, error) in cases {
        let pairs: Vec<(&str, &str)> = params
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let r = send("GET", &authorize_url(&gw, &pairs), &[], None, None).await;
        assert_eq!(r.status, 303, "{what}: {}", r.body);
        let loc = r.location();
        assert!(loc.starts_with(&format!("{redirect}?")), "{what}: {loc}");
        let q = query_of(loc);
        assert_eq!(q["error"], error, "{what}");
        assert_eq!(q["state"], "st8", "{what}");
        assert!(!q.contains_key("code"));
    }
    // Without state: refused too.
    let pairs: Vec<(String, String)> = with("state", None);
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let r = send("GET", &authorize_url(&gw, &pairs), &[], None, None).await;
    assert_eq!(r.status, 303);
    assert_eq!(query_of(r.location())["error"], "invalid_request");
}

#[tokio::test]
async fn sign_in_form_is_csrf_safe() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, email) = password_user(&env, 0).await;
    let p = pkce();
    let redirect = "http://127.0.0.1:5000/callback";
    let params = authorize_params(redirect, &p, "s");
    let page = send("GET", &authorize_url(&gw, &params), &[], None, None).await;
    let csrf = csrf_of(&page.body);
    let cookie = cookie_of(&page);
    let post = |cookie: Option<String>, csrf: String, origin: Option<&'static str>| {
        let mut fields: Vec<(String, String)> = params
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        fields.push(("csrf".into(), csrf));
        fields.push(("email".into(), email.clone()));
        fields.push(("password".into(), PASSWORD.into()));
        let body = fields
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        let url = gw.url("/oauth/authorize");
        async move {
            let mut h = vec![(
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            )];
            if let Some(c) = cookie {
                h.push(("cookie", c));
            }
            if let Some(o) = origin {
                h.push(("origin", o.to_owned()));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send("POST", &url, &h, Some(body), None).await
        }
    };
    // No cookie (a cross-site POST: SameSite=Strict keeps it out).
    let r = post(None, csrf.clone(), None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // The cookie with a well-formed token that does not belong to it (another page's).
    let other = send("GET", &authorize_url(&gw, &params), &[], None, None).await;
    let r = post(Some(cookie.clone()), csrf_of(&other.body), None).await;
    assert_eq!(r.status, 403, "another page's token with this cookie");
    // A tampered token.
    let r = post(Some(cookie.clone()), csrf.replace('A', "B") + "x", None).await;
    assert_eq!(r.status, 403, "a tampered token");
    let r = post(Some(cookie_of(&other)), csrf.clone(), None).await;
    assert_eq!(r.status, 403, "a token bound to another cookie");
    // Another origin.
    let r = post(
        Some(cookie.clone()),
        csrf.clone(),
        Some("http://evil.example"),
    )
    .await;
    assert_eq!(r.status, 403);
    // The real thing.
    let r = post(Some(cookie), csrf, None).await;
    assert_eq!(r.status, 303, "{}", r.body);
}

// ---------------------------------------------------------------------------------
// Sign-in: credentials, throttling, users

#[tokio::test]
async fn wrong_credentials_get_a_generic_message_and_failures_lock_out() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__OAUTH__SIGNIN_MAX_FAILURES", "2"),
                ("TOLLGATE__OAUTH__SIGNIN_LOCKOUT_INITIAL_SECS", "120"),
            ],
        )
        .await;
    let (_, a) = password_user(&env, 0).await;
    let (_, b) = password_user(&env, 0).await;
    let p = pkce();
    let params = authorize_params("http://127.0.0.1:5000/callback", &p, "s");
    let ip = |last: u8| Some(IpAddr::from([127, 0, 0, last]));

    // Wrong password and unknown account: the same generic answer.
    let wrong = sign_in_from(&gw, &params, &a, "not the password", ip(1)).await;
    assert_eq!(wrong.status, 200);
    assert!(wrong.body.contains(WRONG), "{}", wrong.body);
    assert!(wrong.body.contains("name=\"password\""), "the form again");
    let unknown = sign_in_from(&gw, &params, "nobody@example.com", PASSWORD, ip(2)).await;
    assert_eq!(unknown.status, 200);
    assert!(unknown.body.contains(WRONG));

    // Per account: a second failure of `a` locks it, whatever the IP.
    let r = sign_in_from(&gw, &params, &a, "still wrong", ip(3)).await;
    assert_eq!(r.status, 200);
    let r = sign_in_from(&gw, &params, &a, PASSWORD, ip(4)).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("Too many failed sign-in attempts"));
    // Another account from a clean IP is unaffected.
    let r = sign_in_from(&gw, &params, &b, PASSWORD, ip(5)).await;
    assert_eq!(r.status, 303, "{}", r.body);

    // Per IP: two failures from 127.0.0.6 on different accounts lock that IP.
    for email in ["x1@example.com", "x2@example.com"] {
        let r = sign_in_from(&gw, &params, email, "wrong", ip(6)).await;
        assert_eq!(r.status, 200);
    }
    let r = sign_in_from(&gw, &params, &b, PASSWORD, ip(6)).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let r = sign_in_from(&gw, &params, &b, PASSWORD, ip(7)).await;
    assert_eq!(r.status, 303);
}

/// How a burst of wrong sign-ins was answered.
#[derive(Debug, Default)]
struct Burst {
    /// 200 with the generic message: the password was checked.
    wrong: usize,
    /// 429: refused while locked, unchecked.
    locked: usize,
    /// 503: no hasher free and the queue full, unchecked.
    busy: usize,
}

/// Tallies the answers to wrong sign-ins, asserting each is one of the three.
fn burst_of(rs: &[Resp]) -> Burst {
    let mut b = Burst::default();
    for r in rs {
        match r.status {
            200 => {
                assert!(r.body.contains(WRONG), "{}", r.body);
                b.wrong += 1;
            }
            429 => {
                assert!(
                    r.body.contains("Too many failed sign-in attempts"),
                    "{}",
                    r.body
                );
                let secs: u64 = r.headers["retry-after"].parse().unwrap();
                assert!(secs >= 1, "retry-after {secs}");
                b.locked += 1;
            }
            503 => {
                assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
                b.busy += 1;
            }
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    assert_eq!(b.wrong + b.locked + b.busy, rs.len(), "{b:?}");
    b
}

fn loopback(i: usize) -> Option<IpAddr> {
    Some(IpAddr::from([
        127,
        10,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ]))
}

const SIGNIN_HASHES: &str = "tollgate_password_hashes_total{purpose=\"signin\"}";

#[tokio::test]
async fn parallel_wrong_guesses_are_refused_before_hashing() {
    const MAX: usize = 3;
    const GUESSES: usize = 200;
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__OAUTH__SIGNIN_MAX_FAILURES", "3"),
                ("TOLLGATE__OAUTH__SIGNIN_LOCKOUT_INITIAL_SECS", "120"),
                ("TOLLGATE__OAUTH__SIGNIN_LOCKOUT_MAX_SECS", "120"),
            ],
        )
        .await;
    let (_, email) = password_user(&env, 0).await;
    let p = pkce();
    let params = authorize_params("http://127.0.0.1:5000/callback", &p, "s");
    let (cookie, csrf) = sign_in_page(&gw, &params).await;

    // One account, guessed from 200 addresses at once: its lock is what must hold.
    let before = counter(&env.metrics(&gw).await, SIGNIN_HASHES);
    let rs =
        futures_util::future::join_all(
            (0..GUESSES).map(|i| {
                let guess = format!("guess {i}");
                let (params, cookie, csrf, email, gw) = (&params, &cookie, &csrf, &email, &gw);
                async move {
                    submit_sign_in(gw, params, (cookie, csrf), email, &guess, loopback(i)).await
                }
            }),
        )
        .await;
    let m = env.metrics(&gw).await;
    let hashed = counter(&m, SIGNIN_HASHES) - before;
    let b = burst_of(&rs);
    println!("one account, {GUESSES} parallel guesses: {b:?}, password hashes run: {hashed}");
    assert!(
        hashed <= MAX as u64,
        "{hashed} hashes for {MAX} allowed failures: {b:?}"
    );
    assert_eq!(hashed, b.wrong as u64, "a 200 is a checked password: {b:?}");
    assert!(b.wrong >= 1, "{b:?}");
    assert_eq!(
        counter(&m, "tollgate_signin_locked_total{subject=\"account\"}"),
        b.locked as u64
    );
    // Locked now: even the right password is refused, unchecked.
    let r = sign_in_from(&gw, &params, &email, PASSWORD, loopback(GUESSES)).await;
    assert_eq!(r.status, 429, "{}", r.body);

    // One address, guessing 200 accounts at once: its lock is what must hold.
    let before = counter(&env.metrics(&gw).await, SIGNIN_HASHES);
    let from = Some(IpAddr::from([127, 11, 0, 1]));
    let rs = futures_util::future::join_all((0..GUESSES).map(|i| {
        let account = format!("guess{i}@example.com");
        let (params, cookie, csrf, gw) = (&params, &cookie, &csrf, &gw);
        async move { submit_sign_in(gw, params, (cookie, csrf), &account, "guess", from).await }
    }))
    .await;
    let m = env.metrics(&gw).await;
    let hashed = counter(&m, SIGNIN_HASHES) - before;
    let b = burst_of(&rs);
    println!("one address, {GUESSES} parallel guesses: {b:?}, password hashes run: {hashed}");
    assert!(
        hashed <= MAX as u64,
        "{hashed} hashes for {MAX} allowed failures: {b:?}"
    );
    assert_eq!(hashed, b.wrong as u64, "{b:?}");
    assert!(b.wrong >= 1, "{b:?}");
    assert_eq!(
        counter(&m, "tollgate_signin_locked_total{subject=\"ip\"}"),
        b.locked as u64
    );
}

#[tokio::test]
async fn after_the_lock_expires_the_right_password_signs_in() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__OAUTH__SIGNIN_MAX_FAILURES", "2"),
                ("TOLLGATE__OAUTH__SIGNIN_LOCKOUT_INITIAL_SECS", "3"),
                ("TOLLGATE__OAUTH__SIGNIN_LOCKOUT_MAX_SECS", "60"),
            ],
        )
        .await;
    let (_, email) = password_user(&env, 0).await;
    let p = pkce();
    let params = authorize_params("http://127.0.0.1:5000/callback", &p, "s");
    for i in 0..2 {
        let r = sign_in_from(&gw, &params, &email, "wrong", loopback(i)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains(WRONG));
    }
    let r = sign_in_from(&gw, &params, &email, PASSWORD, loopback(2)).await;
    assert_eq!(r.status, 429, "{}", r.body);
    // Refused attempts neither count nor extend the lock: keep asking until it lifts.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = sign_in_from(&gw, &params, &email, PASSWORD, loopback(3)).await;
        if r.status != 429 || Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(r.status, 303, "{}", r.body);
    // That success cleared the account (and the lock its own attempt armed).
    let r = sign_in_from(&gw, &params, &email, PASSWORD, loopback(4)).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let r = sign_in_from(&gw, &params, &email, "wrong", loopback(5)).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn successes_behind_one_address_do_not_lock_it() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__OAUTH__SIGNIN_MAX_FAILURES", "2"),
                ("TOLLGATE__OAUTH__SIGNIN_LOCKOUT_INITIAL_SECS", "120"),
            ],
        )
        .await;
    let (_, a) = password_user(&env, 0).await;
    let (_, b) = password_user(&env, 0).await;
    let p = pkce();
    let params = authorize_params("http://127.0.0.1:5000/callback", &p, "s");
    let nat = Some(IpAddr::from([127, 12, 0, 1]));
    let r = sign_in_from(&gw, &params, "nobody@example.com", "wrong", nat).await;
    assert_eq!(r.status, 200);
    // Many users sign in from the same address: each success gives its attempt back.
    for email in [&a, &b, &a, &b, &a] {
        let r = sign_in_from(&gw, &params, email, PASSWORD, nat).await;
        assert_eq!(r.status, 303, "{}", r.body);
    }
    // Failures still count: the second one locks the address.
    let r = sign_in_from(&gw, &params, "nobody2@example.com", "wrong", nat).await;
    assert_eq!(r.status, 200);
    let r = sign_in_from(&gw, &params, &a, PASSWORD, nat).await;
    assert_eq!(r.status, 429, "{}", r.body);
}

#[tokio::test]
async fn a_full_hasher_queue_answers_503_with_retry_after() {
    const CALLS: usize = 200;
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__PASSWORDS__MAX_QUEUED", "0"),
                ("TOLLGATE__OAUTH__SIGNIN_MAX_FAILURES", "1000"),
            ],
        )
        .await;
    let p = pkce();
    let params = authorize_params("http://127.0.0.1:5000/callback", &p, "s");
    let (cookie, csrf) = sign_in_page(&gw, &params).await;

    // Sign-in: more parallel checks than hashers, and no queue.
    let rs =
        futures_util::future::join_all((0..CALLS).map(|i| {
            let account = format!("busy{i}@example.com");
            let (params, cookie, csrf, gw) = (&params, &cookie, &csrf, &gw);
            async move {
                submit_sign_in(gw, params, (cookie, csrf), &account, "guess", loopback(i)).await
            }
        }))
        .await;
    let m = env.metrics(&gw).await;
    let b = burst_of(&rs);
    println!("{CALLS} parallel sign-ins, no queue: {b:?}");
    assert_eq!(b.locked, 0, "{b:?}");
    assert!(b.busy >= 1, "{b:?}");
    assert_eq!(counter(&m, SIGNIN_HASHES), b.wrong as u64);
    assert_eq!(
        counter(&m, "tollgate_password_queue_full_total{purpose=\"signin\"}"),
        b.busy as u64
    );
    let busy = rs.iter().find(|r| r.status == 503).unwrap();
    assert_eq!(busy.headers["retry-after"], "1");
    assert!(busy.body.contains("Sign-in is busy"), "{}", busy.body);
    assert!(
        busy.headers["content-type"].starts_with("text/html"),
        "{:?}",
        busy.headers
    );

    // The token endpoint's client-secret check: RFC 6749 `temporarily_unavailable`.
    let argon2 = argon2::Params::new(19_456, 2, 1, None).unwrap();
    let secret_hash = tollgate::oauth::password::hash("s3cret-value", &argon2).unwrap();
    env.db()
        .await
        .execute(
            "INSERT INTO oauth_clients (client_id, client_name, client_secret_hash, redirect_uris, grant_types, response_types, scope)
             VALUES ('backend', 'Backend', $1, ARRAY['https://app.example/cb'], ARRAY['refresh_token'], ARRAY['code'], 'llm.inference')",
            &[&secret_hash],
        )
        .await
        .unwrap();
    let pairs = [
        ("grant_type", "refresh_token"),
        ("refresh_token", "x"),
        ("client_id", "backend"),
        ("client_secret", "s3cret-value"),
    ];
    let rs = futures_util::future::join_all((0..CALLS).map(|_| token_request(&gw, &pairs))).await;
    let m = env.metrics(&gw).await;
    let (mut checked, mut busy) = (0, 0);
    for r in &rs {
        if r.status == 503 {
            r.oauth_error(503, "temporarily_unavailable");
            assert_eq!(r.headers["retry-after"], "1");
            busy += 1;
        } else {
            r.oauth_error(400, "invalid_grant");
            checked += 1;
        }
    }
    println!("{CALLS} parallel client authentications, no queue: {checked} checked, {busy} busy");
    assert!(busy >= 1);
    assert_eq!(
        counter(
            &m,
            "tollgate_password_hashes_total{purpose=\"client_secret\"}"
        ),
        checked
    );
    assert_eq!(
        counter(
            &m,
            "tollgate_password_queue_full_total{purpose=\"client_secret\"}"
        ),
        busy
    );
}

#[tokio::test]
async fn password_is_rehashed_when_parameters_rise() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let (user, email) = password_user(&env, 0).await;
    let db = env.db().await;
    let hash = |db: tokio_postgres::Client| async move {
        db.query_one("SELECT password_hash FROM users WHERE id = $1", &[&user])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let before = hash(env.db().await).await;
    assert!(
        before.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{before}"
    );
    let gw = env
        .gateway_with(
            &mock,
            &[("TOLLGATE__PASSWORDS__ARGON2_MEMORY_KIB", "24576")],
        )
        .await;
    let p = pkce();
    let params = authorize_params("http://127.0.0.1:5000/callback", &p, "s");
    let r = sign_in(&gw, &params, &email, PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let after = hash(db).await;
    assert!(
        after.starts_with("$argon2id$v=19$m=24576,t=2,p=1$"),
        "{after}"
    );
    // The new hash still signs in.
    let r = sign_in(&gw, &params, &email, PASSWORD).await;
    assert_eq!(r.status, 303);
}

#[tokio::test]
async fn deactivated_or_deleted_user_is_locked_out_everywhere() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(&mock, &[("TOLLGATE__OAUTH__REVOCATION_REFRESH_MS", "200")])
        .await;
    let db = env.db().await;
    for (what, sql) in [
        (
            "deactivated",
            "UPDATE users SET is_active = false WHERE id = $1",
        ),
        (
            "deleted",
            "UPDATE users SET deleted_at = now() WHERE id = $1",
        ),
    ] {
        let (user, email) = password_user(&env, 1000).await;
        let (access, refresh_token) = tokens_for(&gw, &email).await;
        let (s, _, _) = env.chat(&gw, &access, chat_body()).await;
        assert_eq!(s, 200, "{what}");
        db.execute(sql, &[&user]).await.unwrap();

        // The issued access token stops working (the set reloads in the background).
        let deadline = Instant::now() + Duration::from_secs(30);
        let (s, h, b) = loop {
            let (s, h, b) = env.chat(&gw, &access, chat_body()).await;
            if s != 200 || Instant::now() > deadline {
                break (s, h, b);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_invalid_token(s, &h, &b, what);
        // Its refresh tokens are revoked.
        let live: i64 = db
            .query_one(
                "SELECT count(*) FROM oauth_refresh_tokens WHERE user_id = $1 AND revoked_at IS NULL",
                &[&user],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(live, 0, "{what}");
        refresh(&gw, &refresh_token)
            .await
            .oauth_error(400, "invalid_grant");
        // It cannot sign in.
        let p = pkce();
        let r = sign_in(
            &gw,
            &authorize_params("http://127.0.0.1:5000/callback", &p, "s"),
            &email,
            PASSWORD,
        )
        .await;
        assert_eq!(r.status, 200, "{what}");
        assert!(r.body.contains(WRONG), "{what}");
    }
}

// ---------------------------------------------------------------------------------
// Token endpoint negatives

#[tokio::test]
async fn code_redemption_negatives() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, email) = password_user(&env, 1000).await;
    let redirect = "http://127.0.0.1:5000/callback";
    let code_for = |p: &Pkce| {
        let params = authorize_params(redirect, p, "s")
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect::<Vec<_>>();
        let gw = &gw;
        let email = email.clone();
        async move {
            let pairs: Vec<(&str, &str)> = params
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            let r = sign_in(gw, &pairs, &email, PASSWORD).await;
            assert_eq!(r.status, 303, "{}", r.body);
            query_of(r.location())["code"].clone()
        }
    };

    // Wrong verifier: invalid_grant, and the code is spent.
    let p = pkce();
    let code = code_for(&p).await;
    redeem(&gw, &code, redirect, &pkce().verifier)
        .await
        .oauth_error(400, "invalid_grant");
    redeem(&gw, &code, redirect, &p.verifier)
        .await
        .oauth_error(400, "invalid_grant");

    // Missing or malformed verifier: invalid_request (the code stays usable).
    let p = pkce();
    let code = code_for(&p).await;
    token_request(
        &gw,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", CLIENT),
            ("code", &code),
            ("redirect_uri", redirect),
        ],
    )
    .await
    .oauth_error(400, "invalid_request");
    redeem(&gw, &code, redirect, "short")
        .await
        .oauth_error(400, "invalid_request");
    // The plain method (verifier == challenge) does not verify.
    redeem(&gw, &code, redirect, &p.challenge)
        .await
        .oauth_error(400, "invalid_grant");

    // Redirect URI different from the authorization request's (another port).
    let p = pkce();
    let code = code_for(&p).await;
    redeem(&gw, &code, "http://127.0.0.1:5001/callback", &p.verifier)
        .await
        .oauth_error(400, "invalid_grant");

    // Expired (past its 60 s).
    let p = pkce();
    let code = code_for(&p).await;
    env.db()
        .await
        .execute(
            "UPDATE oauth_authorization_codes SET expires_at = now() - interval '1 second'
              WHERE code_hash = sha256($1::text::bytea)",
            &[&code],
        )
        .await
        .unwrap();
    redeem(&gw, &code, redirect, &p.verifier)
        .await
        .oauth_error(400, "invalid_grant");

    // Replay: the second redemption fails and revokes what the first one got.
    let p = pkce();
    let code = code_for(&p).await;
    let first = redeem(&gw, &code, redirect, &p.verifier).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let v = first.json();
    let access = v["access_token"].as_str().unwrap().to_owned();
    let rt = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, _, _) = env.chat(&gw, &access, chat_body()).await;
    assert_eq!(s, 200);
    redeem(&gw, &code, redirect, &p.verifier)
        .await
        .oauth_error(400, "invalid_grant");
    refresh(&gw, &rt).await.oauth_error(400, "invalid_grant");
    let (s, h, b) = env.chat(&gw, &access, chat_body()).await;
    assert_invalid_token(s, &h, &b, "access token of a replayed code");

    // Unknown code, unknown grant type, missing grant type, not a form.
    redeem(&gw, "AAAA", redirect, &p.verifier)
        .await
        .oauth_error(400, "invalid_grant");
    token_request(&gw, &[("grant_type", "password"), ("client_id", CLIENT)])
        .await
        .oauth_error(400, "unsupported_grant_type");
    token_request(&gw, &[("client_id", CLIENT)])
        .await
        .oauth_error(400, "invalid_request");
    token_request(
        &gw,
        &[
            ("grant_type", "refresh_token"),
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
        ],
    )
    .await
    .oauth_error(400, "invalid_request");
    let r = send(
        "POST",
        &gw.url("/oauth/token"),
        &[("content-type", "application/json")],
        Some("{}".into()),
        None,
    )
    .await;
    r.oauth_error(400, "invalid_request");
    // A code issued to one client cannot be redeemed by another.
    env.db()
        .await
        .execute(
            "INSERT INTO oauth_clients (client_id, client_name, redirect_uris, grant_types, response_types, scope)
             VALUES ('other-app', 'Other', ARRAY['http://127.0.0.1/callback'], ARRAY['authorization_code'], ARRAY['code'], 'llm.inference')",
            &[],
        )
        .await
        .unwrap();
    let p = pkce();
    let code = code_for(&p).await;
    token_request(
        &gw,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "other-app"),
            ("code", &code),
            ("redirect_uri", redirect),
            ("code_verifier", &p.verifier),
        ],
    )
    .await
    .oauth_error(400, "invalid_grant");
    // A client not registered for refresh tokens may not use them.
    token_request(
        &gw,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "other-app"),
            ("refresh_token", "x"),
        ],
    )
    .await
    .oauth_error(400, "unauthorized_client");
}

#[tokio::test]
async fn refresh_token_reuse_revokes_the_family_and_tokens_expire() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, email) = password_user(&env, 1000).await;
    let db = env.db().await;

    // Reuse of a rotated token revokes the whole family.
    let (_, r1) = tokens_for(&gw, &email).await;
    let t = refresh(&gw, &r1).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let a2 = t.json()["access_token"].as_str().unwrap().to_owned();
    let r2 = t.json()["refresh_token"].as_str().unwrap().to_owned();
    refresh(&gw, &r1).await.oauth_error(400, "invalid_grant");
    refresh(&gw, &r2).await.oauth_error(400, "invalid_grant");
    let (s, h, b) = env.chat(&gw, &a2, chat_body()).await;
    assert_invalid_token(s, &h, &b, "access token of a revoked family");
    // Another sign-in of the same user is untouched.
    let (a3, r3) = tokens_for(&gw, &email).await;
    let (s, _, _) = env.chat(&gw, &a3, chat_body()).await;
    assert_eq!(s, 200);

    // Idle expiry.
    db.execute(
        "UPDATE oauth_refresh_tokens SET expires_at = now() - interval '1 second'
          WHERE token_hash = sha256($1::text::bytea)",
        &[&r3],
    )
    .await
    .unwrap();
    refresh(&gw, &r3).await.oauth_error(400, "invalid_grant");

    // Absolute expiry: rotation never extends past it.
    let (_, r4) = tokens_for(&gw, &email).await;
    let t = refresh(&gw, &r4).await;
    assert_eq!(t.status, 200);
    let r5 = t.json()["refresh_token"].as_str().unwrap().to_owned();
    let row = db
        .query_one(
            "SELECT expires_at <= family_expires_at, family_expires_at > now() + interval '89 days'
               FROM oauth_refresh_tokens WHERE token_hash = sha256($1::text::bytea)",
            &[&r5],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    db.execute(
        "UPDATE oauth_refresh_tokens SET family_expires_at = now() - interval '1 second'
          WHERE user_id = $1",
        &[&user],
    )
    .await
    .unwrap();
    refresh(&gw, &r5).await.oauth_error(400, "invalid_grant");

    // Garbage, a missing token, a wider scope.
    refresh(&gw, "garbage")
        .await
        .oauth_error(400, "invalid_grant");
    token_request(
        &gw,
        &[("grant_type", "refresh_token"), ("client_id", CLIENT)],
    )
    .await
    .oauth_error(400, "invalid_request");
    let (_, r6) = tokens_for(&gw, &email).await;
    token_request(
        &gw,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("refresh_token", &r6),
            ("scope", "llm.inference credits.read"),
        ],
    )
    .await
    .oauth_error(400, "invalid_scope");
}

#[tokio::test]
async fn a_sign_in_without_scope_is_granted_the_clients_registered_scopes() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, email) = password_user(&env, 1000).await;
    let registered: String = env
        .db()
        .await
        .query_one(
            "SELECT scope FROM oauth_clients WHERE client_id = $1",
            &[&CLIENT],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        registered,
        "openid email profile llm.inference models.read user.info credits.read"
    );
    let p = pkce();
    let redirect = "http://127.0.0.1:43210/callback";
    let params: Vec<_> = authorize_params(redirect, &p, "s")
        .into_iter()
        .filter(|(k, _)| *k != "scope")
        .collect();
    let r = sign_in(&gw, &params, &email, PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let code = query_of(r.location())["code"].clone();
    let t = redeem(&gw, &code, redirect, &p.verifier).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let v = t.json();
    assert_eq!(v["scope"], registered.as_str());
    let access = v["access_token"].as_str().unwrap().to_owned();
    let refresh1 = v["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(jwt_part(&access, 1)["scope"], registered.as_str());
    // The registered scopes reach every scoped route.
    for path in [
        "/v1/models",
        "/v1/credits",
        "/v1/usage",
        "/v1/users/me",
        "/v1/users/me/preferences",
    ] {
        let (s, _, b) = env.request("GET", &gw.url(path), Some(&access), None).await;
        assert_eq!(s, 200, "{path}: {}", String::from_utf8_lossy(&b));
    }
    let (s, _, b) = env.chat(&gw, &access, chat_body()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));

    // A refresh without scope keeps the grant; one with a narrower scope narrows it,
    // and the narrowed token is refused where a dropped scope is needed.
    let t = refresh(&gw, &refresh1).await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert_eq!(t.json()["scope"], registered.as_str());
    let refresh2 = t.json()["refresh_token"].as_str().unwrap().to_owned();
    let t = token_request(
        &gw,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("refresh_token", &refresh2),
            ("scope", "llm.inference"),
        ],
    )
    .await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert_eq!(t.json()["scope"], "llm.inference");
    let narrowed = t.json()["access_token"].as_str().unwrap().to_owned();
    let (s, _, b) = env.chat(&gw, &narrowed, chat_body()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (s, h, b) = env
        .request("GET", &gw.url("/v1/users/me"), Some(&narrowed), None)
        .await;
    assert_eq!(s, 403, "{}", String::from_utf8_lossy(&b));
    assert_eq!(openai_error(&b)["code"], "insufficient_scope");
    assert_eq!(
        h["www-authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"user.info\""
    );
}

// ---------------------------------------------------------------------------------
// The gateway's token check

#[tokio::test]
async fn token_check_refuses_every_forgery_with_invalid_token() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, _) = env.user(1000).await;
    let (_, key) = signing_key(&env);
    let jwks = json(
        send("GET", &gw.url("/.well-known/jwks.json"), &[], None, None)
            .await
            .body
            .as_bytes(),
    );
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let public_x = jwks["keys"][0]["x"].as_str().unwrap().to_owned();
    let t = now();
    let base = json!({
        "iss": "http://127.0.0.1:8080", "aud": "tollgate", "sub": user.to_string(),
        "iat": t, "exp": t + 300, "jti": Uuid::new_v4().to_string(),
        "client_id": CLIENT, "scope": "llm.inference",
    });
    let header = || {
        let mut h = Header::new(Algorithm::EdDSA);
        h.typ = Some("at+jwt".into());
        h.kid = Some(kid.clone());
        h
    };
    let sign =
        |claims: &serde_json::Value, h: &Header| jsonwebtoken::encode(h, claims, &key).unwrap();
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };

    // The well-formed token is accepted: the negatives below fail for their one flaw.
    let (s, _, b) = env.chat(&gw, &sign(&base, &header()), chat_body()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));

    let unsigned = |h: serde_json::Value| {
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(h.to_string()),
            URL_SAFE_NO_PAD.encode(base.to_string())
        )
    };
    let hmac = |secret: &[u8]| {
        let mut h = Header::new(Algorithm::HS256);
        h.typ = Some("at+jwt".into());
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(&h, &base, &EncodingKey::from_secret(secret)).unwrap()
    };
    let mut unknown_kid = header();
    unknown_kid.kid = Some("not-a-kid".into());
    let mut no_kid = header();
    no_kid.kid = None;
    let mut jwt_typ = header();
    jwt_typ.typ = Some("JWT".into());
    let other_key = {
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        EncodingKey::from_ed_der(doc.as_ref())
    };
    let cases: Vec<(&str, String)> = vec![
        ("expired", sign(&with("exp", json!(t - 120)), &header())),
        (
            "not yet valid",
            sign(&with("nbf", json!(t + 3600)), &header()),
        ),
        (
            "wrong iss",
            sign(&with("iss", json!("https://evil.example")), &header()),
        ),
        (
            "wrong aud",
            sign(&with("aud", json!("someone-else")), &header()),
        ),
        ("no exp", sign(&without("exp"), &header())),
        ("no sub", sign(&without("sub"), &header())),
        ("no iat", sign(&without("iat"), &header())),
        ("no jti", sign(&without("jti"), &header())),
        ("no client_id", sign(&without("client_id"), &header())),
        (
            "alg none",
            unsigned(json!({"alg": "none", "typ": "at+jwt", "kid": kid})),
        ),
        (
            "alg None",
            unsigned(json!({"alg": "None", "typ": "at+jwt", "kid": kid})),
        ),
        (
            "HS256 with the public key (JWK x)",
            hmac(public_x.as_bytes()),
        ),
        (
            "HS256 with the public key (raw)",
            hmac(&URL_SAFE_NO_PAD.decode(&public_x).unwrap()),
        ),
        ("unknown kid", sign(&base, &unknown_kid)),
        ("no kid", sign(&base, &no_kid)),
        ("typ JWT", sign(&base, &jwt_typ)),
        (
            "signed by another key",
            jsonwebtoken::encode(&header(), &base, &other_key).unwrap(),
        ),
        ("garbage", "a.b.c".into()),
    ];
    for (what, token) in cases {
        let (s, h, b) = env.chat(&gw, &token, chat_body()).await;
        assert_invalid_token(s, &h, &b, what);
    }
    // No credentials: 401 with a bare challenge (RFC 6750 §3.1).
    let (s, h, b) = env
        .request(
            "POST",
            &gw.url("/v1/chat/completions"),
            None,
            Some(b"{}".to_vec()),
        )
        .await;
    assert_eq!(s, 401);
    assert_eq!(h["www-authenticate"], "Bearer");
    assert_eq!(openai_error(&b)["code"], "missing_api_key");
}

#[tokio::test]
async fn rotated_keys_verify_until_retired() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let (_, token) = env.user(1000).await; // signed by the first key (generated)
    let first = env.dir.path().join("signing.pem");
    let second = env.dir.path().join("keys/second.pem");
    let prev = format!("[\"{}\"]", first.display());
    let rotated = [
        ("TOLLGATE__AUTH__SIGNING_KEY_PATH", second.to_str().unwrap()),
        ("TOLLGATE__AUTH__PREVIOUS_KEY_PATHS", prev.as_str()),
    ];
    let gw = env.gateway_with(&mock, &rotated).await;
    assert!(second.exists(), "the new key is generated and persisted");
    let jwks = json(
        send("GET", &gw.url("/.well-known/jwks.json"), &[], None, None)
            .await
            .body
            .as_bytes(),
    );
    let kids: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kids.len(), 2);
    let old_kid = jwt_part(&token, 0)["kid"].as_str().unwrap().to_owned();
    assert_eq!(kids[1], old_kid, "the older key is still published");
    // The older key still verifies; new tokens are signed by the newest.
    let (s, _, _) = env.chat(&gw, &token, chat_body()).await;
    assert_eq!(s, 200);
    let (_, email) = password_user(&env, 1000).await;
    let (access, _) = tokens_for(&gw, &email).await;
    assert_eq!(jwt_part(&access, 0)["kid"], kids[0].as_str());
    let (s, _, _) = env.chat(&gw, &access, chat_body()).await;
    assert_eq!(s, 200);
    drop(gw);

    // Retired: the old key is no longer listed, its tokens are refused.
    let gw = env
        .gateway_with(
            &mock,
            &[("TOLLGATE__AUTH__SIGNING_KEY_PATH", second.to_str().unwrap())],
        )
        .await;
    let (s, h, b) = env.chat(&gw, &token, chat_body()).await;
    assert_invalid_token(s, &h, &b, "token of a retired key");
    let (s, _, _) = env.chat(&gw, &access, chat_body()).await;
    assert_eq!(s, 200);
}

/// A local identity provider's JWKS endpoint: serves the current key set and counts
/// fetches.
struct Idp {
    url: String,
    keys: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Idp {
    async fn start() -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let keys = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (k, f) = (keys.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (k, f) = (k.clone(), f.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    while let Ok(m) = s.read(&mut buf[n..]).await {
                        if m == 0 {
                            break;
                        }
                        n += m;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = json!({"keys": *k.lock().unwrap()}).to_string();
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                });
            }
        });
        Idp { url, keys, fetches }
    }

    /// Adds an Ed25519 key with `kid`; returns its signing key.
    fn add_key(&self, kid: &str) -> EncodingKey {
        use aws_lc_rs::signature::KeyPair;
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        let kp = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        self.keys.lock().unwrap().push(json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(kp.public_key().as_ref()),
        }));
        EncodingKey::from_ed_der(doc.as_ref())
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn external_issuer_tokens_via_its_cached_jwks() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let (user, _) = env.user(1000).await;
    let idp = Idp::start().await;
    let k1 = idp.add_key("ext-1");
    let config = |interval: &'static str| {
        vec![
            (
                "TOLLGATE__EXTERNAL_ISSUER__ISSUER",
                "https://idp.example".to_owned(),
            ),
            ("TOLLGATE__EXTERNAL_ISSUER__JWKS_URL", idp.url.clone()),
            (
                "TOLLGATE__EXTERNAL_ISSUER__AUDIENCE",
                "tollgate-api".to_owned(),
            ),
            (
                "TOLLGATE__EXTERNAL_ISSUER__USER_CLAIM",
                "tollgate_user".to_owned(),
            ),
            (
                "TOLLGATE__EXTERNAL_ISSUER__JWKS_REFETCH_MIN_INTERVAL_MS",
                interval.to_owned(),
            ),
        ]
    };
    let t = now();
    let claims = json!({
        "iss": "https://idp.example", "aud": "tollgate-api", "sub": "idp|12345",
        "tollgate_user": user.to_string(), "client_id": "idp-app", "jti": "j1",
        "iat": t, "exp": t + 300, "scope": "llm.inference",
    });
    let with = |k: &str, v: serde_json::Value| {
        let mut c = claims.clone();
        c[k] = v;
        c
    };
    let sign = |claims: &serde_json::Value, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(Algorithm::EdDSA);
        h.typ = Some("at+jwt".into());
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    };

    // A long refetch interval: the first unknown kid fetches, later ones cannot.
    let cfg = config("3600000");
    let env_pairs: Vec<(&str, &str)> = cfg.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = env.gateway_with(&mock, &env_pairs).await;
    let (s, _, b) = env
        .chat(&gw, &sign(&claims, "ext-1", &k1), chat_body())
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(idp.fetches(), 1);
    let (s, _, _) = env
        .chat(
            &gw,
            &sign(&with("jti", json!("j2")), "ext-1", &k1),
            chat_body(),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(idp.fetches(), 1, "served from the cached JWKS");
    // Its `scope` claim is enforced like ours: whole values only.
    for scope in ["models.read", "llm.inferencex", ""] {
        let token = sign(&with("scope", json!(scope)), "ext-1", &k1);
        let (s, h, b) = env.chat(&gw, &token, chat_body()).await;
        assert_eq!(s, 403, "{scope}: {}", String::from_utf8_lossy(&b));
        assert_eq!(openai_error(&b)["code"], "insufficient_scope");
        assert_eq!(
            h["www-authenticate"],
            "Bearer error=\"insufficient_scope\", scope=\"llm.inference\""
        );
    }
    let (s, _, _) = env
        .request(
            "GET",
            &gw.url("/v1/models"),
            Some(&sign(&with("scope", json!("models.read")), "ext-1", &k1)),
            None,
        )
        .await;
    assert_eq!(s, 200);
    // Our own tokens still work beside it.
    let (_, own) = env.user(1000).await;
    let (s, _, _) = env.chat(&gw, &own, chat_body()).await;
    assert_eq!(s, 200);

    let mut hs = Header::new(Algorithm::HS256);
    hs.typ = Some("at+jwt".into());
    hs.kid = Some("ext-1".into());
    let mut no_typ = Header::new(Algorithm::EdDSA);
    no_typ.kid = Some("ext-1".into());
    let mut without_user = claims.clone();
    without_user
        .as_object_mut()
        .unwrap()
        .remove("tollgate_user");
    let cases = vec![
        (
            "wrong aud",
            sign(&with("aud", json!("tollgate")), "ext-1", &k1),
        ),
        (
            "wrong iss",
            sign(&with("iss", json!("https://other.example")), "ext-1", &k1),
        ),
        ("expired", sign(&with("exp", json!(t - 120)), "ext-1", &k1)),
        ("no user claim", sign(&without_user, "ext-1", &k1)),
        (
            "user claim not a user id",
            sign(&with("tollgate_user", json!("idp|12345")), "ext-1", &k1),
        ),
        (
            "HS256",
            jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(b"k")).unwrap(),
        ),
        (
            "typ JWT",
            jsonwebtoken::encode(&no_typ, &claims, &k1).unwrap(),
        ),
    ];
    for (what, token) in cases {
        let (s, h, b) = env.chat(&gw, &token, chat_body()).await;
        assert_invalid_token(s, &h, &b, what);
    }
    assert_eq!(idp.fetches(), 1);
    // The issuer rotates: a new kid is unknown, and within the interval no refetch.
    let k2 = idp.add_key("ext-2");
    let (s, h, b) = env
        .chat(&gw, &sign(&claims, "ext-2", &k2), chat_body())
        .await;
    assert_invalid_token(s, &h, &b, "kid newer than the cached JWKS");
    let (s, h, b) = env
        .chat(&gw, &sign(&claims, "made-up", &k2), chat_body())
        .await;
    assert_invalid_token(s, &h, &b, "unknown kid");
    assert_eq!(idp.fetches(), 1, "at most one fetch per interval");
    drop(gw);

    // A short interval: the unknown kid refetches and the new key verifies.
    let cfg = config("1");
    let env_pairs: Vec<(&str, &str)> = cfg.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = env.gateway_with(&mock, &env_pairs).await;
    let (s, _, _) = env
        .chat(&gw, &sign(&claims, "ext-2", &k2), chat_body())
        .await;
    assert_eq!(s, 200);
    let before = idp.fetches();
    let k3 = idp.add_key("ext-3");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (s, _, b) = env
        .chat(&gw, &sign(&claims, "ext-3", &k3), chat_body())
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(idp.fetches(), before + 1);
}

// ---------------------------------------------------------------------------------
// The sign-in page in a real browser

/// A WebDriver session on Debian's chromium + chromedriver.
struct Browser {
    driver: tokio::process::Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

async fn wd(method: &str, url: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let r = send(
        method,
        url,
        &[("content-type", "application/json")],
        body.map(|b| b.to_string()),
        None,
    )
    .await;
    let v = json(r.body.as_bytes());
    assert_eq!(r.status, 200, "WebDriver {method} {url}: {v}");
    v["value"].clone()
}

impl Browser {
    async fn start() -> Browser {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let chromedriver =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        assert!(
            std::path::Path::new(&chromium).exists()
                && std::path::Path::new(&chromedriver).exists(),
            "the browser test needs {chromium} and {chromedriver} (scripts/test.sh installs them)"
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = tokio::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = client_from(None)
                .request(
                    http::Request::get(format!("{base}/status"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .is_ok();
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-extensions",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let v = wd("POST", &format!("{base}/session"), Some(caps)).await;
        let session = v["sessionId"].as_str().expect("a session id").to_owned();
        // Element lookups wait for the element (a submitted form's next page may still be
        // loading: the password check is a deliberately slow hash).
        wd(
            "POST",
            &format!("{base}/session/{session}/timeouts"),
            Some(json!({"implicit": 15000})),
        )
        .await;
        Browser {
            driver,
            base,
            session,
            _profile: profile,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{}", self.base, self.session, path)
    }

    async fn goto(&self, url: &str) {
        wd("POST", &self.url("/url"), Some(json!({ "url": url }))).await;
    }

    async fn current_url(&self) -> String {
        wd("GET", &self.url("/url"), None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let v = wd(
            "POST",
            &self.url("/element"),
            Some(json!({"using": "css selector", "value": css})),
        )
        .await;
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        wd(
            "POST",
            &self.url(&format!("/element/{e}/value")),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        wd(
            "POST",
            &self.url(&format!("/element/{e}/click")),
            Some(json!({})),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        wd("GET", &self.url(&format!("/element/{e}/text")), None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn wait_for_url(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let u = self.current_url().await;
            if u.starts_with(prefix) {
                return u;
            }
            assert!(Instant::now() < deadline, "still at {u}, expected {prefix}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn quit(mut self) {
        let _ = send("DELETE", &self.url(""), &[], None, None).await;
        let _ = self.driver.kill().await;
    }
}

#[tokio::test]
async fn sign_in_page_in_headless_chromium() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, email) = password_user(&env, 1000).await;
    let mut app = Loopback::start().await;
    let redirect = app.redirect_uri();
    let p = pkce();
    let url = authorize_url(&gw, &authorize_params(&redirect, &p, "browser-state"));
    let browser = Browser::start().await;

    // A wrong password shows the error, on the same form.
    browser.goto(&url).await;
    browser.type_into("#email", &email).await;
    browser.type_into("#password", "not the password").await;
    browser.click("#submit").await;
    assert_eq!(browser.text("#error").await, WRONG);
    assert!(browser
        .current_url()
        .await
        .starts_with(&gw.url("/oauth/authorize")));

    // The right one lands on the app's loopback redirect with a code.
    browser.goto(&url).await;
    browser.type_into("#email", &email).await;
    browser.type_into("#password", PASSWORD).await;
    browser.click("#submit").await;
    let landed = browser.wait_for_url(&redirect).await;
    let q = query_of(&landed);
    assert_eq!(q["state"], "browser-state");
    let received = query_of(&app.next().await);
    assert_eq!(received["code"], q["code"]);
    assert_eq!(browser.text("#done").await, "You are signed in.");
    browser.quit().await;

    // The code works.
    let t = redeem(&gw, &q["code"], &redirect, &p.verifier).await;
    assert_eq!(t.status, 200, "{}", t.body);
}
