-- Tollgate schema, version 1: every table, enum, index and foreign-key rule of the
-- data model (shared/seed/000_*.txt), in snake_case. Applied by `tollgate migrate`.

-- updated_at is kept current by the database, not by callers.
CREATE FUNCTION tollgate_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TYPE subscription_tier AS ENUM ('free', 'pro', 'enterprise');
CREATE TYPE subscription_status AS ENUM ('active', 'cancelled', 'expired', 'suspended');
CREATE TYPE usage_operation AS ENUM ('completion', 'chat', 'embedding', 'function_call');
CREATE TYPE model_capability AS ENUM ('text', 'vision', 'function_calling', 'code', 'long_context');

-- 1. users -------------------------------------------------------------------------
CREATE TABLE users (
    id                  uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    email               varchar(255) NOT NULL,
    email_verified      boolean      NOT NULL DEFAULT false,
    username            varchar(100),
    password_hash       varchar(255),
    first_name          varchar(100),
    last_name           varchar(100),
    profile_picture_url text,
    created_at          timestamptz  NOT NULL DEFAULT now(),
    updated_at          timestamptz  NOT NULL DEFAULT now(),
    last_login_at       timestamptz,
    is_active           boolean      NOT NULL DEFAULT true,
    deleted_at          timestamptz,
    CONSTRAINT users_email_key UNIQUE (email)
);
-- Emails are unique regardless of case.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
CREATE INDEX users_email_idx ON users (email);
CREATE INDEX users_created_at_idx ON users (created_at);
CREATE TRIGGER users_touch_updated_at BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION tollgate_touch_updated_at();

-- 2. oauth_clients -----------------------------------------------------------------
CREATE TABLE oauth_clients (
    client_id          varchar(255) PRIMARY KEY,
    client_name        varchar(255) NOT NULL,
    client_secret_hash varchar(255),
    redirect_uris      text[]       NOT NULL DEFAULT '{}',
    grant_types        text[]       NOT NULL DEFAULT '{}',
    response_types     text[]       NOT NULL DEFAULT '{}',
    scope              text,
    is_active          boolean      NOT NULL DEFAULT true,
    created_at         timestamptz  NOT NULL DEFAULT now()
);

-- 3. subscriptions -----------------------------------------------------------------
CREATE TABLE subscriptions (
    id                     uuid                PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                uuid                NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    tier                   subscription_tier   NOT NULL,
    status                 subscription_status NOT NULL DEFAULT 'active',
    credits_per_month      integer             NOT NULL CHECK (credits_per_month >= 0),
    credits_rollover       boolean             NOT NULL DEFAULT false,
    price_cents            integer             NOT NULL CHECK (price_cents >= 0),
    billing_interval       varchar(20)         NOT NULL,
    stripe_subscription_id varchar(255),
    stripe_customer_id     varchar(255),
    current_period_start   timestamptz         NOT NULL,
    current_period_end     timestamptz         NOT NULL,
    trial_end              timestamptz,
    created_at             timestamptz         NOT NULL DEFAULT now(),
    updated_at             timestamptz         NOT NULL DEFAULT now(),
    cancelled_at           timestamptz
);
CREATE INDEX subscriptions_user_id_idx ON subscriptions (user_id);
CREATE INDEX subscriptions_status_idx ON subscriptions (status);
CREATE INDEX subscriptions_current_period_end_idx ON subscriptions (current_period_end);
CREATE TRIGGER subscriptions_touch_updated_at BEFORE UPDATE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION tollgate_touch_updated_at();

