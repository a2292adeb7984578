//! The command path every service shares: load the stream, fold it, call the pure
//! `decide`, append with the expected version, retry on conflict (bounded), reply.
//!
//! Idempotency: a command carries a client-chosen `command_id`, recorded as the
//! `causation_id` of every event it causes, and the event ids are derived from it
//! deterministically. Re-sending an accepted command finds its events on the stream and
//! returns the same reply without appending; a retry racing the original is
//! deduplicated by the store on the derived event ids. (EventStoreDB keeps subscription
//! checkpoints and idempotency the same way: in the streams themselves.)

use std::time::Duration;

use chartline_domain::Aggregate;
use chartline_proto::codec::{DomainEvent, decode, encode};
use chartline_proto::commands::{CommandReply, CommandRequest, RejectionCode};
use chartline_proto::{Actor, EventEnvelope, Metadata, NewEvent, StreamId, TenantId};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::bus::{Bus, BusMessage};
use crate::store::{EventStore, ExpectedVersion, StoreError, read_stream_tail};

/// How often a command is re-decided after losing an optimistic-concurrency race.
pub const MAX_CONFLICT_RETRIES: u32 = 8;

/// Who sent a command and why; becomes the events' metadata.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub tenant: TenantId,
    pub command_id: Uuid,
    pub actor: Actor,
    pub correlation_id: Uuid,
    /// The service that handles the command (recorded as the events' source).
    pub source: String,
}

