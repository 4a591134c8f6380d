//! The real gateway entry point, built inside this crate so integration
//! tests find it through `env!("CARGO_BIN_EXE_gateway-under-test")`.

fn main() -> std::process::ExitCode {
    edge_gateway::cli_main()
}
