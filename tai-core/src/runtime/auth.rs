//! API keys and who a request speaks for.
//!
//! `TAI_API_KEYS` (or Vault's `api_keys`) is a comma-separated list of `key[:merchant[:scope]]`.
//! An entry `key:merchant` binds the key to one merchant: requests with it act for that merchant
//! only. An entry without a merchant (`key`, or `key::scope`) is an admin key, for every
//! merchant. The scope is `write` (the default: every method) or `read` (GET and HEAD only; a
//! read-only key that sends anything else is refused 403 `insufficient_scope`). With keys configured, every route but the common
//! ones (`/health`, `/ready`, `/metrics`, `/status`, `/andon`, `/`, `/openapi.json`) needs one,
//! reads included; the middleware puts the [`Principal`] in the request's extensions for the
//! handlers to scope what they do. With no keys, everything is open and no principal is set.

use crate::secrets::Secret;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Read only: GET and HEAD.
    Read,
    /// Read and change: every method.
    #[default]
    Write,
}

impl Scope {
    /// Whether a request with `method` is within the scope.
    pub fn allows(self, method: &axum::http::Method) -> bool {
        self == Scope::Write
            || matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD)
    }
}

/// One configured key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// The key itself (never printed).
    pub secret: Secret,
    /// The merchant it acts for; `None` for an admin key.
    pub merchant: Option<String>,
    /// What it may do.
    pub scope: Scope,
}

/// Who an authenticated request speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The merchant a bound key acts for; `None` for an admin key.
    pub merchant: Option<String>,
    /// What the key may do.
    pub scope: Scope,
}

impl Principal {
    /// Whether it may act for `merchant`: an admin key may act for any.
    pub fn may_act_for(&self, merchant: &str) -> bool {
        self.merchant.as_deref().is_none_or(|m| m == merchant)
    }
}

/// Whether a request may act for `merchant`: open when no keys are configured (no principal).
pub fn may_act_for(principal: Option<&Principal>, merchant: &str) -> bool {
    principal.is_none_or(|p| p.may_act_for(merchant))
}

/// Parses `key[:merchant[:scope]],…` (spaces around entries and parts ignored, empty entries
/// skipped). An unknown scope is read as `read`: a typo never widens what a key may do.
pub fn parse_api_keys(text: &str) -> Vec<ApiKey> {
    text.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|entry| {
            let mut parts = entry.splitn(3, ':').map(str::trim);
            let secret = Secret::new(parts.next().unwrap_or_default());
            let merchant = parts.next().filter(|m| !m.is_empty()).map(str::to_owned);
            let scope = match parts.next() {
                None | Some("") | Some("write") => Scope::Write,
                Some(_) => Scope::Read,
            };
            ApiKey {
                secret,
                merchant,
                scope,
            }
        })
        .collect()
}

/// The key that matches `presented`, comparing with every key in constant time (so timing does
/// not tell which one matched, or how much of one).
pub(crate) fn find<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a ApiKey> {
    keys.iter().fold(None, |found, k| {
        if k.secret.matches(presented.as_bytes()) {
            Some(k)
        } else {
            found
        }
    })
}

/// The common routes, open to all (probes, scrapers and the Andon board).
pub(crate) fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/ready" | "/metrics" | "/status" | "/andon" | "/" | "/openapi.json"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_and_admin_keys() {
        let keys = parse_api_keys(
            " sk_a:merc_a, sk_admin ,, sk_b:merc_b, sk_r:merc_a:read, sk_ar::read, sk_t:m:raed",
        );
        assert_eq!(keys.len(), 6);
        let scopes: Vec<(Option<&str>, Scope)> = keys
            .iter()
            .map(|k| (k.merchant.as_deref(), k.scope))
            .collect();
        assert_eq!(
            scopes,
            vec![
                (Some("merc_a"), Scope::Write),
                (None, Scope::Write),
                (Some("merc_b"), Scope::Write),
                (Some("merc_a"), Scope::Read),
                (None, Scope::Read),
                (Some("m"), Scope::Read),
            ],
            "a misspelt scope is read-only"
        );
        assert!(Scope::Read.allows(&axum::http::Method::GET));
        assert!(!Scope::Read.allows(&axum::http::Method::POST));
        assert!(Scope::Write.allows(&axum::http::Method::DELETE));
        let a = find(&keys, "sk_a").expect("a");
        assert_eq!(a.merchant.as_deref(), Some("merc_a"));
        assert_eq!(find(&keys, "sk_admin").expect("admin").merchant, None);
        assert!(
            find(&keys, "sk_a:merc_a").is_none(),
            "the binding is not part of the key"
        );
        let p = Principal {
            merchant: Some("merc_a".into()),
            scope: Scope::Write,
        };
        assert!(p.may_act_for("merc_a") && !p.may_act_for("merc_b"));
        let admin = Principal {
            merchant: None,
            scope: Scope::Write,
        };
        assert!(admin.may_act_for("merc_b"));
        assert!(may_act_for(None, "anyone"), "open without keys");
    }
}