-- 4. credits -----------------------------------------------------------------------
CREATE TABLE credits (
    id                   uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id              uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    subscription_id      uuid        REFERENCES subscriptions (id) ON DELETE SET NULL,
    total_credits        integer     NOT NULL CHECK (total_credits >= 0),
    used_credits         integer     NOT NULL DEFAULT 0 CHECK (used_credits >= 0),
    billing_period_start timestamptz NOT NULL,
    billing_period_end   timestamptz NOT NULL,
    is_current           boolean     NOT NULL DEFAULT true,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credits_user_id_idx ON credits (user_id);
CREATE INDEX credits_user_id_is_current_idx ON credits (user_id, is_current);
CREATE INDEX credits_billing_period_idx ON credits (billing_period_start, billing_period_end);
CREATE TRIGGER credits_touch_updated_at BEFORE UPDATE ON credits
    FOR EACH ROW EXECUTE FUNCTION tollgate_touch_updated_at();

-- 6. models (before usage_history, which references it) ----------------------------
CREATE TABLE models (
    id                             varchar(100)       PRIMARY KEY,
    name                           varchar(255)       NOT NULL,
    display_name                   varchar(255)       NOT NULL,
    provider                       varchar(100)       NOT NULL,
    description                    text,
    capabilities                   model_capability[] NOT NULL DEFAULT '{}',
    context_length                 integer            NOT NULL CHECK (context_length > 0),
    max_output_tokens              integer            CHECK (max_output_tokens > 0),
    input_cost_per_million_tokens  integer            NOT NULL CHECK (input_cost_per_million_tokens >= 0),
    output_cost_per_million_tokens integer            NOT NULL CHECK (output_cost_per_million_tokens >= 0),
    credits_per_1k_tokens          integer            NOT NULL CHECK (credits_per_1k_tokens >= 0),
    is_available                   boolean            NOT NULL DEFAULT true,
    is_deprecated                  boolean            NOT NULL DEFAULT false,
    version                        varchar(50),
    created_at                     timestamptz        NOT NULL DEFAULT now(),
    updated_at                     timestamptz        NOT NULL DEFAULT now()
);
CREATE INDEX models_is_available_idx ON models (is_available);
CREATE INDEX models_provider_idx ON models (provider);
CREATE TRIGGER models_touch_updated_at BEFORE UPDATE ON models
    FOR EACH ROW EXECUTE FUNCTION tollgate_touch_updated_at();

-- 5. usage_history: partitioned by month on created_at -----------------------------
CREATE TABLE usage_history (
    id                  uuid            NOT NULL,
    user_id             uuid            NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    credit_id           uuid            REFERENCES credits (id) ON DELETE SET NULL,
    model_id            varchar(100)    NOT NULL REFERENCES models (id) ON DELETE RESTRICT,
    operation           usage_operation NOT NULL,
    credits_used        integer         NOT NULL CHECK (credits_used >= 0),
    input_tokens        integer         CHECK (input_tokens >= 0),
    output_tokens       integer         CHECK (output_tokens >= 0),
    total_tokens        integer         CHECK (total_tokens >= 0),
    request_duration_ms integer         CHECK (request_duration_ms >= 0),
    request_metadata    jsonb,
    created_at          timestamptz     NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX usage_history_user_id_idx ON usage_history (user_id);
CREATE INDEX usage_history_created_at_idx ON usage_history (created_at);
CREATE INDEX usage_history_model_id_idx ON usage_history (model_id);
CREATE INDEX usage_history_user_id_created_at_idx ON usage_history (user_id, created_at DESC);
-- Catches rows outside every monthly partition (clock skew) so that no row is refused;
-- the server keeps monthly partitions created months ahead, so this stays empty.
CREATE TABLE usage_history_default PARTITION OF usage_history DEFAULT;

-- Creates the monthly partitions from the month of `from_ts` through `months_ahead`
-- months after it. Idempotent; returns how many partitions it created.
CREATE FUNCTION tollgate_ensure_usage_partitions(from_ts timestamptz, months_ahead integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    first_month date := date_trunc('month', from_ts AT TIME ZONE 'UTC')::date;
    m date;
    part text;
    created integer := 0;
BEGIN
    FOR i IN 0..months_ahead LOOP
        m := (first_month + make_interval(months => i))::date;
        part := format('usage_history_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF usage_history FOR VALUES FROM (%L) TO (%L)',
                part,
                (m::timestamp AT TIME ZONE 'UTC'),
                ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END;
$$;

-- 7. user_preferences --------------------------------------------------------------
CREATE TABLE user_preferences (
    user_id              uuid         PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    default_model_id     varchar(100) REFERENCES models (id) ON DELETE SET NULL,
    enable_streaming     boolean      NOT NULL DEFAULT true,
    max_tokens           integer      NOT NULL DEFAULT 4096 CHECK (max_tokens > 0),
    temperature          numeric(3,2) NOT NULL DEFAULT 0.7,
    preferences_metadata jsonb,
    created_at           timestamptz  NOT NULL DEFAULT now(),
    updated_at           timestamptz  NOT NULL DEFAULT now()
);
CREATE TRIGGER user_preferences_touch_updated_at BEFORE UPDATE ON user_preferences
    FOR EACH ROW EXECUTE FUNCTION tollgate_touch_updated_at();

-- Legacy tables of the branding website, kept as they were: CUID text ids. ----------
CREATE TABLE downloads (
    id         text        PRIMARY KEY,
    os         varchar(20) NOT NULL CHECK (os IN ('windows', 'macos', 'linux')),
    version    varchar(50),
    user_agent text,
    ip_hash    varchar(64),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX downloads_os_idx ON downloads (os);
CREATE INDEX downloads_created_at_idx ON downloads (created_at);

CREATE TABLE feedbacks (
    id         text        PRIMARY KEY,
    user_id    text,
    email      varchar(255),
    message    text        NOT NULL,
    rating     smallint    CHECK (rating BETWEEN 1 AND 5),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feedbacks_created_at_idx ON feedbacks (created_at);

CREATE TABLE diagnostics (
    id          text         PRIMARY KEY,
    user_id     text,
    file_name   varchar(255) NOT NULL,
    file_size   integer      NOT NULL CHECK (file_size >= 0),
    storage_url text         NOT NULL,
    created_at  timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX diagnostics_created_at_idx ON diagnostics (created_at);

CREATE TABLE app_versions (
    id           text        PRIMARY KEY,
    version      varchar(50) NOT NULL UNIQUE,
    release_date timestamptz NOT NULL DEFAULT now(),
    download_url text        NOT NULL,
    changelog    text,
    is_latest    boolean     NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);
