//! The black-box harness: start the built binaries on free ports, talk to them over HTTP, and
//! reach the real backends `scripts/test-env.sh` started (Redis, NATS JetStream, Prometheus).
//!
//! Every process a test starts is killed when its [`Proc`] is dropped, pass or fail. Binaries are
//! taken from the workspace's target directory, so `cargo build --workspace --bins` must run
//! first (`make test` does).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The target directory's profile folder (`target/debug`), found from this test binary's path.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TAI_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/blackbox-<hash> -> target/debug
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A backend `scripts/test-env.sh` started; the tests need it, so its absence is an error.
pub fn backend(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through `make test`, which starts Redis, NATS and Prometheus")
    })
}

/// A unique name for this test run and counter, for key prefixes, streams and labels.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A running service binary.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    /// Its log file (stdout and stderr).
    pub log_path: PathBuf,
    /// Its `TAI_DATA_DIR` (its embedded database), kept across restarts.
    pub data_dir: PathBuf,
    envs: Vec<(String, String)>,
}

/// Log files of this run live here; the card-number check reads them all.
pub fn log_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tai-blackbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

impl Proc {
    /// Starts binary `name` on a free port with `envs` (and nothing else from the environment
    /// but PATH and HOME), and waits until `/health` answers.
    pub async fn start(name: &str, envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = free_port();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut p = Self {
            name: name.to_owned(),
            child: None,
            port,
            log_path: log_dir().join(format!("{}.log", unique(name))),
            data_dir: log_dir().join(unique("data")),
            envs,
        };
        p.spawn()?;
        p.wait_healthy(Duration::from_secs(30)).await?;
        Ok(p)
    }

