//! The store contract, one async fn per property, generic over the backend.

use std::collections::HashSet;
use std::time::Duration;

use chartline_infra::store::Subscription;
use chartline_infra::{Direction, EventStore, ExpectedVersion, ReadScope, StoreError};
use chartline_proto::{Actor, ActorKind, Metadata, NewEvent, StreamId, TenantId};
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

pub fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

pub fn new_stream() -> StreamId {
    StreamId::for_aggregate("encounter", Uuid::now_v7())
}

pub fn event(tenant: &TenantId, n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "TestHappened".into(),
        schema_version: 1,
        data: json!({ "n": n, "note": "synthetic" }),
        metadata: Metadata {
            tenant: tenant.clone(),
            actor: Actor::new(ActorKind::Service, "tester"),
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            source: "conformance".into(),
            occurred_at: Utc::now(),
            contains_phi: false,
        },
    }
}

pub fn events(tenant: &TenantId, count: u64) -> Vec<NewEvent> {
    (1..=count).map(|n| event(tenant, n)).collect()
}

/// A tenant with one stream of `count` events.
pub async fn seeded_stream<S: EventStore>(store: &S, count: u64) -> (TenantId, StreamId) {
    let tenant = tenant("clinic-a");
    store.ensure_tenant(&tenant).await.unwrap();
    let stream = new_stream();
    store
        .append(
            &tenant,
            &stream,
            ExpectedVersion::NoStream,
            events(&tenant, count),
        )
        .await
        .unwrap();
    (tenant, stream)
}

async fn event_count<S: EventStore>(store: &S) -> u64 {
    store.stats().await.unwrap().events
}

pub async fn append_then_read_round_trips_with_a_valid_chain<S: EventStore>(store: S) {
    let tenant = tenant("clinic-a");
    store.ensure_tenant(&tenant).await.unwrap();
    let stream = new_stream();
    let batch = events(&tenant, 3);
    let first = store
        .append(&tenant, &stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert_eq!((first.first_version, first.last_version), (1, 3));
    assert_eq!(first.last_position - first.first_position, 2);
    assert!(!first.deduplicated);
    let second = store
        .append(
            &tenant,
            &stream,
            ExpectedVersion::Exact(3),
            vec![event(&tenant, 4)],
        )
        .await
        .unwrap();
    assert_eq!((second.first_version, second.last_version), (4, 4));
    assert_eq!(second.first_position, first.last_position + 1);

    let read = store
        .read_stream(&tenant, &stream, 1, Direction::Forwards, 100)
        .await
        .unwrap();
    assert_eq!(read.len(), 4);
    for (index, stored) in read.iter().enumerate() {
        assert_eq!(stored.stream_version, index as u64 + 1);
        assert_eq!(stored.stream_id, stream);
        if index < 3 {
            assert_eq!(stored.event_id, batch[index].event_id);
            assert_eq!(stored.data, batch[index].data);
            assert_eq!(stored.metadata, batch[index].metadata);
        }
    }
    assert_eq!(read[0].prev_hash, chartline_proto::hash::GENESIS_HASH);
    assert_eq!(read[1].prev_hash, read[0].hash);
    let report = store.verify_stream(&tenant, &stream).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events_checked, 4);
    let all = store
        .read_all(&ReadScope::AllTenants, 0, 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    assert!(
        all.windows(2)
            .all(|w| w[1].global_position == w[0].global_position + 1)
    );
    assert_eq!(store.head_position().await.unwrap(), second.last_position);
}

pub async fn expected_version_is_enforced_and_conflicts_write_nothing<S: EventStore>(store: S) {
    let (tenant, stream) = seeded_stream(&store, 2).await;
    let before = event_count(&store).await;
    let conflict = store
        .append(
            &tenant,
            &stream,
            ExpectedVersion::NoStream,
            events(&tenant, 5),
        )
        .await
        .unwrap_err();
    assert_eq!(
        conflict,
        StoreError::Conflict {
            stream: stream.clone(),
            expected: ExpectedVersion::NoStream,
            actual: Some(2)
        }
    );
    let stale = store
        .append(
            &tenant,
            &stream,
            ExpectedVersion::Exact(1),
            events(&tenant, 5),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            stale,
            StoreError::Conflict {
                actual: Some(2),
                ..
            }
        ),
        "{stale:?}"
    );
    let missing = store
        .append(
            &tenant,
            &new_stream(),
            ExpectedVersion::Exact(1),
            events(&tenant, 1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StoreError::Conflict { actual: None, .. }),
        "{missing:?}"
    );
    assert_eq!(
        event_count(&store).await,
        before,
        "a rejected batch wrote something"
    );
    let any = store
        .append(&tenant, &stream, ExpectedVersion::Any, events(&tenant, 2))
        .await
        .unwrap();
    assert_eq!(any.last_version, 4);
}

