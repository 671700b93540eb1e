//! The `proc` platform's file (`PLATFORM_FILE`, TOML): where its state lives, the HAProxy
//! binary, the regions with the address their traffic enters at, and the services with the
//! commands that run each version.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcConfig {
    /// Pid files, HAProxy configs and sockets, instance logs.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The HAProxy binary (from PATH by default).
    #[serde(default = "default_haproxy")]
    pub haproxy: String,
    /// Regions by name.
    pub regions: BTreeMap<String, RegionConfig>,
    /// Services by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// The file's folder: commands run there, and a relative `state_dir` is taken from there.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// One region: one HAProxy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Where the region's traffic enters (the HAProxy frontend).
    pub listen: SocketAddr,
    /// Where HAProxy's Prometheus exporter answers `/metrics` (a free loopback port by default).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// The most processes of all services and versions the region may run.
    #[serde(default)]
    pub max_instances: Option<u32>,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The version running before any deployment.
    pub stable: String,
    /// Processes per version per region.
    #[serde(default = "one")]
    pub instances: u32,
    /// An instance takes traffic only once this answers 2xx.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// How long a version keeps running after it takes no traffic.
    #[serde(default = "default_scale_down")]
    pub scale_down_delay_secs: f64,
    /// The versions that can run, by name.
    pub versions: BTreeMap<String, VersionConfig>,
}

/// How one version runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionConfig {
    /// The program and its arguments; `{port}`, `{region}`, `{service}` and `{version}` are
    /// filled in.
    pub command: Vec<String>,
    /// Environment added to the process (the same placeholders are filled in).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A filled-in command: the program and arguments, and the environment added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment added.
    pub env: Vec<(String, String)>,
}

