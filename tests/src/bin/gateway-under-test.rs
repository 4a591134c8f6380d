//! The real gateway entry point, built inside this crate so integration
//! tests find it through `env!("CARGO_BIN_EXE_gateway-under-test")`.
//!
//! Test seams, set from the environment here only (never by the gateway):
//! - `EDGE_TEST_ABORT_AFTER_DOWNSTREAM_COMMITS=N`: abort right after the
//!   N-th downstream message is committed locally, before its upstream ack.

/// See the module documentation.
const ABORT_AFTER_DOWNSTREAM_COMMITS: &str = "EDGE_TEST_ABORT_AFTER_DOWNSTREAM_COMMITS";

fn main() -> std::process::ExitCode {
    if let Some(n) = std::env::var(ABORT_AFTER_DOWNSTREAM_COMMITS)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        edge_upstream::abort_after_downstream_commits(n);
    }
    edge_gateway::cli_main()
}
