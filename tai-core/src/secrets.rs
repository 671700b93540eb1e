//! Secrets: API keys, gateway keys, tokens.
//!
//! A [`Secret`] cannot print itself: `Debug` and `Display` show `****`, so a secret that ends up
//! in a log line, a span or a panic message leaks nothing. The value is reached only through
//! [`Secret::expose`], which makes every use easy to find. Secrets come from a [`SecretSource`]:
//! the environment by default, Vault's KV v2 when configured.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::backend::{BackendError, BoxFuture};

/// A secret string.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `candidate` in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(candidate).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// Where secrets come from.
pub trait SecretSource: Send + Sync + fmt::Debug {
    /// The backend's name for `/status`: `env` or `vault`.
    fn backend(&self) -> &'static str;
    /// Reads a secret by name; `None` when it is not set.
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Secret>, BackendError>>;
}

/// Secrets from environment variables (`name` is the variable's name).
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSecrets;

impl SecretSource for EnvSecrets {
    fn backend(&self) -> &'static str {
        "env"
    }
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Secret>, BackendError>> {
        let value = std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret);
        Box::pin(std::future::ready(Ok(value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let s = Secret::new("sk_live_very_secret");
        assert_eq!(format!("{s:?}"), "Secret(****)");
        assert_eq!(format!("{s}"), "****");
        assert_eq!(
            format!("{:?}", Some(vec![s.clone()])),
            "Some([Secret(****)])"
        );
        assert!(s.matches(b"sk_live_very_secret"));
        assert!(!s.matches(b"sk_live_very_secreT"));
        assert!(!s.matches(b"sk_live"));
    }
}
