-- Prices per token kind (issue 13, item 5). A model may price input, output and
-- cached input differently; NULL falls back to credits_per_1k_tokens, so a model
-- without them is charged as before. A request costs
--   ceil((uncached input × input + cached input × cached_input + output × output) / 1000)
-- credits, one ceiling per request; its hold prices every token at the highest of the
-- three.
ALTER TABLE models
    ADD COLUMN input_credits_per_1k_tokens        integer CHECK (input_credits_per_1k_tokens >= 0),
    ADD COLUMN output_credits_per_1k_tokens       integer CHECK (output_credits_per_1k_tokens >= 0),
    ADD COLUMN cached_input_credits_per_1k_tokens integer CHECK (cached_input_credits_per_1k_tokens >= 0);

COMMENT ON COLUMN models.input_credits_per_1k_tokens IS
    'Credits per 1,000 uncached input tokens (cache writes included); NULL: credits_per_1k_tokens.';
COMMENT ON COLUMN models.output_credits_per_1k_tokens IS
    'Credits per 1,000 output tokens; NULL: credits_per_1k_tokens.';
COMMENT ON COLUMN models.cached_input_credits_per_1k_tokens IS
    'Credits per 1,000 input tokens read from the provider''s prompt cache; NULL: credits_per_1k_tokens.';

-- What each row was charged at. usage_history is partitioned: columns added to the
-- parent reach every partition (and DEFAULT). NULL on rows written before this.
ALTER TABLE usage_history
    ADD COLUMN cached_input_tokens integer CHECK (cached_input_tokens >= 0),
    ADD COLUMN input_rate          integer CHECK (input_rate >= 0),
    ADD COLUMN output_rate         integer CHECK (output_rate >= 0),
    ADD COLUMN cached_input_rate   integer CHECK (cached_input_rate >= 0),
    ADD COLUMN provider_cost_cents numeric(20, 6) CHECK (provider_cost_cents >= 0);

COMMENT ON COLUMN usage_history.cached_input_tokens IS
    'The part of input_tokens read from the provider''s prompt cache (charged at cached_input_rate).';
COMMENT ON COLUMN usage_history.input_rate IS
    'Credits per 1,000 uncached input tokens this row was charged at.';
COMMENT ON COLUMN usage_history.output_rate IS
    'Credits per 1,000 output tokens this row was charged at.';
COMMENT ON COLUMN usage_history.cached_input_rate IS
    'Credits per 1,000 cached input tokens this row was charged at.';
COMMENT ON COLUMN usage_history.provider_cost_cents IS
    'What the provider charges for this request, in US cents, exact: (input_tokens × '
    'models.input_cost_per_million_tokens + output_tokens × output_cost_per_million_tokens) / 10^6 '
    'at the prices of the request''s time (tokens of total_tokens in neither kind at the output cost). '
    'Cached input is priced at the input cost: the seed has no cached-input cost, and every '
    'provider prices cached input below input, so this never understates the cost.';
