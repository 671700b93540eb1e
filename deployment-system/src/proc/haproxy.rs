//! One region's HAProxy: its configuration, started (or adopted) as a daemon the platform owns,
//! and its runtime API (the admin socket) for servers, weights and statistics. Servers are
//! added, weighted, drained and removed through the socket, never by a reload.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process;

/// A region's router.
#[derive(Debug, Clone)]
pub struct Router {
    region: String,
    binary: String,
    dir: PathBuf,
    /// Where traffic enters.
    pub listen: SocketAddr,
    /// Where the Prometheus exporter answers `/metrics`.
    pub metrics: SocketAddr,
}

/// One server as HAProxy reports it (`show servers state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    /// The server's name: `<version>-i<index>`.
    pub name: String,
    /// The port it forwards to.
    pub port: u16,
    /// Running (2) or down (0) per health checks.
    pub running: bool,
    /// No maintenance or drain flag.
    pub ready: bool,
    /// The weight set through the runtime API.
    pub weight: u32,
}

/// One server's counters (`show stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStat {
    /// Responses of any class.
    pub responses: u64,
    /// 5xx responses (the server's own and HAProxy's on its behalf). Connections that failed
    /// and were retried on another server are not counted: the client never saw them, and a
    /// crashed instance is restarted rather than held against its version.
    pub errors: u64,
    /// Average response time over the last 1024 requests, in ms.
    pub rtime_ms: f64,
}

/// Counters of every server, by (backend, server).
pub type Counters = BTreeMap<(String, String), ServerStat>;

/// The name of instance `idx` of `version`.
pub fn server_name(version: &str, idx: u32) -> String {
    format!("{version}-i{idx}")
}

/// The version and index a server name holds.
pub fn parse_server_name(name: &str) -> Option<(&str, u32)> {
    let (v, i) = name.rsplit_once("-i")?;
    Some((v, i.parse().ok()?))
}

const CLI_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    metrics: SocketAddr,
}

impl Router {
    /// The router of `region`, its files under `dir`; the exporter's address as configured,
    /// as saved by an earlier start, or a free loopback port.
    pub fn new(
        region: &str,
        binary: &str,
        dir: &Path,
        listen: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let saved_path = dir.join("router.json");
        let metrics = match metrics {
            Some(m) => m,
            None => match std::fs::read(&saved_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
            {
                Some(s) => s.metrics,
                None => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?,
            },
        };
        let saved = serde_json::to_vec(&Saved { metrics }).unwrap_or_default();
        process::write_atomic(&saved_path, &saved)?;
        Ok(Self {
            region: region.to_owned(),
            binary: binary.to_owned(),
            dir: dir.to_path_buf(),
            listen,
            metrics,
        })
    }

    fn cfg_path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }
    fn pid_path(&self) -> PathBuf {
        self.dir.join("haproxy.pid")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// The configuration for `services` (name, health path): one frontend at `listen` choosing
    /// the backend by Host header (the first service by default), one backend per service
    /// with no servers (they come through the runtime API), and the Prometheus exporter.
    pub fn config(&self, services: &[(String, String)]) -> String {
        let mut c = format!(
            "# written by the deployment service's proc platform for region {region}; \
             servers are set through the admin socket\n\
             global\n  pidfile {pid}\n  stats socket {sock} mode 600 level admin\n\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  \
             timeout http-request 10s\n  retries 3\n  option redispatch 1\n  \
             retry-on conn-failure empty-response response-timeout\n\n\
             frontend traffic\n  bind {listen}\n",
            region = self.region,
            pid = self.pid_path().display(),
            sock = self.socket().display(),
            listen = self.listen,
        );
        for (name, _) in services {
            c.push_str(&format!(
                "  use_backend {name} if {{ req.hdr(host),field(1,:) -m str {name} }}\n"
            ));
        }
        if let Some((first, _)) = services.first() {
            c.push_str(&format!("  default_backend {first}\n"));
        }
        c.push_str(&format!(
            "\nfrontend exporter\n  bind {}\n  http-request use-service prometheus-exporter if {{ path /metrics }}\n",
            self.metrics
        ));
        for (name, health) in services {
            c.push_str(&format!(
                "\nbackend {name}\n  balance roundrobin\n  option httpchk GET {health}\n  http-check expect status 200-299\n"
            ));
        }
        c
    }

    /// The pid of this region's HAProxy if it runs (one started with this folder's config).
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        process::start_ticks(pid)?;
        let cfg = self.cfg_path().display().to_string();
        process::cmdline(pid)
            .filter(|c| c.contains("haproxy") && c.contains(&cfg))
            .map(|_| pid)
    }

