//! `edge-gateway backlog [replay|purge [--route R]]`: against a running
//! gateway through its admin endpoints (`--admin URL`), or on a stopped
//! gateway's data directory (`--data-dir DIR`): read-only for the backlog,
//! a normal open of the store for replay and purge (refused while the
//! gateway holds it). Without either, the configuration's metrics listener
//! is tried first, then its data directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use edge_config::Config;
use edge_store::{DB_FILE, OpenError, ReadOnlyStore, Store};

use super::client::{AdminUrl, RequestError, query_value, request};
use super::dead_letters::{DeadLetterAction, act_on_dead_letters, check_route};
use super::report::Report;
use super::scan::{UpstreamRef, routes_by_upstream, scan};

/// Environment variable with the admin user's password (else prompted).
const PASSWORD_ENV: &str = "EDGE_GATEWAY_ADMIN_PASSWORD";

#[derive(Debug, Args)]
pub struct BacklogArgs {
    #[command(subcommand)]
    pub action: Option<BacklogCommand>,
    /// A stopped gateway's data directory (its `gateway.data_dir`); the
    /// routes come from --config.
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// A running gateway's admin endpoint: its metrics listener, `http://127.0.0.1:9183`.
    #[arg(long, value_name = "URL", global = true)]
    pub admin: Option<String>,
    /// Admin user (`auth.admin_users`); the password from
    /// EDGE_GATEWAY_ADMIN_PASSWORD or prompted.
    #[arg(long, value_name = "USER", global = true)]
    pub user: Option<String>,
    /// Print the backlog as JSON (the `GET /backlog` body) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BacklogCommand {
    /// Put dead letters back into the log, to be forwarded again by the
    /// upstreams that parked them (under their original message ids).
    Replay {
        /// Only the dead letters of this route.
        #[arg(long, value_name = "ROUTE")]
        route: Option<String>,
    },
    /// Delete dead letters.
    Purge {
        /// Only the dead letters of this route.
        #[arg(long, value_name = "ROUTE")]
        route: Option<String>,
    },
}

/// Where the command looks.
enum Target {
    Admin(AdminUrl),
    DataDir(PathBuf),
    /// The config's metrics listener, else its data directory when nothing
    /// listens there.
    AdminOrDataDir(AdminUrl, PathBuf),
}

/// Runs the command; 0 on success, 1 with a message on stderr otherwise.
pub fn run(args: BacklogArgs, config_file: Option<&Path>) -> ExitCode {
    match execute(args, config_file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-gateway backlog: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(args: BacklogArgs, config_file: Option<&Path>) -> anyhow::Result<()> {
    let config = match config_file {
        Some(path) => Config::load(path).map_err(|e| anyhow!("{e}"))?,
        None => Config::defaults().map_err(|e| anyhow!("{e}"))?,
    };
    let target = match (&args.admin, &args.data_dir) {
        (Some(_), Some(_)) => bail!("give --admin or --data-dir, not both"),
        (Some(url), None) => Target::Admin(AdminUrl::parse(url)?),
        (None, Some(dir)) => Target::DataDir(dir.clone()),
        (None, None) => match &config.metrics {
            Some(m) if !m.tls => Target::AdminOrDataDir(
                AdminUrl::of_listen(m.listen),
                config.gateway.data_dir.clone(),
            ),
            _ => Target::DataDir(config.gateway.data_dir.clone()),
        },
    };
    let admin = Admin {
        user: args.user.clone(),
    };
    match args.action {
        None => {
            let report = match target {
                Target::Admin(url) => admin.backlog(&url)?,
                Target::DataDir(dir) => offline_backlog(&dir, &config)?,
                Target::AdminOrDataDir(url, dir) => match admin.try_backlog(&url) {
                    Err(RequestError::Unreachable(e)) => {
                        eprintln!(
                            "{e:#}; reading the data directory {} instead",
                            dir.display()
                        );
                        offline_backlog(&dir, &config)?
                    }
                    other => other.map_err(|e| anyhow!("{e}"))??,
                },
            };
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Some(BacklogCommand::Replay { route }) => {
            dead_letters(&admin, target, &config, route, DeadLetterAction::Replay)
        }
        Some(BacklogCommand::Purge { route }) => {
            dead_letters(&admin, target, &config, route, DeadLetterAction::Purge)
        }
    }
}

/// The admin endpoints' user, if any.
struct Admin {
    user: Option<String>,
}

impl Admin {
    fn credentials(&self) -> anyhow::Result<Option<(String, String)>> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
        let password = match std::env::var(PASSWORD_ENV) {
            Ok(p) => p,
            Err(_) => rpassword::prompt_password(format!("Password for {user}: "))
                .context("reading the admin password")?,
        };
        Ok(Some((user.clone(), password)))
    }

    fn call(&self, url: &AdminUrl, method: &str, path: &str) -> Result<String, RequestError> {
        let credentials = self.credentials().map_err(RequestError::Failed)?;
        let credentials = credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        let (status, body) = request(url, method, path, credentials)?;
        if status != 200 {
            return Err(RequestError::Failed(anyhow!(
                "{method} {url}{path} answered {status}: {}",
                body.trim()
            )));
        }
        Ok(body)
    }

    /// `GET /backlog`; `Err` only when the endpoint could not be asked.
    fn try_backlog(&self, url: &AdminUrl) -> Result<anyhow::Result<Report>, RequestError> {
        let body = self.call(url, "GET", "/backlog")?;
        Ok(Report::from_json(&body)
            .with_context(|| format!("{url}/backlog answered something else than a backlog")))
    }

    fn backlog(&self, url: &AdminUrl) -> anyhow::Result<Report> {
        self.try_backlog(url).map_err(|e| anyhow!("{e}"))?
    }
}

/// The data directory's store file, or why there is none.
fn store_file(dir: &Path) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        bail!("data directory {} does not exist", dir.display());
    }
    let file = dir.join(DB_FILE);
    if !file.is_file() {
        bail!(
            "{} holds no store ({DB_FILE} is missing): is it the gateway's data_dir?",
            dir.display()
        );
    }
    Ok(file)
}

