//! `TestGateway`: a real gateway on ephemeral ports with a temporary data
//! directory, started in-process (`Gateway::start`) or as a child process
//! (`gateway-under-test --config FILE`) for tests that kill it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use edge_config::Config;
use edge_gateway::Gateway;
use tokio::process::{Child, Command};

/// How long a child gateway gets to answer `/healthz`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the configuration of a test gateway.
#[derive(Debug)]
pub struct TestGatewayBuilder {
    id: String,
    /// `(key, raw TOML value)` per single table: `gateway`, `mqtt`, ...
    settings: Vec<(String, String, String)>,
    upstreams: Vec<String>,
    routes: Vec<String>,
    downstreams: Vec<String>,
    /// Environment of a child gateway (`spawn`).
    env: Vec<(String, String)>,
    root: Option<tempfile::TempDir>,
}

/// A gateway running inside the test process.
#[derive(Debug)]
pub struct TestGateway {
    gateway: Option<Gateway>,
    config: Config,
    root: tempfile::TempDir,
}

/// A gateway running as a child process, with fixed ports so it can be
/// killed and started again on the same data directory and addresses.
#[derive(Debug)]
pub struct GatewayProcess {
    binary: PathBuf,
    child: Option<Child>,
    root: tempfile::TempDir,
    config_path: PathBuf,
    mqtt_port: u16,
    amqp_port: u16,
    metrics_port: u16,
    id: String,
    env: Vec<(String, String)>,
}

impl Default for TestGatewayBuilder {
    fn default() -> Self {
        TestGatewayBuilder {
            id: crate::unique("gw"),
            settings: Vec::new(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            downstreams: Vec::new(),
            env: Vec::new(),
            root: None,
        }
    }
}

fn quote(s: &str) -> String {
    // TOML basic string; Rust's escaping of printable text is compatible.
    format!("{s:?}")
}

impl TestGatewayBuilder {
    /// The gateway id (prefix of every forwarded `message_id`).
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_string();
        self
    }

    /// Sets `table.key = value`, `value` being raw TOML (`"\"4KiB\""`, `16`).
    pub fn set(mut self, dotted_key: &str, toml_value: &str) -> Self {
        let (table, key) = dotted_key
            .split_once('.')
            .unwrap_or(("gateway", dotted_key));
        self.settings
            .push((table.to_string(), key.to_string(), toml_value.to_string()));
        self
    }

    /// An `[[upstream]]` with quick reconnects (tests restart brokers).
    pub fn upstream(self, name: &str, uris: &[String]) -> Self {
        self.upstream_with(name, uris, &[])
    }

    /// An `[[upstream]]` with extra `key = raw TOML value` lines.
    pub fn upstream_with(mut self, name: &str, uris: &[String], extra: &[(&str, &str)]) -> Self {
        let list: Vec<String> = uris.iter().map(|u| quote(u)).collect();
        let mut t = format!(
            "[[upstream]]\nname = {}\nuris = [{}]\n",
            quote(name),
            list.join(", ")
        );
        let has = |k: &str| extra.iter().any(|(key, _)| *key == k);
        if !has("reconnect_min") {
            t.push_str("reconnect_min = \"50ms\"\n");
        }
        if !has("reconnect_max") {
            t.push_str("reconnect_max = \"500ms\"\n");
        }
        for (k, v) in extra {
            let _ = writeln!(t, "{k} = {v}");
        }
        self.upstreams.push(t);
        self
    }

    /// A `[[route]]` on `amq.topic` with routing key `{topic}`.
    pub fn route(self, name: &str, filter: &str, upstream: &str) -> Self {
        self.route_with(name, filter, upstream, &[])
    }

    /// A `[[route]]` with extra `key = raw TOML value` lines (`exchange`,
    /// `routing_key`, `priority`, `ttl`, `persistent`).
    pub fn route_with(
        mut self,
        name: &str,
        filter: &str,
        upstream: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut t = format!(
            "[[route]]\nname = {}\nfilter = {}\nupstream = {}\n",
            quote(name),
            quote(filter),
            quote(upstream)
        );
        for (k, v) in extra {
            let _ = writeln!(t, "{k} = {v}");
        }
        self.routes.push(t);
        self
    }

    /// A `[[route]]` selecting what AMQP clients publish to the local
    /// `exchange` with a routing key matching `pattern`.
    pub fn local_route(
        mut self,
        name: &str,
        exchange: &str,
        pattern: &str,
        upstream: &str,
    ) -> Self {
        self.routes.push(format!(
            "[[route]]\nname = {}\nlocal_exchange = {}\nlocal_routing_key = {}\nupstream = {}\n",
            quote(name),
            quote(exchange),
            quote(pattern),
            quote(upstream)
        ));
        self
    }

