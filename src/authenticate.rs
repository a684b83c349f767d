//! Stage 2, authenticate: verify the bearer JWT locally — no database or network call
//! per request. The algorithm comes from our key, never from the token; `typ` must be
//! `at+jwt` (RFC 9068); `iss`, `aud`, `exp` (and `nbf` when present) are checked with a
//! bounded leeway; the `kid` selects the key.
//!
//! Keys are Ed25519 or P-256 PKCS#8 PEM files. The one at `auth.signing_key_path` signs
//! (if the file is missing, an Ed25519 key is generated and persisted there, mode
//! 0600); those at `auth.previous_key_paths` still verify and are published in the
//! JWKS until they are removed from the list (rotation without a flag day).
//! `jku`, `x5u` and embedded `jwk` headers are never followed: the key is chosen by
//! `kid` from our own set only.

pub mod external;
pub mod revocation;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::AuthConfig;
use crate::error::ApiError;

/// The claims of an access token (RFC 9068).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub jti: String,
    pub client_id: String,
    #[serde(default)]
    pub scope: String,
    /// The sign-in (refresh-token family) the token belongs to, when issued by OAuth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

/// Who is calling, once the token has verified.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: Uuid,
    pub client_id: Arc<str>,
    pub scope: Arc<str>,
    /// The sign-in this token belongs to (revoked sessions are refused).
    pub session: Option<Uuid>,
}

/// Tokens that verified, with their principal and expiry: a token is checked
/// cryptographically once, then served from here until it expires (or the key set
/// changes). Sharded to keep lock hold times short; bounded in size.
type Shard = Mutex<HashMap<Box<str>, (Principal, u64)>>;

struct VerifiedCache {
    shards: Vec<Shard>,
    per_shard: usize,
}

const CACHE_SHARDS: usize = 16;
const CACHE_CAPACITY: usize = 65_536;

impl VerifiedCache {
    fn new() -> VerifiedCache {
        VerifiedCache {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            per_shard: CACHE_CAPACITY / CACHE_SHARDS,
        }
    }

    fn shard(&self, token: &str) -> &Shard {
        // The signature's last bytes are uniformly distributed.
        let b = token.as_bytes();
        let i = b.last().map_or(0, |x| usize::from(*x))
            ^ b.get(b.len().saturating_sub(2))
                .map_or(0, |x| usize::from(*x) << 3);
        &self.shards[i % CACHE_SHARDS]
    }

    fn get(&self, token: &str, now: u64) -> Option<Principal> {
        let shard = self.shard(token).lock().ok()?;
        match shard.get(token) {
            Some((p, exp)) if now < *exp => Some(p.clone()),
            _ => None,
        }
    }

    fn insert(&self, token: &str, p: Principal, exp: u64) {
        if let Ok(mut shard) = self.shard(token).lock() {
            if shard.len() >= self.per_shard {
                let now = now_secs();
                shard.retain(|_, (_, e)| *e > now);
                if shard.len() >= self.per_shard {
                    shard.clear();
                }
            }
            shard.insert(token.into(), (p, exp));
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("signing key: {0}")]
pub struct KeyError(pub String);

struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
}

struct VerifyingKey {
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
    /// The public key as a JWK (RFC 7517), for `/.well-known/jwks.json`.
    jwk: serde_json::Value,
}

/// The gateway's key set: signs tokens (CLI, OAuth) and verifies them (every request).
pub struct Authenticator {
    signing: SigningKey,
    verifying: HashMap<String, VerifyingKey>,
    /// Kids in publication order: the signing key first.
    kids: Vec<String>,
    /// A secret derived from the signing key (shared by replicas with the same key),
    /// for form CSRF tokens.
    form_secret: [u8; 32],
    issuer: String,
    audience: String,
    ttl_secs: u64,
    leeway_secs: u64,
    cache: VerifiedCache,
    /// Disabled users and revoked sign-ins (reloaded in the background).
    revocations: revocation::Revocations,
    /// Another issuer whose tokens are accepted too (`[external_issuer]`).
    external: Option<external::ExternalIssuer>,
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

fn pem_decode(pem: &str) -> Result<Vec<u8>, KeyError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(KeyError(
            "expected a PKCS#8 `BEGIN PRIVATE KEY` PEM block".into(),
        ));
    }
    STANDARD
        .decode(body)
        .map_err(|e| KeyError(format!("bad base64 in PEM: {e}")))
}

