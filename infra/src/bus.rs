//! The message bus services use for commands: NATS in a distributed deployment, an
//! in-process bus with the same request/reply and queue-group semantics in the embedded
//! default. Services are written once against [`Bus`] and run unchanged on either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Nobody subscribes to the subject: the service is not running. Retry later.
    #[error("no service answers on {0}")]
    NoResponders(String),
    /// The service did not answer in time; the outcome is unknown. Retry with the same
    /// command id (commands are idempotent).
    #[error("no reply on {0} within {1:?}")]
    Timeout(String, Duration),
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// How a received request is answered.
pub enum ReplyTo {
    Nats(async_nats::Client, async_nats::Subject),
    InProcess(oneshot::Sender<Vec<u8>>),
}

pub struct BusMessage {
    pub subject: String,
    pub payload: Vec<u8>,
    pub reply: Option<ReplyTo>,
}

impl BusMessage {
    /// Sends the reply, if the sender asked for one.
    pub async fn respond(self, body: Vec<u8>) {
        match self.reply {
            Some(ReplyTo::Nats(client, subject)) => {
                if let Err(error) = client.publish(subject, body.into()).await {
                    tracing::warn!(%error, "could not publish a reply");
                }
            }
            Some(ReplyTo::InProcess(sender)) => {
                let _ = sender.send(body);
            }
            None => {}
        }
    }
}

pub enum BusSubscription {
    Nats(async_nats::Client, async_nats::Subscriber),
    InProcess(mpsc::Receiver<BusMessage>),
}

impl BusSubscription {
    pub async fn next(&mut self) -> Option<BusMessage> {
        match self {
            BusSubscription::Nats(client, subscriber) => {
                let message = subscriber.next().await?;
                Some(BusMessage {
                    subject: message.subject.to_string(),
                    payload: message.payload.to_vec(),
                    reply: message
                        .reply
                        .map(|reply| ReplyTo::Nats(client.clone(), reply)),
                })
            }
            BusSubscription::InProcess(receiver) => receiver.recv().await,
        }
    }
}

#[derive(Clone)]
pub enum Bus {
    Nats(async_nats::Client),
    InProcess(InProcessBus),
}

impl Bus {
    pub async fn connect_nats(url: &str) -> Result<Bus, BusError> {
        // A service that starts while NATS is briefly down keeps trying in the
        // background (and reconnects after any later outage) instead of exiting.
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(3))
            .retry_on_initial_connect()
            .name("chartline")
            .connect(url)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot connect to NATS at {url}: {e}")))?;
        Ok(Bus::Nats(client))
    }

    pub fn in_process() -> Bus {
        Bus::InProcess(InProcessBus::default())
    }

    pub fn nats_client(&self) -> Option<&async_nats::Client> {
        match self {
            Bus::Nats(client) => Some(client),
            Bus::InProcess(_) => None,
        }
    }

    /// Subscribes to a subject pattern (`*` one token, `>` the rest) in a queue group:
    /// each message goes to one member of the group.
    pub async fn queue_subscribe(
        &self,
        pattern: &str,
        queue: &str,
    ) -> Result<BusSubscription, BusError> {
        match self {
            Bus::Nats(client) => client
                .queue_subscribe(pattern.to_string(), queue.to_string())
                .await
                .map(|subscriber| BusSubscription::Nats(client.clone(), subscriber))
                .map_err(|e| BusError::Unavailable(e.to_string())),
            Bus::InProcess(bus) => Ok(BusSubscription::InProcess(bus.subscribe(pattern, queue))),
        }
    }

    /// Request/reply with a bounded wait.
    pub async fn request(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, BusError> {
        match self {
            Bus::Nats(client) => {
                let request = async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(timeout));
                client
                    .send_request(subject.to_string(), request)
                    .await
                    .map(|message| message.payload.to_vec())
                    .map_err(|e| match e.kind() {
                        async_nats::client::RequestErrorKind::NoResponders => {
                            BusError::NoResponders(subject.to_string())
                        }
                        async_nats::client::RequestErrorKind::TimedOut => {
                            BusError::Timeout(subject.to_string(), timeout)
                        }
                        _ => BusError::Unavailable(e.to_string()),
                    })
            }
            Bus::InProcess(bus) => bus.request(subject, payload, timeout).await,
        }
    }
}

