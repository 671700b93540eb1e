//! The command line of every TAI binary: `--help`, `--version`, and each setting as a flag and
//! an environment variable (clap with `env`).
//!
//! A binary declares its settings once, as [`Setting`] tables (tai-core's own are
//! [`CORE_SETTINGS`]); `--help` lists them with their defaults, docs/CONFIGURATION.md is checked
//! against that list, and a value given as a flag (`--gateway-timeout-ms 250`) wins over the
//! environment (`GATEWAY_TIMEOUT_MS=250`), which wins over the `TAI_CONFIG` file.

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, Command};

/// One setting: its environment name, its default as `--help` shows it, and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The environment variable (`GATEWAY_TIMEOUT_MS`); the flag is its lower-case, dashed form.
    pub name: &'static str,
    /// The default as shown to people; empty when unset means "off" or "none".
    pub default: &'static str,
    /// One line on what it does.
    pub help: &'static str,
}

impl Setting {
    /// A setting with a default.
    pub const fn new(name: &'static str, default: &'static str, help: &'static str) -> Self {
        Self {
            name,
            default,
            help,
        }
    }

    /// The flag for it: `GATEWAY_TIMEOUT_MS` -> `gateway-timeout-ms`.
    pub fn flag(&self) -> String {
        self.name.to_ascii_lowercase().replace('_', "-")
    }
}

/// The settings every service built on the runtime reads.
pub const CORE_SETTINGS: &[Setting] = &[
    Setting::new("LISTEN_ADDR", "", "Address to listen on, host:port"),
    Setting::new(
        "TAI_PROFILE",
        "dev",
        "dev, staging or prod; prod refuses embedded parts and open APIs",
    ),
    Setting::new(
        "TAI_CONFIG",
        "",
        "A TOML file with the same settings in lower case; the environment wins",
    ),
    Setting::new(
        "TAI_DATA_DIR",
        "./data",
        "Where the embedded SQLite database lives",
    ),
    Setting::new(
        "TAI_SINGLE_NODE",
        "false",
        "The operator's word that one replica runs (SQLite in prod)",
    ),
    Setting::new(
        "DATABASE_URL",
        "sqlite://TAI_DATA_DIR/<service>.db",
        "System of record: sqlite://PATH, postgres://USER@HOST/DB or memory",
    ),
    Setting::new(
        "DATABASE_MAX_CONNECTIONS",
        "10",
        "PostgreSQL pool size (SQLite: one writer, two readers)",
    ),
    Setting::new(
        "REDIS_URL",
        "",
        "Redis for hot shared state (rate limits, windows, leases); in process when unset",
    ),
    Setting::new(
        "REDIS_KEY_PREFIX",
        "tai:<service>:",
        "Prefix of every Redis key this service writes",
    ),
    Setting::new(
        "NATS_URL",
        "",
        "NATS JetStream for queues and event streams; in process when unset",
    ),
    Setting::new(
        "AMQP_URL",
        "",
        "RabbitMQ for Kanban queues; with NATS_URL too, the fallback while NATS is unreachable",
    ),
    Setting::new(
        "OUTBOX_POLL_MS",
        "100",
        "How often the outbox relay looks for events to publish",
    ),
    Setting::new(
        "TAI_API_KEYS",
        "",
        "Bearer keys, comma-separated: KEY (admin), KEY:MERCHANT, either with :read for GET/HEAD only (KEY::read, KEY:MERCHANT:read); none means open",
    ),
    Setting::new(
        "VAULT_ADDR",
        "",
        "Vault address: the API keys come from Vault when set",
    ),
    Setting::new("VAULT_TOKEN", "", "Vault token (a secret: never logged)"),
    Setting::new("VAULT_MOUNT", "secret", "Vault KV v2 mount"),
    Setting::new(
        "VAULT_PATH",
        "tai/<service>",
        "Vault secret path holding the field api_keys",
    ),
    Setting::new(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "OTLP endpoint for traces (e.g. http://127.0.0.1:4318); none when unset",
    ),
    Setting::new("LOG_FORMAT", "pretty (json in prod)", "pretty or json"),
    Setting::new("RUST_LOG", "info", "Log filter (tracing EnvFilter syntax)"),
    Setting::new(
        "REQUEST_TIMEOUT_MS",
        "30000",
        "A request still running after this long is answered 503",
    ),
    Setting::new(
        "BODY_LIMIT_BYTES",
        "65536",
        "Largest request body accepted (larger: 413)",
    ),
    Setting::new(
        "TAI_TEST_HOOKS",
        "false",
        "Tests only, refused in prod: POST /debug/workers/NAME/panic makes a worker panic, POST /debug/panic a handler",
    ),
    Setting::new(
        "SHUTDOWN_GRACE_MS",
        "10000",
        "How long shutdown waits for queues and requests to drain",
    ),
];