fn default_haproxy() -> String {
    "haproxy".into()
}
fn one() -> u32 {
    1
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_scale_down() -> f64 {
    30.0
}

/// Files the platform keeps beside regions, services and versions in its state folder.
const RESERVED: [&str; 9] = [
    "haproxy.cfg",
    "haproxy.pid",
    "haproxy.log",
    "admin.sock",
    "router.json",
    "platform.lock",
    "lane.json",
    "lane.tmp",
    "router.tmp",
];

/// A name HAProxy and file paths both take.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && !RESERVED.contains(&name)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ProcConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        Self::parse(&text, &base).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks `text`, with `base` as the file's folder.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let mut cfg: ProcConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.base_dir = base.to_path_buf();
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if self.regions.is_empty() {
            return Err("no [regions.<name>]".into());
        }
        if self.services.is_empty() {
            return Err("no [services.<name>]".into());
        }
        let mut addrs = BTreeMap::new();
        for (name, r) in &self.regions {
            if !valid_name(name) {
                return Err(format!(
                    "region name {name:?}: letters, digits, '-', '_' and '.' only"
                ));
            }
            for addr in std::iter::once(r.listen).chain(r.metrics) {
                if let Some(other) = addrs.insert(addr, name.clone()) {
                    return Err(format!("{addr} is used twice (regions {other} and {name})"));
                }
            }
        }
        for (name, s) in &self.services {
            if !valid_name(name) {
                return Err(format!(
                    "service name {name:?}: letters, digits, '-', '_' and '.' only"
                ));
            }
            if !(1..=32).contains(&s.instances) {
                return Err(format!("services.{name}.instances: 1 to 32"));
            }
            // it goes into HAProxy's config as is: no spaces, quotes, '#' or backslashes
            let path_ok = s.health_path.starts_with('/')
                && s.health_path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/-._~%?=&+:@!$,;*()".contains(c));
            if !path_ok {
                return Err(format!(
                    "services.{name}.health_path: a path such as /health"
                ));
            }
            if !(s.scale_down_delay_secs.is_finite() && s.scale_down_delay_secs >= 0.0) {
                return Err(format!(
                    "services.{name}.scale_down_delay_secs: 0 or more seconds"
                ));
            }
            if !s.versions.contains_key(&s.stable) {
                return Err(format!(
                    "services.{name}.stable = {:?} is not under [services.{name}.versions]",
                    s.stable
                ));
            }
            for (v, vc) in &s.versions {
                if !valid_name(v) {
                    return Err(format!(
                        "services.{name}.versions.{v:?}: letters, digits, '-', '_' and '.' only"
                    ));
                }
                if vc.command.first().is_none_or(|c| c.trim().is_empty()) {
                    return Err(format!("services.{name}.versions.{v}.command is empty"));
                }
            }
        }
        Ok(())
    }

    /// The state folder: as given (relative to the file's folder), or one under the system's
    /// temp dir.
    pub fn state_dir(&self) -> PathBuf {
        match &self.state_dir {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.base_dir.join(p),
            None => std::env::temp_dir().join("tai-platform"),
        }
    }

    /// The command and environment of `version` of `service` in `region` on `port`, filled in;
    /// `None` if the file does not list the version.
    pub fn command(&self, region: &str, service: &str, version: &str, port: u16) -> Option<Launch> {
        let vc = self.services.get(service)?.versions.get(version)?;
        let fill = |s: &str| {
            s.replace("{port}", &port.to_string())
                .replace("{region}", region)
                .replace("{service}", service)
                .replace("{version}", version)
        };
        let mut argv: Vec<String> = vc.command.iter().map(|a| fill(a)).collect();
        // a relative program path is taken from the file's folder, not the service's
        if let Some(first) = argv.first_mut()
            && first.contains('/')
            && !Path::new(first.as_str()).is_absolute()
        {
            *first = self.base_dir.join(first.as_str()).display().to_string();
        }
        let env = vc.env.iter().map(|(k, v)| (k.clone(), fill(v))).collect();
        Some(Launch { argv, env })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
state_dir = "state"
[regions.us-west-2]
listen = "127.0.0.1:18080"
max_instances = 6
[services.api-service]
stable = "v1.0.0"
instances = 2
[services.api-service.versions."v1.0.0"]
command = ["./app", "--port", "{port}", "--region", "{region}"]
env = { VERSION = "{version}" }
"#;

    #[test]
    fn the_file_parses_with_defaults_and_fills_commands_in() {
        let cfg = ProcConfig::parse(FILE, Path::new("/srv/demo")).expect("valid");
        assert_eq!(cfg.state_dir(), PathBuf::from("/srv/demo/state"));
        let s = &cfg.services["api-service"];
        assert_eq!(
            (s.health_path.as_str(), s.scale_down_delay_secs),
            ("/health", 30.0)
        );
        let Launch { argv, env } = cfg
            .command("us-west-2", "api-service", "v1.0.0", 4100)
            .expect("listed");
        assert_eq!(
            argv,
            vec!["/srv/demo/./app", "--port", "4100", "--region", "us-west-2"]
        );
        assert_eq!(env, vec![("VERSION".to_owned(), "v1.0.0".to_owned())]);
        assert!(cfg.command("us-west-2", "api-service", "v9", 1).is_none());
    }

    #[test]
    fn mistakes_are_named() {
        let bad_stable = FILE.replace("stable = \"v1.0.0\"", "stable = \"v2\"");
        let e = ProcConfig::parse(&bad_stable, Path::new("/")).expect_err("stable not listed");
        assert!(e.contains("services.api-service.stable"), "{e}");
        let unknown = format!("{FILE}\nbogus = 1\n");
        assert!(ProcConfig::parse(&unknown, Path::new("/")).is_err());
        let bad_name = FILE.replace("[regions.us-west-2]", "[regions.\"us west\"]");
        let e = ProcConfig::parse(&bad_name, Path::new("/")).expect_err("space");
        assert!(e.contains("region name"), "{e}");
        let clash = FILE.replace("[regions.us-west-2]", "[regions.\"haproxy.cfg\"]");
        assert!(
            ProcConfig::parse(&clash, Path::new("/")).is_err(),
            "a file's name"
        );
        let comment = FILE.replace("instances = 2", "instances = 2\nhealth_path = \"/h#x\"");
        let e = ProcConfig::parse(&comment, Path::new("/")).expect_err("#");
        assert!(e.contains("health_path"), "{e}");
    }
}
