//! Configuration: environment variables over an optional TOML file over defaults.
//!
//! The names are docs/API.md's (`LISTEN_ADDR`, `TAI_PROFILE`, `REDIS_URL`, ...). A TOML file named by
//! `TAI_CONFIG` may set the same names in lower case (`listen_addr = "..."`); the environment wins.
//! Services read their own settings through [`RuntimeConfig::setting`] with the same rule, so
//! every knob can be set either way. The effective configuration is printed at start with
//! secrets masked ([`RuntimeConfig::describe`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::secrets::Secret;

/// Deployment profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// A developer's machine: pretty logs, keys optional.
    Dev,
    /// Pre-production.
    Staging,
    /// Production: JSON logs, API keys required.
    Prod,
}

impl FromStr for Profile {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "dev" | "development" => Ok(Profile::Dev),
            "staging" => Ok(Profile::Staging),
            "prod" | "production" => Ok(Profile::Prod),
            other => Err(ConfigError::Invalid {
                name: "TAI_PROFILE".into(),
                value: other.into(),
                expected: "dev, staging or prod".into(),
            }),
        }
    }
}

impl Profile {
    /// The profile's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Dev => "dev",
            Profile::Staging => "staging",
            Profile::Prod => "prod",
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// A configuration value could not be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A value did not parse.
    #[error("{name}={value:?} is invalid: expected {expected}")]
    Invalid {
        /// The setting.
        name: String,
        /// Its value.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// The TOML file could not be read.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A rule of the profile was broken.
    #[error("{0}")]
    Refused(String),
    /// A backend the configuration names could not be set up.
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
}

/// Where settings come from: environment first, then the file.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    env: BTreeMap<String, String>,
    file: BTreeMap<String, String>,
}

impl Sources {
    /// The process environment and the file `TAI_CONFIG` names, if any.
    pub fn from_process() -> Result<Self, ConfigError> {
        Self::from_process_with(Vec::new())
    }

    /// The same with `flags` (settings given on the command line) above the environment; a
    /// `--tai-config` flag names the file.
    pub fn from_process_with(flags: Vec<(String, String)>) -> Result<Self, ConfigError> {
        let mut env: BTreeMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        env.extend(flags);
        let mut file = BTreeMap::new();
        if let Some(path) = env.get("TAI_CONFIG").filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            file = parse_toml(&text).map_err(|message| ConfigError::File {
                path: path.clone(),
                message,
            })?;
        }
        Ok(Self { env, file })
    }

    /// Explicit settings (tests): `env` as if from the environment, `toml` as if from a file.
    pub fn from_parts(env: &[(&str, &str)], toml: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            file: parse_toml(toml).map_err(|message| ConfigError::File {
                path: "<inline>".into(),
                message,
            })?,
        })
    }

    /// A setting by its environment name (`GATEWAY_TIMEOUT_MS`), or the same name in lower case
    /// from the file; empty values count as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        self.env
            .get(name)
            .or_else(|| self.file.get(&name.to_ascii_lowercase()))
            .filter(|v| !v.is_empty())
            .cloned()
    }
}

