//! API SKETCH of the gateway library (the real one replaces this).
//! `Gateway::start` opens the store, binds every listener and spawns the
//! tasks; the returned handle tells where it listens and shuts it down.

use std::net::SocketAddr;

use edge_config::Config;

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {}

impl Gateway {
    /// Opens the store, binds the MQTT and metrics listeners (port 0 picks
    /// a free port) and spawns the MQTT server and one replicator per upstream.
    pub async fn start(_config: Config) -> anyhow::Result<Gateway> {
        unimplemented!()
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        unimplemented!()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        unimplemented!()
    }

    /// Stops accepting, lets in-flight commits finish, flushes cursors,
    /// closes upstream links; bounded by `gateway.shutdown_grace`.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        unimplemented!()
    }
}

/// The command line entry point (`edge-gateway [--config FILE]`,
/// `edge-gateway check-config FILE`); returns the process exit code.
pub fn cli_main() -> std::process::ExitCode {
    unimplemented!()
}
