//! API keys and who a request speaks for.
//!
//! `TAI_API_KEYS` (or Vault's `api_keys`) is a comma-separated list. An entry `key:merchant`
//! binds the key to one merchant: requests with it act for that merchant only. An entry without
//! `:` is an admin key, for every merchant. With keys configured, every route but the common
//! ones (`/health`, `/ready`, `/metrics`, `/status`, `/andon`, `/`, `/openapi.json`) needs one,
//! reads included; the middleware puts the [`Principal`] in the request's extensions for the
//! handlers to scope what they do. With no keys, everything is open and no principal is set.

use crate::secrets::Secret;

/// One configured key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// The key itself (never printed).
    pub secret: Secret,
    /// The merchant it acts for; `None` for an admin key.
    pub merchant: Option<String>,
}

/// Who an authenticated request speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The merchant a bound key acts for; `None` for an admin key.
    pub merchant: Option<String>,
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

/// Parses `key[:merchant],…` (spaces around entries ignored, empty entries skipped).
pub fn parse_api_keys(text: &str) -> Vec<ApiKey> {
    text.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|entry| match entry.split_once(':') {
            Some((key, merchant)) if !merchant.trim().is_empty() => ApiKey {
                secret: Secret::new(key.trim()),
                merchant: Some(merchant.trim().to_owned()),
            },
            _ => ApiKey {
                secret: Secret::new(entry.trim_end_matches(':')),
                merchant: None,
            },
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
        let keys = parse_api_keys(" sk_a:merc_a, sk_admin ,, sk_b:merc_b");
        assert_eq!(keys.len(), 3);
        let a = find(&keys, "sk_a").expect("a");
        assert_eq!(a.merchant.as_deref(), Some("merc_a"));
        assert_eq!(find(&keys, "sk_admin").expect("admin").merchant, None);
        assert!(
            find(&keys, "sk_a:merc_a").is_none(),
            "the binding is not part of the key"
        );
        let p = Principal {
            merchant: Some("merc_a".into()),
        };
        assert!(p.may_act_for("merc_a") && !p.may_act_for("merc_b"));
        assert!(Principal { merchant: None }.may_act_for("merc_b"));
        assert!(may_act_for(None, "anyone"), "open without keys");
    }
}