/// Flattens a TOML document into `key` / `section.key` strings.
fn parse_toml(text: &str) -> Result<BTreeMap<String, String>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = BTreeMap::new();
    flatten("", &toml::Value::Table(table), &mut out);
    Ok(out)
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.to_ascii_lowercase()
                } else {
                    format!("{prefix}.{}", k.to_ascii_lowercase())
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::String(s) => {
            out.insert(prefix.to_owned(), s.clone());
        }
        toml::Value::Array(items) => {
            let joined: Vec<String> = items
                .iter()
                .map(|i| match i {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            out.insert(prefix.to_owned(), joined.join(","));
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// What every TAI service is configured with.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The service's name.
    pub service: String,
    /// Where to listen (`LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// `TAI_PROFILE`.
    pub profile: Profile,
    /// `DATABASE_URL`: the system of record: `sqlite://PATH`, `postgres://…` or `memory`;
    /// unset means a SQLite file under [`RuntimeConfig::data_dir`].
    pub database_url: Secret,
    /// `TAI_DATA_DIR` (default `./data`): where the embedded SQLite database lives.
    pub data_dir: std::path::PathBuf,
    /// `TAI_SINGLE_NODE`: the operator's word that one replica runs (SQLite in `prod`).
    pub single_node: bool,
    /// `REDIS_URL`: hot shared state (rate limits, velocity windows, locks) in Redis when set.
    pub redis_url: Option<Secret>,
    /// `NATS_URL`: queues and audit streams in JetStream when set.
    pub nats_url: Option<String>,
    /// `AMQP_URL`: Kanban queues on RabbitMQ when set (the fallback when `NATS_URL` is set too).
    pub amqp_url: Option<Secret>,
    /// `VAULT_ADDR`: secrets from Vault when set.
    pub vault_addr: Option<String>,
    /// `VAULT_TOKEN`.
    pub vault_token: Option<Secret>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: traces exported over OTLP when set.
    pub otlp_endpoint: Option<String>,
    /// `TAI_API_KEYS`: bearer keys (`key` for an admin, `key:merchant` bound to a merchant);
    /// none means open.
    pub api_keys: Vec<super::auth::ApiKey>,
    /// `LOG_FORMAT`: `pretty` or `json` (default by profile).
    pub log_format: LogFormat,
    /// `REQUEST_TIMEOUT_MS` (default 30 s).
    pub request_timeout: Duration,
    /// `BODY_LIMIT_BYTES` (default 64 KiB).
    pub body_limit: usize,
    /// `SHUTDOWN_GRACE_MS`: how long shutdown waits for queues to drain (default 10 s).
    pub shutdown_grace: Duration,
    sources: Sources,
}

impl RuntimeConfig {
    /// Reads the configuration of `service` from the process environment and `TAI_CONFIG`.
    pub fn from_env(service: &str, default_listen: &str) -> Result<Self, ConfigError> {
        Self::from_sources(service, default_listen, Sources::from_process()?)
    }

    /// Reads the configuration from explicit sources.
    pub fn from_sources(
        service: &str,
        default_listen: &str,
        sources: Sources,
    ) -> Result<Self, ConfigError> {
        let profile: Profile = sources
            .get("TAI_PROFILE")
            .map(|p| p.parse())
            .transpose()?
            .unwrap_or(Profile::Dev);
        let listen = sources
            .get("LISTEN_ADDR")
            .unwrap_or_else(|| default_listen.to_owned());
        let listen_addr = listen.parse().map_err(|_| ConfigError::Invalid {
            name: "LISTEN_ADDR".into(),
            value: listen.clone(),
            expected: "host:port, e.g. 127.0.0.1:3001".into(),
        })?;
        let api_keys = sources
            .get("TAI_API_KEYS")
            .map(|keys| super::auth::parse_api_keys(&keys))
            .unwrap_or_default();
        let log_format = match sources.get("LOG_FORMAT").as_deref() {
            Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "LOG_FORMAT".into(),
                    value: other.into(),
                    expected: "pretty or json".into(),
                });
            }
            None if profile == Profile::Prod => LogFormat::Json,
            None => LogFormat::Pretty,
        };
        let data_dir = std::path::PathBuf::from(
            sources
                .get("TAI_DATA_DIR")
                .unwrap_or_else(|| "./data".to_owned()),
        );
        let database_url = sources.get("DATABASE_URL").unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                data_dir.join(format!("{service}.db")).display()
            )
        });
        let single_node = match sources.get("TAI_SINGLE_NODE").as_deref() {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "TAI_SINGLE_NODE".into(),
                    value: other.into(),
                    expected: "true or false".into(),
                });
            }
        };
        let config = Self {
            service: service.to_owned(),
            listen_addr,
            profile,
            database_url: Secret::new(database_url),
            data_dir,
            single_node,
            redis_url: sources.get("REDIS_URL").map(Secret::new),
            nats_url: sources.get("NATS_URL"),
            amqp_url: sources.get("AMQP_URL").map(Secret::new),
            vault_addr: sources.get("VAULT_ADDR"),
            vault_token: sources.get("VAULT_TOKEN").map(Secret::new),
            otlp_endpoint: sources.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            api_keys,
            log_format,
            request_timeout: Duration::from_millis(parse_or(
                &sources,
                "REQUEST_TIMEOUT_MS",
                30_000,
            )?),
            body_limit: parse_or(&sources, "BODY_LIMIT_BYTES", 64 * 1024)?,
            shutdown_grace: Duration::from_millis(parse_or(&sources, "SHUTDOWN_GRACE_MS", 10_000)?),
            sources,
        };
        if config.profile == Profile::Prod
            && config.api_keys.is_empty()
            && config.vault_addr.is_none()
        {
            return Err(ConfigError::Refused(
                "the prod profile refuses to start without API keys: set TAI_API_KEYS or VAULT_ADDR"
                    .into(),
            ));
        }
        if config.profile == Profile::Prod
            && config.sources.get("TAI_TEST_HOOKS").as_deref() == Some("true")
        {
            return Err(ConfigError::Refused(
                "the prod profile refuses TAI_TEST_HOOKS=true: unset it".into(),
            ));
        }
        if config.profile == Profile::Prod {
            let db = config.database_url.expose();
            if db == "memory" || db == "sqlite::memory:" {
                return Err(ConfigError::Refused(
                    "the prod profile refuses the memory store: set DATABASE_URL to postgres://... \
                     (or sqlite://PATH with TAI_SINGLE_NODE=true)"
                        .into(),
                ));
            }
            if db.starts_with("sqlite:") && !config.single_node {
                return Err(ConfigError::Refused(
                    "the prod profile refuses SQLite unless TAI_SINGLE_NODE=true (one replica): \
                     set DATABASE_URL to postgres://... for several replicas"
                        .into(),
                ));
            }
        }
        Ok(config)
    }

    /// A service setting by its environment name, with the same precedence as the runtime's own.
    pub fn setting(&self, name: &str) -> Option<String> {
        self.sources.get(name)
    }

    /// The setting `name` as text, or `default` when it is not set.
    pub fn text_or(&self, name: &str, default: &str) -> String {
        self.setting(name).unwrap_or_else(|| default.to_owned())
    }

    /// The comma-separated setting `name` as a list (each item trimmed, empty ones dropped), or
    /// `None` when it is not set.
    pub fn list(&self, name: &str) -> Option<Vec<String>> {
        self.setting(name).map(|text| {
            text.split(',')
                .map(|item| item.trim().to_owned())
                .filter(|item| !item.is_empty())
                .collect()
        })
    }

    /// The text of the file the setting `name` names, or `builtin` when it names none; a file
    /// that cannot be read is a [`ConfigError::File`] naming it.
    pub fn file_or(&self, name: &str, builtin: &str) -> Result<String, ConfigError> {
        match self.setting(name) {
            Some(path) => std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
                message: format!("{name}: {e}"),
                path,
            }),
            None => Ok(builtin.to_owned()),
        }
    }

    /// Refuses, in the `prod` profile, a part that only the embedded default provides: `what`
    /// names it, `fix` says which setting to change.
    pub fn refuse_in_prod(&self, embedded: bool, what: &str, fix: &str) -> Result<(), ConfigError> {
        if self.profile == Profile::Prod && embedded {
            return Err(ConfigError::Refused(format!(
                "the prod profile refuses {what}: {fix}"
            )));
        }
        Ok(())
    }

    /// A service setting parsed as `T`, or `default` when unset.
    pub fn setting_or<T: FromStr>(&self, name: &str, default: T) -> Result<T, ConfigError> {
        parse_or(&self.sources, name, default)
    }

    /// The effective configuration as `name=value` pairs, secrets masked.
    pub fn describe(&self) -> Vec<(String, String)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        vec![
            ("service".into(), self.service.clone()),
            ("LISTEN_ADDR".into(), self.listen_addr.to_string()),
            ("TAI_PROFILE".into(), self.profile.as_str().into()),
            ("DATABASE_URL".into(), mask_url(self.database_url.expose())),
            ("TAI_DATA_DIR".into(), self.data_dir.display().to_string()),
            ("TAI_SINGLE_NODE".into(), self.single_node.to_string()),
            (
                "REDIS_URL".into(),
                self.redis_url
                    .as_ref()
                    .map(|u| mask_url(u.expose()))
                    .unwrap_or_else(|| "- (memory)".into()),
            ),
            (
                "NATS_URL".into(),
                self.nats_url
                    .as_deref()
                    .map(mask_url)
                    .unwrap_or_else(|| "- (in-process)".into()),
            ),
            (
                "AMQP_URL".into(),
                self.amqp_url
                    .as_ref()
                    .map(|u| mask_url(u.expose()))
                    .unwrap_or_else(|| "-".into()),
            ),
            ("VAULT_ADDR".into(), opt(&self.vault_addr)),
            (
                "VAULT_TOKEN".into(),
                if self.vault_token.is_some() {
                    "****"
                } else {
                    "-"
                }
                .into(),
            ),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                opt(&self.otlp_endpoint),
            ),
            (
                "TAI_API_KEYS".into(),
                format!(
                    "{} key(s) ({} bound to a merchant), masked",
                    self.api_keys.len(),
                    self.api_keys
                        .iter()
                        .filter(|k| k.merchant.is_some())
                        .count()
                ),
            ),
            (
                "LOG_FORMAT".into(),
                format!("{:?}", self.log_format).to_lowercase(),
            ),
            (
                "REQUEST_TIMEOUT_MS".into(),
                self.request_timeout.as_millis().to_string(),
            ),
            ("BODY_LIMIT_BYTES".into(), self.body_limit.to_string()),
            (
                "SHUTDOWN_GRACE_MS".into(),
                self.shutdown_grace.as_millis().to_string(),
            ),
        ]
    }
}

