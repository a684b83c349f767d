//! The signed-in user's own account: `GET /v1/users/me`, `GET /v1/credits`,
//! `GET /v1/usage` and `GET|PUT /v1/users/me/preferences`. Off the hot path: these
//! read PostgreSQL (and the live balance in Redis) directly.

use axum::extract::{Query, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::authenticate::Principal;
use crate::error::ApiError;
use crate::state::AppState;

fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param),
    }
}

/// `GET /v1/users/me`: the profile and the current subscription, if any.
pub async fn me(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let c = state.db.get().await?;
    let row = c
        .query_opt(
            "SELECT u.id, u.email, u.email_verified, u.username, u.first_name, u.last_name,
                    u.profile_picture_url, u.created_at, u.last_login_at,
                    s.tier::text, s.status::text, s.credits_per_month, s.current_period_end,
                    s.past_due_since, s.scheduled_tier::text
               FROM users u
               LEFT JOIN LATERAL (
                    -- The user's subscription is their latest row (as the ledger and
                    -- `tollgate subscriptions` read it).
                    SELECT tier, status, credits_per_month, current_period_end, past_due_since,
                           scheduled_tier
                      FROM subscriptions
                     WHERE user_id = u.id ORDER BY created_at DESC, id DESC
                     LIMIT 1) s ON true
              WHERE u.id = $1 AND u.deleted_at IS NULL",
            &[&p.user_id],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    let subscription = row.get::<_, Option<String>>(9).map(|tier| {
        json!({
            "tier": tier,
            "status": row.get::<_, Option<String>>(10),
            "credits_per_month": row.get::<_, Option<i32>>(11),
            "current_period_end": row.get::<_, Option<DateTime<Utc>>>(12),
            // Set while a payment is overdue (served until the grace ends).
            "past_due_since": row.get::<_, Option<DateTime<Utc>>>(13),
            // A downgrade that starts with the next period.
            "scheduled_tier": row.get::<_, Option<String>>(14),
        })
    });
    Ok(Json(json!({
        "object": "user",
        "id": row.get::<_, Uuid>(0),
        "email": row.get::<_, String>(1),
        "email_verified": row.get::<_, bool>(2),
        "username": row.get::<_, Option<String>>(3),
        "first_name": row.get::<_, Option<String>>(4),
        "last_name": row.get::<_, Option<String>>(5),
        "profile_picture_url": row.get::<_, Option<String>>(6),
        "created_at": row.get::<_, DateTime<Utc>>(7),
        "last_login_at": row.get::<_, Option<DateTime<Utc>>>(8),
        "subscription": subscription,
    })))
}

/// `GET /v1/credits`: the live balance (Redis, exact to the last settled request) and
/// each current credits row — subscription periods and grants — in spend order
/// (soonest expiry first), with its total, used, remaining and expiry
/// (`expires_at` = `billing_period_end`). `total_credits = used_credits + held_credits
/// + available_credits`. A row's `recorded_used_credits` is PostgreSQL's (it lags by at
/// most one flush); its `used_credits` adds the charges settled but not yet flushed,
/// spread the way the flusher will (soonest expiry first, the rest on the last row), so
/// the rows' `remaining_credits` add up to `available_credits + held_credits`.
pub async fn credits(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let mut account = None;
    for _ in 0..3 {
        account = state
            .ledger
            .account(&p.user_id)
            .await
            .map_err(|e| ApiError::unavailable("credit ledger", e))?;
        if account.is_some() {
            break;
        }
        state.ledger.load(&state.db, &p.user_id).await?;
    }
    let account =
        account.ok_or_else(|| ApiError::unavailable("credit ledger", "balance did not load"))?;
    let c = state.db.get().await?;
    let rows = c
        .query(
            "SELECT id, subscription_id, total_credits, used_credits, billing_period_start, billing_period_end
               FROM credits WHERE user_id = $1 AND is_current
              ORDER BY billing_period_end, created_at, id",
            &[&p.user_id],
        )
        .await?;
    let used = account
        .granted
        .saturating_sub(account.balance)
        .saturating_sub(account.held);
    let recorded: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| (i64::from(r.get::<_, i32>(2)), i64::from(r.get::<_, i32>(3))))
        .collect();
    let live = live_used(&recorded, used);
    let periods: Vec<Value> = rows
        .iter()
        .zip(recorded.iter().zip(live))
        .map(|(r, (&(total, recorded_used), used))| {
            let subscription = r.get::<_, Option<Uuid>>(1);
            let end = r.get::<_, DateTime<Utc>>(5);
            json!({
                "id": r.get::<_, Uuid>(0),
                "kind": if subscription.is_some() { "subscription" } else { "grant" },
                "subscription_id": subscription,
                "total_credits": total,
                "used_credits": used,
                "remaining_credits": total.saturating_sub(used),
                "recorded_used_credits": recorded_used,
                "billing_period_start": r.get::<_, DateTime<Utc>>(4),
                "billing_period_end": end,
                "expires_at": end,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "credits",
        "total_credits": account.granted,
        "used_credits": used,
        "held_credits": account.held,
        "available_credits": account.balance,
        "periods": periods,
    })))
}

