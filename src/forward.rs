//! Stage 6, forward: send the request to the model's provider over pooled keep-alive
//! connections (TCP_NODELAY, rustls for https). The client's own `Authorization` and
//! cookies are never forwarded; the provider key comes from the environment variable
//! named in config.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::translate::Kind;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct Provider {
    pub name: String,
    /// The wire format it speaks.
    pub kind: Kind,
    client: Client<Https, Full<Bytes>>,
    base_url: String,
    chat_uri: Uri,
    /// The key header: `authorization: Bearer` (OpenAI), `x-api-key` (Anthropic),
    /// `x-goog-api-key` (Gemini).
    api_key: Option<(header::HeaderName, HeaderValue)>,
    /// Longest wait for the answer to start, and between two of its frames.
    pub idle_timeout: Duration,
}

pub struct Upstream {
    providers: HashMap<String, Provider>,
}

impl Upstream {
    pub fn new(
        providers: &std::collections::BTreeMap<String, ProviderConfig>,
    ) -> Result<Upstream, String> {
        let mut out = HashMap::new();
        for (name, p) in providers {
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.enforce_http(false);
            http.set_connect_timeout(Some(p.connect_timeout));
            http.set_keepalive(Some(Duration::from_secs(60)));
            let tls = rustls_config()?;
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(256)
                .build(https);
            let chat_uri: Uri = format!("{}/chat/completions", p.base_url)
                .parse()
                .map_err(|e| format!("providers.{name}.base_url: {e}"))?;
            let kind = Kind::of(name);
            let api_key = std::env::var(&p.api_key_env)
                .ok()
                .filter(|k| !k.is_empty())
                .and_then(|k| {
                    let (name, value) = match kind {
                        Kind::OpenAi => (header::AUTHORIZATION, format!("Bearer {k}")),
                        Kind::Anthropic => (header::HeaderName::from_static("x-api-key"), k),
                        Kind::Gemini => (header::HeaderName::from_static("x-goog-api-key"), k),
                    };
                    let mut v = HeaderValue::from_str(&value).ok()?;
                    v.set_sensitive(true);
                    Some((name, v))
                });
            out.insert(
                name.clone(),
                Provider {
                    name: name.clone(),
                    kind,
                    client,
                    base_url: p.base_url.clone(),
                    chat_uri,
                    api_key,
                    idle_timeout: p.idle_timeout,
                },
            );
        }
        Ok(Upstream { providers: out })
    }

    /// The provider serving `name`, if it is configured.
    pub fn provider(&self, name: &str) -> Result<&Provider, ApiError> {
        self.providers
            .get(name)
            .ok_or_else(|| ApiError::ProviderNotImplemented {
                provider: name.to_owned(),
            })
    }
}

fn rustls_config() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What a request asks of a provider; each provider knows its URL for it.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint<'a> {
    /// Chat: OpenAI `/chat/completions`, Anthropic `/v1/messages`, Gemini
    /// `models/{model}:generateContent` (`:streamGenerateContent?alt=sse` for streams).
    Chat { model: &'a str },
    /// OpenAI `/completions`.
    Completions,
    /// OpenAI `/embeddings`, Gemini `models/{model}:batchEmbedContents`.
    Embeddings { model: &'a str },
}

impl Provider {
    /// The URL of `endpoint` at this provider.
    pub fn uri(&self, endpoint: Endpoint<'_>, stream: bool) -> Result<Uri, ApiError> {
        let model_ok = |m: &str| {
            !m.is_empty()
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        let url = match (self.kind, endpoint) {
            (Kind::OpenAi, Endpoint::Chat { .. }) => return Ok(self.chat_uri.clone()),
            (Kind::OpenAi, Endpoint::Completions) => format!("{}/completions", self.base_url),
            (Kind::OpenAi, Endpoint::Embeddings { .. }) => {
                format!("{}/embeddings", self.base_url)
            }
            (Kind::Anthropic, Endpoint::Chat { .. }) => format!("{}/v1/messages", self.base_url),
            (Kind::Gemini, Endpoint::Chat { model }) if model_ok(model) => {
                if stream {
                    format!(
                        "{}/v1beta/models/{model}:streamGenerateContent?alt=sse",
                        self.base_url
                    )
                } else {
                    format!("{}/v1beta/models/{model}:generateContent", self.base_url)
                }
            }
            (Kind::Gemini, Endpoint::Embeddings { model }) if model_ok(model) => {
                format!("{}/v1beta/models/{model}:batchEmbedContents", self.base_url)
            }
            _ => {
                return Err(ApiError::internal(format!(
                    "no {endpoint:?} endpoint at provider {}",
                    self.name
                )))
            }
        };
        url.parse().map_err(ApiError::internal)
    }

    /// POSTs an OpenAI chat-completions body (OpenAI providers).
    pub async fn chat(
        &self,
        body: Bytes,
        stream: bool,
    ) -> Result<http::Response<Incoming>, ApiError> {
        self.post(self.chat_uri.clone(), body, stream).await
    }

    /// POSTs `body` to `uri` with the provider's key. Errors before any response are 502.
    pub async fn post(
        &self,
        uri: Uri,
        body: Bytes,
        stream: bool,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::ACCEPT,
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .header(
                header::USER_AGENT,
                concat!("tollgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(ApiError::internal)?;
        if let Some((name, value)) = &self.api_key {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        if self.kind == Kind::Anthropic {
            req.headers_mut().insert(
                "anthropic-version",
                HeaderValue::from_static(crate::translate::anthropic::VERSION),
            );
        }
        match tokio::time::timeout(self.idle_timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                tracing::warn!(provider = %self.name, error = %e, "upstream request failed");
                Err(ApiError::BadGateway {
                    message: format!("the upstream provider `{}` could not be reached", self.name),
                })
            }
            Err(_) => {
                tracing::warn!(provider = %self.name, "upstream did not answer in time");
                Err(ApiError::BadGateway {
                    message: format!("the upstream provider `{}` timed out", self.name),
                })
            }
        }
    }
}
