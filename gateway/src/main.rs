fn main() -> std::process::ExitCode {
    edge_gateway::cli_main()
}