fn parse_or<T: FromStr>(sources: &Sources, name: &str, default: T) -> Result<T, ConfigError> {
    match sources.get(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ConfigError::Invalid {
            name: name.into(),
            value: v,
            expected: format!("a {}", std::any::type_name::<T>()),
        }),
    }
}

/// Hides the password of a `scheme://user:password@host` URL.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:****@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let sources = Sources::from_parts(
            &[("LISTEN_ADDR", "127.0.0.1:4000"), ("TAI_API_KEYS", "k1, k2")],
            "listen_addr = \"127.0.0.1:5000\"\nredis_url = \"redis://u:pw@localhost:6379/2\"\ngateway_timeout_ms = 250\n",
        )
        .expect("sources");
        let c = RuntimeConfig::from_sources("svc", "127.0.0.1:3001", sources).expect("config");
        assert_eq!(c.listen_addr.port(), 4000);
        assert_eq!(c.api_keys.len(), 2);
        assert_eq!(
            c.setting_or("GATEWAY_TIMEOUT_MS", 5000u64).expect("parse"),
            250
        );
        assert_eq!(c.profile, Profile::Dev);
        let described = format!("{:?}", c.describe());
        assert!(described.contains("redis://u:****@localhost:6379/2"));
        assert!(!described.contains("pw@"));
        assert!(!described.contains("k1"));
        let sources = Sources::from_parts(&[("REGIONS", " us-east, ,eu-west ")], "").expect("src");
        let c = RuntimeConfig::from_sources("svc", "127.0.0.1:3001", sources).expect("config");
        assert_eq!(
            c.list("REGIONS"),
            Some(vec!["us-east".to_owned(), "eu-west".to_owned()])
        );
        assert_eq!(c.list("UNSET"), None);
        assert_eq!(c.text_or("UNSET", "fallback"), "fallback");
        assert_eq!(c.text_or("REGIONS", "fallback"), " us-east, ,eu-west ");
    }

    #[test]
    fn prod_refuses_to_start_without_keys_and_bad_values_are_named() {
        let sources = Sources::from_parts(&[("TAI_PROFILE", "prod")], "").expect("sources");
        let err =
            RuntimeConfig::from_sources("svc", "127.0.0.1:3001", sources).expect_err("refused");
        assert!(err.to_string().contains("API keys"));
        let sources = Sources::from_parts(&[("LISTEN_ADDR", "nope")], "").expect("sources");
        let err = RuntimeConfig::from_sources("svc", "127.0.0.1:3001", sources).expect_err("bad");
        assert!(err.to_string().contains("LISTEN_ADDR=\"nope\""));
    }
}