/// Reads the PKCS#8 key at `path`, generating an Ed25519 one there first if absent.
pub fn load_or_generate_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    if !path.exists() {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| KeyError("could not generate an Ed25519 key".into()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| KeyError(format!("{}: {e}", dir.display())))?;
        }
        write_private(path, pem_encode(doc.as_ref()).as_bytes())?;
        tracing::info!(path = %path.display(), "generated a new Ed25519 signing key");
    }
    let pem =
        std::fs::read_to_string(path).map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
    pem_decode(&pem)
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| KeyError(format!("{}: {e}", path.display())))
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> Result<(), KeyError> {
    std::fs::write(path, data).map_err(|e| KeyError(format!("{}: {e}", path.display())))
}

fn kid_of(public: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public);
    URL_SAFE_NO_PAD.encode(&d.as_ref()[..12])
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One parsed key: (alg, kid, encoding key, verifying key).
fn parse_key(
    der: &[u8],
    cfg: &AuthConfig,
) -> Result<(String, EncodingKey, VerifyingKey), KeyError> {
    let (alg, public, key, jwk) = if let Ok(kp) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        let public = kp.public_key().as_ref().to_vec();
        let x = URL_SAFE_NO_PAD.encode(&public);
        let dk = DecodingKey::from_ed_components(&x).map_err(|e| KeyError(e.to_string()))?;
        let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x});
        (Algorithm::EdDSA, public, dk, jwk)
    } else if let Ok(kp) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der) {
        let public = kp.public_key().as_ref().to_vec();
        // Uncompressed point: 0x04 || x || y.
        let (x, y) = match public.as_slice() {
            [4, rest @ ..] if rest.len() == 64 => rest.split_at(32),
            _ => return Err(KeyError("unexpected P-256 public key encoding".into())),
        };
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)});
        let dk = DecodingKey::from_ec_der(&public);
        (Algorithm::ES256, public, dk, jwk)
    } else {
        return Err(KeyError(
            "not an Ed25519 or P-256 PKCS#8 private key".into(),
        ));
    };
    let kid = kid_of(&public);
    let encoding = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_der(der),
        _ => EncodingKey::from_ed_der(der),
    };
    let mut validation = Validation::new(alg);
    validation.algorithms = vec![alg];
    validation.leeway = cfg.leeway_secs;
    validation.set_issuer(&[cfg.issuer.as_str()]);
    validation.set_audience(&[cfg.audience.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub", "iat"]);
    validation.validate_nbf = true;
    let mut jwk = jwk;
    if let Some(o) = jwk.as_object_mut() {
        o.insert("kid".into(), kid.clone().into());
        o.insert("use".into(), "sig".into());
        o.insert(
            "alg".into(),
            (if alg == Algorithm::ES256 {
                "ES256"
            } else {
                "EdDSA"
            })
            .into(),
        );
    }
    Ok((
        kid,
        encoding,
        VerifyingKey {
            alg,
            key,
            validation,
            jwk,
        },
    ))
}

impl Authenticator {
    /// Builds the key set from a PKCS#8 DER private key (Ed25519 or P-256).
    pub fn from_pkcs8(der: &[u8], cfg: &AuthConfig) -> Result<Authenticator, KeyError> {
        Self::from_keys(der, &[], cfg)
    }

    /// The signing key plus older keys that still verify.
    pub fn from_keys(
        signing_der: &[u8],
        previous: &[Vec<u8>],
        cfg: &AuthConfig,
    ) -> Result<Authenticator, KeyError> {
        let (kid, encoding, vk) = parse_key(signing_der, cfg)?;
        let alg = vk.alg;
        let mut verifying = HashMap::new();
        let mut kids = vec![kid.clone()];
        verifying.insert(kid.clone(), vk);
        for der in previous {
            let (k, _, vk) = parse_key(der, cfg)?;
            if let std::collections::hash_map::Entry::Vacant(e) = verifying.entry(k.clone()) {
                kids.push(k);
                e.insert(vk);
            }
        }
        let tag = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, signing_der),
            b"tollgate form secret v1",
        );
        let mut form_secret = [0u8; 32];
        form_secret.copy_from_slice(&tag.as_ref()[..32]);
        Ok(Authenticator {
            signing: SigningKey {
                kid,
                alg,
                key: encoding,
            },
            verifying,
            kids,
            form_secret,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            ttl_secs: cfg.access_token_ttl.as_secs(),
            leeway_secs: cfg.leeway_secs,
            cache: VerifiedCache::new(),
            revocations: revocation::Revocations::default(),
            external: match &cfg.external {
                Some(e) => Some(
                    external::ExternalIssuer::new(e.clone())
                        .map_err(|e| KeyError(format!("external issuer: {e}")))?,
                ),
                None => None,
            },
        })
    }

    pub fn from_config(cfg: &AuthConfig) -> Result<Authenticator, KeyError> {
        let der = load_or_generate_key(&cfg.signing_key_path)?;
        let mut previous = Vec::new();
        for path in &cfg.previous_key_paths {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
            previous.push(pem_decode(&pem)?);
        }
        Self::from_keys(&der, &previous, cfg)
    }

    /// The public keys as a JWK Set (RFC 7517), the signing key first.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .kids
            .iter()
            .filter_map(|k| self.verifying.get(k).map(|v| v.jwk.clone()))
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// A secret for form CSRF tokens, the same on every replica with the same key.
    pub fn form_secret(&self) -> &[u8; 32] {
        &self.form_secret
    }

    pub fn revocations(&self) -> &revocation::Revocations {
        &self.revocations
    }

    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    pub fn kid(&self) -> &str {
        &self.signing.kid
    }

    /// Issues an access token for `user` (RFC 9068 claims, `typ: at+jwt`).
    pub fn issue(
        &self,
        user: &Uuid,
        client_id: &str,
        scope: &str,
        ttl_secs: Option<u64>,
    ) -> Result<String, KeyError> {
        self.issue_for_session(user, client_id, scope, ttl_secs, None)
    }

    /// Issues an access token that belongs to the sign-in `session`.
    pub fn issue_for_session(
        &self,
        user: &Uuid,
        client_id: &str,
        scope: &str,
        ttl_secs: Option<u64>,
        session: Option<&Uuid>,
    ) -> Result<String, KeyError> {
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: user.to_string(),
            aud: self.audience.clone(),
            exp: now + ttl_secs.unwrap_or(self.ttl_secs),
            iat: now,
            nbf: None,
            jti: Uuid::new_v4().to_string(),
            client_id: client_id.to_owned(),
            scope: scope.to_owned(),
            sid: session.map(Uuid::to_string),
        };
        let mut header = Header::new(self.signing.alg);
        header.typ = Some("at+jwt".into());
        header.kid = Some(self.signing.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.signing.key)
            .map_err(|e| KeyError(e.to_string()))
    }

    /// Verifies an `Authorization` header value; a token of the external issuer whose
    /// `kid` is not known yet refetches its JWKS first (rate-limited) — the only case in
    /// which verification leaves memory.
    pub async fn verify_header_async(
        &self,
        value: Option<&http::HeaderValue>,
    ) -> Result<Principal, ApiError> {
        let first = self.verify_header(value);
        let (Err(_), Some(ext)) = (&first, &self.external) else {
            return first;
        };
        let kid = value
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.get(7..))
            .and_then(|t| jsonwebtoken::decode_header(t.trim()).ok())
            .and_then(|h| h.kid);
        match kid {
            Some(kid) if !self.verifying.contains_key(&kid) && ext.key(&kid).is_none() => {
                if ext.refetch_if_due(self.leeway_secs).await {
                    self.verify_header(value)
                } else {
                    first
                }
            }
            _ => first,
        }
    }

    /// Verifies an `Authorization` header value.
    pub fn verify_header(&self, value: Option<&http::HeaderValue>) -> Result<Principal, ApiError> {
        let Some(value) = value else {
            return Err(ApiError::Unauthenticated {
                code: "",
                message:
                    "You didn't provide an API key. Send it as `Authorization: Bearer <token>`."
                        .into(),
            });
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated {
                code: "invalid_request",
                message: "The Authorization header must be `Bearer <token>`.".into(),
            })?;
        self.verify(token)
    }

    /// Verifies a compact JWS access token (served from the cache of verified tokens
    /// until the token expires).
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let now = now_secs();
        let p = match self.cache.get(token, now) {
            Some(p) => p,
            None => {
                let (p, exp) = self.verify_uncached(token)?;
                self.cache
                    .insert(token, p.clone(), exp.saturating_add(self.leeway_secs));
                p
            }
        };
        if self.revocations.is_revoked(&p) {
            return Err(ApiError::Unauthenticated {
                code: "invalid_token",
                message: "Invalid access token: the user is disabled or the sign-in was revoked."
                    .into(),
            });
        }
        Ok(p)
    }

    /// The full check: header, key, signature and claims.
    fn verify_uncached(&self, token: &str) -> Result<(Principal, u64), ApiError> {
        let invalid = |why: &str| ApiError::Unauthenticated {
            code: "invalid_token",
            message: format!("Invalid access token: {why}."),
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
        if header
            .typ
            .as_deref()
            .map(|t| t.eq_ignore_ascii_case("at+jwt"))
            != Some(true)
        {
            return Err(invalid("typ must be at+jwt"));
        }
        let kid = header.kid.as_deref().ok_or_else(|| invalid("no kid"))?;
        let Some(key) = self.verifying.get(kid) else {
            return match self.external.as_ref().and_then(|e| Some((e, e.key(kid)?))) {
                Some((ext, key)) => verify_external(token, header.alg, &ext.cfg, &key),
                None => Err(invalid("unknown kid")),
            };
        };
        if header.alg != key.alg {
            return Err(invalid("algorithm not allowed"));
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => invalid("expired"),
                    ErrorKind::ImmatureSignature => invalid("not yet valid"),
                    ErrorKind::InvalidIssuer => invalid("wrong issuer"),
                    ErrorKind::InvalidAudience => invalid("wrong audience"),
                    ErrorKind::MissingRequiredClaim(_) => invalid("missing a required claim"),
                    _ => invalid("signature or claims do not verify"),
                }
            })?;
        let user_id =
            Uuid::parse_str(&data.claims.sub).map_err(|_| invalid("sub is not a user id"))?;
        let session = match data.claims.sid.as_deref() {
            Some(s) => Some(Uuid::parse_str(s).map_err(|_| invalid("sid is not a session id"))?),
            None => None,
        };
        let p = Principal {
            user_id,
            client_id: data.claims.client_id.into(),
            scope: data.claims.scope.into(),
            session,
        };
        Ok((p, data.claims.exp))
    }
}