/// An open error said for an operator.
fn explain(dir: &Path, e: OpenError) -> anyhow::Error {
    match &e {
        e if e.is_in_use() => anyhow!(
            "the store in {} is in use: the gateway is running (ask it with --admin URL, its metrics listener)",
            dir.display()
        ),
        e if e.needs_repair() => anyhow!(
            "the store in {} was not closed cleanly (the gateway was killed or crashed); it needs the repair the gateway makes when it starts: start the gateway and use --admin URL",
            dir.display()
        ),
        _ => anyhow!(e),
    }
}

/// The backlog of a stopped gateway's store, opened read-only.
fn offline_backlog(dir: &Path, config: &Config) -> anyhow::Result<Report> {
    store_file(dir)?;
    let store = ReadOnlyStore::open(dir).map_err(|e| explain(dir, e))?;
    let routes = crate::routes(&config.routes)?;
    let upstreams: Vec<UpstreamRef> = config
        .upstreams
        .iter()
        .map(|u| UpstreamRef {
            name: u.name.clone(),
            link: None,
        })
        .collect();
    warn_unconfigured_cursors(&store, config)?;
    Ok(scan(
        &store,
        &upstreams,
        &routes,
        "data-dir",
        edge_core::message::now_ms(),
    )?)
}

/// The stored cursors of upstreams the configuration does not name (their
/// routes are then unknown here). A priority lane's cursor of a configured
/// upstream is not one: the upstream's own cursor is never past it.
fn unconfigured_cursors(store: &ReadOnlyStore, config: &Config) -> anyhow::Result<Vec<String>> {
    let lane_of_configured = |name: &str| {
        config.upstreams.iter().any(|u| {
            name.strip_prefix(u.name.as_str())
                .is_some_and(|rest| rest.starts_with("/priority-"))
        })
    };
    Ok(store
        .cursors()?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !config.upstreams.iter().any(|u| &u.name == name))
        .filter(|name| !lane_of_configured(name))
        .collect())
}

fn warn_unconfigured_cursors(store: &ReadOnlyStore, config: &Config) -> anyhow::Result<()> {
    let unknown = unconfigured_cursors(store, config)?;
    if !unknown.is_empty() {
        eprintln!(
            "note: the store has cursors of upstream(s) {} that the configuration does not name; pass the gateway's own --config to see their backlog",
            unknown.join(", ")
        );
    }
    Ok(())
}

fn dead_letters(
    admin: &Admin,
    target: Target,
    config: &Config,
    route: Option<String>,
    action: DeadLetterAction,
) -> anyhow::Result<()> {
    let endpoint = match action {
        DeadLetterAction::Replay => "/dead-letters/replay",
        DeadLetterAction::Purge => "/dead-letters/purge",
    };
    let path = match &route {
        Some(r) => format!("{endpoint}?route={}", query_value(r)),
        None => endpoint.to_string(),
    };
    let answer = match target {
        Target::Admin(url) => admin
            .call(&url, "POST", &path)
            .map_err(|e| anyhow!("{e}"))?,
        Target::DataDir(dir) => offline_dead_letters(&dir, config, route, action)?,
        Target::AdminOrDataDir(url, dir) => match admin.call(&url, "POST", &path) {
            Err(RequestError::Unreachable(e)) => {
                eprintln!("{e:#}; using the data directory {} instead", dir.display());
                offline_dead_letters(&dir, config, route, action)?
            }
            other => other.map_err(|e| anyhow!("{e}"))?,
        },
    };
    print!("{answer}");
    Ok(())
}

/// Replay or purge on a stopped gateway's store, opened as the gateway
/// opens it (so with its cursors: a store holding cursors the configuration
/// does not name is refused, as opening would drop them).
fn offline_dead_letters(
    dir: &Path,
    config: &Config,
    route: Option<String>,
    action: DeadLetterAction,
) -> anyhow::Result<String> {
    store_file(dir)?;
    let routes = crate::routes(&config.routes)?;
    if let Some(route) = &route {
        check_route(&routes, route).map_err(|e| anyhow!(e))?;
    }
    {
        let view = ReadOnlyStore::open(dir).map_err(|e| explain(dir, e))?;
        let unknown = unconfigured_cursors(&view, config)?;
        if !unknown.is_empty() {
            bail!(
                "the store has cursors of upstream(s) {} that the configuration does not name, and opening it with this configuration would drop them: pass the gateway's own --config",
                unknown.join(", ")
            );
        }
    }
    let store = Store::open(dir, crate::store_options(config)).map_err(|e| explain(dir, e))?;
    let own = std::sync::Arc::new(routes_by_upstream(
        config.upstreams.iter().map(|u| u.name.as_str()),
        &routes,
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let done = act_on_dead_letters(&store, own, route, action).await;
        store.close().await.context("closing the store")?;
        match done {
            Ok(total) => Ok(format!("{} {total}\n", action.verb())),
            Err((total, e)) => Err(e.context(format!("{} {total}, then failed", action.verb()))),
        }
    })
}
