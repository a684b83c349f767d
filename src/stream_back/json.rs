//! Stage 7 for a JSON answer: read it whole (bounded in size, each frame within the
//! idle timeout), translate it when the provider is not OpenAI, charge what the
//! provider reported (stage 8), then answer the client, whose head carries
//! `x-credits-charged` and `x-credits-remaining`.

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderValue};
use http_body_util::BodyExt;

use crate::deploy::Sent;
use crate::error::ApiError;
use crate::hold::Answering;
use crate::settle::Received;
use crate::state::{shutting_down, Cut};
use crate::translate::{ChatId, Endpoint};
use crate::usage::Billed;

/// Reads a 2xx JSON answer, then charges what the provider reported. Once the
/// provider answered 2xx it did the work: an answer that fails to arrive whole (cut,
/// silent, too large, unreadable, or cut by shutdown) is charged an estimate of what
/// was received, capped at the hold and marked, and the client gets an error.
pub async fn answer_json(mut adm: Answering, sent: Sent) -> Result<Response, ApiError> {
    let extra = sent.attempts_meta();
    let max = adm.state.cfg.max_response_bytes;
    let idle = adm.idle_timeout();
    let embeddings = matches!(adm.endpoint, Endpoint::Embeddings { .. });
    let Sent {
        status,
        content_type,
        body: mut upstream,
        ..
    } = sent;
    let mut buf = bytes::BytesMut::new();
    let mut grace_end = Cut::new(&adm.state);
    let failure = loop {
        let next = tokio::time::timeout(idle, upstream.frame());
        let Some(frame) = grace_end.or(next).await else {
            break Some(("shutdown_cut", shutting_down()));
        };
        match frame {
            Ok(None) => break None,
            Ok(Some(Ok(f))) => {
                let Ok(data) = f.into_data() else { continue };
                let total = buf.len().saturating_add(data.len());
                adm.ticket.progress(Received {
                    bytes: total,
                    completion_estimate: if embeddings {
                        0
                    } else {
                        i64::try_from(total.div_ceil(4)).unwrap_or(i64::MAX)
                    },
                    usage: None,
                });
                if total > max {
                    break Some((
                        "answer_too_large",
                        ApiError::BadGateway {
                            message:
                                "the upstream provider's answer is larger than the gateway accepts"
                                    .into(),
                        },
                    ));
                }
                buf.extend_from_slice(&data);
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(request_id = %adm.ticket.rid, error = %e, "upstream answer cut");
                break Some((
                    "upstream_cut",
                    ApiError::BadGateway {
                        message: "the upstream provider's answer was cut off".into(),
                    },
                ));
            }
            Err(_) => {
                break Some((
                    "upstream_timeout",
                    ApiError::UpstreamTimeout {
                        message: "the upstream provider went silent in the middle of its answer"
                            .into(),
                    },
                ))
            }
        }
    };
    if let Some((reason, error)) = failure {
        return Err(adm.charge_failure(reason, extra, error).await);
    }
    let bytes = buf.freeze();
    // The provider's answer in OpenAI's shape, with its usage (Wire::answer).
    let id = ChatId(adm.ticket.rid);
    let answer = adm.kind.answer(adm.endpoint, bytes, &id, &adm.model.id);
    let (bytes, usage, tool_call) = match answer {
        Ok(a) => (a.body, a.usage, a.tool_call),
        Err(e) => {
            tracing::warn!(request_id = %adm.ticket.rid, error = %e, "upstream answer not understood");
            let error = ApiError::BadGateway {
                message: "the upstream provider's answer could not be read".into(),
            };
            return Err(adm.charge_failure("unreadable_answer", extra, error).await);
        }
    };
    if tool_call && adm.ticket.operation == "chat" {
        adm.ticket.operation = "function_call";
    }
    let usage = usage.unwrap_or_else(|| {
        let r = adm.ticket.received().unwrap_or_default();
        adm.ticket.estimate(r.completion_estimate)
    });
    // Settled before the head is sent: a success the client sees is recorded, and the
    // head can say what it cost.
    let billed = adm.settle(usage, extra).await?;
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    charge_headers(h, &billed);
    Ok(out)
}

/// The header with the credits this request was charged.
pub const CREDITS_CHARGED: &str = "x-credits-charged";
/// The header with the spendable balance right after the charge.
pub const CREDITS_REMAINING: &str = "x-credits-remaining";

/// `x-credits-charged`, and `x-credits-remaining` when the ledger told it.
fn charge_headers(h: &mut http::HeaderMap, billed: &Billed) {
    h.insert(CREDITS_CHARGED, HeaderValue::from(billed.credits));
    if let Some(r) = billed.remaining {
        h.insert(CREDITS_REMAINING, HeaderValue::from(r));
    }
}