    /// Adopts the running HAProxy, or starts one (reloading it with `-sf` when its config
    /// changed); its pid.
    pub async fn ensure_running(&self, services: &[(String, String)]) -> Result<u32, String> {
        let text = self.config(services);
        let running = self.pid();
        let current = std::fs::read_to_string(self.cfg_path()).ok();
        if let Some(pid) = running
            && current.as_deref() == Some(text.as_str())
        {
            return Ok(pid);
        }
        process::write_atomic(&self.cfg_path(), text.as_bytes())
            .map_err(|e| format!("writing {}: {e}", self.cfg_path().display()))?;
        let log = self.dir.join("haproxy.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("-D")
            .arg("-f")
            .arg(self.cfg_path())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(old) = running {
            // a reload: the new process takes the listeners over and the old one finishes
            cmd.arg("-sf").arg(old.to_string());
        }
        let status = tokio::time::timeout(Duration::from_secs(10), cmd.status())
            .await
            .map_err(|_| format!("{} did not start within 10 s", self.binary))?
            .map_err(|e| format!("cannot run {}: {e}", self.binary))?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(format!(
                "{} exited with {status} for region {}: {}",
                self.binary,
                self.region,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        // the daemon writes its pid file and opens its socket just after the parent exits
        for _ in 0..100 {
            if let Some(pid) = self.pid()
                && running != Some(pid)
                && self.cli("show info").await.is_ok()
            {
                tracing::info!(region = %self.region, pid, listen = %self.listen, metrics = %self.metrics, "HAProxy started");
                return Ok(pid);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "HAProxy for region {} started but its admin socket does not answer",
            self.region
        ))
    }

    /// Runs `commands` (joined by `;`) on the admin socket; what HAProxy answered.
    pub async fn cli(&self, commands: &str) -> Result<String, String> {
        let talk = async {
            let mut s = tokio::net::UnixStream::connect(self.socket()).await?;
            s.write_all(format!("{commands}\n").as_bytes()).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        tokio::time::timeout(CLI_TIMEOUT, talk)
            .await
            .map_err(|_| format!("HAProxy of region {} did not answer in time", self.region))?
            .map_err(|e| format!("HAProxy of region {}: {e}", self.region))
    }

    /// The servers of `backend` as HAProxy reports them.
    pub async fn servers(&self, backend: &str) -> Result<Vec<ServerState>, String> {
        let out = self.cli(&format!("show servers state {backend}")).await?;
        parse_servers_state(&out)
    }

    /// Every server's counters, by (backend, server).
    pub async fn stats(&self) -> Result<Counters, String> {
        let out = self.cli("show stat").await?;
        Ok(parse_stat(&out))
    }

    /// Stops HAProxy: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration) {
        let Some(pid) = self.pid() else { return };
        let Some(ticks) = process::start_ticks(pid) else {
            return;
        };
        let rec = process::PidRecord {
            pid,
            port: 0,
            start_ticks: ticks,
        };
        process::signal(pid, libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while process::alive(&rec) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if process::alive(&rec) {
            process::signal(pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_file(self.pid_path());
        tracing::info!(region = %self.region, pid, "HAProxy stopped");
    }
}

/// Fields of `show servers state`, by the header's names.
fn parse_servers_state(out: &str) -> Result<Vec<ServerState>, String> {
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let _version = lines.next();
    let header: Vec<&str> = match lines.next() {
        Some(h) if h.starts_with('#') => h.trim_start_matches('#').split_whitespace().collect(),
        Some(other) => return Err(format!("HAProxy answered: {}", other.trim())),
        None => return Ok(Vec::new()),
    };
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(n), Some(op), Some(admin), Some(w), Some(port)) = (
        col("srv_name"),
        col("srv_op_state"),
        col("srv_admin_state"),
        col("srv_uweight"),
        col("srv_port"),
    ) else {
        return Err("HAProxy's server state lacks a column this platform reads".into());
    };
    Ok(lines
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(ServerState {
                name: f.get(n)?.to_string(),
                port: f.get(port)?.parse().ok()?,
                running: f.get(op)?.parse::<u32>().ok()? == 2,
                ready: f.get(admin)?.parse::<u32>().ok()? == 0,
                weight: f.get(w)?.parse().ok()?,
            })
        })
        .collect())
}

/// Server rows of `show stat` (CSV with a `# ` header).
fn parse_stat(out: &str) -> Counters {
    let mut lines = out.lines();
    let Some(header) = lines.next() else {
        return BTreeMap::new();
    };
    let header: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let classes: Vec<usize> = [
        "hrsp_1xx",
        "hrsp_2xx",
        "hrsp_3xx",
        "hrsp_4xx",
        "hrsp_5xx",
        "hrsp_other",
    ]
    .iter()
    .filter_map(|c| col(c))
    .collect();
    let (Some(px), Some(sv), Some(e5), Some(rt)) =
        (col("pxname"), col("svname"), col("hrsp_5xx"), col("rtime"))
    else {
        return BTreeMap::new();
    };
    let num = |f: &[&str], i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    lines
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let server = *f.get(sv)?;
            if server == "FRONTEND" || server == "BACKEND" {
                return None;
            }
            Some((
                (f.get(px)?.to_string(), server.to_owned()),
                ServerStat {
                    responses: classes.iter().map(|i| num(&f, *i)).sum(),
                    errors: num(&f, e5),
                    rtime_ms: num(&f, rt) as f64,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_carry_version_and_index() {
        assert_eq!(
            parse_server_name(&server_name("v1-i2", 0)),
            Some(("v1-i2", 0))
        );
        assert_eq!(parse_server_name("nonsense"), None);
    }

    #[test]
    fn haproxy_answers_are_read_by_column_name() {
        let state = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord\n4 svc 1 v1-i0 127.0.0.1 2 0 10 10 1 6 3 1 6 0 0 0 - 18600 -\n4 svc 2 v2-i0 127.0.0.1 0 1 5 5 1 6 3 1 6 0 0 0 - 18601 -\n\n";
        let s = parse_servers_state(state).expect("parsed");
        assert_eq!(
            s,
            vec![
                ServerState {
                    name: "v1-i0".into(),
                    port: 18600,
                    running: true,
                    ready: true,
                    weight: 10
                },
                ServerState {
                    name: "v2-i0".into(),
                    port: 18601,
                    running: false,
                    ready: false,
                    weight: 5
                },
            ]
        );
        assert!(parse_servers_state("1\nNo such backend.\n").is_err());
        let stat = "# pxname,svname,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,rtime,\nfe,FRONTEND,0,9,0,0,1,0,,\nsvc,v1-i0,0,90,0,2,8,0,12,\n";
        let m = parse_stat(stat);
        assert_eq!(m.len(), 1);
        assert_eq!(
            m[&("svc".to_owned(), "v1-i0".to_owned())],
            ServerStat {
                responses: 100,
                errors: 8,
                rtime_ms: 12.0
            }
        );
    }
}
