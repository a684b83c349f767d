//! The provider clients of stage 6 ([`forward`](crate::forward)): send a request to
//! one of the model's provider's deployments (chosen, retried and failed over in
//! [`crate::deploy`]) over pooled keep-alive
//! connections (TCP_NODELAY, rustls for https), in the provider's own wire format
//! ([`crate::translate`] turns OpenAI requests into it). The upstream request is built
//! afresh: the client's own `Authorization`, cookies and other headers are never
//! forwarded; each deployment's key comes from the environment variable named in
//! config, in the header its provider expects.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::ProviderConfig;
use crate::deploy::{Deployment, HttpClient, Pool, Sent};
use crate::error::ApiError;
use crate::translate::{Endpoint, Kind};

pub struct Provider {
    pub name: String,
    /// The wire format it speaks.
    pub kind: Kind,
    /// A connection pool per worker thread: a pooled connection's task runs on the
    /// thread that opened it, which is the thread that uses it.
    clients: crate::worker::PerWorker<HttpClient>,
    /// The deployments, their breakers and the retry policy.
    pub pool: Pool,
    /// The chat URL of each deployment, by index, parsed once at start-up when it
    /// depends on the deployment alone ([`crate::translate::Wire::fixed_chat_url`]:
    /// OpenAI's hot path); empty otherwise.
    chat_uris: Vec<Uri>,
    /// Longest wait between two frames of an answer.
    pub idle_timeout: Duration,
}

pub struct Upstream {
    providers: HashMap<String, Provider>,
}

impl Upstream {
    /// `workers`: data-plane threads, each of which gets its own connection pools.
    pub fn new(
        providers: &std::collections::BTreeMap<String, ProviderConfig>,
        workers: usize,
    ) -> Result<Upstream, UpstreamError> {
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
            let clients = crate::worker::PerWorker::new(workers, || {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    // Per worker thread. Past a burst, connections beyond this are closed
                    // as they come back rather than kept (and their buffers with them).
                    .pool_max_idle_per_host(32)
                    .build(https.clone())
            });
            let kind = crate::translate::for_name(name);
            let chat_uris = p
                .deployments
                .iter()
                .enumerate()
                .filter(|_| kind.fixed_chat_url())
                .filter_map(|(i, d)| {
                    let url = kind.url(&d.base_url, Endpoint::Chat, "", false)?;
                    Some(url.parse::<Uri>().map_err(|source| UpstreamError::BaseUrl {
                        provider: name.clone(),
                        index: i,
                        source,
                    }))
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.insert(
                name.clone(),
                Provider {
                    name: name.clone(),
                    kind,
                    clients,
                    pool: Pool::new(p),
                    chat_uris,
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

/// Why the provider clients could not be built (at start-up).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TLS client configuration could not be built.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// A deployment's `base_url` does not make a URI.
    #[error("providers.{provider}.deployments[{index}].base_url: {source}")]
    BaseUrl {
        provider: String,
        index: usize,
        source: http::uri::InvalidUri,
    },
}

pub(crate) fn rustls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Provider {
    /// The URL of `endpoint` for the upstream model `model` at deployment `d` of this
    /// provider ([`crate::translate::Wire::url`]).
    pub fn uri(
        &self,
        d: &Deployment,
        endpoint: Endpoint,
        model: &str,
        stream: bool,
    ) -> Result<Uri, ApiError> {
        if endpoint == Endpoint::Chat {
            if let Some(u) = self.chat_uris.get(d.index) {
                return Ok(u.clone());
            }
        }
        let Some(url) = self.kind.url(&d.base_url, endpoint, model, stream) else {
            return Err(ApiError::internal(format!(
                "no {endpoint:?} endpoint for model {model} at provider {}",
                self.name
            )));
        };
        url.parse().map_err(ApiError::internal)
    }

    /// The request of one attempt at deployment `d`: `body` (already in the provider's
    /// format) POSTed to `endpoint`, with the deployment's key in the provider's
    /// headers ([`crate::translate::Wire::auth_headers`]) and nothing of the client's
    /// request but the body.
    pub fn request(
        &self,
        d: &Deployment,
        endpoint: Endpoint,
        model: &str,
        body: Bytes,
        stream: bool,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        let accept = HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        });
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri(d, endpoint, model, stream)?)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, accept)
            .header(
                header::USER_AGENT,
                concat!("tollgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(ApiError::internal)?;
        let h = req.headers_mut();
        for (name, value) in &d.auth {
            h.insert(name.clone(), value.clone());
        }
        Ok(req)
    }

    /// POSTs `body` (already in the provider's format) to `endpoint` for the upstream
    /// model `model` at the provider's deployments (retries and failover in
    /// [`Pool::send`]).
    pub async fn send(
        &self,
        endpoint: Endpoint,
        model: &str,
        body: Bytes,
        stream: bool,
    ) -> Result<Sent, ApiError> {
        self.pool
            .send(self.clients.get(), |d| {
                self.request(d, endpoint, model, body.clone(), stream)
            })
            .await
    }
}
