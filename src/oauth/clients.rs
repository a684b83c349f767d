//! Registered OAuth clients (`oauth_clients`) and the redirect URI rules of RFC 8252:
//! an exact string match with a registered URI, except that for a registered loopback
//! IP literal (`http://127.0.0.1/...`, `http://[::1]/...`) any port is accepted. A
//! host name (`localhost`) is never treated as loopback unless registered as such.

use crate::db::{Db, DbError};

#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub name: String,
    pub secret_hash: Option<String>,
    pub redirect_uris: Vec<String>,
    pub grant_types: Vec<String>,
    pub response_types: Vec<String>,
    pub scope: Vec<String>,
}

/// The client if it exists and is active.
pub async fn find(db: &Db, client_id: &str) -> Result<Option<Client>, DbError> {
    if client_id.is_empty() || client_id.len() > 255 {
        return Ok(None);
    }
    let conn = db.get().await?;
    let row = conn
        .query_opt(
            "SELECT client_name, client_secret_hash, redirect_uris, grant_types, response_types,
                    coalesce(scope, '')
               FROM oauth_clients WHERE client_id = $1 AND is_active",
            &[&client_id],
        )
        .await?;
    Ok(row.map(|r| Client {
        client_id: client_id.to_owned(),
        name: r.get(0),
        secret_hash: r.get(1),
        redirect_uris: r.get(2),
        grant_types: r.get(3),
        response_types: r.get(4),
        scope: r
            .get::<_, String>(5)
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect(),
    }))
}

impl Client {
    pub fn allows_redirect(&self, uri: &str) -> bool {
        self.redirect_uris.iter().any(|r| redirect_matches(r, uri))
    }

    /// The granted scope: the requested one if every value is registered for the
    /// client, the client's whole scope if none was requested.
    pub fn grant_scope(&self, requested: Option<&str>) -> Option<String> {
        match requested {
            None => Some(self.scope.join(" ")),
            Some(r) => {
                let mut out: Vec<&str> = Vec::new();
                for s in r.split(' ').filter(|s| !s.is_empty()) {
                    if !self.scope.iter().any(|c| c == s) {
                        return None;
                    }
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
                (!out.is_empty()).then(|| out.join(" "))
            }
        }
    }
}

/// Splits `http://host[:port]rest` into (host, port, rest) for loopback IP literals.
fn loopback_parts(uri: &str) -> Option<(&str, Option<&str>, &str)> {
    let rest = uri.strip_prefix("http://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (host, port) = if let Some(v6) = authority.strip_prefix("[::1]") {
        ("[::1]", v6)
    } else if let Some(v4) = authority.strip_prefix("127.0.0.1") {
        ("127.0.0.1", v4)
    } else {
        return None;
    };
    let port = match port {
        "" => None,
        p => {
            let digits = p.strip_prefix(':')?;
            if digits.is_empty()
                || digits.len() > 5
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || digits.parse::<u32>().ok()? > 65_535
            {
                return None;
            }
            Some(digits)
        }
    };
    Some((host, port, tail))
}

/// RFC 8252 §7.3 and §8.4: exact match, or the same loopback IP URI on any port.
pub fn redirect_matches(registered: &str, requested: &str) -> bool {
    if registered == requested {
        return true;
    }
    if requested.contains('#') {
        return false;
    }
    match (loopback_parts(registered), loopback_parts(requested)) {
        (Some((rh, _, rt)), Some((qh, _, qt))) => rh == qh && rt == qt,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_requested_scope_grants_the_registered_one_and_requests_are_checked_by_value() {
        let c = Client {
            client_id: "c".into(),
            name: "C".into(),
            secret_hash: None,
            redirect_uris: Vec::new(),
            grant_types: Vec::new(),
            response_types: Vec::new(),
            scope: vec!["openid".into(), "llm.inference".into(), "user.info".into()],
        };
        assert_eq!(
            c.grant_scope(None).as_deref(),
            Some("openid llm.inference user.info")
        );
        assert_eq!(
            c.grant_scope(Some("user.info  user.info llm.inference"))
                .as_deref(),
            Some("user.info llm.inference")
        );
        assert_eq!(c.grant_scope(Some("llm")), None);
        assert_eq!(c.grant_scope(Some("llm.inferencex")), None);
        assert_eq!(c.grant_scope(Some("openid credits.read")), None);
    }

    #[test]
    fn loopback_any_port_everything_else_exact() {
        let reg = "http://127.0.0.1/callback";
        assert!(redirect_matches(reg, "http://127.0.0.1/callback"));
        assert!(redirect_matches(reg, "http://127.0.0.1:53117/callback"));
        assert!(!redirect_matches(reg, "http://127.0.0.1:53117/callback/"));
        assert!(!redirect_matches(reg, "http://127.0.0.1:53117/other"));
        assert!(!redirect_matches(
            reg,
            "http://127.0.0.1:53117/callback?x=1"
        ));
        assert!(!redirect_matches(reg, "http://127.0.0.1:53117/callback#f"));
        assert!(!redirect_matches(reg, "http://localhost:53117/callback"));
        assert!(!redirect_matches(reg, "http://127.0.0.1.evil.com/callback"));
        assert!(!redirect_matches(reg, "http://127.0.0.1:99999/callback"));
        assert!(!redirect_matches(reg, "http://127.0.0.1:/callback"));
        assert!(!redirect_matches(reg, "https://127.0.0.1:5/callback"));
        assert!(!redirect_matches(reg, "http://[::1]:5/callback"));
        assert!(redirect_matches(
            "http://[::1]/callback",
            "http://[::1]:5/callback"
        ));
        let custom = "textassistant://oauth/callback";
        assert!(redirect_matches(custom, custom));
        assert!(!redirect_matches(custom, "textassistant://oauth/callback/"));
        assert!(!redirect_matches(
            "https://app.example.com/cb",
            "https://app.example.com:444/cb"
        ));
    }
}