pub async fn appends_are_idempotent_by_event_id<S: EventStore>(store: S) {
    let tenant = tenant("clinic-a");
    store.ensure_tenant(&tenant).await.unwrap();
    let stream = new_stream();
    let batch = events(&tenant, 3);
    let original = store
        .append(&tenant, &stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    store
        .append(&tenant, &stream, ExpectedVersion::Any, events(&tenant, 1))
        .await
        .unwrap();
    // A client retry after a lost reply, even with a now-stale expected version.
    let retry = store
        .append(&tenant, &stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(retry.deduplicated);
    assert_eq!(
        (
            retry.first_position,
            retry.last_position,
            retry.first_version,
            retry.last_version
        ),
        (original.first_position, original.last_position, 1, 3)
    );
    assert_eq!(event_count(&store).await, 4);
    // Same id, different content: a typed error, nothing stored.
    let mut reused = batch[0].clone();
    reused.data = json!({"n": 42});
    let error = store
        .append(&tenant, &stream, ExpectedVersion::Any, vec![reused.clone()])
        .await
        .unwrap_err();
    assert_eq!(error, StoreError::EventIdReused(reused.event_id));
    // Mixing stored and new ids in one batch is a client error.
    let mixed = vec![batch[1].clone(), event(&tenant, 9)];
    let error = store
        .append(&tenant, &stream, ExpectedVersion::Any, mixed)
        .await
        .unwrap_err();
    assert_eq!(error, StoreError::PartiallyStoredBatch(batch[1].event_id));
    assert_eq!(event_count(&store).await, 4);
}

pub async fn read_stream_pages_forwards_and_backwards<S: EventStore>(store: S) {
    let (tenant, stream) = seeded_stream(&store, 10).await;
    let forwards = store
        .read_stream(&tenant, &stream, 4, Direction::Forwards, 3)
        .await
        .unwrap();
    assert_eq!(
        forwards
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    let backwards = store
        .read_stream(&tenant, &stream, 10, Direction::Backwards, 4)
        .await
        .unwrap();
    assert_eq!(
        backwards
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        vec![10, 9, 8, 7]
    );
    let from_end = store
        .read_stream(&tenant, &stream, u64::MAX, Direction::Backwards, 1)
        .await
        .unwrap();
    assert_eq!(from_end[0].stream_version, 10);
    let past_end = store
        .read_stream(&tenant, &stream, 11, Direction::Forwards, 5)
        .await
        .unwrap();
    assert!(past_end.is_empty());
    let whole = chartline_infra::store::read_whole_stream(&store, &tenant, &stream)
        .await
        .unwrap();
    assert_eq!(whole.len(), 10);
}

pub async fn tenants_are_isolated<S: EventStore>(store: S) {
    let (tenant_a, stream) = seeded_stream(&store, 3).await;
    let tenant_b = tenant("clinic-b");
    store.ensure_tenant(&tenant_b).await.unwrap();
    let b_stream = new_stream();
    store
        .append(
            &tenant_b,
            &b_stream,
            ExpectedVersion::NoStream,
            events(&tenant_b, 2),
        )
        .await
        .unwrap();
    assert!(
        store
            .read_stream(&tenant_b, &stream, 1, Direction::Forwards, 10)
            .await
            .unwrap()
            .is_empty(),
        "tenant B read tenant A's stream"
    );
    let b_view = store
        .read_all(&ReadScope::Tenant(tenant_b.clone()), 0, 100)
        .await
        .unwrap();
    assert_eq!(b_view.len(), 2);
    assert!(b_view.iter().all(|e| e.metadata.tenant == tenant_b));
    let verify = store.verify_stream(&tenant_b, &stream).await.unwrap();
    assert_eq!(verify.events_checked, 0);
    let error = store
        .append(
            &tenant_b,
            &stream,
            ExpectedVersion::Any,
            events(&tenant_b, 1),
        )
        .await
        .unwrap_err();
    assert_eq!(error, StoreError::ForeignStream(stream.clone()));
    assert_eq!(
        store
            .read_all(&ReadScope::Tenant(tenant_a), 0, 100)
            .await
            .unwrap()
            .len(),
        3
    );
}

pub async fn bad_input_is_rejected_and_changes_nothing<S: EventStore>(store: S) {
    let (tenant, stream) = seeded_stream(&store, 1).await;
    let before = event_count(&store).await;
    assert_eq!(
        store
            .append(&tenant, &stream, ExpectedVersion::Any, vec![])
            .await
            .unwrap_err(),
        StoreError::EmptyBatch
    );
    let mut huge = event(&tenant, 1);
    huge.data = json!({ "blob": "x".repeat(1024 * 1024 + 1) });
    assert!(matches!(
        store
            .append(
                &tenant,
                &stream,
                ExpectedVersion::Any,
                vec![event(&tenant, 0), huge]
            )
            .await
            .unwrap_err(),
        StoreError::EventTooLarge {
            limit: 1_048_576,
            ..
        }
    ));
    let stranger = tenant_unknown();
    assert_eq!(
        store
            .append(
                &stranger,
                &new_stream(),
                ExpectedVersion::Any,
                events(&stranger, 1)
            )
            .await
            .unwrap_err(),
        StoreError::UnknownTenant("nobody-registered".into())
    );
    let mut bad_type = event(&tenant, 1);
    bad_type.event_type = "evt.with.dots".into();
    assert!(matches!(
        store
            .append(&tenant, &stream, ExpectedVersion::Any, vec![bad_type])
            .await
            .unwrap_err(),
        StoreError::InvalidInput(_)
    ));
    let other = TenantId::parse("clinic-z").unwrap();
    store.ensure_tenant(&other).await.unwrap();
    assert!(matches!(
        store
            .append(&tenant, &stream, ExpectedVersion::Any, events(&other, 1))
            .await
            .unwrap_err(),
        StoreError::InvalidInput(_)
    ));
    let duplicate = event(&tenant, 1);
    assert!(matches!(
        store
            .append(
                &tenant,
                &stream,
                ExpectedVersion::Any,
                vec![duplicate.clone(), duplicate]
            )
            .await
            .unwrap_err(),
        StoreError::InvalidInput(_)
    ));
    assert_eq!(event_count(&store).await, before);
    // Invalid stream ids cannot even be constructed.
    assert!(StreamId::parse("no spaces-allowed").is_err());
}

fn tenant_unknown() -> TenantId {
    tenant("nobody-registered")
}

pub async fn concurrent_writers_on_one_stream_get_exactly_one_winner_per_version<S: EventStore>(
    store: S,
) {
    let (tenant, stream) = seeded_stream(&store, 1).await;
    // Round after round, 32 writers race with the same expected version.
    for round in 1..=5u64 {
        let mut tasks = Vec::new();
        for writer in 0..32u64 {
            let store = store.clone();
            let tenant = tenant.clone();
            let stream = stream.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .append(
                        &tenant,
                        &stream,
                        ExpectedVersion::Exact(round),
                        vec![event(&tenant, writer)],
                    )
                    .await
            }));
        }
        let mut winners = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(result) => {
                    winners += 1;
                    assert_eq!(result.last_version, round + 1);
                }
                Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Some(round + 1)),
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
        assert_eq!(winners, 1, "round {round}: exactly one writer must win");
    }
    let all = chartline_infra::store::read_whole_stream(&store, &tenant, &stream)
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    let ids: HashSet<_> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 6);
    assert!(
        store
            .verify_stream(&tenant, &stream)
            .await
            .unwrap()
            .is_intact()
    );
}

