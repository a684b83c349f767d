//! Stage 6, the forwarding task of one request: it sends the body upstream (through
//! the provider's [deployments](crate::deploy), with retries and failover), and — once
//! the provider answered 2xx — hands the answer to stage 7
//! ([`stream_back`](crate::stream_back)). It runs in a task of its own, so a client that
//! disconnects cannot cancel the settle of what the provider produced.

use std::sync::Arc;

use axum::response::Response;
use bytes::Bytes;

use crate::deploy::Sent;
use crate::error::ApiError;
use crate::hold::{holding, Admitted};
use crate::route::Model;
use crate::state::{shutting_down, unless_cut, AppState};
use crate::stream_back;
use crate::translate::Endpoint;

/// An upstream call started before its hold was taken.
pub struct EarlySend {
    pub state: AppState,
    pub model: Arc<Model>,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub body: Bytes,
}

/// The admitted request handed to its forwarding task. `resend` is for an early call
/// whose hold lowered the limit: the body to send instead of using its answer.
pub struct Go {
    pub adm: Admitted,
    pub resend: Option<Bytes>,
    pub include_usage: bool,
}

/// How the forwarding task starts.
pub enum Start {
    /// Admitted: send this body now.
    Now(Box<Go>, Bytes),
    /// Send at once, and answer only once the hold is taken (or stop if it is refused).
    Early(EarlySend, tokio::sync::oneshot::Receiver<Go>),
}

/// The forwarding task: the upstream call, then stages 7 and 8.
pub async fn run(start: Start) -> Result<Response, ApiError> {
    let (go, sent) = match start {
        Start::Now(go, body) => {
            let go = *go;
            let a = &go.adm;
            // Boxed here (and below) so the nested wrappers move a pointer, not the
            // whole future (the moves of large futures showed in profiles as memmove).
            let call = Box::pin(send(&a.state, &a.model, a.endpoint, a.ticket.stream, body));
            let sent = holding(&a.state, &a.keeper, unless_cut(&a.state, call))
                .await
                .unwrap_or_else(|| Err(shutting_down()));
            (go, sent)
        }
        Start::Early(e, mut wait) => {
            let mut call = Some(Box::pin(send(
                &e.state, &e.model, e.endpoint, e.stream, e.body,
            )));
            let mut answer = None;
            let go = loop {
                tokio::select! {
                    go = &mut wait => break go,
                    a = async { match call.as_mut() { Some(c) => c.await, None => std::future::pending().await } },
                        if answer.is_none() => answer = Some(a),
                }
            };
            let Ok(go) = go else {
                // Refused (or the client left before its hold): the call is dropped here.
                metrics::counter!("tollgate_speculative_sends_total", "outcome" => "cancelled")
                    .increment(1);
                return Err(ApiError::internal("not admitted"));
            };
            let sent = match (&go.resend, answer, call.take()) {
                (None, Some(a), _) => a,
                (None, None, Some(c)) => {
                    let st = &go.adm.state;
                    holding(st, &go.adm.keeper, unless_cut(st, c))
                        .await
                        .unwrap_or_else(|| Err(shutting_down()))
                }
                (None, None, None) => Err(ApiError::internal("no upstream call")),
                // Sent with a limit the hold does not cover: drop that call (and its
                // answer, if it came: a stream would stay open upstream) and send again.
                (Some(b), a, c) => {
                    drop(a);
                    drop(c);
                    let g = &go.adm;
                    let call = Box::pin(send(
                        &g.state,
                        &g.model,
                        g.endpoint,
                        g.ticket.stream,
                        b.clone(),
                    ));
                    holding(&g.state, &g.keeper, unless_cut(&g.state, call))
                        .await
                        .unwrap_or_else(|| Err(shutting_down()))
                }
            };
            (go, sent)
        }
    };
    let Go {
        adm, include_usage, ..
    } = go;
    if let Err(e) = &sent {
        tracing::info!(request_id = %adm.ticket.rid, error = e.label(), "upstream failed");
    }
    let (adm, sent) = adm.or_release(sent).await?;
    // The provider answered 2xx: from here on the request is charged.
    let adm = adm.answered();
    let (state, keeper) = (adm.state.clone(), adm.keeper.clone());
    if adm.ticket.stream {
        let pump = stream_back::pump::answer_stream(adm, sent, include_usage);
        holding(&state, &keeper, Box::pin(pump)).await
    } else {
        let read = stream_back::json::answer_json(adm, sent);
        holding(&state, &keeper, Box::pin(read)).await
    }
}

/// Sends a request upstream (retries and failover inside).
async fn send(
    state: &AppState,
    model: &Model,
    endpoint: Endpoint,
    stream: bool,
    body: Bytes,
) -> Result<Sent, ApiError> {
    let provider = state.upstream.provider(&model.provider)?;
    provider.send(endpoint, &model.name, body, stream).await
}
