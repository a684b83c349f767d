//! Access tokens from an external issuer (optional, `[external_issuer]`): its JWKS is
//! fetched and cached in memory; a token whose `kid` is in neither our key set nor the
//! cache triggers a refetch, at most once per `jwks_refetch_min_interval_ms` (so a
//! flood of made-up kids cannot turn into a flood of fetches). The algorithm comes
//! from the key (RSA, P-256, Ed25519 only; never HMAC or `none`), and `typ`, `iss`,
//! `aud`, `exp`/`nbf` are checked as for our own tokens. The configured claim names
//! the user: its value must be a Tollgate user id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::ExternalIssuerConfig;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct ExtKey {
    pub alg: Algorithm,
    pub key: DecodingKey,
    pub validation: Validation,
}

pub struct ExternalIssuer {
    pub cfg: ExternalIssuerConfig,
    keys: ArcSwap<HashMap<String, Arc<ExtKey>>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    client: Client<Https, Empty<Bytes>>,
}

const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Why the JWKS was not fetched (logged; the keys already loaded stay in use).
#[derive(Debug, thiserror::Error)]
enum JwksError {
    /// `jwks_url` does not make a request.
    #[error(transparent)]
    Request(#[from] http::Error),
    /// No answer, or no whole body, within `fetch_timeout`.
    #[error("timed out")]
    TimedOut,
    /// The connection or the request failed.
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
    /// A status other than 2xx.
    #[error("status {0}")]
    Status(http::StatusCode),
    /// The body failed or was over `MAX_JWKS_BYTES`.
    #[error("{0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// Not a JWK set.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl ExternalIssuer {
    pub fn new(cfg: ExternalIssuerConfig) -> Result<ExternalIssuer, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.fetch_timeout));
        let tls = crate::upstream::rustls_config()?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(ExternalIssuer {
            cfg,
            keys: ArcSwap::default(),
            last_fetch: tokio::sync::Mutex::new(None),
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    pub fn key(&self, kid: &str) -> Option<Arc<ExtKey>> {
        self.keys.load().get(kid).cloned()
    }

    /// Refetches the JWKS unless that was done less than the configured interval ago.
    /// Returns whether a fresh set was loaded.
    pub async fn refetch_if_due(&self, leeway_secs: u64) -> bool {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.cfg.refetch_min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        match self.fetch(leeway_secs).await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "external issuer JWKS loaded");
                self.keys.store(Arc::new(keys));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "external issuer JWKS fetch failed");
                false
            }
        }
    }

    async fn fetch(&self, leeway_secs: u64) -> Result<HashMap<String, Arc<ExtKey>>, JwksError> {
        let req = http::Request::get(&self.cfg.jwks_url)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())?;
        let timeout = self.cfg.fetch_timeout;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| JwksError::TimedOut)??;
        if !resp.status().is_success() {
            return Err(JwksError::Status(resp.status()));
        }
        let body = tokio::time::timeout(
            timeout,
            http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect(),
        )
        .await
        .map_err(|_| JwksError::TimedOut)?
        .map_err(JwksError::Body)?
        .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body)?;
        Ok(self.keys_of(&set, leeway_secs))
    }

    /// The usable signature keys of a set (others are skipped).
    fn keys_of(&self, set: &JwkSet, leeway_secs: u64) -> HashMap<String, Arc<ExtKey>> {
        let mut out = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                continue;
            }
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::RSA(_), Some(KeyAlgorithm::PS256)) => Algorithm::PS256,
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                (AlgorithmParameters::OctetKeyPair(p), None | Some(KeyAlgorithm::EdDSA))
                    if p.curve == EllipticCurve::Ed25519 =>
                {
                    Algorithm::EdDSA
                }
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let mut v = Validation::new(alg);
            v.algorithms = vec![alg];
            v.leeway = leeway_secs;
            v.set_issuer(&[self.cfg.issuer.as_str()]);
            v.set_audience(&[self.cfg.audience.as_str()]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "iat"]);
            v.validate_nbf = true;
            out.insert(
                kid,
                Arc::new(ExtKey {
                    alg,
                    key,
                    validation: v,
                }),
            );
        }
        out
    }
}
