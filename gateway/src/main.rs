// jemalloc with its background purge thread instead of glibc malloc. After
// 2,000 subscribed MQTT connections come and go, glibc keeps ~44 MB of freed
// memory (an arena shrinks only from its top; MALLOC_ARENA_MAX=1 changes
// nothing) and ratchets with each wave, 52 -> 69 -> 78 MB; jemalloc's
// background thread purges freed pages within ~20 s even while the gateway is
// idle, back to ~16 MB after every wave. mimalloc, tried too, purges only
// inside allocator calls, so an idle gateway kept 33-49 MB. Figures:
// benches/RESULTS.md ("Memory after connection churn", `conn-churn`).
// jemalloc's page size is fixed at build time: .cargo/config.toml builds it for
// 64 KiB pages so the same build runs on 4, 16 (Raspberry Pi 5) and 64 KiB
// page kernels. Only this binary chooses the allocator, never a library crate.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    edge_gateway::cli_main()
}
