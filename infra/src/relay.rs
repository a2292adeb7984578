//! The JetStream relay: publishes every committed event, in global-log order, to the
//! JetStream stream `CHARTLINE_EVENTS` on `chartline.evt.<tenant>.<category>.<event_type>`
//! for external consumers.
//!
//! Exactly once, in order, across crashes: the relay's checkpoint is the JetStream
//! stream itself — on start it reads the last stored message's `Chartline-Global-Position`
//! header and continues after it. Every message carries `Nats-Msg-Id = event_id` (the
//! server drops a re-publish inside the duplicate window) and
//! `Nats-Expected-Last-Msg-Id = previous event id`, so a message can only land directly
//! after its predecessor: if one publish of a pipelined window fails, the rest of the
//! window is refused too, and the relay resumes from what the stream really holds.
//! Acks are awaited in windows (one ack at a time caps throughput near 11k msg/s).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use chartline_proto::EventEnvelope;

use crate::checkpoint::CHECKPOINT_CATEGORY;
use crate::store::{EventStore, ReadScope};

pub const HEADER_POSITION: &str = "Chartline-Global-Position";
pub const HEADER_STREAM_ID: &str = "Chartline-Stream-Id";
pub const HEADER_STREAM_VERSION: &str = "Chartline-Stream-Version";
pub const HEADER_EVENT_TYPE: &str = "Chartline-Event-Type";

/// Publish acks awaited per window.
const ACK_WINDOW: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("event store: {0}")]
    Store(#[from] crate::store::StoreError),
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Subject root (`chartline`); tests use their own.
    pub root: String,
    /// JetStream stream name (`CHARTLINE_EVENTS`).
    pub stream_name: String,
    pub poll_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            root: chartline_proto::subjects::ROOT.to_string(),
            stream_name: chartline_proto::subjects::EVENTS_STREAM.to_string(),
            poll_interval: Duration::from_millis(100),
        }
    }
}

fn js_error(error: impl std::fmt::Display) -> RelayError {
    RelayError::JetStream(error.to_string())
}

/// Creates (or reuses) the events stream and returns it.
pub async fn ensure_stream(
    context: &jetstream::Context,
    config: &RelayConfig,
) -> Result<stream::Stream, RelayError> {
    context
        .get_or_create_stream(stream::Config {
            name: config.stream_name.clone(),
            subjects: vec![format!("{}.evt.>", config.root)],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(2 * 60 * 60),
            ..Default::default()
        })
        .await
        .map_err(js_error)
}

/// The last relayed (position, event id), read from the stream itself.
async fn resume_point(stream: &mut stream::Stream) -> Result<(u64, Option<String>), RelayError> {
    let info = stream.info().await.map_err(js_error)?;
    let last_sequence = info.state.last_sequence;
    if info.state.messages == 0 || last_sequence == 0 {
        return Ok((0, None));
    }
    let message = stream
        .get_raw_message(last_sequence)
        .await
        .map_err(js_error)?;
    let headers = message.headers;
    let position = headers
        .get(HEADER_POSITION)
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or_else(|| js_error("last message has no Chartline-Global-Position header"))?;
    let id = headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_string());
    Ok((position, id))
}

fn headers_for(event: &EventEnvelope, previous: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        event.event_id.to_string().as_str(),
    );
    if let Some(previous) = previous {
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID, previous);
    }
    headers.insert(HEADER_POSITION, event.global_position.to_string().as_str());
    headers.insert(HEADER_STREAM_ID, event.stream_id.as_str());
    headers.insert(
        HEADER_STREAM_VERSION,
        event.stream_version.to_string().as_str(),
    );
    headers.insert(HEADER_EVENT_TYPE, event.event_type.as_str());
    headers
}

/// Publishes one page; returns how many events landed before the first failure.
async fn publish_page(
    context: &jetstream::Context,
    config: &RelayConfig,
    page: &[EventEnvelope],
    previous: &mut Option<String>,
) -> Result<usize, RelayError> {
    let mut published = 0;
    for window in page.chunks(ACK_WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        let mut expected_previous = previous.clone();
        for event in window {
            let subject = format!(
                "{}.evt.{}.{}.{}",
                config.root,
                event.metadata.tenant,
                event.category(),
                event.event_type
            );
            let payload = serde_json::to_vec(event).expect("envelopes serialize");
            let ack = context
                .publish_with_headers(
                    subject,
                    headers_for(event, expected_previous.as_deref()),
                    payload.into(),
                )
                .await
                .map_err(js_error)?;
            expected_previous = Some(event.event_id.to_string());
            acks.push((event, ack));
        }
        for (event, ack) in acks {
            match ack.await {
                Ok(_) => {
                    *previous = Some(event.event_id.to_string());
                    published += 1;
                }
                Err(error) => {
                    tracing::warn!(%error, position = event.global_position, "relay publish refused; resuming from the stream");
                    return Ok(published);
                }
            }
        }
    }
    Ok(published)
}

/// Relays until `shutdown` resolves. Safe to kill at any moment and restart.
pub async fn run_relay<S: EventStore>(
    store: S,
    client: async_nats::Client,
    config: RelayConfig,
    mut wake: Option<tokio::sync::watch::Receiver<u64>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), RelayError> {
    let context = jetstream::new(client);
    let mut stream = ensure_stream(&context, &config).await?;
    let (mut position, mut previous) = resume_point(&mut stream).await?;
    tokio::pin!(shutdown);
    loop {
        let page = match store
            .read_all(&ReadScope::AllTenants, position, 1_000)
            .await
        {
            Ok(page) => page,
            Err(error) if error.is_retryable() => {
                tracing::warn!(%error, "relay: store unavailable; retrying");
                Vec::new()
            }
            Err(error) => return Err(error.into()),
        };
        let relayable: Vec<EventEnvelope> = page
            .iter()
            .filter(|e| e.category() != CHECKPOINT_CATEGORY)
            .cloned()
            .collect();
        if page.is_empty() {
            let idle = async {
                match &mut wake {
                    Some(wake) => {
                        let _ = tokio::time::timeout(config.poll_interval, wake.changed()).await;
                    }
                    None => tokio::time::sleep(config.poll_interval).await,
                }
            };
            tokio::select! {
                _ = idle => continue,
                _ = &mut shutdown => return Ok(()),
            }
        }
        let published = match publish_page(&context, &config, &relayable, &mut previous).await {
            Ok(published) => published,
            Err(error) => {
                tracing::warn!(%error, "relay: JetStream unavailable; retrying");
                0
            }
        };
        if published == relayable.len() {
            position = page.last().map_or(position, |e| e.global_position);
        } else {
            // Something was refused: trust only what the stream holds.
            tokio::time::sleep(Duration::from_millis(200)).await;
            match resume_point(&mut stream).await {
                Ok((resumed, id)) => {
                    position = resumed;
                    previous = id;
                }
                Err(error) => {
                    tracing::warn!(%error, "relay: cannot read the stream's last message")
                }
            }
        }
        if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
            return Ok(());
        }
    }
}