    /// Starts binary `name` and returns at once, without waiting for health (for start-up refusals).
    pub fn spawn_only(name: &str, envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut p = Self {
            name: name.to_owned(),
            child: None,
            port: free_port(),
            log_path: log_dir().join(format!("{}.log", unique(name))),
            data_dir: log_dir().join(unique("data")),
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = bin_dir().join(&self.name);
        if !bin.exists() {
            bail!(
                "{} not built: run `cargo build --workspace --bins` first (make test does)",
                bin.display()
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("log file")?;
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("LISTEN_ADDR", format!("127.0.0.1:{}", self.port))
            // each process its own embedded database, unless the test shares one
            .env("TAI_DATA_DIR", &self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
        );
        Ok(())
    }

    /// Starts the same binary again on the same port with the same settings.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(30)).await
    }

    async fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let client = client();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "{} exited with {status} before serving:\n{}",
                    self.name,
                    self.log()
                );
            }
            if let Ok(r) = client.get(self.url("/health")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not serve /health within {within:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Waits for the process to exit; its exit code, or `None` on timeout (or a signal).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Scrape targets registered with the test Prometheus through file service discovery; the
/// registration is removed when this is dropped.
#[derive(Debug)]
pub struct ScrapeTargets {
    path: PathBuf,
}

impl ScrapeTargets {
    /// Registers `targets` (file_sd JSON: `[{"targets": [...], "labels": {...}}]`) as `name`.
    pub fn register(name: &str, targets: &serde_json::Value) -> Self {
        let dir = PathBuf::from(backend("TAI_TEST_PROMETHEUS_TARGETS"));
        let tmp = dir.join(format!(".{name}.tmp"));
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&tmp, targets.to_string()).expect("write scrape targets");
        // rename, so Prometheus never reads a half-written file
        std::fs::rename(&tmp, &path).expect("publish scrape targets");
        Self { path }
    }
}

impl Drop for ScrapeTargets {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An HTTP client with a timeout, so a hung server fails a test instead of hanging it.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// GETs `url` and reads the body as JSON, failing the test if either step fails.
pub async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> serde_json::Value {
    http.get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("a JSON body")
}

/// The Prometheus text of `svc`'s `/metrics`, failing the test if it cannot be read.
pub async fn metrics_text(http: &reqwest::Client, svc: &Proc) -> String {
    http.get(svc.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics text")
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh, empty PostgreSQL database on the server `scripts/test-env.sh` started; its URL.
pub fn postgres_database() -> String {
    let admin = backend("TAI_TEST_DATABASE_URL");
    let name = unique("tai").replace('-', "_");
    psql(&admin, &format!("CREATE DATABASE {name}"));
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b)
        .expect("TAI_TEST_DATABASE_URL ends with /DBNAME");
    format!("{base}/{name}")
}

/// Runs one SQL statement with `psql` against `url`; its output (unaligned, tuples only).
pub fn psql(url: &str, sql: &str) -> String {
    let bin = std::env::var("TAI_TEST_PSQL").unwrap_or_else(|_| "psql".into());
    let out = Command::new(&bin)
        .args([url, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A NATS server (with JetStream) of the test's own, so the test can stop and restart it;
/// stopped when dropped.
#[derive(Debug)]
pub struct OwnNats {
    child: Option<Child>,
    /// Its client port.
    pub port: u16,
    store: PathBuf,
}

impl OwnNats {
    /// Starts one on a free port and waits until it takes connections.
    pub async fn start() -> Self {
        let mut n = Self {
            child: None,
            port: free_port(),
            store: log_dir().join(unique("nats-store")),
        };
        n.restart().await;
        n
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again), on the same port and store, and waits until it takes connections.
    pub async fn restart(&mut self) {
        self.stop();
        let bin = backend("TAI_TEST_NATS_BIN");
        self.child = Some(
            Command::new(bin)
                .args([
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-sd",
                ])
                .arg(&self.store)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server"),
        );
        let url = self.url();
        eventually(Duration::from_secs(10), "nats to take connections", || {
            let url = url.clone();
            async move { async_nats_ready(&url).await.then_some(()) }
        })
        .await;
    }

    /// Kills it (SIGKILL), as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn async_nats_ready(url: &str) -> bool {
    let addr = url.trim_start_matches("nats://").to_owned();
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

/// A PostgreSQL server of the test's own (so the test can stop and restart it), on a free port;
/// stopped and removed when dropped. As root, it runs as the `postgres` user.
#[derive(Debug)]
pub struct OwnPostgres {
    dir: PathBuf,
    bin: PathBuf,
    /// Its port.
    pub port: u16,
    child: Option<Child>,
}

fn as_postgres(program: &std::path::Path) -> Command {
    // SAFETY-free check for root: the effective user id of this process
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl OwnPostgres {
    /// Makes a fresh cluster and starts it.
    pub async fn start() -> Self {
        let bin = PathBuf::from(backend("TAI_TEST_PG_BIN"));
        let dir = std::env::temp_dir().join(unique("tai-own-pg"));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let _ = Command::new("chown").arg("postgres").arg(&dir).status();
        let init = as_postgres(&bin.join("initdb"))
            .args(["-U", "tai", "--auth=trust", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb");
        assert!(init.success(), "initdb failed");
        let mut pg = Self {
            dir,
            bin,
            port: free_port(),
            child: None,
        };
        pg.restart().await;
        pg
    }

    /// `postgres://tai@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://tai@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts it (again) and waits until it takes connections.
    pub async fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(log_dir().join(unique("own-pg.log"))).expect("pg log");
        self.child = Some(
            as_postgres(&self.bin.join("postgres"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-p", &self.port.to_string(), "-k"])
                .arg(&self.dir)
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("postgres"),
        );
        let (ready, port) = (self.bin.join("pg_isready"), self.port.to_string());
        eventually(
            Duration::from_secs(20),
            "postgres to take connections",
            || {
                let (ready, port) = (ready.clone(), port.clone());
                async move {
                    Command::new(&ready)
                        .args(["-q", "-h", "127.0.0.1", "-p", &port])
                        .status()
                        .ok()
                        .filter(|s| s.success())
                        .map(|_| ())
                }
            },
        )
        .await;
    }

    /// Stops it at once (SIGINT to the postmaster: fast shutdown, clients cut off), as an
    /// outage would, and waits (boundedly) until it is gone.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid_file = self.dir.join("data/postmaster.pid");
        let postmaster = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned));
        if let Some(pid) = postmaster {
            let _ = Command::new("kill").args(["-INT", &pid]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if c.try_wait().ok().flatten().is_some() && !pid_file.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis of the test's own, so the test can kill and restart it; killed when dropped.
#[derive(Debug)]
pub struct OwnRedis {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Where `SAVE` writes `dump.rdb` (uncompressed, so a test can read what Redis holds).
    pub dir: PathBuf,
}

impl OwnRedis {
    /// Starts one on `port` and waits until it answers.
    pub async fn start(port: u16) -> Self {
        let dir = log_dir().join(unique("own-redis"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r = Self {
            child: None,
            port,
            dir,
        };
        r.restart().await;
        r
    }

    /// Everything it holds, as written by `SAVE` (an uncompressed RDB file).
    pub fn dump(&self) -> Vec<u8> {
        let ok = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "SAVE"])
            .output()
            .expect("redis-cli");
        assert!(ok.status.success(), "SAVE failed");
        std::fs::read(self.dir.join("dump.rdb")).expect("dump.rdb")
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and waits until it takes connections.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = Some(
            Command::new("redis-server")
                .args([
                    "--port",
                    &self.port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--rdbcompression",
                    "no",
                    "--dir",
                ])
                .arg(&self.dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server (make test installs it)"),
        );
        let addr = format!("127.0.0.1:{}", self.port);
        eventually(Duration::from_secs(10), "redis to take connections", || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
        })
        .await;
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