    /// A `[[downstream]]` consuming `queue` over `upstream`'s nodes, with
    /// extra `key = raw TOML value` lines (`declare`, `topic_prefix`, `qos`,
    /// `prefetch`, `dedup_window`).
    pub fn downstream(
        mut self,
        name: &str,
        upstream: &str,
        queue: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut t = format!(
            "[[downstream]]\nname = {}\nupstream = {}\nqueue = {}\n",
            quote(name),
            quote(upstream),
            quote(queue)
        );
        for (k, v) in extra {
            let _ = writeln!(t, "{k} = {v}");
        }
        self.downstreams.push(t);
        self
    }

    /// An environment variable of a child gateway (`spawn`), such as a
    /// test seam of `gateway-under-test`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Reuse a directory (its `data/` holds the store) from an earlier gateway.
    pub fn root(mut self, root: tempfile::TempDir) -> Self {
        self.root = Some(root);
        self
    }

    /// The TOML text for the given listen addresses and data directory
    /// (the AMQP listener on `amqp_listen`).
    pub fn to_toml(
        &self,
        mqtt_listen: &str,
        amqp_listen: &str,
        metrics_listen: &str,
        data_dir: &Path,
    ) -> String {
        let mut tables: Vec<(String, Vec<String>)> = vec![
            (
                "gateway".into(),
                vec![
                    format!("id = {}", quote(&self.id)),
                    format!("data_dir = {}", quote(&data_dir.display().to_string())),
                    "shutdown_grace = \"5s\"".into(),
                ],
            ),
            (
                "mqtt".into(),
                vec![format!("listen = {}", quote(mqtt_listen))],
            ),
            (
                "amqp".into(),
                vec![format!("listen = {}", quote(amqp_listen))],
            ),
            (
                "metrics".into(),
                vec![format!("listen = {}", quote(metrics_listen))],
            ),
            ("store".into(), vec![]),
        ];
        for (table, key, value) in &self.settings {
            let line = format!("{key} = {value}");
            match tables.iter_mut().find(|(t, _)| t == table) {
                Some((_, lines)) => {
                    // A later setting of the same key wins.
                    lines.retain(|l| !l.starts_with(&format!("{key} =")));
                    lines.push(line);
                }
                None => tables.push((table.clone(), vec![line])),
            }
        }
        let mut text = String::new();
        for (table, lines) in &tables {
            let _ = writeln!(text, "[{table}]");
            for l in lines {
                let _ = writeln!(text, "{l}");
            }
            text.push('\n');
        }
        for t in self
            .upstreams
            .iter()
            .chain(&self.routes)
            .chain(&self.downstreams)
        {
            let _ = writeln!(text, "{t}");
        }
        text
    }

    fn take_root(&mut self) -> Result<tempfile::TempDir> {
        match self.root.take() {
            Some(r) => Ok(r),
            None => tempfile::Builder::new()
                .prefix("edgetest-gw-")
                .tempdir()
                .context("creating gateway directory"),
        }
    }

    /// Starts the gateway in this process.
    pub async fn start(mut self) -> Result<TestGateway> {
        let root = self.take_root()?;
        let text = self.to_toml(
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &root.path().join("data"),
        );
        let config = Config::parse(&text)
            .map_err(|e| anyhow!("test gateway config is invalid: {e}\n{text}"))?;
        let gateway = tokio::time::timeout(Duration::from_secs(30), Gateway::start(config.clone()))
            .await
            .map_err(|_| anyhow!("Gateway::start did not return within 30s"))?
            .context("starting the gateway in-process")?;
        Ok(TestGateway {
            gateway: Some(gateway),
            config,
            root,
        })
    }

    /// Starts the gateway as a child process of `binary` (pass
    /// `env!("CARGO_BIN_EXE_gateway-under-test")`), and waits for `/healthz`.
    pub async fn spawn(mut self, binary: &Path) -> Result<GatewayProcess> {
        let root = self.take_root()?;
        let mqtt_port = crate::free_port()?;
        let amqp_port = crate::free_port()?;
        let metrics_port = crate::free_port()?;
        let text = self.to_toml(
            &format!("127.0.0.1:{mqtt_port}"),
            &format!("127.0.0.1:{amqp_port}"),
            &format!("127.0.0.1:{metrics_port}"),
            &root.path().join("data"),
        );
        let config_path = root.path().join("gateway.toml");
        std::fs::write(&config_path, text).context("writing gateway.toml")?;
        let mut process = GatewayProcess {
            binary: binary.to_path_buf(),
            child: None,
            root,
            config_path,
            mqtt_port,
            amqp_port,
            metrics_port,
            id: self.id.clone(),
            env: std::mem::take(&mut self.env),
        };
        process.start().await?;
        Ok(process)
    }
}

