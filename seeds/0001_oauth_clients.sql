-- The desktop app: a public client (no secret) that signs in with PKCE.
INSERT INTO oauth_clients AS c
    (client_id, client_name, client_secret_hash, redirect_uris, grant_types, response_types, scope, is_active)
VALUES
    ('textassistant-desktop', 'TextAssistant Desktop', NULL,
     ARRAY['http://127.0.0.1/callback', 'textassistant://oauth/callback'],
     ARRAY['authorization_code', 'refresh_token'],
     ARRAY['code'],
     'openid email profile llm.inference models.read user.info credits.read',
     true)
ON CONFLICT (client_id) DO UPDATE SET
    client_name        = EXCLUDED.client_name,
    client_secret_hash = EXCLUDED.client_secret_hash,
    redirect_uris      = EXCLUDED.redirect_uris,
    grant_types        = EXCLUDED.grant_types,
    response_types     = EXCLUDED.response_types,
    scope              = EXCLUDED.scope,
    is_active          = EXCLUDED.is_active
WHERE (c.client_name, c.client_secret_hash, c.redirect_uris, c.grant_types, c.response_types, c.scope, c.is_active)
      IS DISTINCT FROM
      (EXCLUDED.client_name, EXCLUDED.client_secret_hash, EXCLUDED.redirect_uris, EXCLUDED.grant_types,
       EXCLUDED.response_types, EXCLUDED.scope, EXCLUDED.is_active);