/// Each row's live used credits: its recorded `used_credits` plus its share of the
/// charges not yet flushed (`live_total` less the rows' recorded sum), given in spend
/// order, each row up to its total and the rest on the last row.
fn live_used(rows: &[(i64, i64)], live_total: i64) -> Vec<i64> {
    let recorded: i64 = rows.iter().fold(0, |a, (_, u)| a.saturating_add(*u));
    let mut left = live_total.saturating_sub(recorded).max(0);
    let n = rows.len();
    rows.iter()
        .enumerate()
        .map(|(i, &(total, used))| {
            let take = if i + 1 == n {
                left
            } else {
                left.min(total.saturating_sub(used).max(0))
            };
            left -= take;
            used.saturating_add(take)
        })
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    limit: Option<String>,
    starting_after: Option<String>,
    model: Option<String>,
    operation: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

const OPERATIONS: &[&str] = &["completion", "chat", "embedding", "function_call"];

fn parse_time(param: &'static str, v: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(secs) = v.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0)
            .ok_or_else(|| bad(param, format!("`{param}` is out of range")));
    }
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            bad(
                param,
                format!("`{param}` must be an RFC 3339 time or Unix seconds"),
            )
        })
}

/// `GET /v1/usage`: the user's usage records, newest first, `limit` (1–100, default
/// 20) at a time; `starting_after=<id>` continues after a record; `model`,
/// `operation`, `from` and `to` filter. Records appear once flushed (within
/// `flush.interval_ms` of the request's end in normal operation).
pub async fn usage(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit: i64 = match q.limit.as_deref() {
        None => 20,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => return Err(bad("limit", "`limit` must be an integer from 1 to 100")),
        },
    };
    if let Some(op) = q.operation.as_deref() {
        if !OPERATIONS.contains(&op) {
            return Err(bad(
                "operation",
                format!("`operation` must be one of {}", OPERATIONS.join(", ")),
            ));
        }
    }
    let from = q
        .from
        .as_deref()
        .map(|v| parse_time("from", v))
        .transpose()?;
    let to = q.to.as_deref().map(|v| parse_time("to", v)).transpose()?;
    let c = state.db.get().await?;
    let cursor: Option<(DateTime<Utc>, Uuid)> = match q.starting_after.as_deref() {
        None => None,
        Some(v) => {
            let id = Uuid::parse_str(v).map_err(|_| {
                bad(
                    "starting_after",
                    "`starting_after` must be a usage record id",
                )
            })?;
            let row = c
                .query_opt(
                    "SELECT created_at, id FROM usage_history WHERE id = $1 AND user_id = $2",
                    &[&id, &p.user_id],
                )
                .await?
                .ok_or_else(|| {
                    bad(
                        "starting_after",
                        "`starting_after` does not name one of your usage records",
                    )
                })?;
            Some((row.get(0), row.get(1)))
        }
    };
    let (after_time, after_id) = cursor.unzip();
    let rows = c
        .query(
            "SELECT id, created_at, model_id, operation::text, credits_used, input_tokens, output_tokens,
                    total_tokens, request_duration_ms, request_metadata
               FROM usage_history
              WHERE user_id = $1
                AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
                AND ($4::text IS NULL OR model_id = $4)
                AND ($5::text IS NULL OR operation::text = $5)
                AND ($6::timestamptz IS NULL OR created_at >= $6)
                AND ($7::timestamptz IS NULL OR created_at < $7)
              ORDER BY created_at DESC, id DESC
              LIMIT $8",
            &[
                &p.user_id,
                &after_time,
                &after_id,
                &q.model,
                &q.operation,
                &from,
                &to,
                &(limit + 1),
            ],
        )
        .await?;
    let has_more = rows.len() as i64 > limit;
    let data: Vec<Value> = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            json!({
                "object": "usage_record",
                "id": r.get::<_, Uuid>(0),
                "created_at": r.get::<_, DateTime<Utc>>(1),
                "model": r.get::<_, String>(2),
                "operation": r.get::<_, String>(3),
                "credits_used": r.get::<_, i32>(4),
                "input_tokens": r.get::<_, Option<i32>>(5),
                "output_tokens": r.get::<_, Option<i32>>(6),
                "total_tokens": r.get::<_, Option<i32>>(7),
                "request_duration_ms": r.get::<_, Option<i32>>(8),
                "metadata": r.get::<_, Option<Value>>(9),
            })
        })
        .collect();
    let last_id = data.last().and_then(|d| d.get("id").cloned());
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "has_more": has_more,
        "last_id": last_id,
    })))
}

