//! `edge-gateway [--config FILE]`, `edge-gateway check-config FILE`,
//! `edge-gateway passwd FILE USER [--stdin] [--delete]` and
//! `edge-gateway backlog [replay|purge] ...` (`backlog/command.rs`).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_config::{Config, ConfigError};

use crate::Gateway;

/// Exit status for a bad configuration (sysexits `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;
/// Exit status when the gateway could not start or failed at run time.
const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "edge-gateway",
    version,
    about = "MQTT/AMQP edge gateway with a durable store-and-forward log"
)]
struct Cli {
    /// TOML configuration file; without it the embedded defaults are used
    /// (MQTT on 127.0.0.1:1883, metrics on 127.0.0.1:9183, data in ./data, no upstream).
    #[arg(long, short, value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file and exit: 0 when valid, 64 listing every problem.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Per upstream and route: messages still to forward, their bytes and
    /// oldest age, the cursor, the link state and the parked dead letters;
    /// `replay` / `purge` dead letters (of one route with --route). Asks a
    /// running gateway (--admin URL) or reads a stopped one's data directory
    /// (--data-dir DIR, read-only for the backlog).
    Backlog(crate::backlog::BacklogArgs),
    /// Add a user to a password file or change its password (prompted twice,
    /// or one line from stdin with --stdin); --delete removes the user.
    Passwd {
        /// The password file (created if missing; rewritten atomically, mode 0600).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The user name.
        #[arg(value_name = "USER")]
        user: String,
        /// Read the password from one line of standard input instead of prompting.
        #[arg(long, conflicts_with = "delete")]
        stdin: bool,
        /// Remove the user instead of setting its password.
        #[arg(long)]
        delete: bool,
    },
}

pub fn cli_main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Passwd {
            file,
            user,
            stdin,
            delete,
        }) => passwd(&file, &user, stdin, delete),
        Some(Command::Backlog(args)) => crate::backlog::run_command(args, cli.config.as_deref()),
        None => run(cli.config.as_deref()),
    }
}

fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    match file {
        Some(path) => Config::load(path),
        None => Config::defaults(),
    }
}

fn check_config(file: &Path) -> ExitCode {
    let checked = Config::load(file).map(|config| {
        let routes = crate::routes(&config.routes);
        (config, routes)
    });
    match checked {
        Ok((_, Err(e))) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Ok((config, Ok(_))) if let Err(e) = crate::security::build(&config) => {
            eprintln!("{}: {e:#}", file.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Ok((config, Ok(_))) => {
            println!(
                "{}: ok (gateway id {}, MQTT on {}, {} upstream(s), {} route(s))",
                file.display(),
                config.gateway.id.as_deref().map_or(
                    "recorded in the store or generated".to_string(),
                    |id| format!("{id:?}")
                ),
                config.mqtt.listen,
                config.upstreams.len(),
                config.routes.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn passwd(file: &Path, user: &str, stdin: bool, delete: bool) -> ExitCode {
    match passwd_change(file, user, stdin, delete) {
        Ok(message) => {
            eprintln!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-gateway passwd: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Carries out `passwd`; the message to print on success.
fn passwd_change(file: &Path, user: &str, stdin: bool, delete: bool) -> anyhow::Result<String> {
    if delete {
        if edge_auth::remove_user(file, user)? {
            return Ok(format!("removed user {user} from {}", file.display()));
        }
        anyhow::bail!("user {user} is not in {}", file.display());
    }
    edge_auth::validate_user_name(user)?;
    let password = if stdin {
        read_password_line()?
    } else {
        let first = rpassword::prompt_password("Password: ")?;
        let second = rpassword::prompt_password("Reenter password: ")?;
        if first != second {
            anyhow::bail!("the passwords do not match");
        }
        first
    };
    if password.is_empty() {
        anyhow::bail!("empty password refused");
    }
    edge_auth::set_user(file, user, password.as_bytes())?;
    Ok(format!("updated user {user} in {}", file.display()))
}

/// One line of standard input without its line ending.
fn read_password_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let trimmed = line
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&line);
    Ok(trimmed.to_string())
}

fn run(file: Option<&Path>) -> ExitCode {
    crate::init_logging();
    let config = match load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "edge-gateway starting");
    let gateway = Gateway::start(config).await?;
    let failure = tokio::select! {
        _ = wait_for_signal() => None,
        reason = gateway.store_failed() => Some(reason),
    };
    match failure {
        None => {
            tracing::info!("shutting down");
            gateway.shutdown().await
        }
        Some(reason) => {
            tracing::error!(%reason, "the store failed: stopping so the supervisor restarts the gateway (reopening the store recovers it)");
            gateway.shutdown().await?;
            anyhow::bail!("store failed: {reason}")
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