/// The command line of a binary with `settings` (each table in turn).
pub fn command(
    bin: &'static str,
    version: &'static str,
    about: &'static str,
    default_listen: &'static str,
    settings: &[&'static [Setting]],
) -> Command {
    let mut cmd = Command::new(bin).version(version).about(about).after_help(
        "Every setting is a flag and an environment variable; a flag wins over the \
             environment, which wins over the TAI_CONFIG file. Reference: docs/CONFIGURATION.md.",
    );
    for s in settings.iter().flat_map(|t| t.iter()) {
        let mut arg = Arg::new(s.name)
            .long(s.flag())
            .env(s.name)
            .hide_env_values(true)
            .value_name("VALUE")
            .action(ArgAction::Set)
            .help(s.help);
        if s.name == "LISTEN_ADDR" && !default_listen.is_empty() {
            arg = arg.default_value(default_listen);
        } else if !s.default.is_empty() {
            arg = arg.default_value(s.default);
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// Parses the process's arguments: prints help or the version and exits when asked, exits with
/// a usage error on an unknown flag, and returns the settings given as flags (name, value), to
/// be placed above the environment.
pub fn parse(
    bin: &'static str,
    version: &'static str,
    about: &'static str,
    default_listen: &'static str,
    settings: &[&'static [Setting]],
) -> Vec<(String, String)> {
    given(
        command(bin, version, about, default_listen, settings).get_matches(),
        settings,
    )
}

fn given(matches: clap::ArgMatches, settings: &[&'static [Setting]]) -> Vec<(String, String)> {
    settings
        .iter()
        .flat_map(|t| t.iter())
        .filter(|s| matches.value_source(s.name) == Some(ValueSource::CommandLine))
        .filter_map(|s| {
            matches
                .get_one::<String>(s.name)
                .map(|v| (s.name.to_owned(), v.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &[Setting] = &[Setting::new(
        "GATEWAY_TIMEOUT_MS",
        "5000",
        "gateway timeout",
    )];

    #[test]
    fn a_flag_is_returned_and_a_default_is_not() {
        let cmd = command("x", "1.0", "about", "127.0.0.1:1", &[CORE_SETTINGS, OWN]);
        let m = cmd
            .try_get_matches_from(["x", "--gateway-timeout-ms", "250", "--tai-profile=staging"])
            .expect("parses");
        let mut got = given(m, &[CORE_SETTINGS, OWN]);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("GATEWAY_TIMEOUT_MS".to_owned(), "250".to_owned()),
                ("TAI_PROFILE".to_owned(), "staging".to_owned()),
            ]
        );
    }

    #[test]
    fn an_unknown_flag_is_a_usage_error_and_help_names_every_setting() {
        let cmd = command("x", "1.0", "about", "127.0.0.1:1", &[CORE_SETTINGS, OWN]);
        assert!(cmd.clone().try_get_matches_from(["x", "--nope"]).is_err());
        let help = cmd.clone().render_long_help().to_string();
        for s in CORE_SETTINGS.iter().chain(OWN) {
            assert!(help.contains(&format!("--{}", s.flag())), "{}", s.name);
            assert!(help.contains(&format!("env: {}", s.name)), "{}", s.name);
        }
        let names: std::collections::BTreeSet<_> = CORE_SETTINGS.iter().map(|s| s.name).collect();
        assert_eq!(
            names.len(),
            CORE_SETTINGS.len(),
            "a setting is declared twice"
        );
    }
}
