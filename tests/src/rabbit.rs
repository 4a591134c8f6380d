//! Private RabbitMQ nodes: own node name, ports, data and log directories,
//! so a test can stop, kill and restart its broker without touching anyone
//! else's. Nodes never outlive the test process: a small watchdog shell
//! loop stops the node once the process is gone, and dedicated nodes also
//! stop on drop.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::free_port;

/// How long a node gets to boot (`rabbitmqctl wait --timeout`).
const BOOT_TIMEOUT_SECS: u32 = 60;
/// Longest a watchdog outlives its test process if nothing else ends it.
const WATCHDOG_MAX_SECS: u32 = 3600;

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);
static SHARED: OnceLock<std::result::Result<RabbitNode, String>> = OnceLock::new();

/// One private RabbitMQ node.
#[derive(Debug)]
pub struct RabbitNode {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    base: PathBuf,
    /// `RABBITMQ_CONFIG_FILE`, when the node has one.
    config_file: Option<PathBuf>,
    /// `RABBITMQ_ADVANCED_CONFIG_FILE`, when the node has one (Erlang
    /// terms, for settings `rabbitmq.conf` cannot express, such as a
    /// certificate per SNI name).
    advanced_config: Option<PathBuf>,
    /// Removes `base` when a dedicated node is dropped.
    _dir: Option<tempfile::TempDir>,
    running: bool,
}

