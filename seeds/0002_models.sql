-- The three launch models. `name` is the provider's own model name, sent upstream;
-- prices are in US cents per million tokens; credits_per_1k_tokens is what we bill.
-- image_tokens: the most one image can cost, from the provider's documented method
-- (GPT-5: 85 + 170 per 512 px tile, at most 8 tiles after scaling = 1,445; Claude:
-- width x height / 750 on images scaled to about 1.15 megapixels = about 1,600);
-- Gemini tiles large images at 258 tokens per 768 px tile with no stated maximum, so
-- NULL: an image counts as the context length.
INSERT INTO models AS m
    (id, name, display_name, provider, description, capabilities, context_length, max_output_tokens,
     input_cost_per_million_tokens, output_cost_per_million_tokens, credits_per_1k_tokens,
     is_available, is_deprecated, version, image_tokens)
VALUES
    ('gpt-5', 'gpt-5', 'GPT-5', 'openai',
     'OpenAI flagship model for coding, reasoning and agentic tasks.',
     ARRAY['text', 'vision', 'function_calling', 'code', 'long_context']::model_capability[],
     400000, 128000, 125, 1000, 2, true, false, '2025-08-07', 1500),
    ('gemini-2.0-pro', 'gemini-2.0-pro-exp-02-05', 'Gemini 2.0 Pro', 'google',
     'Google Gemini 2.0 Pro with a two-million-token context window.',
     ARRAY['text', 'vision', 'function_calling', 'code', 'long_context']::model_capability[],
     2097152, 8192, 125, 500, 1, true, false, '2.0-exp-02-05', NULL),
    ('claude-3.5-sonnet', 'claude-3-5-sonnet-20241022', 'Claude 3.5 Sonnet', 'anthropic',
     'Anthropic Claude 3.5 Sonnet for writing, analysis and code.',
     ARRAY['text', 'vision', 'function_calling', 'code']::model_capability[],
     200000, 8192, 300, 1500, 2, true, false, '20241022', 1600)
ON CONFLICT (id) DO UPDATE SET
    name                           = EXCLUDED.name,
    display_name                   = EXCLUDED.display_name,
    provider                       = EXCLUDED.provider,
    description                    = EXCLUDED.description,
    capabilities                   = EXCLUDED.capabilities,
    context_length                 = EXCLUDED.context_length,
    max_output_tokens              = EXCLUDED.max_output_tokens,
    input_cost_per_million_tokens  = EXCLUDED.input_cost_per_million_tokens,
    output_cost_per_million_tokens = EXCLUDED.output_cost_per_million_tokens,
    credits_per_1k_tokens          = EXCLUDED.credits_per_1k_tokens,
    is_available                   = EXCLUDED.is_available,
    is_deprecated                  = EXCLUDED.is_deprecated,
    version                        = EXCLUDED.version,
    image_tokens                   = EXCLUDED.image_tokens
WHERE (m.name, m.display_name, m.provider, m.description, m.capabilities, m.context_length,
       m.max_output_tokens, m.input_cost_per_million_tokens, m.output_cost_per_million_tokens,
       m.credits_per_1k_tokens, m.is_available, m.is_deprecated, m.version, m.image_tokens)
      IS DISTINCT FROM
      (EXCLUDED.name, EXCLUDED.display_name, EXCLUDED.provider, EXCLUDED.description, EXCLUDED.capabilities,
       EXCLUDED.context_length, EXCLUDED.max_output_tokens, EXCLUDED.input_cost_per_million_tokens,
       EXCLUDED.output_cost_per_million_tokens, EXCLUDED.credits_per_1k_tokens, EXCLUDED.is_available,
       EXCLUDED.is_deprecated, EXCLUDED.version, EXCLUDED.image_tokens);