const PREFERENCES_MAX_BYTES: usize = 64 * 1024;

const PREFERENCES_SQL: &str =
    "SELECT default_model_id, enable_streaming, max_tokens, temperature::float8,
        preferences_metadata, updated_at FROM user_preferences WHERE user_id = $1";

fn preferences_json(row: Option<&tokio_postgres::Row>) -> Value {
    match row {
        Some(r) => json!({
            "object": "user.preferences",
            "default_model_id": r.get::<_, Option<String>>(0),
            "enable_streaming": r.get::<_, bool>(1),
            "max_tokens": r.get::<_, i32>(2),
            "temperature": r.get::<_, f64>(3),
            "metadata": r.get::<_, Option<Value>>(4),
            "updated_at": r.get::<_, Option<DateTime<Utc>>>(5),
        }),
        // The table's defaults, for a user who never saved any.
        None => json!({
            "object": "user.preferences",
            "default_model_id": null,
            "enable_streaming": true,
            "max_tokens": 4096,
            "temperature": 0.7,
            "metadata": null,
            "updated_at": null,
        }),
    }
}

/// `GET /v1/users/me/preferences`.
pub async fn get_preferences(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let c = state.db.get().await?;
    let row = c.query_opt(PREFERENCES_SQL, &[&p.user_id]).await?;
    Ok(Json(preferences_json(row.as_ref())))
}

/// `PUT /v1/users/me/preferences`: sets the fields present in the JSON object
/// (`default_model_id`, `enable_streaming`, `max_tokens`, `temperature`, `metadata`);
/// fields left out keep their value. Answers the stored preferences.
pub async fn put_preferences(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    req: axum::extract::Request,
) -> Result<Json<Value>, ApiError> {
    // Preferences are small: more than this is refused with an OpenAI-shaped 413.
    let body = crate::body::read_body(req.into_body(), PREFERENCES_MAX_BYTES).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON ({e})")))?;
    let Value::Object(fields) = v else {
        return Err(ApiError::invalid("the body must be a JSON object"));
    };
    let update = PreferencesUpdate::parse(&fields, &state)?;
    let c = state.db.get().await?;
    c.execute(
        "INSERT INTO user_preferences AS p
                (user_id, default_model_id, enable_streaming, max_tokens, temperature, preferences_metadata)
         VALUES ($1, $3, coalesce($4, true), coalesce($5, 4096), coalesce($6::float8::numeric(3,2), 0.7), $8)
         ON CONFLICT (user_id) DO UPDATE SET
                default_model_id = CASE WHEN $2 THEN $3 ELSE p.default_model_id END,
                enable_streaming = coalesce($4, p.enable_streaming),
                max_tokens = coalesce($5, p.max_tokens),
                temperature = coalesce($6::float8::numeric(3,2), p.temperature),
                preferences_metadata = CASE WHEN $7 THEN $8 ELSE p.preferences_metadata END",
        &[
            &p.user_id,
            &update.default_model.is_some(),
            &update.default_model.clone().flatten(),
            &update.enable_streaming,
            &update.max_tokens,
            &update.temperature,
            &update.metadata.is_some(),
            &update.metadata.clone().flatten(),
        ],
    )
    .await?;
    // This gateway applies the new values at once; other replicas within
    // `preferences.cache_ttl_ms`.
    state.preferences.invalidate(&p.user_id);
    let row = c.query_opt(PREFERENCES_SQL, &[&p.user_id]).await?;
    Ok(Json(preferences_json(row.as_ref())))
}