/// What one append of a burst should end as.
#[derive(Debug)]
enum Expect {
    Stored(u64),
    Conflict,
    UnknownTenant,
    Deduplicated(u64),
    EventIdReused,
}

/// A burst of concurrent appends (grouped into one commit directly; sent together as
/// `append_many` requests over NATS) still gives every caller its own outcome: a
/// conflict, an unknown tenant, a retry or a reused id fails or deduplicates only that
/// append, the others are stored exactly once.
pub async fn concurrent_appends_keep_their_own_outcomes<S: EventStore>(store: S) {
    let (tenant_a, stream_a) = seeded_stream(&store, 2).await;
    let tenant_b = tenant("clinic-b");
    store.ensure_tenant(&tenant_b).await.unwrap();
    let stored_batch = events(&tenant_a, 2);
    let stored = store
        .append(
            &tenant_a,
            &new_stream(),
            ExpectedVersion::NoStream,
            stored_batch.clone(),
        )
        .await
        .unwrap();
    for round in 0..3u64 {
        let before = event_count(&store).await;
        let mut burst: Vec<(TenantId, StreamId, ExpectedVersion, Vec<NewEvent>, Expect)> =
            Vec::new();
        for n in 0..16 {
            let count = 1 + n % 3;
            burst.push((
                tenant_a.clone(),
                new_stream(),
                ExpectedVersion::NoStream,
                events(&tenant_a, count),
                Expect::Stored(count),
            ));
        }
        for _ in 0..4 {
            burst.push((
                tenant_b.clone(),
                new_stream(),
                ExpectedVersion::NoStream,
                events(&tenant_b, 1),
                Expect::Stored(1),
            ));
        }
        burst.push((
            tenant_a.clone(),
            stream_a.clone(),
            ExpectedVersion::Exact(1),
            events(&tenant_a, 1),
            Expect::Conflict,
        ));
        burst.push((
            tenant_unknown(),
            new_stream(),
            ExpectedVersion::NoStream,
            events(&tenant_unknown(), 1),
            Expect::UnknownTenant,
        ));
        burst.push((
            tenant_a.clone(),
            stored.stream_id.clone(),
            ExpectedVersion::NoStream,
            stored_batch.clone(),
            Expect::Deduplicated(stored.first_position),
        ));
        let mut reused = stored_batch[0].clone();
        reused.data = json!({ "n": 1000 + round });
        burst.push((
            tenant_a.clone(),
            new_stream(),
            ExpectedVersion::NoStream,
            vec![reused],
            Expect::EventIdReused,
        ));
        let tasks: Vec<_> = burst
            .into_iter()
            .map(|(tenant, stream, expected, batch, expect)| {
                let store = store.clone();
                tokio::spawn(async move {
                    let result = store.append(&tenant, &stream, expected, batch).await;
                    (result, expect)
                })
            })
            .collect();
        let mut new_events = 0;
        let mut positions = HashSet::new();
        for task in tasks {
            let (result, expect) = task.await.unwrap();
            match (&expect, result) {
                (Expect::Stored(count), Ok(result)) => {
                    assert!(!result.deduplicated);
                    assert_eq!(result.last_position - result.first_position + 1, *count);
                    assert_eq!((result.first_version, result.last_version), (1, *count));
                    for position in result.first_position..=result.last_position {
                        assert!(positions.insert(position), "position {position} twice");
                    }
                    new_events += count;
                }
                (Expect::Conflict, Err(StoreError::Conflict { actual, .. })) => {
                    assert_eq!(actual, Some(2));
                }
                (Expect::UnknownTenant, Err(StoreError::UnknownTenant(_))) => {}
                (Expect::Deduplicated(first), Ok(result)) => {
                    assert!(result.deduplicated);
                    assert_eq!(result.first_position, *first);
                }
                (Expect::EventIdReused, Err(StoreError::EventIdReused(_))) => {}
                (expect, result) => panic!("round {round}: {expect:?} but got {result:?}"),
            }
        }
        assert_eq!(event_count(&store).await, before + new_events);
    }
    let report = store.verify_all(&ReadScope::AllTenants).await.unwrap();
    assert!(report.is_intact());
}

