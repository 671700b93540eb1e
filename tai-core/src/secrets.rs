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

/// Secrets from one KV v2 secret in Vault: `name` is a field of the secret at `mount`/`path`.
pub struct VaultSecrets {
    client: std::sync::Arc<vaultrs::client::VaultClient>,
    mount: String,
    path: String,
}

impl fmt::Debug for VaultSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultSecrets")
            .field("mount", &self.mount)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn vault_error(e: impl fmt::Display) -> BackendError {
    BackendError::Unavailable {
        backend: "vault",
        message: e.to_string(),
    }
}

impl VaultSecrets {
    /// A reader of the KV v2 secret `mount`/`path` at the Vault server `address`.
    pub fn new(
        address: &str,
        token: &Secret,
        mount: &str,
        path: &str,
    ) -> Result<Self, BackendError> {
        // both ring (NATS) and aws-lc (nothing else) could be compiled in; pick one explicitly
        let _ = rustls::crypto::ring::default_provider().install_default();
        let settings = vaultrs::client::VaultClientSettingsBuilder::default()
            .address(address)
            .token(token.expose())
            .timeout(Some(std::time::Duration::from_secs(5)))
            .build()
            .map_err(vault_error)?;
        let client = vaultrs::client::VaultClient::new(settings).map_err(vault_error)?;
        Ok(Self {
            client: std::sync::Arc::new(client),
            mount: mount.to_owned(),
            path: path.to_owned(),
        })
    }
}

impl SecretSource for VaultSecrets {
    fn backend(&self) -> &'static str {
        "vault"
    }
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Secret>, BackendError>> {
        Box::pin(async move {
            let fields: std::collections::HashMap<String, String> =
                vaultrs::kv2::read(self.client.as_ref(), &self.mount, &self.path)
                    .await
                    .map_err(|e| {
                        vault_error(format!("reading {}/{}: {e}", self.mount, self.path))
                    })?;
            Ok(fields
                .get(name)
                .filter(|v| !v.is_empty())
                .map(|v| Secret::new(v.clone())))
        })
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
