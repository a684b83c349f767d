//! Stage 4, route: `model` → provider and price, from an in-memory copy of the
//! `models` table that a background task refreshes. Unknown, unavailable and
//! deprecated models fail here, before anything is charged.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::db::{Db, DbError};
use crate::error::ApiError;
use crate::usage::{ProviderCosts, Rates};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub id: String,
    /// The provider's own name for the model, sent upstream.
    pub name: String,
    pub display_name: String,
    pub provider: String,
    pub capabilities: Vec<String>,
    pub context_length: i64,
    pub max_output_tokens: Option<i64>,
    pub credits_per_1k_tokens: i64,
    /// The effective credits per 1k tokens of each kind (`models.input_`, `output_`,
    /// `cached_input_credits_per_1k_tokens`; NULL: `credits_per_1k_tokens`).
    pub rates: Rates,
    /// The provider's prices (`models.input_`/`output_cost_per_million_tokens`).
    pub provider_costs: ProviderCosts,
    /// The most prompt tokens one image can cost (`None`: unknown — see
    /// [`crate::parse::PromptSize::tokens_bound`]).
    pub image_tokens: Option<i64>,
    pub is_available: bool,
    pub is_deprecated: bool,
    pub created: i64,
}

impl Model {
    /// The most tokens an answer of this model can have.
    pub fn output_cap(&self) -> i64 {
        self.max_output_tokens.unwrap_or(self.context_length).max(1)
    }

    pub fn to_openai(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.provider,
        })
    }
}

#[derive(Default)]
pub struct Models {
    map: ArcSwap<HashMap<String, Arc<Model>>>,
}

impl Models {
    pub fn get(&self, id: &str) -> Option<Arc<Model>> {
        self.map.load().get(id).cloned()
    }

    /// Models a client may use, sorted by id.
    pub fn listed(&self) -> Vec<Arc<Model>> {
        let mut v: Vec<_> = self
            .map
            .load()
            .values()
            .filter(|m| m.is_available && !m.is_deprecated)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reloads the whole table (it is small) and swaps it in.
    pub async fn refresh(&self, db: &Db) -> Result<usize, DbError> {
        let client = db.get().await?;
        let rows = client
            .query(
                "SELECT id, name, display_name, provider, capabilities::text[], context_length, max_output_tokens,
                        credits_per_1k_tokens, is_available, is_deprecated,
                        extract(epoch FROM created_at)::bigint, image_tokens,
                        input_credits_per_1k_tokens, output_credits_per_1k_tokens,
                        cached_input_credits_per_1k_tokens,
                        input_cost_per_million_tokens, output_cost_per_million_tokens
                   FROM models",
                &[],
            )
            .await?;
        let mut map = HashMap::with_capacity(rows.len());
        for r in rows {
            let flat = i64::from(r.get::<_, i32>(7));
            let rate = |i: usize| r.get::<_, Option<i32>>(i).map_or(flat, i64::from);
            let m = Model {
                id: r.get(0),
                name: r.get(1),
                display_name: r.get(2),
                provider: r.get(3),
                capabilities: r.get(4),
                context_length: i64::from(r.get::<_, i32>(5)),
                max_output_tokens: r.get::<_, Option<i32>>(6).map(i64::from),
                credits_per_1k_tokens: flat,
                rates: Rates {
                    input: rate(12),
                    output: rate(13),
                    cached_input: rate(14),
                },
                provider_costs: ProviderCosts {
                    input_cents_per_million: i64::from(r.get::<_, i32>(15)),
                    output_cents_per_million: i64::from(r.get::<_, i32>(16)),
                },
                is_available: r.get(8),
                is_deprecated: r.get(9),
                created: r.get(10),
                image_tokens: r.get::<_, Option<i32>>(11).map(i64::from),
            };
            map.insert(m.id.clone(), Arc::new(m));
        }
        let n = map.len();
        self.map.store(Arc::new(map));
        Ok(n)
    }

    /// Resolves the model a request names.
    pub fn route(&self, id: &str) -> Result<Arc<Model>, ApiError> {
        match self.get(id) {
            Some(m) if m.is_available && !m.is_deprecated => Ok(m),
            _ => Err(ApiError::ModelNotFound {
                model: id.to_owned(),
            }),
        }
    }

    /// Replaces the whole table (benches and tests; the server uses [`Models::refresh`]).
    pub fn replace(&self, models: Vec<Model>) {
        self.map.store(Arc::new(
            models
                .into_iter()
                .map(|m| (m.id.clone(), Arc::new(m)))
                .collect(),
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn m(id: &str, available: bool, deprecated: bool) -> Model {
        Model {
            id: id.into(),
            name: id.into(),
            display_name: id.into(),
            provider: "openai".into(),
            capabilities: vec![],
            context_length: 1000,
            max_output_tokens: Some(100),
            credits_per_1k_tokens: 2,
            rates: Rates::flat(2),
            provider_costs: ProviderCosts::default(),
            image_tokens: None,
            is_available: available,
            is_deprecated: deprecated,
            created: 0,
        }
    }

    #[test]
    fn unknown_unavailable_and_deprecated_are_not_found() {
        let models = Models::default();
        models.replace(vec![
            m("a", true, false),
            m("b", false, false),
            m("c", true, true),
        ]);
        assert_eq!(models.route("a").unwrap().id, "a");
        for id in ["b", "c", "zzz"] {
            assert_eq!(models.route(id).unwrap_err().label(), "model_not_found");
        }
        assert_eq!(models.listed().len(), 1);
    }
}