pub async fn subscription_catches_up_then_goes_live_without_gap_or_duplicate<S: EventStore>(
    store: S,
) {
    let tenant = tenant("clinic-a");
    store.ensure_tenant(&tenant).await.unwrap();
    // 200 events before the subscription starts, 4 writers × 50 batches of 3 during.
    for _ in 0..20 {
        store
            .append(
                &tenant,
                &new_stream(),
                ExpectedVersion::NoStream,
                events(&tenant, 10),
            )
            .await
            .unwrap();
    }
    let expected_total = 200 + 4 * 50 * 3;
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let tenant = tenant.clone();
            tokio::spawn(async move {
                let stream = new_stream();
                for batch in 0..50u64 {
                    let expected = if batch == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(batch * 3)
                    };
                    store
                        .append(&tenant, &stream, expected, events(&tenant, 3))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    let mut subscription = Subscription::new(store.clone(), ReadScope::AllTenants, 0)
        .with_page_size(64)
        .with_poll_interval(Duration::from_millis(10));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < expected_total {
        let event = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .expect("subscription stalled")
            .unwrap();
        seen.push(event);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let positions: Vec<u64> = seen.iter().map(|e| e.global_position).collect();
    assert_eq!(positions, (1..=expected_total as u64).collect::<Vec<_>>());
    let ids: HashSet<_> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), expected_total, "an event was delivered twice");
    // Each stream's events arrive in version order.
    let mut last_version = std::collections::HashMap::new();
    for event in seen.iter() {
        let previous = last_version.insert(event.stream_id.clone(), event.stream_version);
        assert_eq!(previous.unwrap_or(0) + 1, event.stream_version);
    }
    // Nothing more arrives: no duplicate after the seam.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), subscription.next())
            .await
            .is_err()
    );
}

