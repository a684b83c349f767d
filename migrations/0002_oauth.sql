-- OAuth 2.0 authorization server state: authorization codes and refresh tokens, both
-- stored as SHA-256 hashes (the secrets themselves are never stored).

-- A code is redeemed once; `family_id` names the refresh-token family it produced, so
-- that a second redemption can revoke what the first one issued.
CREATE TABLE oauth_authorization_codes (
    code_hash      bytea        PRIMARY KEY,
    client_id      varchar(255) NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    user_id        uuid         NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    redirect_uri   text         NOT NULL,
    code_challenge text         NOT NULL,
    scope          text         NOT NULL,
    expires_at     timestamptz  NOT NULL,
    used_at        timestamptz,
    family_id      uuid,
    created_at     timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX oauth_authorization_codes_expires_at_idx ON oauth_authorization_codes (expires_at);

-- Refresh tokens rotate on every use: each use marks the row used and inserts its
-- successor in the same family. Presenting a used token revokes the whole family.
-- `expires_at` is the idle expiry (pushed forward by each rotation, never past
-- `family_expires_at`, the absolute expiry of the sign-in).
CREATE TABLE oauth_refresh_tokens (
    token_hash        bytea        PRIMARY KEY,
    family_id         uuid         NOT NULL,
    client_id         varchar(255) NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    user_id           uuid         NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    scope             text         NOT NULL,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    expires_at        timestamptz  NOT NULL,
    family_expires_at timestamptz  NOT NULL,
    used_at           timestamptz,
    revoked_at        timestamptz
);
CREATE INDEX oauth_refresh_tokens_family_id_idx ON oauth_refresh_tokens (family_id);
CREATE INDEX oauth_refresh_tokens_user_id_idx ON oauth_refresh_tokens (user_id);
CREATE INDEX oauth_refresh_tokens_revoked_at_idx ON oauth_refresh_tokens (revoked_at)
    WHERE revoked_at IS NOT NULL;

-- A user who is deactivated or deleted loses every refresh token at once, whoever
-- changes the row.
CREATE FUNCTION tollgate_revoke_disabled_user_tokens() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NOT NEW.is_active OR NEW.deleted_at IS NOT NULL)
       AND (OLD.is_active AND OLD.deleted_at IS NULL) THEN
        UPDATE oauth_refresh_tokens SET revoked_at = now()
         WHERE user_id = NEW.id AND revoked_at IS NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER users_revoke_tokens_when_disabled AFTER UPDATE OF is_active, deleted_at ON users
    FOR EACH ROW EXECUTE FUNCTION tollgate_revoke_disabled_user_tokens();