/// Deterministic event id for the `index`-th event a command causes on a stream at a
/// version: a retry that decides the same events produces the same ids.
pub fn derived_event_id(command_id: Uuid, stream: &StreamId, version: u64) -> Uuid {
    let mut hasher = Sha256::new();
    hasher.update(command_id.as_bytes());
    hasher.update(stream.as_str().as_bytes());
    hasher.update(version.to_be_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A deterministic UUID (v8) from string parts: reactors derive command and event ids
/// from the triggering event this way, so redelivery repeats the same ids.
pub fn derived_uuid(parts: &[&str]) -> Uuid {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

fn rejected(code: RejectionCode, message: impl Into<String>) -> CommandReply {
    CommandReply::Rejected {
        code,
        message: message.into(),
    }
}

fn store_rejection(error: StoreError) -> CommandReply {
    match error {
        StoreError::Unavailable(message) => rejected(RejectionCode::Unavailable, message),
        StoreError::UnknownTenant(tenant) => rejected(
            RejectionCode::UnauthorizedTenant,
            format!("unknown tenant {tenant}"),
        ),
        StoreError::ForeignStream(stream) => rejected(
            RejectionCode::UnauthorizedTenant,
            format!("{stream} is not accessible to this tenant"),
        ),
        StoreError::Conflict { .. } => rejected(RejectionCode::Conflict, error.to_string()),
        other => rejected(RejectionCode::Validation, other.to_string()),
    }
}

/// Runs one command against one aggregate stream. Never panics on bad input; every
/// outcome is a [`CommandReply`].
pub async fn execute<A, S>(
    store: &S,
    stream: &StreamId,
    command: &A::Command,
    context: &CommandContext,
) -> CommandReply
where
    A: Aggregate,
    A::Event: DomainEvent,
    S: EventStore,
{
    execute_from::<A, S>(store, stream, command, context, &[], A::default()).await
}

/// [`execute`] for a caller that already holds a prefix of the stream — its envelopes
/// from version 1 on, and the aggregate folded from exactly those (a reactor that keeps
/// the streams it works on). Only the tail after the prefix is read and decoded; the
/// result is the same as `execute`'s, because a stream only grows and the append's
/// expected version still catches anything written meanwhile (a conflict re-reads the
/// tail). A prefix that does not run 1, 2, 3, … is ignored (the whole stream is read).
pub async fn execute_from<A, S>(
    store: &S,
    stream: &StreamId,
    command: &A::Command,
    context: &CommandContext,
    known: &[EventEnvelope],
    known_state: A,
) -> CommandReply
where
    A: Aggregate,
    A::Event: DomainEvent,
    S: EventStore,
{
    let contiguous = known
        .iter()
        .enumerate()
        .all(|(index, e)| e.stream_version == index as u64 + 1);
    let (known, prefix) = if contiguous {
        (known, known_state)
    } else {
        (&[][..], A::default())
    };
    for _attempt in 0..=MAX_CONFLICT_RETRIES {
        let from = known.last().map_or(1, |e| e.stream_version + 1);
        let tail = match read_stream_tail(store, &context.tenant, stream, from).await {
            Ok(tail) => tail,
            Err(error) => return store_rejection(error),
        };
        if let Some(reply) = prior_reply(stream, known, &tail, context.command_id) {
            return reply;
        }
        let mut state = prefix.clone();
        for envelope in &tail {
            match decode::<A::Event>(envelope) {
                Ok(event) => state.apply(&event),
                Err(error) => {
                    return rejected(
                        RejectionCode::Unavailable,
                        format!("stream {stream} holds an unreadable event: {error}"),
                    );
                }
            }
        }
        let produced = match state.decide(command) {
            Ok(events) => events,
            Err(error) => return rejected(RejectionCode::Invariant, error.to_string()),
        };
        let version = tail.last().or(known.last()).map_or(0, |e| e.stream_version);
        if produced.is_empty() {
            return CommandReply::Accepted {
                stream_id: stream.clone(),
                version,
                global_position: 0,
                event_ids: vec![],
            };
        }
        let events: Vec<NewEvent> = produced
            .iter()
            .enumerate()
            .map(|(index, event)| to_new_event(event, stream, version + 1 + index as u64, context))
            .collect();
        let event_ids = events.iter().map(|e| e.event_id).collect();
        let expected = match version {
            0 => ExpectedVersion::NoStream,
            v => ExpectedVersion::Exact(v),
        };
        match store
            .append(&context.tenant, stream, expected, events)
            .await
        {
            Ok(result) => {
                return CommandReply::Accepted {
                    stream_id: stream.clone(),
                    version: result.last_version,
                    global_position: result.last_position,
                    event_ids,
                };
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => return store_rejection(error),
        }
    }
    rejected(
        RejectionCode::Conflict,
        format!("{stream} kept changing; gave up after {MAX_CONFLICT_RETRIES} retries"),
    )
}

fn to_new_event<E: DomainEvent>(
    event: &E,
    stream: &StreamId,
    version: u64,
    context: &CommandContext,
) -> NewEvent {
    let encoded = encode(event);
    let occurred_at = serde_json::to_value(event)
        .ok()
        .and_then(|v| v["data"]["at"].as_str().map(str::to_owned))
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok())
        .map_or_else(chrono::Utc::now, |at| at.with_timezone(&chrono::Utc));
    NewEvent {
        event_id: derived_event_id(context.command_id, stream, version),
        event_type: encoded.event_type.to_string(),
        schema_version: encoded.schema_version,
        data: encoded.data,
        metadata: Metadata {
            tenant: context.tenant.clone(),
            actor: context.actor.clone(),
            correlation_id: context.correlation_id,
            causation_id: Some(context.command_id),
            source: context.source.clone(),
            occurred_at,
            contains_phi: encoded.contains_phi,
        },
    }
}

/// The reply a command already got, if its events are on the stream.
fn prior_reply(
    stream: &StreamId,
    known: &[EventEnvelope],
    tail: &[EventEnvelope],
    command_id: Uuid,
) -> Option<CommandReply> {
    let caused: Vec<&EventEnvelope> = known
        .iter()
        .chain(tail)
        .filter(|e| e.metadata.causation_id == Some(command_id))
        .collect();
    let last = caused.last()?;
    Some(CommandReply::Accepted {
        stream_id: stream.clone(),
        version: last.stream_version,
        global_position: last.global_position,
        event_ids: caused.iter().map(|e| e.event_id).collect(),
    })
}

/// A service's command table: the names it accepts (the last subject token) and the
/// payload field that names the aggregate instance.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    pub name: &'static str,
    pub commands: &'static [&'static str],
    /// Payload field holding the aggregate id (`encounter_id`, `patient_id`, …).
    pub target_field: &'static str,
}

/// Parses and routes one raw command message: subject `…cmd.<tenant>.<service>.<command>`,
/// body `CommandRequest` whose payload is the command's fields plus the target id.
pub async fn handle_message<A, S>(
    spec: &ServiceSpec,
    store: &S,
    subject: &str,
    body: &[u8],
) -> CommandReply
where
    A: Aggregate,
    A::Event: DomainEvent,
    A::Command: serde::de::DeserializeOwned + serde::Serialize,
    S: EventStore,
{
    let tokens: Vec<&str> = subject.split('.').collect();
    let [.., kind, tenant, service, command_name] = tokens.as_slice() else {
        return rejected(
            RejectionCode::UnknownCommand,
            format!("bad subject {subject}"),
        );
    };
    if *kind != "cmd" || *service != spec.name {
        return rejected(
            RejectionCode::UnknownCommand,
            format!("bad subject {subject}"),
        );
    }
    let tenant = match TenantId::parse(tenant) {
        Ok(tenant) => tenant,
        Err(error) => return rejected(RejectionCode::UnauthorizedTenant, error.to_string()),
    };
    if !spec.commands.contains(command_name) {
        return rejected(
            RejectionCode::UnknownCommand,
            format!(
                "{} has no command {command_name}; it takes {:?}",
                spec.name, spec.commands
            ),
        );
    }
    let request: CommandRequest<Value> = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(error) => {
            return rejected(
                RejectionCode::Validation,
                format!("malformed command: {error}"),
            );
        }
    };
    let Value::Object(mut payload) = request.payload else {
        return rejected(RejectionCode::Validation, "payload must be a JSON object");
    };
    let target = match payload
        .get(spec.target_field)
        .and_then(Value::as_str)
        .map(Uuid::parse_str)
    {
        Some(Ok(id)) => id,
        _ => {
            return rejected(
                RejectionCode::Validation,
                format!("payload.{} must be a UUID", spec.target_field),
            );
        }
    };
    // The target id also stays in the payload when the command itself carries it
    // (e.g. `schedule`); otherwise it is not a field of the command.
    let mut command_value = payload.clone();
    command_value.insert("command".into(), Value::String((*command_name).to_string()));
    let command: A::Command = match serde_json::from_value(Value::Object(command_value)) {
        Ok(command) => command,
        Err(first_error) => {
            payload.remove(spec.target_field);
            payload.insert("command".into(), Value::String((*command_name).to_string()));
            match serde_json::from_value(Value::Object(payload)) {
                Ok(command) => command,
                Err(_) => {
                    return rejected(
                        RejectionCode::Validation,
                        format!("invalid {command_name} payload: {first_error}"),
                    );
                }
            }
        }
    };
    // A command that names its own target (schedule's encounter_id) must agree.
    let own_target = serde_json::to_value(&command).ok().and_then(|v| {
        v.get(spec.target_field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    if own_target.is_some_and(|own| own != target.to_string()) {
        return rejected(
            RejectionCode::Validation,
            format!("payload.{} disagrees with the command", spec.target_field),
        );
    }
    let stream = StreamId::for_aggregate(A::CATEGORY, target);
    let context = CommandContext {
        tenant,
        command_id: request.command_id,
        actor: request.actor,
        correlation_id: request.correlation_id.unwrap_or(request.command_id),
        source: spec.name.to_string(),
    };
    execute::<A, S>(store, &stream, &command, &context).await
}

/// Serves a service's commands on the bus until `shutdown` resolves, then drains the
/// commands in flight (graceful shutdown: nothing accepted is abandoned mid-way).
pub async fn serve_commands<A, S>(
    spec: ServiceSpec,
    bus: Bus,
    store: S,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), crate::bus::BusError>
where
    A: Aggregate + Send + 'static,
    A::Event: DomainEvent + Send,
    A::Command: serde::de::DeserializeOwned + serde::Serialize + Send + Sync,
    S: EventStore,
{
    serve_requests(bus, root, spec.name, shutdown, move |subject, payload| {
        let store = store.clone();
        async move { handle_message::<A, S>(&spec, &store, &subject, &payload).await }
    })
    .await
}

/// The request/reply loop every command service runs: a queue subscription on
/// `<root>.cmd.*.<service>.*` (one instance handles each command), each message handled
/// on its own task and answered with the handler's reply; on `shutdown` it stops taking
/// messages and drains the ones in flight (30 s at most).
pub async fn serve_requests<H, F>(
    bus: Bus,
    root: &str,
    service: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
    handle: H,
) -> Result<(), crate::bus::BusError>
where
    H: Fn(String, Vec<u8>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = CommandReply> + Send + 'static,
{
    let mut subscription = bus
        .queue_subscribe(
            &format!("{root}.cmd.*.{service}.*"),
            &format!("chartline-{service}"),
        )
        .await?;
    let mut in_flight = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let mut message: BusMessage = tokio::select! {
            message = subscription.next() => match message {
                Some(message) => message,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        // Reap finished handlers so the set stays small.
        while in_flight.try_join_next().is_some() {}
        let reply = handle(
            message.subject.clone(),
            std::mem::take(&mut message.payload),
        );
        in_flight.spawn(async move {
            let body = serde_json::to_vec(&reply.await).expect("replies serialize");
            message.respond(body).await;
        });
    }
    drop(subscription);
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!(service, "shutdown: commands still running after 30 s");
    }
    Ok(())
}

/// Client side: sends a command over the bus and parses the reply. Bus failures become
/// `unavailable` rejections (the caller may retry with the same command id).
pub async fn send_command<P: serde::Serialize>(
    bus: &Bus,
    root: &str,
    tenant: &TenantId,
    service: &str,
    command: &str,
    request: &CommandRequest<P>,
    timeout: Duration,
) -> CommandReply {
    let subject = format!("{root}.cmd.{tenant}.{service}.{command}");
    let body = match serde_json::to_vec(request) {
        Ok(body) => body,
        Err(error) => return rejected(RejectionCode::Validation, error.to_string()),
    };
    match bus.request(&subject, body, timeout).await {
        Ok(reply) => serde_json::from_slice(&reply).unwrap_or_else(|e| {
            rejected(RejectionCode::Unavailable, format!("unreadable reply: {e}"))
        }),
        Err(crate::bus::BusError::NoResponders(subject)) => rejected(
            RejectionCode::Unavailable,
            format!("no service answers on {subject}"),
        ),
        Err(error) => rejected(RejectionCode::Unavailable, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use chartline_domain::Aggregate;
    use chartline_proto::codec::DomainEvent;
    use chartline_proto::commands::{CommandReply, RejectionCode};
    use chartline_proto::{Actor, ActorKind, StreamId, TenantId};
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use super::{CommandContext, execute, execute_from};
    use crate::store::read_whole_stream;
    use crate::store::sqlite::SqliteStore;

    /// A counter that refuses to pass its cap: its decisions depend on every event.
    #[derive(Debug, Clone, Default)]
    struct Counter {
        total: u64,
    }

    #[derive(Debug, Clone)]
    struct Add {
        n: u64,
        cap: u64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum CounterEvent {
        Added { n: u64 },
    }

    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    #[error("the cap would be passed")]
    struct OverCap;

    impl DomainEvent for CounterEvent {
        const CATEGORY: &'static str = "counter";
        fn event_type(&self) -> &'static str {
            "Added"
        }
        fn contains_phi(&self) -> bool {
            false
        }
    }

    impl Aggregate for Counter {
        const CATEGORY: &'static str = "counter";
        type Command = Add;
        type Event = CounterEvent;
        type Error = OverCap;
        fn decide(&self, command: &Add) -> Result<Vec<CounterEvent>, OverCap> {
            if self.total + command.n > command.cap {
                return Err(OverCap);
            }
            Ok(vec![CounterEvent::Added { n: command.n }])
        }
        fn apply(&mut self, event: &CounterEvent) {
            let CounterEvent::Added { n } = event;
            self.total += n;
        }
    }

    fn context(command_id: Uuid) -> CommandContext {
        CommandContext {
            tenant: TenantId::parse("default").unwrap(),
            command_id,
            actor: Actor::new(ActorKind::System, "test"),
            correlation_id: Uuid::now_v7(),
            source: "test".into(),
        }
    }

    /// A caller's prefix only saves reading: the decision still sees the events after
    /// it, a command already in the prefix is answered from it, and a prefix that is not
    /// the stream's start is ignored.
    #[tokio::test]
    async fn execute_from_a_stale_prefix_decides_on_the_whole_stream() {
        let dir = std::env::temp_dir().join(format!("chartline_cmd_{}", Uuid::new_v4().simple()));
        let store = SqliteStore::open(&format!("sqlite://{}/events.db", dir.display()))
            .await
            .unwrap();
        let stream = StreamId::parse("counter-1").unwrap();
        let first = Uuid::now_v7();
        for id in [first, Uuid::now_v7(), Uuid::now_v7()] {
            let reply =
                execute::<Counter, _>(&store, &stream, &Add { n: 1, cap: 8 }, &context(id)).await;
            assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
        }
        let tenant = TenantId::parse("default").unwrap();
        let history = read_whole_stream(&store, &tenant, &stream).await.unwrap();
        let prefix = &history[..2];
        let prefix_state = Counter { total: 2 };

        // Total is 3, not the prefix's 2: adding 6 passes the cap of 8.
        let over = execute_from::<Counter, _>(
            &store,
            &stream,
            &Add { n: 6, cap: 8 },
            &context(Uuid::now_v7()),
            prefix,
            prefix_state.clone(),
        )
        .await;
        assert!(
            matches!(
                over,
                CommandReply::Rejected {
                    code: RejectionCode::Invariant,
                    ..
                }
            ),
            "{over:?}"
        );
        // A retried command found in the prefix gets its original answer.
        let retry = execute_from::<Counter, _>(
            &store,
            &stream,
            &Add { n: 1, cap: 8 },
            &context(first),
            prefix,
            prefix_state.clone(),
        )
        .await;
        assert!(
            matches!(retry, CommandReply::Accepted { version: 1, .. }),
            "{retry:?}"
        );
        // A prefix that does not start at version 1 is not trusted.
        let gapped = execute_from::<Counter, _>(
            &store,
            &stream,
            &Add { n: 6, cap: 8 },
            &context(Uuid::now_v7()),
            &history[1..2],
            Counter { total: 0 },
        )
        .await;
        assert!(
            matches!(
                gapped,
                CommandReply::Rejected {
                    code: RejectionCode::Invariant,
                    ..
                }
            ),
            "{gapped:?}"
        );
        // Within the cap, the append lands after the tail, at version 4.
        let fits = execute_from::<Counter, _>(
            &store,
            &stream,
            &Add { n: 5, cap: 8 },
            &context(Uuid::now_v7()),
            prefix,
            prefix_state,
        )
        .await;
        assert!(
            matches!(fits, CommandReply::Accepted { version: 4, .. }),
            "{fits:?}"
        );
        assert_eq!(
            read_whole_stream(&store, &tenant, &stream)
                .await
                .unwrap()
                .len(),
            4
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