impl RabbitNode {
    /// The process-wide node for ordinary tests, started on first use.
    /// Tests on it must use their own queue names and topic prefixes.
    pub fn shared() -> Result<&'static RabbitNode> {
        let node = SHARED.get_or_init(|| {
            RabbitNode::create("shared")
                .and_then(|mut n| {
                    n.start()?;
                    // The shared node is never dropped: let the watchdog
                    // delete its directory too.
                    if let Some(dir) = n._dir.take() {
                        let _ = dir.keep();
                    }
                    Ok(n)
                })
                .map_err(|e| format!("{e:#}"))
        });
        node.as_ref()
            .map_err(|e| anyhow::anyhow!("shared RabbitMQ node failed to start: {e}"))
    }

    /// A node only this test uses (it may stop, kill and restart it),
    /// started and ready.
    pub fn dedicated(label: &str) -> Result<RabbitNode> {
        let mut node = RabbitNode::create(label)?;
        node.start()?;
        Ok(node)
    }

    /// Allocates name, ports and directories without starting anything.
    pub fn create(label: &str) -> Result<RabbitNode> {
        RabbitNode::create_with(label, &[], None, &|_| None)
    }

    /// Like [`RabbitNode::dedicated`], with `files` (name, contents) in the
    /// node's directory and a `rabbitmq.conf` made by `conf` from that
    /// directory and a free port of its own (e.g. a TLS listener's).
    /// Returns the node and that port.
    pub fn dedicated_with(
        label: &str,
        files: &[(&str, &[u8])],
        conf: impl Fn(&Path, u16) -> String,
    ) -> Result<(RabbitNode, u16)> {
        RabbitNode::dedicated_with_advanced(label, files, conf, |_: &Path| None)
    }

    /// Like [`RabbitNode::dedicated_with`], and an `advanced.config` made by
    /// `advanced` from the node's directory when it returns one.
    pub fn dedicated_with_advanced(
        label: &str,
        files: &[(&str, &[u8])],
        conf: impl Fn(&Path, u16) -> String,
        advanced: impl Fn(&Path) -> Option<String>,
    ) -> Result<(RabbitNode, u16)> {
        let port = free_port()?;
        let mut node =
            RabbitNode::create_with(label, files, Some(&|dir: &Path| conf(dir, port)), &advanced)?;
        node.start()?;
        Ok((node, port))
    }

    fn create_with(
        label: &str,
        files: &[(&str, &[u8])],
        conf: Option<&dyn Fn(&Path) -> String>,
        advanced: &dyn Fn(&Path) -> Option<String>,
    ) -> Result<RabbitNode> {
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("edgetest-{label}-{pid}-{n}@localhost");
        let dir = tempfile::Builder::new()
            .prefix(&format!("edgetest-rabbit-{label}-{pid}-{n}-"))
            .tempdir()
            .context("creating node directory")?;
        let base = dir.path().to_path_buf();
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(base.join(sub))
                .with_context(|| format!("creating {}", base.join(sub).display()))?;
        }
        std::fs::write(base.join("enabled_plugins"), "[].\n").context("writing enabled_plugins")?;
        for (name, contents) in files {
            std::fs::write(base.join(name), contents).with_context(|| format!("writing {name}"))?;
        }
        let config_file = match conf {
            Some(conf) => {
                let path = base.join("rabbitmq.conf");
                std::fs::write(&path, conf(&base)).context("writing rabbitmq.conf")?;
                Some(path)
            }
            None => None,
        };
        let advanced_config = match advanced(&base) {
            Some(terms) => {
                let path = base.join("advanced.config");
                std::fs::write(&path, terms).context("writing advanced.config")?;
                Some(path)
            }
            None => None,
        };
        if is_root() {
            ensure_shared_cookie()?;
            // The Debian wrapper drops to the `rabbitmq` user.
            run_checked(
                Command::new("chown")
                    .arg("-R")
                    .arg("rabbitmq:rabbitmq")
                    .arg(&base),
            )?;
            // TempDir is created 0700; the node's user must be able to enter it.
            run_checked(Command::new("chmod").arg("0755").arg(&base))?;
        }
        let node = RabbitNode {
            name,
            amqp_port: free_port()?,
            dist_port: free_port()?,
            base,
            config_file,
            advanced_config,
            _dir: Some(dir),
            running: false,
        };
        node.spawn_watchdog()?;
        Ok(node)
    }

    /// The Erlang node name (`name@localhost`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    fn pid_file(&self) -> PathBuf {
        self.base.join("node.pid")
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.base.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.base.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("HOME", self.base.join("home"))
            .stdin(Stdio::null());
        if let Some(path) = &self.config_file {
            cmd.env("RABBITMQ_CONFIG_FILE", path);
        }
        if let Some(path) = &self.advanced_config {
            cmd.env("RABBITMQ_ADVANCED_CONFIG_FILE", path);
        }
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool_path(tool));
        self.env(&mut cmd);
        cmd
    }

    /// Boots the node and waits until it accepts AMQP connections. A boot
    /// that writes no pid file within the timeout is tried once more (seen
    /// right after a kill -9 on a loaded machine: the detached node died
    /// during start-up, and the second attempt came up).
    pub fn start(&mut self) -> Result<()> {
        if self.running {
            return Ok(());
        }
        let started = Instant::now();
        if let Err(first) = self.boot() {
            eprintln!(
                "rabbit: node {} did not come up ({first:#}); startup output: {}; its log ends: {}; trying again",
                self.name,
                std::fs::read_to_string(self.base.join("startup.out")).unwrap_or_default(),
                self.log_tail(30)
            );
            // The failed attempt's beam may still run (its application
            // stopped, the node up): it would hold the name and the ports
            // the second attempt needs.
            self.kill_failed_boot();
            self.boot()?;
        }
        self.running = true;
        self.wait_for_port(Duration::from_secs(30))?;
        eprintln!(
            "rabbit: node {} up on port {} in {:.1?}",
            self.name,
            self.amqp_port,
            started.elapsed()
        );
        Ok(())
    }

    /// One `rabbitmq-server -detached` and the wait for its pid file.
    fn boot(&mut self) -> Result<()> {
        // A stale pid file (after kill) would make `wait` watch a dead pid.
        let _ = std::fs::remove_file(self.pid_file());
        // Not piped: the detached node could hold a pipe open forever.
        let out = std::fs::File::create(self.base.join("startup.out"))?;
        let status = self
            .command("rabbitmq-server")
            .arg("-detached")
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .with_context(|| format!("starting RabbitMQ node {}", self.name))?;
        if !status.success() {
            bail!(
                "rabbitmq-server -detached for {} failed ({status}); see {}",
                self.name,
                self.base.join("startup.out").display()
            );
        }
        run_checked(
            self.command("rabbitmqctl")
                .args(["-n", &self.name, "wait"])
                .arg(self.pid_file())
                .args(["--timeout", &BOOT_TIMEOUT_SECS.to_string()]),
        )
        .with_context(|| {
            format!(
                "waiting for RabbitMQ node {} (logs in {})",
                self.name,
                self.base.join("log").display()
            )
        })
    }

    /// Same environment, same data: durable queues and persistent messages
    /// survive.
    pub fn start_again(&mut self) -> Result<()> {
        self.start()
    }

    /// Stops then starts the node (a clean broker restart).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Graceful stop; returns once the node's OS process has exited.
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        run_checked(
            self.command("rabbitmqctl")
                .args(["-n", &self.name, "stop"])
                .arg(self.pid_file()),
        )
        .with_context(|| format!("stopping RabbitMQ node {}", self.name))?;
        self.running = false;
        self.wait_port_closed(Duration::from_secs(30))
    }

    /// Runs `rabbitmqctl -n <node> <args>` (e.g. `add_user`), failing on a
    /// non-zero exit. Blocking.
    pub fn ctl(&self, args: &[&str]) -> Result<()> {
        run_checked(
            self.command("rabbitmqctl")
                .args(["-n", &self.name])
                .args(args),
        )
        .with_context(|| format!("rabbitmqctl {args:?} on {}", self.name))
    }

    /// `kill -9` of the node's beam process: a broker crash.
    pub fn kill(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let pid = self.os_pid()?;
        run_checked(Command::new("kill").args(["-9", &pid.to_string()]))?;
        self.running = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            if Instant::now() > deadline {
                bail!("RabbitMQ node {} (pid {pid}) survived kill -9", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_port_closed(Duration::from_secs(30))
    }

    /// Kills the beam process of a boot that did not come up, if any,
    /// and waits (at most 10 s) for its port to close. Found by its node
    /// name (unique per test process), not by the pid file: the boot may
    /// not have written one, or may have died and left a pid since reused.
    fn kill_failed_boot(&self) {
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--", &self.name])
            .status();
        let _ = self.wait_port_closed(Duration::from_secs(10));
    }

    /// The last `lines` lines of the node's log files (for a failed boot).
    fn log_tail(&self, lines: usize) -> String {
        let Ok(dir) = std::fs::read_dir(self.base.join("log")) else {
            return String::new();
        };
        let mut tail = String::new();
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log")
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                let all: Vec<&str> = text.lines().collect();
                let from = all.len().saturating_sub(lines);
                tail.push_str(&format!(
                    "\n[{}]\n{}",
                    path.display(),
                    all[from..].join("\n")
                ));
            }
        }
        tail
    }

    /// The beam process id, from the node's pid file.
    pub fn os_pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(self.pid_file())
            .with_context(|| format!("reading {}", self.pid_file().display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("pid file {} holds {text:?}", self.pid_file().display()))
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    fn wait_for_port(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.amqp_port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {} does not listen on {}", self.name, self.amqp_port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_port_closed(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while std::net::TcpStream::connect(("127.0.0.1", self.amqp_port)).is_ok() {
            if Instant::now() > deadline {
                bail!("node {} still listens on {}", self.name, self.amqp_port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A detached shell loop that stops the node and removes its directory
    /// once this test process is gone. It ends by itself.
    fn spawn_watchdog(&self) -> Result<()> {
        let script = format!(
            "i=0; while [ $i -lt {max} ] && kill -0 {pid} 2>/dev/null; do sleep 1; i=$((i+1)); done; \
             if [ -f '{pidfile}' ]; then {ctl} -n '{name}' stop '{pidfile}' >/dev/null 2>&1; fi; \
             rm -rf '{base}'",
            max = WATCHDOG_MAX_SECS,
            pid = std::process::id(),
            pidfile = self.pid_file().display(),
            ctl = tool_path("rabbitmqctl"),
            name = self.name,
            base = self.base.display(),
        );
        let mut cmd = Command::new("sh");
        self.env(&mut cmd);
        cmd.arg("-c")
            .arg(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Own process group: a Ctrl-C to the test run does not kill the
        // watchdog before it has done its job.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn().context("spawning the node watchdog")?;
        Ok(())
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if self.running
            && let Err(e) = self.stop()
        {
            eprintln!("rabbit: {e:#}; killing it");
            let _ = self.kill();
        }
    }
}

/// As root every node and `rabbitmqctl` run as `rabbitmq` with its home
/// (`su` resets HOME), so they share one cookie there. Nodes booting in
/// parallel on a fresh machine would race to create it: create it first.
fn ensure_shared_cookie() -> Result<()> {
    static COOKIE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = COOKIE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ensure_cookie_in(Path::new("/var/lib/rabbitmq"), Some("rabbitmq:rabbitmq"))
}

fn ensure_cookie_in(home: &Path, owner: Option<&str>) -> Result<()> {
    let cookie = home.join(".erlang.cookie");
    if cookie.exists() || !home.is_dir() {
        return Ok(());
    }
    use std::hash::{BuildHasher, Hasher};
    let mut text = String::new();
    while text.len() < 20 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        text.extend(
            h.finish()
                .to_le_bytes()
                .iter()
                .map(|b| char::from(b'A' + b % 26)),
        );
    }
    std::fs::write(&cookie, &text[..20]).context("writing the Erlang cookie")?;
    if let Some(owner) = owner {
        run_checked(Command::new("chown").arg(owner).arg(&cookie))?;
    }
    run_checked(Command::new("chmod").arg("0400").arg(&cookie))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// As root the `/usr/sbin` wrappers drop to the `rabbitmq` user; as anyone
/// else they refuse, so call the real scripts directly.
fn tool_path(tool: &str) -> String {
    let direct = format!("/usr/lib/rabbitmq/bin/{tool}");
    if !is_root() && Path::new(&direct).exists() {
        direct
    } else {
        tool.to_string()
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ensure_cookie_in;

    #[test]
    fn cookie_is_created_once_and_kept() {
        let home = tempfile::tempdir().unwrap();
        ensure_cookie_in(home.path(), None).unwrap();
        let path = home.path().join(".erlang.cookie");
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.len(), 20);
        assert!(first.chars().all(|c| c.is_ascii_uppercase()));
        ensure_cookie_in(home.path(), None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
    }
}
