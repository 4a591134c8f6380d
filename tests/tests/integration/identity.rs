//! The gateway identity (prefix of every message id) belongs with the log:
//! made up once when none is configured, then kept across restarts.

use edge_config::Config;
use edge_gateway::Gateway;

async fn start(data_dir: &std::path::Path, id: Option<&str>) -> anyhow::Result<Gateway> {
    let id_line = id.map(|id| format!("id = {id:?}\n")).unwrap_or_default();
    let text = format!(
        "[gateway]\n{id_line}data_dir = {:?}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[metrics]\nenabled = false\n",
        data_dir.display().to_string()
    );
    Gateway::start(Config::parse(&text)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfigured_id_is_generated_once_and_kept() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let first = start(root.path(), None).await?;
    let id = first.id().to_string();
    let (host, suffix) = id.rsplit_once('-').expect("<host>-<hex>");
    assert!(!host.is_empty() && suffix.len() == 8, "{id}");
    assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    first.shutdown().await?;

    let again = start(root.path(), None).await?;
    assert_eq!(again.id(), id, "the recorded id is reused after a restart");
    again.shutdown().await?;

    let configured = start(root.path(), Some("edge-42")).await?;
    assert_eq!(configured.id(), "edge-42", "a configured id wins");
    configured.shutdown().await?;
    let after = start(root.path(), None).await?;
    assert_eq!(after.id(), "edge-42", "and is recorded for later starts");
    after.shutdown().await?;
    Ok(())
}
