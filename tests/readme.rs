//! The README's Rust snippet, run as written against a broker (only the URL differs).

use hare_suite::TestBroker;
use lapin::{options::*, types::FieldTable, BasicProperties, Connection, ConnectionProperties};

#[tokio::test]
async fn readme_lapin_snippet_publishes_a_message_that_can_be_fetched() -> Result<(), lapin::Error>
{
    let broker = TestBroker::start();
    let conn = Connection::connect(broker.url(), ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let queue = format!("tasks-{}", std::process::id());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default(),
        )
        .await?
        .await?;
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .expect("the published message is in the queue");
    assert_eq!(got.delivery.data, b"hello");
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}
