//! Bad configuration: exit code 64, every problem named, nothing started.

use std::time::Duration;

use anyhow::Context;
use edge_tests::gateway::run_binary;
use tokio::io::AsyncReadExt;

use crate::gateway_bin;

const EX_CONFIG: i32 = 64;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn check_config_lists_every_problem_with_key_and_allowed_values() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(
        &dir,
        "bad.toml",
        r##"
[mqtt]
listen = "everywhere"

[store]
when_full = "explode"

[[route]]
name = "r"
filter = "a/#/b"
upstream = "nowhere"
"##,
    );
    let (code, out) = run_binary(gateway_bin(), &["check-config", &file]).await?;
    assert_eq!(code, Some(EX_CONFIG), "output:\n{out}");
    for needle in [
        "mqtt.listen",
        "everywhere",
        "store.when_full",
        "explode",
        "\"reject\"",
        "route[0].filter",
        "route[0].upstream",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    Ok(())
}

#[tokio::test]
async fn check_config_accepts_a_good_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(
        &dir,
        "good.toml",
        r##"
[gateway]
id = "edge-1"

[[upstream]]
name = "central"
uris = ["amqp://guest:guest@127.0.0.1:5672/%2f"]

[[route]]
name = "all"
filter = "#"
upstream = "central"
"##,
    );
    let (code, out) = run_binary(gateway_bin(), &["check-config", &file]).await?;
    assert_eq!(code, Some(0), "output:\n{out}");
    Ok(())
}

#[tokio::test]
async fn check_config_checks_routes_over_a_local_exchange() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let upstream = "[[upstream]]\nname = \"central\"\nuris = [\"amqp://127.0.0.1:5672/%2f\"]\n";
    let good = write(
        &dir,
        "good.toml",
        &format!(
            "{upstream}[[route]]\nname = \"orders\"\nlocal_exchange = \"orders\"\nlocal_routing_key = \"eu.*.#\"\nupstream = \"central\"\n"
        ),
    );
    let (code, out) = run_binary(gateway_bin(), &["check-config", &good]).await?;
    assert_eq!(code, Some(0), "output:\n{out}");
    let bad = write(
        &dir,
        "bad.toml",
        &format!(
            "{upstream}[[route]]\nname = \"both\"\nfilter = \"a/#\"\nlocal_exchange = \"amq.topic\"\nupstream = \"central\"\n\
             [[route]]\nname = \"inner\"\nlocal_exchange = \"orders\"\nlocal_routing_key = \"eu.#.x\"\nupstream = \"central\"\n"
        ),
    );
    let (code, out) = run_binary(gateway_bin(), &["check-config", &bad]).await?;
    assert_eq!(code, Some(EX_CONFIG), "output:\n{out}");
    for needle in [
        "route[0].filter",
        "not both",
        "route[0].local_exchange",
        "other than amq.topic",
        "route[1].local_routing_key",
        "eu.#.x",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    Ok(())
}

#[tokio::test]
async fn unknown_key_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(
        &dir,
        "typo.toml",
        "[mqtt]\nlisten_addr = \"127.0.0.1:1883\"\n",
    );
    let (code, out) = run_binary(gateway_bin(), &["check-config", &file]).await?;
    assert_eq!(code, Some(EX_CONFIG), "output:\n{out}");
    assert!(out.contains("listen_addr"), "unknown key not named:\n{out}");
    Ok(())
}

#[tokio::test]
async fn running_with_a_bad_config_exits_64_before_starting_anything() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Hold the MQTT port: a gateway that bound before validating would
    // fail on it instead of reporting the config problem.
    let held = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = held.local_addr()?.port();
    let data_dir = dir.path().join("data");
    let file = write(
        &dir,
        "bad.toml",
        &format!(
            "[gateway]\ndata_dir = {:?}\n\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n\n[store]\nmax_bytes = \"lots\"\n",
            data_dir.display().to_string()
        ),
    );
    let (code, out) = run_binary(gateway_bin(), &["--config", &file]).await?;
    assert_eq!(code, Some(EX_CONFIG), "output:\n{out}");
    assert!(out.contains("store.max_bytes"), "bad key not named:\n{out}");
    assert!(
        !data_dir.exists(),
        "the store was created despite the bad config"
    );
    Ok(())
}

#[tokio::test]
async fn missing_config_file_is_named_and_fails() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope.toml").display().to_string();
    let (code, out) = run_binary(gateway_bin(), &["--config", &missing]).await?;
    // EX_CONFIG or EX_NOINPUT (sysexits.h) both say what happened.
    assert!(
        matches!(code, Some(64 | 66)),
        "exit code {code:?}, output:\n{out}"
    );
    assert!(out.contains("nope.toml"), "file not named:\n{out}");
    Ok(())
}

/// Issue 5: an `amqps://` upstream is never served by a plain TCP
/// connection. Whatever answers on its port gets a TLS ClientHello, never
/// the AMQP protocol header, on the first attempt and on every retry (a
/// failed handshake does not fall back), and the password is not printed.
#[tokio::test]
async fn amqps_upstream_speaks_tls_and_never_falls_back_to_clear() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A broker port that is not TLS: it reads what the gateway sends, then
    // hangs up, so every attempt fails its handshake.
    let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = broker.local_addr()?.port();
    let data_dir = dir.path().join("data");
    let file = write(
        &dir,
        "amqps.toml",
        &format!(
            r##"
[gateway]
id = "edge-1"
data_dir = {data_dir:?}

[mqtt]
listen = "127.0.0.1:0"

[metrics]
enabled = false

[[upstream]]
name = "central"
uris = ["amqps://guest:secret@127.0.0.1:{port}/%2f"]
reconnect_min = "50ms"
reconnect_max = "100ms"

[[route]]
name = "all"
filter = "#"
upstream = "central"
"##,
            data_dir = data_dir.display().to_string()
        ),
    );
    let (code, out) = run_binary(gateway_bin(), &["check-config", file.as_str()]).await?;
    assert_eq!(code, Some(0), "amqps:// is a valid upstream:\n{out}");
    assert!(!out.contains("secret"), "password printed:\n{out}");

    let log = std::fs::File::create(dir.path().join("gateway.log"))?;
    let mut gateway = tokio::process::Command::new(gateway_bin())
        .args(["--config", file.as_str()])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    for attempt in 0..3 {
        let (mut stream, _) = tokio::time::timeout(Duration::from_secs(30), broker.accept())
            .await
            .with_context(|| format!("attempt {attempt}: the gateway never connected"))??;
        let mut first = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut first)).await??;
        assert_ne!(
            &first[..4],
            b"AMQP",
            "attempt {attempt}: AMQP header in clear"
        );
        // A TLS record: handshake (22), version 3.x.
        assert_eq!(
            (first[0], first[1]),
            (0x16, 0x03),
            "attempt {attempt}: {first:02x?}"
        );
    }
    assert!(
        gateway.try_wait()?.is_none(),
        "the gateway stays up while the link fails"
    );
    gateway.kill().await?;
    let logged = std::fs::read_to_string(dir.path().join("gateway.log"))?;
    assert!(!logged.contains("secret"), "password logged:\n{logged}");
    Ok(())
}
