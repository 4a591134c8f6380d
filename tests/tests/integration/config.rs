//! Bad configuration: exit code 64, every problem named, nothing started.

use std::time::Duration;

use anyhow::bail;
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

/// Issue 5: an `amqps://` upstream must not be served by a plain TCP
/// connection. Until TLS exists the URI is refused as a config problem, with
/// the password kept out of the output, and nothing reaches the broker's port.
#[tokio::test]
async fn amqps_upstream_is_refused_and_never_contacted_in_clear() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Stands in for a TLS broker: whatever connects to it is a downgrade.
    let broker = std::net::TcpListener::bind("127.0.0.1:0")?;
    broker.set_nonblocking(true)?;
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
uris = ["amqp://guest:guest@127.0.0.1:1/%2f", "amqps://guest:secret@127.0.0.1:{port}/%2f"]

[[route]]
name = "all"
filter = "#"
upstream = "central"
"##,
            data_dir = data_dir.display().to_string()
        ),
    );

    for args in [["check-config", file.as_str()], ["--config", file.as_str()]] {
        let (code, out) = run_binary(gateway_bin(), &args).await?;
        assert_eq!(code, Some(EX_CONFIG), "{args:?}, output:\n{out}");
        assert!(
            out.contains("upstream[0].uris[1]"),
            "{args:?}: key not named:\n{out}"
        );
        assert!(
            out.contains("amqps://"),
            "{args:?}: value not shown:\n{out}"
        );
        assert!(
            !out.contains("secret"),
            "{args:?}: password printed:\n{out}"
        );
    }
    assert!(
        !data_dir.exists(),
        "the store was created despite the bad config"
    );

    // Both processes have exited, so any connection they made has completed
    // its handshake and waits in the accept queue; the deadline is margin.
    let broker = tokio::net::TcpListener::from_std(broker)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    if let Ok(accepted) = tokio::time::timeout_at(deadline, broker.accept()).await {
        let (mut stream, peer) = accepted?;
        let mut sent = Vec::new();
        // The peer has exited: the read ends at EOF or a reset.
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut sent)).await;
        bail!(
            "the gateway connected to the amqps:// port from {peer} and sent {sent:?} \
             (AMQP 0-9-1 protocol header in clear: {})",
            sent.starts_with(b"AMQP\x00\x00\x09\x01")
        );
    }
    Ok(())
}