/// A validated preferences update; `Some(None)` clears a nullable field.
#[derive(Debug, Default)]
struct PreferencesUpdate {
    default_model: Option<Option<String>>,
    enable_streaming: Option<bool>,
    max_tokens: Option<i32>,
    temperature: Option<f64>,
    metadata: Option<Option<Value>>,
}

impl PreferencesUpdate {
    fn parse(fields: &Map<String, Value>, state: &AppState) -> Result<Self, ApiError> {
        let mut u = PreferencesUpdate::default();
        for (k, v) in fields {
            match (k.as_str(), v) {
                ("default_model_id", Value::Null) => u.default_model = Some(None),
                ("default_model_id", Value::String(id)) => {
                    if state.models.route(id).is_err() {
                        return Err(bad(
                            "default_model_id",
                            format!("`{id}` is not an available model"),
                        ));
                    }
                    u.default_model = Some(Some(id.clone()));
                }
                ("default_model_id", _) => {
                    return Err(bad(
                        "default_model_id",
                        "`default_model_id` must be a model id or null",
                    ))
                }
                ("enable_streaming", Value::Bool(b)) => u.enable_streaming = Some(*b),
                ("enable_streaming", _) => {
                    return Err(bad("enable_streaming", "`enable_streaming` must be a boolean"))
                }
                ("max_tokens", v) => match v.as_i64().and_then(|n| i32::try_from(n).ok()) {
                    Some(n) if n >= 1 => u.max_tokens = Some(n),
                    _ => return Err(bad("max_tokens", "`max_tokens` must be a positive integer")),
                },
                ("temperature", v) => match v.as_f64() {
                    Some(t) if (0.0..=2.0).contains(&t) => u.temperature = Some(t),
                    _ => {
                        return Err(bad(
                            "temperature",
                            "`temperature` must be a number from 0 to 2",
                        ))
                    }
                },
                ("metadata", Value::Null) => u.metadata = Some(None),
                ("metadata", Value::Object(_)) => u.metadata = Some(Some(v.clone())),
                ("metadata", _) => {
                    return Err(bad("metadata", "`metadata` must be a JSON object or null"))
                }
                (other, _) => {
                    return Err(ApiError::invalid(format!(
                        "unknown preference `{other}` (known: default_model_id, enable_streaming, max_tokens, temperature, metadata)"
                    )))
                }
            }
        }
        Ok(u)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::live_used;

    #[test]
    fn unflushed_charges_go_to_the_rows_in_spend_order() {
        // Nothing unflushed: the recorded figures.
        assert_eq!(live_used(&[(100, 10), (50, 0)], 10), vec![10, 0]);
        // 95 unflushed: the first row fills up (90 more), the rest goes to the next.
        assert_eq!(live_used(&[(100, 10), (50, 0)], 105), vec![100, 5]);
        // More than every row holds: the rest on the last row.
        assert_eq!(live_used(&[(100, 10), (50, 0)], 200), vec![100, 100]);
        // A live figure below the recorded one (a row no longer in Redis) moves nothing.
        assert_eq!(live_used(&[(100, 30)], 10), vec![30]);
        assert!(live_used(&[], 5).is_empty());
    }
}
