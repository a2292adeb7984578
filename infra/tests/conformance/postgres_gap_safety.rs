//! Gap safety on PostgreSQL, the property a position-paging reader depends on.
//!
//! 1. A writer that holds its transaction open (an external process writing through the
//!    same lock protocol) keeps every other append from committing a higher position:
//!    the reader cannot skip it, because nothing commits past it.
//! 2. The blunt version: 8 concurrent writers append 100,000 events while two
//!    subscribers tail the global log in pages of 100 and of 1,000. Each receives every
//!    event exactly once, each stream in version order, both in the same total order;
//!    a subscriber stopped midway and resumed from its checkpoint continues exactly.

use std::collections::HashMap;
use std::time::Duration;

use chartline_infra::store::Subscription;
use chartline_infra::store::postgres::WRITE_LOCK_KEY;
use chartline_infra::{EventStore, ExpectedVersion, ReadScope};
use chartline_proto::EventEnvelope;

use super::harness::postgres_store;
use super::properties::{event, events, new_stream, seeded_stream, tenant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_write_transaction_blocks_higher_positions_from_committing() {
    let (store, _guard) = postgres_store().await;
    let (tenant, stream) = seeded_stream(&store, 1).await;
    // A slow writer in "another process": takes the lock, inserts position 2, waits.
    let mut held = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITE_LOCK_KEY)
        .execute(&mut *held)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (global_position, event_id, tenant_id, stream_id, stream_version, event_type, \
         schema_version, data, metadata, recorded_at, prev_hash, hash) \
         VALUES (2, 'held-event', 'clinic-a', 'held-stream', 1, 'Held', 1, '{}', '{}', 'x', 'x', 'x')",
    )
    .execute(&mut *held)
    .await
    .unwrap();
    // Meanwhile other writers try to append.
    let writer = {
        let store = store.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            store
                .append(
                    &tenant,
                    &new_stream(),
                    ExpectedVersion::NoStream,
                    events(&tenant, 5),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let visible = store
        .read_all(&ReadScope::AllTenants, 1, 100)
        .await
        .unwrap();
    assert!(
        visible.is_empty(),
        "a higher position committed past a held transaction"
    );
    assert!(!writer.is_finished(), "the writer must wait for the lock");
    held.commit().await.unwrap();
    let result = writer.await.unwrap().unwrap();
    assert_eq!(
        result.first_position, 3,
        "positions continue after the held event"
    );
    let positions: Vec<u64> =
        sqlx::query_scalar::<_, i64>("SELECT global_position FROM events ORDER BY 1")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|p| p as u64)
            .collect();
    assert_eq!(positions, (1..=7).collect::<Vec<_>>());
    let _ = stream;
}

async fn tail(
    store: chartline_infra::store::postgres::PostgresStore,
    page: usize,
    total: usize,
    stop_after: Option<usize>,
    after: u64,
) -> (Vec<(u64, String, u64, uuid::Uuid)>, u64) {
    let mut subscription = Subscription::new(store.clone(), ReadScope::AllTenants, after)
        .with_page_size(page)
        .with_wake(Some(store.head_watch()))
        .with_poll_interval(Duration::from_millis(20));
    let mut seen = Vec::with_capacity(total);
    let limit = stop_after.unwrap_or(total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while seen.len() < limit {
        let event: EventEnvelope = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .expect("subscriber stalled")
            .unwrap();
        seen.push((
            event.global_position,
            event.stream_id.to_string(),
            event.stream_version,
            event.event_id,
        ));
    }
    (seen, subscription.position())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_100k_events_two_tailing_subscribers_see_each_event_once_in_order() {
    const WRITERS: u64 = 8;
    const BATCHES: u64 = 1_250;
    const BATCH: u64 = 10;
    let total = (WRITERS * BATCHES * BATCH) as usize;
    let (store, _guard) = postgres_store().await;
    let tenant = tenant("clinic-a");
    store.ensure_tenant(&tenant).await.unwrap();

    let small_pages = tokio::spawn(tail(store.clone(), 100, total, None, 0));
    let large_pages = tokio::spawn(tail(store.clone(), 1_000, total, None, 0));
    let interrupted = tokio::spawn(tail(store.clone(), 250, total, Some(total / 3), 0));

    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            let tenant = tenant.clone();
            tokio::spawn(async move {
                // Each writer spreads its batches over 25 streams.
                let streams: Vec<_> = (0..25).map(|_| new_stream()).collect();
                let mut versions = vec![0u64; streams.len()];
                for batch in 0..BATCHES {
                    let slot = (batch % 25) as usize;
                    let expected = match versions[slot] {
                        0 => ExpectedVersion::NoStream,
                        v => ExpectedVersion::Exact(v),
                    };
                    let batch_events = (0..BATCH).map(|n| event(&tenant, n)).collect();
                    let result = store
                        .append(&tenant, &streams[slot], expected, batch_events)
                        .await
                        .unwrap();
                    versions[slot] = result.last_version;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let (first_part, checkpoint) = interrupted.await.unwrap();
    let (rest, _) = tail(
        store.clone(),
        250,
        total - first_part.len(),
        None,
        checkpoint,
    )
    .await;
    let resumed: Vec<_> = first_part.into_iter().chain(rest).collect();
    let (small, _) = small_pages.await.unwrap();
    let (large, _) = large_pages.await.unwrap();

    for (name, seen) in [
        ("pages of 100", &small),
        ("pages of 1,000", &large),
        ("resumed", &resumed),
    ] {
        assert_eq!(seen.len(), total, "{name}: wrong count");
        let positions: Vec<u64> = seen.iter().map(|e| e.0).collect();
        assert_eq!(
            positions,
            (1..=total as u64).collect::<Vec<_>>(),
            "{name}: gap or duplicate"
        );
        let unique: std::collections::HashSet<_> = seen.iter().map(|e| e.3).collect();
        assert_eq!(unique.len(), total, "{name}: an event id delivered twice");
        let mut versions: HashMap<&str, u64> = HashMap::new();
        for (_, stream, version, _) in seen.iter() {
            let last = versions.insert(stream.as_str(), *version).unwrap_or(0);
            assert_eq!(
                last + 1,
                *version,
                "{name}: stream {stream} out of version order"
            );
        }
    }
    assert_eq!(small, large, "two subscribers disagree on the total order");
    assert_eq!(
        small, resumed,
        "a resumed subscriber did not continue exactly"
    );
    assert_eq!(store.stats().await.unwrap().events, total as u64);
}
