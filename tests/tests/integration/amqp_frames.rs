//! The AMQP listener at the byte level: a wrong protocol header, bad
//! frames and frames out of order, each answered with the spec's reply
//! code (and the connection still served when only a channel broke).

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{AMQPClass, basic, queue};
use anyhow::Result;
use edge_tests::TestGateway;
use edge_tests::amqp_raw::{RawAmqp, frame_bytes};

fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: Default::default(),
    }))
}

fn publish(key: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: key.into(),
        mandatory: false,
        immediate: false,
    }))
}

fn header(ch: u16, size: u64) -> Vec<u8> {
    frame_bytes(&AMQPFrame::Header(
        ch,
        AMQPContentHeader {
            class_id: 60,
            body_size: size,
            properties: AMQPProperties::default(),
        },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_protocol_header_gets_ours_and_a_close() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    for hello in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"AMQP\x01\x01\x00\x09"] {
        let mut c = RawAmqp::connect(gw.amqp_addr()).await?;
        c.write(hello).await?;
        assert_eq!(c.read_to_end().await?, b"AMQP\x00\x00\x09\x01");
    }
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_end_is_a_frame_error() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let mut c = RawAmqp::open(gw.amqp_addr(), 131_072).await?;
    let mut bytes = frame_bytes(&AMQPFrame::Method(1, declare("q")));
    let end = bytes.len() - 1;
    bytes[end] = 0x00;
    c.write(&bytes).await?;
    let closed = c.expect_connection_close().await?;
    assert_eq!(closed.code, 501, "{closed:?}");
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_above_frame_max_is_refused_from_its_header() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let mut c = RawAmqp::open(gw.amqp_addr(), 8192).await?;
    c.open_channel(1).await?;
    // Only the 7-byte header of a 1 GiB body frame: the server cannot be
    // waiting for the rest.
    c.write(&[3, 0, 1, 0x40, 0, 0, 0]).await?;
    let closed = c.expect_connection_close().await?;
    assert_eq!(closed.code, 501, "{closed:?}");
    assert!(closed.text.contains("frame-max"), "{closed:?}");
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_on_an_unopened_channel_is_a_channel_error() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let mut c = RawAmqp::open(gw.amqp_addr(), 131_072).await?;
    c.method(3, declare("q")).await?;
    let closed = c.expect_connection_close().await?;
    assert_eq!(closed.code, 504, "{closed:?}");
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_out_of_order_is_an_unexpected_frame() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    // A content header with no basic.publish before it.
    let mut c = RawAmqp::open(gw.amqp_addr(), 131_072).await?;
    c.open_channel(1).await?;
    c.write(&header(1, 3)).await?;
    assert_eq!(c.expect_connection_close().await?.code, 505);

    // A body longer than its header announced.
    let mut c = RawAmqp::open(gw.amqp_addr(), 131_072).await?;
    c.open_channel(1).await?;
    c.method(1, publish("q")).await?;
    c.write(&header(1, 3)).await?;
    c.write(&frame_bytes(&AMQPFrame::Body(1, b"four".to_vec())))
        .await?;
    assert_eq!(c.expect_connection_close().await?.code, 505);

    // A method where the content header belongs.
    let mut c = RawAmqp::open(gw.amqp_addr(), 131_072).await?;
    c.open_channel(1).await?;
    c.method(1, publish("q")).await?;
    c.method(1, declare("q")).await?;
    assert_eq!(c.expect_connection_close().await?.code, 505);
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_exception_leaves_the_connection_and_other_channels() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let mut c = RawAmqp::open(gw.amqp_addr(), 131_072).await?;
    c.open_channel(1).await?;
    c.open_channel(2).await?;
    c.method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "missing".into(),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: Default::default(),
        })),
    )
    .await?;
    let closed = c.expect_channel_close(1).await?;
    assert_eq!(closed.code, 404, "{closed:?}");
    assert_eq!((closed.class_id, closed.method_id), (50, 10));
    assert_eq!(closed.text, "NOT_FOUND - no queue 'missing' in vhost '/'");
    // Channel 2 still works, and channel 1 can be opened again.
    c.method(2, declare("")).await?;
    match c.frame().await? {
        AMQPFrame::Method(2, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => {
            assert!(ok.queue.as_str().starts_with("amq.gen-"), "{ok:?}");
        }
        other => panic!("expected queue.declare-ok, got {other}"),
    }
    c.open_channel(1).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_sent_and_a_silent_client_is_closed() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let mut c = RawAmqp::open_tuned(gw.amqp_addr(), 131_072, 1).await?;
    let started = std::time::Instant::now();
    assert_eq!(
        c.frame().await?,
        AMQPFrame::Heartbeat,
        "the server's heartbeat"
    );
    // Silent from here on: two missed intervals close the socket.
    let rest = c.read_to_end().await?;
    assert!(
        rest.iter().all(|b| [8, 0, 0xce].contains(b)),
        "only heartbeats: {rest:?}"
    );
    let after = started.elapsed();
    assert!(
        after >= std::time::Duration::from_secs(2),
        "closed after {after:?}"
    );
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_closed_though_it_sends_heartbeats() -> Result<()> {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    let gw = TestGateway::builder().start().await?;
    let q = edge_tests::unique("unread");
    // More than the socket buffers on both ends and the gateway's own
    // 256 KiB hold.
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await?;
    let body = vec![b'x'; 1 << 20];
    for _ in 0..24 {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            lapin::BasicProperties::default(),
        )
        .await?;
    }
    let mut c = RawAmqp::open_tuned(gw.amqp_addr(), 131_072, 1).await?;
    c.open_channel(1).await?;
    c.method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.as_str().into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: true,
            exclusive: false,
            nowait: true,
            arguments: Default::default(),
        })),
    )
    .await?;
    // Heartbeats out, nothing read: the gateway closes after two intervals
    // without progress, and a write then fails.
    let heartbeat = frame_bytes(&AMQPFrame::Heartbeat);
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            if c.write(&heartbeat).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after 20 s");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_publishes_are_not_implemented_as_in_rabbitmq() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let mut c = RawAmqp::open(gw.amqp_addr(), 131_072).await?;
    c.open_channel(1).await?;
    c.method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: true,
        })),
    )
    .await?;
    let closed = c.expect_connection_close().await?;
    assert_eq!(closed.code, 540, "{closed:?}");
    assert!(closed.text.contains("immediate=true"), "{closed:?}");
    gw.shutdown().await?;
    Ok(())
}