pub async fn old_schema_versions_are_upcast_on_read_but_verify_on_stored_bytes<S: EventStore>(
    store: S,
) {
    let tenant = tenant("clinic-a");
    store.ensure_tenant(&tenant).await.unwrap();
    let stream = new_stream();
    let mut legacy = event(&tenant, 1);
    legacy.event_type = "NoteDrafted".into();
    legacy.schema_version = 1;
    legacy.data = json!({
        "author": {"kind": "clinician", "practitioner_id": "dr-legacy"},
        "body": "S: synthetic complaint\nA: synthetic assessment\nP: synthetic plan",
        "at": "2019-05-01T10:00:00Z"
    });
    store
        .append(
            &tenant,
            &stream,
            ExpectedVersion::NoStream,
            vec![legacy.clone()],
        )
        .await
        .unwrap();
    let read = store
        .read_stream(&tenant, &stream, 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(read[0].schema_version, 2);
    assert_eq!(
        read[0].data["sections"]["assessment"],
        "synthetic assessment"
    );
    // A raw read (the projection engine's) is upcast too, its payload text the same value.
    let position = read[0].global_position;
    let raw = store
        .read_all_raw(&ReadScope::AllTenants, position - 1, 1)
        .await
        .unwrap();
    assert_eq!(raw[0].envelope.event_id, read[0].event_id);
    assert_eq!(raw[0].envelope.schema_version, 2);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&raw[0].data).unwrap(),
        read[0].data
    );
    let decoded: chartline_domain::encounter::EncounterEvent =
        chartline_proto::codec::decode(&read[0]).unwrap();
    assert!(matches!(
        decoded,
        chartline_domain::encounter::EncounterEvent::NoteDrafted(_)
    ));
    // The stored bytes are untouched: the chain verifies against them.
    assert!(
        store
            .verify_stream(&tenant, &stream)
            .await
            .unwrap()
            .is_intact()
    );
    // Re-sending the v1 event is still recognised as the same event.
    assert!(
        store
            .append(&tenant, &stream, ExpectedVersion::Any, vec![legacy])
            .await
            .unwrap()
            .deduplicated
    );
}