impl TestGateway {
    pub fn builder() -> TestGatewayBuilder {
        TestGatewayBuilder::default()
    }

    /// The running gateway's store, for its live figures.
    pub fn store(&self) -> &edge_store::Store {
        self.running().store()
    }

    fn running(&self) -> &Gateway {
        // Only `shutdown(self)` takes it, which consumes the handle.
        self.gateway.as_ref().unwrap()
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.running().mqtt_addr()
    }

    /// The MQTT over WebSocket listener, when `mqtt.ws_listen` is set.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.running().mqtt_ws_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.running().metrics_addr()
    }

    /// The MQTT over TLS listener, when `mqtt.tls_listen` is set.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.running().mqtt_tls_addr()
    }

    /// The MQTT over WebSocket over TLS listener, when `mqtt.wss_listen` is set.
    pub fn mqtt_wss_addr(&self) -> Option<SocketAddr> {
        self.running().mqtt_wss_addr()
    }

    /// The AMQP over TLS listener, when `amqp.tls_listen` is set.
    pub fn amqp_tls_addr(&self) -> Option<SocketAddr> {
        self.running().amqp_tls_addr()
    }

    /// Re-reads certificates and auth files, as SIGHUP does.
    pub fn reload(&self) {
        self.running().reload();
    }

    /// The AMQP listener (enabled in test gateways unless set otherwise).
    pub fn amqp_addr(&self) -> SocketAddr {
        self.running()
            .amqp_addr()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// `amqp://guest:guest@<amqp_addr>/%2f` for lapin.
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp_addr())
    }

    pub fn id(&self) -> &str {
        self.running().id()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.gateway.data_dir
    }

    /// `GET /metrics` body.
    pub async fn metrics(&self) -> Result<String> {
        let addr = self.metrics_addr().context("metrics are disabled")?;
        let (status, body) = crate::http::get(addr, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}: {body}");
        }
        Ok(body)
    }

    /// Graceful shutdown (bounded); returns the directory so a new gateway
    /// can start on the same store (`builder().root(dir)`).
    pub async fn shutdown(mut self) -> Result<tempfile::TempDir> {
        if let Some(g) = self.gateway.take() {
            tokio::time::timeout(Duration::from_secs(30), g.shutdown())
                .await
                .map_err(|_| anyhow!("gateway shutdown took over 30s"))??;
        }
        Ok(self.root)
    }
}

impl GatewayProcess {
    async fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening gateway.log")?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().context("spawning the gateway")?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let addr = self.metrics_addr();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "gateway exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            if crate::http::get(addr, "/healthz").await.is_ok()
                && tokio::net::TcpStream::connect(self.mqtt_addr())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "gateway not ready within {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `kill -9`: no shutdown, no flush.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .map_err(|_| anyhow!("gateway survived SIGKILL for 10s"))??;
        }
        Ok(())
    }

    /// SIGTERM, then the exit status (bounded by `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("gateway is not running")?;
        let pid = child.id().context("gateway has no pid")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| anyhow!("gateway did not exit within {timeout:?} of SIGTERM"))?
            .context("waiting for the gateway")
    }

    /// Leaves `key` out of the environment of the next start.
    pub fn remove_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    /// Waits (bounded) for the child to exit by itself, as a test seam
    /// makes it; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("gateway is not running")?;
        tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| {
                anyhow!(
                    "gateway did not exit within {timeout:?}; log:\n{}",
                    self.log()
                )
            })?
            .context("waiting for the gateway")
    }

    /// Starts the same binary again on the same config, data and ports.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.start().await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt_port))
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.amqp_port))
    }

    /// `amqp://guest:guest@<amqp_addr>/%2f` for lapin.
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp_addr())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("gateway.log")
    }

    /// The last 8 KiB of the child's output.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = text.len().saturating_sub(8192);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    /// `GET /metrics` body.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = crate::http::get(self.metrics_addr(), "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}: {body}");
        }
        Ok(body)
    }
}

/// Runs the gateway binary with `args` to completion (bounded), returning
/// (exit code, stdout + stderr).
pub async fn run_binary(binary: &Path, args: &[&str]) -> Result<(Option<i32>, String)> {
    let mut cmd = Command::new(binary);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| anyhow!("{} {args:?} ran for over 30s", binary.display()))??;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code(), text))
}
