//! A damaged store file at start-up: moved aside by default so the gateway
//! keeps accepting data, or a refusal to start with `on_corrupt = "refuse"`.

use edge_tests::mqtt::publish_one;
use edge_tests::{TestGateway, unique};

fn root_with_damaged_store() -> anyhow::Result<tempfile::TempDir> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("edge.redb"), vec![0xAB_u8; 64 * 1024])?;
    Ok(root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_moved_aside_and_the_gateway_starts_fresh() -> anyhow::Result<()> {
    let gw = TestGateway::builder()
        .root(root_with_damaged_store()?)
        .start()
        .await?;

    let names: Vec<String> = std::fs::read_dir(gw.data_dir())?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("edge.redb.corrupt-")),
        "the damaged file was not kept aside: {names:?}"
    );
    let before = gw.store().stats().next_seq;
    publish_one(gw.mqtt_addr(), &unique("after/corruption"), b"accepted").await?;
    // Committed (it has a seq); with no upstream nothing keeps it after.
    assert_eq!(
        gw.store().stats().next_seq,
        before + 1,
        "the fresh store took the message"
    );
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_corrupt_refuse_keeps_the_file_and_does_not_start() -> anyhow::Result<()> {
    // The builder deletes its root when start fails; the damaged data
    // directory lives outside it (linked in) so the test can look at it.
    let outer = root_with_damaged_store()?;
    let data = outer.path().join("data");
    let root = tempfile::tempdir()?;
    std::os::unix::fs::symlink(&data, root.path().join("data"))?;
    let result = TestGateway::builder()
        .set("store.on_corrupt", "\"refuse\"")
        .root(root)
        .start()
        .await;
    let err = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        err.contains("damaged"),
        "the gateway started on a damaged store: {err:?}"
    );
    assert!(
        data.join("edge.redb").exists(),
        "the damaged file was moved despite \"refuse\""
    );
    Ok(())
}
