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

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct Provider {
    pub name: String,
    client: Client<Https, Full<Bytes>>,
    chat_uri: Uri,
    api_key: Option<HeaderValue>,
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
            let api_key = std::env::var(&p.api_key_env)
                .ok()
                .filter(|k| !k.is_empty())
                .and_then(|k| {
                    let mut v = HeaderValue::from_str(&format!("Bearer {k}")).ok()?;
                    v.set_sensitive(true);
                    Some(v)
                });
            out.insert(
                name.clone(),
                Provider {
                    name: name.clone(),
                    client,
                    chat_uri,
                    api_key,
                    idle_timeout: p.idle_timeout,
                },
            );
        }
        Ok(Upstream { providers: out })
    }

    /// The provider serving `name`, if it is wired (OpenAI's wire format today).
    pub fn provider(&self, name: &str) -> Result<&Provider, ApiError> {
        match self.providers.get(name) {
            Some(p) if name == "openai" => Ok(p),
            _ => Err(ApiError::ProviderNotImplemented {
                provider: name.to_owned(),
            }),
        }
    }
}

pub(crate) fn rustls_config() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Provider {
    /// POSTs an OpenAI chat-completions body. Errors before any response are 502.
    pub async fn chat(
        &self,
        body: Bytes,
        stream: bool,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.chat_uri.clone())
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
        if let Some(k) = &self.api_key {
            req.headers_mut().insert(header::AUTHORIZATION, k.clone());
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