/// A page far bigger than the first decoding chunk (the SQLite store decodes big pages
/// on two threads and puts the chunks back together) equals the same log read in pages
/// of 100: same events, same order, positions contiguous; for all tenants and for one.
pub async fn big_read_all_pages_equal_small_pages_in_log_order<S: EventStore>(store: S) {
    let (tenant_a, tenant_b) = (tenant("clinic-a"), tenant("clinic-b"));
    store.ensure_tenant(&tenant_a).await.unwrap();
    store.ensure_tenant(&tenant_b).await.unwrap();
    let streams: Vec<(TenantId, StreamId)> = (0..6)
        .map(|i| {
            let owner = if i % 2 == 0 { &tenant_a } else { &tenant_b };
            (owner.clone(), new_stream())
        })
        .collect();
    // Interleaved batches, so both tenants' events alternate through the log.
    for round in 0..10u64 {
        for (owner, stream) in &streams {
            let batch = (1..=50).map(|n| event(owner, round * 50 + n)).collect();
            store
                .append(owner, stream, ExpectedVersion::Any, batch)
                .await
                .unwrap();
        }
    }
    let total = 6 * 10 * 50;
    let read = |scope: ReadScope, page: usize| {
        let store = &store;
        async move {
            let mut all = Vec::new();
            let mut after = 0;
            loop {
                let batch = store.read_all(&scope, after, page).await.unwrap();
                let Some(last) = batch.last() else { break };
                after = last.global_position;
                all.extend(batch);
            }
            all
        }
    };
    let summary = |events: &[chartline_proto::EventEnvelope]| -> Vec<(u64, Uuid, String, u64, serde_json::Value)> {
        events
            .iter()
            .map(|e| {
                (
                    e.global_position,
                    e.event_id,
                    e.stream_id.to_string(),
                    e.stream_version,
                    e.data.clone(),
                )
            })
            .collect()
    };
    let small = read(ReadScope::AllTenants, 100).await;
    assert_eq!(small.len(), total);
    let positions: Vec<u64> = small.iter().map(|e| e.global_position).collect();
    assert_eq!(positions, (1..=total as u64).collect::<Vec<_>>());
    for page in [total, 1_337, 5_000] {
        let big = read(ReadScope::AllTenants, page).await;
        assert_eq!(summary(&big), summary(&small), "pages of {page}");
    }
    // Raw reads (payload as text) deliver the same events in the same order.
    for page in [total, 1_337] {
        let mut raw = Vec::new();
        let mut after = 0;
        loop {
            let batch = store
                .read_all_raw(&ReadScope::AllTenants, after, page)
                .await
                .unwrap();
            let Some(last) = batch.last() else { break };
            after = last.envelope.global_position;
            raw.extend(batch.into_iter().map(|r| {
                let mut envelope = r.envelope;
                envelope.data = serde_json::from_str(&r.data).unwrap();
                envelope
            }));
        }
        assert_eq!(raw, small, "raw pages of {page}");
    }
    let only_a: Vec<_> = small
        .iter()
        .filter(|e| e.metadata.tenant == tenant_a)
        .cloned()
        .collect();
    let big_a = read(ReadScope::Tenant(tenant_a.clone()), 5_000).await;
    assert_eq!(summary(&big_a), summary(&only_a));
}