/// Subject matching with NATS semantics: tokens split on '.', `*` matches one token,
/// a final `>` matches one or more.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match token {
            ">" => return subject_tokens.next().is_some(),
            "*" => {
                if subject_tokens.next().is_none() {
                    return false;
                }
            }
            literal => {
                if subject_tokens.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    subject_tokens.next().is_none()
}

struct Subscriber {
    pattern: String,
    queue: String,
    sender: mpsc::Sender<BusMessage>,
}

/// In-process bus: queue groups pick members round-robin; a closed member is dropped.
#[derive(Clone, Default)]
pub struct InProcessBus {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    next_member: Arc<Mutex<HashMap<String, usize>>>,
}

impl InProcessBus {
    fn subscribe(&self, pattern: &str, queue: &str) -> mpsc::Receiver<BusMessage> {
        let (sender, receiver) = mpsc::channel(1_024);
        self.subscribers.lock().expect("bus lock").push(Subscriber {
            pattern: pattern.to_string(),
            queue: queue.to_string(),
            sender,
        });
        receiver
    }

    fn pick(&self, subject: &str) -> Option<mpsc::Sender<BusMessage>> {
        let mut subscribers = self.subscribers.lock().expect("bus lock");
        subscribers.retain(|s| !s.sender.is_closed());
        let members: Vec<&Subscriber> = subscribers
            .iter()
            .filter(|s| subject_matches(&s.pattern, subject))
            .collect();
        if members.is_empty() {
            return None;
        }
        let mut next = self.next_member.lock().expect("bus lock");
        let counter = next.entry(members[0].queue.clone()).or_insert(0);
        *counter = counter.wrapping_add(1);
        Some(members[*counter % members.len()].sender.clone())
    }

    async fn request(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, BusError> {
        let sender = self
            .pick(subject)
            .ok_or_else(|| BusError::NoResponders(subject.to_string()))?;
        let (reply, response) = oneshot::channel();
        sender
            .send(BusMessage {
                subject: subject.to_string(),
                payload,
                reply: Some(ReplyTo::InProcess(reply)),
            })
            .await
            .map_err(|_| BusError::NoResponders(subject.to_string()))?;
        match tokio::time::timeout(timeout, response).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(BusError::Unavailable(format!(
                "{subject}: the service dropped the request"
            ))),
            Err(_) => Err(BusError::Timeout(subject.to_string(), timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns_follow_nats() {
        assert!(subject_matches(
            "chartline.cmd.*.billing.*",
            "chartline.cmd.a.billing.assign"
        ));
        assert!(!subject_matches(
            "chartline.cmd.*.billing.*",
            "chartline.cmd.a.rpm.enroll"
        ));
        assert!(!subject_matches(
            "chartline.cmd.*.billing.*",
            "chartline.cmd.a.billing.x.y"
        ));
        assert!(subject_matches(
            "chartline.evt.>",
            "chartline.evt.a.encounter.Scheduled"
        ));
        assert!(!subject_matches("chartline.evt.>", "chartline.evt"));
    }

    #[tokio::test]
    async fn in_process_request_reply_and_no_responders() {
        let bus = Bus::in_process();
        assert!(matches!(
            bus.request("a.b", vec![], Duration::from_millis(50)).await,
            Err(BusError::NoResponders(_))
        ));
        let mut subscription = bus.queue_subscribe("a.*", "q").await.unwrap();
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let mut body = message.payload.clone();
                body.reverse();
                message.respond(body).await;
            }
        });
        let reply = bus
            .request("a.b", vec![1, 2, 3], Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(reply, vec![3, 2, 1]);
    }
}
