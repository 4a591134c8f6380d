//! Python's paho-mqtt (Debian's python3-paho-mqtt, installed by
//! scripts/test.sh) as a third independent client: a persistent session at
//! QoS 2 gets what was published while it was away, once each, and a
//! retained message with its RETAIN flag.

use anyhow::Result;
use edge_tests::{TestGateway, unique};
use tokio::process::Command;

const SCRIPT: &str = r#"
import sys, time
import paho.mqtt.client as mqtt

port, cid, topic, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
got, state = [], {}

def on_connect(c, u, flags, rc):
    state["present"] = flags.get("session present", 0)
    state["rc"] = rc
    if phase == "subscribe":
        c.subscribe(topic + "/#", qos=2)

def on_subscribe(c, u, mid, granted):
    state["granted"] = granted

def on_message(c, u, m):
    got.append("%d %d %s %s" % (m.retain, m.qos, m.topic, m.payload.decode()))

c = mqtt.Client(client_id=cid, clean_session=False)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
deadline = time.time() + 20
want = int(sys.argv[5]) if len(sys.argv) > 5 else 0
while time.time() < deadline:
    if phase == "subscribe" and "granted" in state:
        break
    if phase == "resume" and len(got) >= want:
        break
    time.sleep(0.02)
c.disconnect()
c.loop_stop()
print("present", state.get("present"), "rc", state.get("rc"), "granted", state.get("granted"))
for line in got:
    print(line)
"#;

async fn run_paho(args: &[&str]) -> Result<Vec<String>> {
    crate::run_python("paho-mqtt", SCRIPT, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_client_resumes_its_qos2_session_and_gets_the_retained_message() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.mqtt_addr().port();
    let id = unique("paho");
    let topic = format!("{id}/t");
    let first = run_paho(&[&port.to_string(), &id, &topic, "subscribe"]).await?;
    assert_eq!(first[0], "present 0 rc 0 granted (2,)", "{first:?}");

    edge_tests::mqtt::mosquitto_pub(port, &format!("{topic}/a"), "one", 2).await?;
    edge_tests::mqtt::mosquitto_pub(port, &format!("{topic}/b"), "two", 1).await?;
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "2", "-r"])
        .args(["-t", &format!("{topic}/r"), "-m", "kept"])
        .output()
        .await?;
    assert!(out.status.success());

    let resumed = run_paho(&[&port.to_string(), &id, &topic, "resume", "3"]).await?;
    assert_eq!(resumed[0], "present 1 rc 0 granted None", "{resumed:?}");
    // Queued while away: at the QoS they were published with (≤ granted),
    // once each; RETAIN is 0 on messages for an existing subscription.
    // (paho hands a QoS 2 message over at PUBREL, so the order of its
    // callbacks across QoS levels is paho's, not the wire's.)
    let mut got = resumed[1..].to_vec();
    got.sort();
    assert_eq!(
        got,
        [
            format!("0 1 {topic}/b two"),
            format!("0 2 {topic}/a one"),
            format!("0 2 {topic}/r kept"),
        ]
    );
    gw.shutdown().await?;
    Ok(())
}