/// Two store instances on one database — two processes, or a standby taking over while
/// the old writer still runs. Each writer plans from what it remembers (the positions,
/// stream versions and hashes it last committed) and writes without reading first; the
/// other one's appends make that memory stale. Every answer must still be the one a
/// store with no memory gives: stale expected versions conflict with the true version,
/// fresh ones succeed, and the log stays gap-free with every chain intact.
pub async fn two_writers_on_one_database_never_answer_from_stale_memory<S: EventStore>(a: S, b: S) {
    let tenant = tenant("clinic-a");
    a.ensure_tenant(&tenant).await.unwrap();
    let stream = new_stream();
    let one = |n| vec![event(&tenant, n)];

    // A remembers the stream at version 1; B moves it to 2.
    a.append(&tenant, &stream, ExpectedVersion::NoStream, one(1))
        .await
        .unwrap();
    b.append(&tenant, &stream, ExpectedVersion::Exact(1), one(2))
        .await
        .unwrap();
    let stale = a
        .append(&tenant, &stream, ExpectedVersion::Exact(1), one(3))
        .await
        .unwrap_err();
    assert_eq!(
        stale,
        StoreError::Conflict {
            stream: stream.clone(),
            expected: ExpectedVersion::Exact(1),
            actual: Some(2)
        }
    );
    let third = a
        .append(&tenant, &stream, ExpectedVersion::Exact(2), one(3))
        .await
        .unwrap();
    assert_eq!((third.first_version, third.first_position), (3, 3));

    // B still remembers version 2 and position 2: both are stale now.
    let any = b
        .append(&tenant, &stream, ExpectedVersion::Any, one(4))
        .await
        .unwrap();
    assert_eq!((any.first_version, any.first_position), (4, 4));

    // A stream one writer created is not new to the other.
    let created_by_b = new_stream();
    b.append(&tenant, &created_by_b, ExpectedVersion::NoStream, one(1))
        .await
        .unwrap();
    let not_new = a
        .append(&tenant, &created_by_b, ExpectedVersion::NoStream, one(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            not_new,
            StoreError::Conflict {
                actual: Some(1),
                ..
            }
        ),
        "{not_new:?}"
    );
    // Nor is it another tenant's to write to, whatever A remembers.
    let other = TenantId::parse("clinic-b").unwrap();
    a.ensure_tenant(&other).await.unwrap();
    let foreign = a
        .append(
            &other,
            &created_by_b,
            ExpectedVersion::Any,
            vec![event(&other, 1)],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(foreign, StoreError::ForeignStream(_)),
        "{foreign:?}"
    );

    // Both writers at once, with exact expected versions on shared streams: each append
    // either lands at the version it expected or conflicts, and retries from the
    // version the conflict reports.
    let shared: Vec<StreamId> = (0..4).map(|_| new_stream()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (writer, store) in [(0, a.clone()), (1, b.clone())] {
        for task in 0..4 {
            let (store, tenant, shared) = (store.clone(), tenant.clone(), shared.clone());
            tasks.spawn(async move {
                let stream = &shared[(writer + task) % shared.len()];
                let mut expected = ExpectedVersion::NoStream;
                let mut landed = 0u64;
                while landed < 25 {
                    match store
                        .append(&tenant, stream, expected, vec![event(&tenant, landed)])
                        .await
                    {
                        Ok(result) => {
                            let want = match expected {
                                ExpectedVersion::NoStream => 1,
                                ExpectedVersion::Exact(v) => v + 1,
                                ExpectedVersion::Any => unreachable!(),
                            };
                            assert_eq!(result.first_version, want, "landed where expected");
                            expected = ExpectedVersion::Exact(result.last_version);
                            landed += 1;
                        }
                        Err(StoreError::Conflict {
                            actual: Some(actual),
                            ..
                        }) => expected = ExpectedVersion::Exact(actual),
                        Err(error) => panic!("writer {writer}: {error:?}"),
                    }
                }
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }

    // 4 + 1 events before the race and 8 tasks × 25 in it, at positions 1..=N in order.
    let log = a.read_all(&ReadScope::AllTenants, 0, 10_000).await.unwrap();
    let positions: Vec<u64> = log.iter().map(|e| e.global_position).collect();
    assert_eq!(positions, (1..=205).collect::<Vec<u64>>(), "gap-free log");
    for stream in &shared {
        let versions: Vec<u64> = a
            .read_stream(&tenant, stream, 1, Direction::Forwards, 1_000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(
            versions,
            (1..=50).collect::<Vec<u64>>(),
            "two tasks × 25 each"
        );
    }
    for store in [&a, &b] {
        let report = store.verify_all(&ReadScope::AllTenants).await.unwrap();
        assert!(report.breaks.is_empty(), "{:?}", report.breaks);
        assert_eq!(report.events_checked, 205);
    }
}