fn invalid(why: &str) -> ApiError {
    ApiError::Unauthenticated {
        code: "invalid_token",
        message: format!("Invalid access token: {why}."),
    }
}

/// The check of an external issuer's token: the same rules, its own key, `iss` and
/// `aud`, and the configured claim for the user.
fn verify_external(
    token: &str,
    alg: Algorithm,
    cfg: &crate::config::ExternalIssuerConfig,
    key: &external::ExtKey,
) -> Result<(Principal, u64), ApiError> {
    if alg != key.alg {
        return Err(invalid("algorithm not allowed"));
    }
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &key.validation)
        .map_err(|_| invalid("signature or claims do not verify"))?;
    let c = &data.claims;
    let text = |k: &str| c.get(k).and_then(|v| v.as_str());
    let user = text(&cfg.user_claim)
        .and_then(|u| Uuid::parse_str(u).ok())
        .ok_or_else(|| invalid("the user claim is missing or not a user id"))?;
    let (Some(client_id), Some(_jti), Some(_sub)) = (text("client_id"), text("jti"), text("sub"))
    else {
        return Err(invalid("missing a required claim"));
    };
    let exp = c
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| invalid("missing a required claim"))?;
    Ok((
        Principal {
            user_id: user,
            client_id: client_id.into(),
            scope: text("scope").unwrap_or_default().into(),
            session: None,
        },
        exp,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> AuthConfig {
        AuthConfig {
            issuer: "https://issuer.test".into(),
            audience: "tollgate".into(),
            signing_key_path: "unused".into(),
            access_token_ttl: Duration::from_secs(900),
            leeway_secs: 0,
            previous_key_paths: Vec::new(),
            external: None,
        }
    }

    fn ed() -> Authenticator {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Authenticator::from_pkcs8(doc.as_ref(), &cfg()).unwrap()
    }

    #[test]
    fn issued_token_verifies_ed25519_and_p256() {
        let a = ed();
        let u = Uuid::new_v4();
        let p = a.verify(&a.issue(&u, "cli", "llm", None).unwrap()).unwrap();
        assert_eq!(p.user_id, u);
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let b = Authenticator::from_pkcs8(doc.as_ref(), &cfg()).unwrap();
        assert_eq!(
            b.verify(&b.issue(&u, "cli", "", None).unwrap())
                .unwrap()
                .user_id,
            u
        );
    }

    #[test]
    fn cached_tokens_still_expire() {
        let a = ed();
        let u = Uuid::new_v4();
        let t = a.issue(&u, "c", "", Some(1)).unwrap();
        assert!(a.verify(&t).is_ok());
        assert!(a.verify(&t).is_ok(), "served from the cache");
        // Past exp (+ leeway 0): refused although it is cached.
        std::thread::sleep(Duration::from_millis(2100));
        assert!(a.verify(&t).is_err());
        // A tampered token never matches a cached one.
        let mut bad = a.issue(&u, "c", "", None).unwrap();
        assert!(a.verify(&bad).is_ok());
        // Change a character well inside the signature (the last one carries padding bits).
        let i = bad.len() - 10;
        let c = if &bad[i..=i] == "A" { "B" } else { "A" };
        bad.replace_range(i..=i, c);
        assert!(a.verify(&bad).is_err());
    }

    #[test]
    fn generated_key_is_persisted_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/key.pem");
        let k1 = load_or_generate_key(&path).unwrap();
        let k2 = load_or_generate_key(&path).unwrap();
        assert_eq!(k1, k2);
        let a = Authenticator::from_pkcs8(&k1, &cfg()).unwrap();
        let b = Authenticator::from_pkcs8(&k2, &cfg()).unwrap();
        assert_eq!(a.kid(), b.kid());
    }

    fn unauth_code(e: ApiError) -> &'static str {
        match e {
            ApiError::Unauthenticated { code, .. } => code,
            other => panic!("expected 401, got {other:?}"),
        }
    }

    #[test]
    fn rejects_what_it_must() {
        let a = ed();
        let other = ed();
        let u = Uuid::new_v4();
        // Signed by a key we do not know.
        assert_eq!(
            unauth_code(
                a.verify(&other.issue(&u, "c", "", None).unwrap())
                    .unwrap_err()
            ),
            "invalid_token"
        );
        // Expired.
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some("at+jwt".into());
        header.kid = Some(a.kid().into());
        let now = now_secs();
        let mk = |claims: &Claims, header: &Header| {
            jsonwebtoken::encode(header, claims, &a.signing.key).unwrap()
        };
        let base = Claims {
            iss: "https://issuer.test".into(),
            sub: u.to_string(),
            aud: "tollgate".into(),
            exp: now + 60,
            iat: now,
            nbf: None,
            jti: "j".into(),
            client_id: "c".into(),
            scope: String::new(),
            sid: None,
        };
        assert!(a.verify(&mk(&base, &header)).is_ok());
        for bad in [
            Claims {
                exp: now - 10,
                ..base.clone()
            },
            Claims {
                iss: "https://evil".into(),
                ..base.clone()
            },
            Claims {
                aud: "other".into(),
                ..base.clone()
            },
            Claims {
                nbf: Some(now + 3600),
                ..base.clone()
            },
            Claims {
                sub: "not-a-uuid".into(),
                ..base.clone()
            },
        ] {
            assert_eq!(
                unauth_code(a.verify(&mk(&bad, &header)).unwrap_err()),
                "invalid_token"
            );
        }
        // Wrong typ.
        let mut h2 = header.clone();
        h2.typ = Some("JWT".into());
        assert_eq!(
            unauth_code(a.verify(&mk(&base, &h2)).unwrap_err()),
            "invalid_token"
        );
        // alg none / HMAC crafted by hand.
        let none_header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"none","typ":"at+jwt","kid":"{}"}}"#,
            a.kid()
        ));
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&base).unwrap());
        assert!(a.verify(&format!("{none_header}.{payload}.")).is_err());
        let hs = jsonwebtoken::encode(
            &Header {
                alg: Algorithm::HS256,
                typ: Some("at+jwt".into()),
                kid: Some(a.kid().into()),
                ..Header::default()
            },
            &base,
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(unauth_code(a.verify(&hs).unwrap_err()), "invalid_token");
        // Garbage and missing headers.
        assert!(a.verify("abc").is_err());
        assert_eq!(unauth_code(a.verify_header(None).unwrap_err()), "");
        let v = http::HeaderValue::from_static("Basic abc");
        assert_eq!(
            unauth_code(a.verify_header(Some(&v)).unwrap_err()),
            "invalid_request"
        );
    }

    #[test]
    fn previous_keys_verify_and_are_published_but_never_sign() {
        let old = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let new =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let before = Authenticator::from_pkcs8(old.as_ref(), &cfg()).unwrap();
        let u = Uuid::new_v4();
        let old_token = before.issue(&u, "c", "", None).unwrap();
        let after =
            Authenticator::from_keys(new.as_ref(), &[old.as_ref().to_vec()], &cfg()).unwrap();
        assert_eq!(after.verify(&old_token).unwrap().user_id, u);
        let t = after.issue(&u, "c", "", None).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&t).unwrap().kid.as_deref(),
            Some(after.kid())
        );
        assert_eq!(
            jsonwebtoken::decode_header(&t).unwrap().alg,
            Algorithm::ES256
        );
        let jwks = after.jwks();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0]["kid"], after.kid());
        assert_eq!(keys[0]["kty"], "EC");
        assert_eq!(keys[1]["kid"], before.kid());
        assert_eq!(keys[1]["crv"], "Ed25519");
        // Retired: no longer listed, its tokens refused.
        let retired = Authenticator::from_pkcs8(new.as_ref(), &cfg()).unwrap();
        assert_eq!(
            unauth_code(retired.verify(&old_token).unwrap_err()),
            "invalid_token"
        );
    }

    #[test]
    fn key_location_headers_are_never_followed() {
        let a = ed();
        let attacker = ed();
        let u = Uuid::new_v4();
        let now = now_secs();
        let claims = Claims {
            iss: "https://issuer.test".into(),
            sub: u.to_string(),
            aud: "tollgate".into(),
            exp: now + 60,
            iat: now,
            nbf: None,
            jti: "j".into(),
            client_id: "c".into(),
            scope: String::new(),
            sid: None,
        };
        let mut h = Header::new(Algorithm::EdDSA);
        h.typ = Some("at+jwt".into());
        h.kid = Some(a.kid().into());
        h.jku = Some("https://attacker.test/jwks.json".into());
        h.x5u = Some("https://attacker.test/cert.pem".into());
        // Signed by the attacker, pointing at the attacker's keys: refused.
        let forged = jsonwebtoken::encode(&h, &claims, &attacker.signing.key).unwrap();
        assert_eq!(unauth_code(a.verify(&forged).unwrap_err()), "invalid_token");
        // Signed by our key: the headers are ignored, the token verifies.
        let ours = jsonwebtoken::encode(&h, &claims, &a.signing.key).unwrap();
        assert_eq!(a.verify(&ours).unwrap().user_id, u);
    }
}
