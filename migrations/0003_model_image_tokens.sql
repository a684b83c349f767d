-- The most prompt tokens one image part can cost with this model, which sizes the
-- credit hold of a request with images. NULL: no bound is known, and an image counts
-- as the whole context length (`metering.image_tokens` > 0 sets another default).
ALTER TABLE models
    ADD COLUMN image_tokens integer CHECK (image_tokens > 0);
