//! Stage 6, forward: send the request to one of the model's provider's deployments
//! (chosen, retried and failed over in [`crate::deploy`]) over pooled keep-alive
//! connections (TCP_NODELAY, rustls for https). The upstream request is built afresh:
//! the client's own `Authorization`, cookies and other headers are never forwarded;
//! each deployment's key comes from the environment variable named in config.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::ProviderConfig;
use crate::deploy::{HttpClient, Mode, Pool, Sent};
use crate::error::ApiError;

pub struct Provider {
    pub name: String,
    client: HttpClient,
    /// The deployments, their breakers and the retry policy.
    pub pool: Pool,
    /// `<base_url>/chat/completions` of each deployment, by index.
    chat_uris: Vec<Uri>,
    /// Longest wait between two frames of an answer.
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
            let chat_uris = p
                .deployments
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    format!("{}/chat/completions", d.base_url)
                        .parse::<Uri>()
                        .map_err(|e| format!("providers.{name}.deployments[{i}].base_url: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.insert(
                name.clone(),
                Provider {
                    name: name.clone(),
                    client,
                    pool: Pool::new(p),
                    chat_uris,
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

impl Provider {
    /// POSTs an OpenAI chat-completions body to the provider's deployments (retries
    /// and failover in [`Pool::send`]). The request is built afresh: nothing of the
    /// client's request but the body goes upstream.
    pub async fn chat(
        &self,
        body: Bytes,
        stream: bool,
        max_bytes: usize,
    ) -> Result<Sent, ApiError> {
        let mode = if stream {
            Mode::Stream
        } else {
            Mode::Json { max_bytes }
        };
        let accept = HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        });
        self.pool
            .send(&self.client, mode, |d| {
                let uri = self
                    .chat_uris
                    .get(d.index)
                    .cloned()
                    .ok_or_else(|| ApiError::internal("deployment without a URL"))?;
                let mut req = Request::builder()
                    .method(Method::POST)
                    .uri(uri)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::ACCEPT, accept.clone())
                    .header(
                        header::USER_AGENT,
                        concat!("tollgate/", env!("CARGO_PKG_VERSION")),
                    )
                    .body(Full::new(body.clone()))
                    .map_err(ApiError::internal)?;
                if let Some(k) = &d.bearer {
                    req.headers_mut().insert(header::AUTHORIZATION, k.clone());
                }
                Ok(req)
            })
            .await
    }
}
