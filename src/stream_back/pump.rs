//! Stage 7 for a stream: its first chunk is awaited in the forwarding task (so an
//! answer that fails before any byte still gets a proper error status), then a pump
//! task passes the provider's chunks to the client through the [`Tap`], reads on
//! (bounded) when the client leaves, and settles (stage 8) before the client sees
//! the end of the stream.

use std::convert::Infallible;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Frame;

use super::{Stop, StreamEnd, Tap};
use crate::deploy::Sent;
use crate::error::ApiError;
use crate::hold::{holding_owned, Answering};
use crate::settle::Received;
use crate::state::{shutting_down, Cut};

/// Who the stream pump reads the provider's answer for.
enum Reader<'a> {
    /// The client, still reading.
    Client,
    /// Nobody: the client left, and the answer is read on until `until` so the user is
    /// billed what was generated, holding one of the `server.disconnect_drains` permits.
    Drain {
        until: tokio::time::Instant,
        _permit: tokio::sync::SemaphorePermit<'a>,
    },
}

impl Reader<'_> {
    /// The end of a stream that stopped as `stop` says, for this reader.
    fn stopped(&self, stop: Stop) -> StreamEnd {
        match self {
            Reader::Client => StreamEnd::Stopped(stop),
            Reader::Drain { .. } => StreamEnd::ClientGone(stop),
        }
    }

    /// The drain time is over.
    fn drain_over(&self) -> bool {
        matches!(self, Reader::Drain { until, .. } if tokio::time::Instant::now() >= *until)
    }
}

/// Streams a 2xx answer back through the tap. Its first chunk is awaited here (within
/// the first-byte timeout), so an answer that fails before any byte still gets a proper
/// error status; it is charged an estimate all the same.
pub async fn answer_stream(
    adm: Answering,
    sent: Sent,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let mut extra = sent.attempts_meta();
    let Sent {
        status,
        body: mut upstream,
        first_byte_due,
        ..
    } = sent;
    let mut grace_end = Cut::new(&adm.state);
    let first = loop {
        let next = tokio::time::timeout_at(first_byte_due, upstream.frame());
        let Some(frame) = grace_end.or(next).await else {
            return Err(adm
                .charge_failure("shutdown_cut", extra, shutting_down())
                .await);
        };
        match frame {
            Ok(Some(Ok(f))) => match f.into_data() {
                Ok(data) if !data.is_empty() => break data,
                _ => continue,
            },
            Ok(None) | Ok(Some(Err(_))) => {
                let error = ApiError::BadGateway {
                    message: "the upstream provider's answer was cut off".into(),
                };
                return Err(adm.charge_failure("upstream_cut", extra, error).await);
            }
            Err(_) => {
                let error = ApiError::UpstreamTimeout {
                    message: format!("the upstream provider `{}` timed out", adm.model.provider),
                };
                return Err(adm.charge_failure("upstream_timeout", extra, error).await);
            }
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let state = adm.state.clone();
    let keeper = adm.keeper.clone();
    let pump_state = state.clone();
    state.tasks.spawn(holding_owned(pump_state, keeper, async move {
        let mut adm = adm;
        let st = adm.state.clone();
        let mut first = Some(first);
        let mut tap = Tap::new(adm.kind, include_usage, adm.ticket.rid, &adm.model.id);
        let drain = adm.state.cfg.disconnect_drain;
        let idle = adm.idle_timeout();
        let max_bytes = adm.state.cfg.max_response_bytes;
        let mut reader = Reader::Client;
        let end = loop {
            // A silent provider is cut after its idle timeout; once the client has left,
            // reading stops at the drain deadline too.
            let mut deadline = tokio::time::Instant::now() + idle;
            if let Reader::Drain { until, .. } = &reader {
                deadline = deadline.min(*until);
            }
            let next = match first.take() {
                // The first chunk was read before the answer was committed to.
                Some(data) => Some(Ok(Frame::data(data))),
                None => {
                    let read = tokio::time::timeout_at(deadline, upstream.frame());
                    match grace_end.or(read).await {
                        None => break reader.stopped(Stop::ShutdownCut),
                        Some(Ok(f)) => f,
                        Some(Err(_)) if reader.drain_over() => break StreamEnd::DrainTimedOut,
                        Some(Err(_)) => {
                            tracing::warn!(request_id = %adm.ticket.rid, "upstream went silent");
                            break reader.stopped(Stop::Silent);
                        }
                    }
                }
            };
            let Some(frame) = next else {
                // A translated stream that ended without the provider's end of the
                // answer was cut.
                break reader.stopped(if tap.failed() {
                    Stop::UpstreamCut
                } else {
                    Stop::Finished
                });
            };
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(e) => {
                    tracing::warn!(request_id = %adm.ticket.rid, error = %e, "upstream stream cut");
                    break reader.stopped(Stop::UpstreamCut);
                }
            };
            let out = tap.feed(data);
            adm.ticket.progress(Received {
                bytes: tap.bytes_seen(),
                completion_estimate: i64::try_from(tap.events_seen()).unwrap_or(i64::MAX),
                usage: tap.usage(),
            });
            // A provider that never ends its answer is cut (and charged at most the
            // hold) rather than streamed for ever.
            if tap.bytes_seen() > max_bytes {
                break reader.stopped(Stop::TooLarge);
            }
            // Once the client is gone, reading goes on (bounded) so the user is billed
            // what was generated.
            let (Some(out), Reader::Client) = (out, &reader) else {
                continue;
            };
            // A client that is gone, or has stopped reading for the whole drain time, is
            // treated as gone.
            match grace_end.or(tx.send_timeout(out, drain)).await {
                Some(Ok(())) => {}
                None => break reader.stopped(Stop::ShutdownCut),
                Some(Err(_)) => {
                    let until = tokio::time::Instant::now() + drain;
                    // Reads on after a disconnect are bounded in number too.
                    match st.drains.try_acquire() {
                        Ok(permit) => {
                            reader = Reader::Drain {
                                until,
                                _permit: permit,
                            }
                        }
                        Err(_) => {
                            break StreamEnd::DrainSkipped {
                                unfinished: tap.failed(),
                            }
                        }
                    }
                }
            }
        };
        if tap.tool_call() && adm.ticket.operation == "chat" {
            adm.ticket.operation = "function_call";
        }
        let events = i64::try_from(tap.events_seen()).unwrap_or(i64::MAX);
        let usage = tap.usage().unwrap_or_else(|| {
            if end.client_gone() {
                // The client left before the usage came: its prompt is billed at the
                // bound the hold covers, not at a guess it could make low.
                adm.ticket.estimate_at_bound(events)
            } else {
                adm.ticket.estimate(events)
            }
        });
        // The drain permit goes back before the settle.
        drop(reader);
        for mark in end.marks() {
            extra.insert(mark.into(), serde_json::Value::Bool(true));
        }
        let billed = adm.settle(usage, extra).await;
        if let (Ok(billed), true) = (billed, end.client_reads_the_end()) {
            // The usage chunk, if asked for, carries what was charged and what is left.
            let tail = tap.finish_billed(Some(&billed));
            if !tail.is_empty() {
                let _ = tx.send(tail).await;
            }
        }
    }));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut out = Response::new(Body::new(http_body_util::StreamBody::new(stream)));
    *out.status_mut() = status;
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(out)
}
