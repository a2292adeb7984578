//! Engine guarantees: crash recovery equals a rebuild, rebuild under concurrent appends
//! loses nothing, poison events are dead-lettered and retried exactly once, replay is
//! idempotent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use chartline_infra::{EventStore, ExpectedVersion};
use chartline_projections::bench::append_synthetic;
use chartline_projections::cache::{CacheControl, Row, RowCache};
use chartline_projections::db::{TableSpec, Tx};
use chartline_projections::models::encounter_view::EncounterViewRow;
use chartline_projections::models::standard_projections;
use chartline_projections::{
    Cell, DeadLetterPolicy, Event, Projection, ProjectionError, ProjectionFactory,
    ProjectionRunner, ReadDb, RunnerConfig, dead_letters, status,
};
use chartline_proto::{Actor, ActorKind, Metadata, NewEvent, StreamId};
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::harness::{Backend, assert_same_rows, dump_all, fresh, fresh_url, tenant};

crate::on_both_backends!(
    crash_mid_batch_then_restart_equals_a_rebuild,
    rebuild_while_events_are_appended_loses_none,
    poison_event_stops_then_retry_applies_it_once,
    poison_event_is_skipped_then_retry_applies_it_once,
    undecodable_event_is_dead_lettered_by_every_reader,
    replaying_the_same_range_twice_changes_nothing,
    rows_put_twice_in_a_batch_keep_the_last,
);

fn config(batch_size: usize, policy: DeadLetterPolicy) -> RunnerConfig {
    RunnerConfig {
        batch_size,
        policy,
        ..RunnerConfig::default()
    }
}

/// Wraps a projection and fails with an infrastructure error (not poison) once the
/// shared counter runs out: the batch's transaction is dropped uncommitted, exactly
/// what a kill -9 in the middle of a batch leaves behind.
struct CrashAfter {
    inner: Box<dyn Projection>,
    remaining: Arc<AtomicI64>,
}

impl Projection for CrashAfter {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn tables(&self) -> Vec<&'static TableSpec> {
        self.inner.tables()
    }
    fn caches(&mut self) -> Vec<&mut dyn CacheControl> {
        self.inner.caches()
    }
    fn apply<'a>(
        &'a mut self,
        tx: &'a mut Tx,
        event: Event<'a>,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            self.inner.apply(tx, event).await?;
            if self.remaining.fetch_sub(1, Ordering::SeqCst) <= 0 {
                return Err(ProjectionError::Config("simulated crash".into()));
            }
            Ok(())
        })
    }
}

async fn crash_mid_batch_then_restart_equals_a_rebuild(backend: Backend) {
    let (store, db, _guard) = fresh(backend).await;
    let appended = append_synthetic(&store, 0, 1_500).await.unwrap();
    let remaining = Arc::new(AtomicI64::new(2_400));
    let crashing: Vec<ProjectionFactory> = standard_projections()
        .into_iter()
        .map(|factory| {
            let remaining = remaining.clone();
            Arc::new(move || {
                Box::new(CrashAfter {
                    inner: factory(),
                    remaining: remaining.clone(),
                }) as Box<dyn Projection>
            }) as ProjectionFactory
        })
        .collect();
    let mut runner = ProjectionRunner::with_projections(
        store.clone(),
        db.clone(),
        crashing,
        config(300, DeadLetterPolicy::Skip),
    )
    .await
    .unwrap();
    assert!(runner.catch_up().await.is_err(), "the crash must surface");
    drop(runner);
    let checkpoints: Vec<u64> = status(&store, &db)
        .await
        .unwrap()
        .iter()
        .map(|s| s.checkpoint)
        .collect();
    assert!(
        checkpoints.iter().any(|c| *c > 0 && *c < appended),
        "the crash left a projection part-way: {checkpoints:?}"
    );

    // Restart with healthy code: resumes from the committed checkpoints.
    let mut runner = ProjectionRunner::with_projections(
        store.clone(),
        db.clone(),
        standard_projections(),
        config(300, DeadLetterPolicy::Skip),
    )
    .await
    .unwrap();
    runner.catch_up().await.unwrap();
    let after_restart = dump_all(&db).await;
    assert!(after_restart.iter().all(|(_, rows)| !rows.is_empty()));
    for name in runner.names() {
        runner.rebuild(name, |_| {}).await.unwrap();
    }
    let rebuilt = dump_all(&db).await;
    assert_same_rows(&after_restart, &rebuilt);
    assert!(dead_letters(&db, None).await.unwrap().is_empty());
}

async fn rebuild_while_events_are_appended_loses_none(backend: Backend) {
    let (store, db, _guard) = fresh(backend).await;
    append_synthetic(&store, 0, 2_000).await.unwrap();
    let mut runner = ProjectionRunner::with_projections(
        store.clone(),
        db.clone(),
        standard_projections(),
        config(200, DeadLetterPolicy::Skip),
    )
    .await
    .unwrap();
    runner.catch_up().await.unwrap();
    let writer = store.clone();
    let appender = tokio::spawn(async move {
        let mut written = 0;
        for round in 0..25u64 {
            written += append_synthetic(&writer, 1_000_000 + round * 1_000, 40)
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        written
    });
    let mut progress_calls = 0;
    runner
        .rebuild("encounter_view", |_| progress_calls += 1)
        .await
        .unwrap();
    runner.rebuild("billing_queue", |_| {}).await.unwrap();
    assert!(progress_calls > 1);
    appender.await.unwrap();
    runner.catch_up().await.unwrap();
    let live = dump_all(&db).await;

    // The same log built from scratch in a separate database (`--read-store`).
    let (other_url, _other_guard) = fresh_url(backend).await;
    let other = ReadDb::open(&other_url).await.unwrap();
    let mut scratch = ProjectionRunner::new(store.clone(), other.clone())
        .await
        .unwrap();
    scratch.catch_up().await.unwrap();
    assert_same_rows(&live, &dump_all(&other).await);
    let encounters = store.stats().await.unwrap();
    let view = live
        .iter()
        .find(|(name, _)| *name == "encounter_view")
        .unwrap();
    assert!(view.1.len() > 40 && encounters.events > 2_000);
}

chartline_projections::read_model_row! {
    pub struct MarkRow in "test_marks" {
        key { event_id: String }
        columns { applied: i64 }
        indexes []
    }
}

/// Counts how often each `marker` event was applied; fails on `{"poison": true}` until
/// `fixed` is set (a code fix). With a [`Gate`], its first apply waits to be released.
/// With `put_by_stream`, it instead writes one row per marker stream with
/// `RowCache::put`, the stream's last marker (its position) winning.
struct Fussy {
    rows: RowCache<MarkRow>,
    fixed: Arc<AtomicBool>,
    gate: Option<Arc<Gate>>,
    put_by_stream: bool,
}

impl Projection for Fussy {
    fn name(&self) -> &'static str {
        "fussy"
    }
    fn tables(&self) -> Vec<&'static TableSpec> {
        vec![MarkRow::TABLE]
    }
    fn caches(&mut self) -> Vec<&mut dyn CacheControl> {
        vec![&mut self.rows]
    }
    fn apply<'a>(
        &'a mut self,
        tx: &'a mut Tx,
        event: Event<'a>,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            if event.envelope.category() != "marker" {
                return Ok(());
            }
            if self.put_by_stream {
                self.rows.put(MarkRow {
                    event_id: event.envelope.stream_id.to_string(),
                    applied: event.envelope.global_position as i64,
                });
                return Ok(());
            }
            if let Some(gate) = &self.gate
                && gate.armed.swap(false, Ordering::SeqCst)
            {
                gate.reached.notify_one();
                gate.release.notified().await;
            }
            if event.envelope.data["poison"] == true && !self.fixed.load(Ordering::SeqCst) {
                return Err(ProjectionError::handler("poison marker: cannot apply"));
            }
            let key = (event.envelope.event_id.to_string(),);
            let row = self
                .rows
                .get_or_insert_with(tx, &key, || MarkRow {
                    event_id: key.0.clone(),
                    applied: 0,
                })
                .await?;
            row.applied += 1;
            Ok(())
        })
    }
}

fn marker(poison: bool) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Marked".into(),
        schema_version: 1,
        data: serde_json::json!({ "poison": poison }),
        metadata: Metadata {
            tenant: tenant(),
            actor: Actor::new(ActorKind::System, "test"),
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            source: "test".into(),
            occurred_at: chrono::Utc::now(),
            contains_phi: false,
        },
    }
}

async fn fussy_runner(
    backend: Backend,
    policy: DeadLetterPolicy,
) -> (
    ProjectionRunner,
    ReadDb,
    Arc<AtomicBool>,
    [Uuid; 3],
    crate::harness::Guard,
) {
    let (store, db, guard) = fresh(backend).await;
    let stream = StreamId::for_aggregate("marker", Uuid::now_v7());
    let events = vec![marker(false), marker(true), marker(false)];
    let ids = [events[0].event_id, events[1].event_id, events[2].event_id];
    store
        .append(&tenant(), &stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let flag = fixed.clone();
    let factory: ProjectionFactory = Arc::new(move || {
        Box::new(Fussy {
            rows: RowCache::default(),
            fixed: flag.clone(),
            gate: None,
            put_by_stream: false,
        })
    });
    let runner =
        ProjectionRunner::with_projections(store, db.clone(), vec![factory], config(100, policy))
            .await
            .unwrap();
    (runner, db, fixed, ids, guard)
}

async fn applied(db: &ReadDb) -> Vec<(String, i64)> {
    db.dump(MarkRow::TABLE, "test_marks")
        .await
        .unwrap()
        .into_iter()
        .map(|row| match (&row[0], &row[1]) {
            (Cell::Text(id), Cell::Int(n)) => (id.clone(), *n),
            other => panic!("unexpected row {other:?}"),
        })
        .collect()
}

async fn poison_event_stops_then_retry_applies_it_once(backend: Backend) {
    let (mut runner, db, fixed, ids, _guard) = fussy_runner(backend, DeadLetterPolicy::Stop).await;
    runner.catch_up().await.unwrap();
    let state = &runner.status().await.unwrap()[0];
    assert_eq!(state.status, "stopped");
    assert_eq!(state.checkpoint, 1);
    assert_eq!(state.dead_letters_open, 1);
    assert!(
        state
            .stopped_reason
            .as_deref()
            .unwrap()
            .contains("poison marker")
    );
    let letters = dead_letters(&db, Some("fussy")).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event_id, ids[1].to_string());
    assert_eq!(letters[0].global_position, 2);
    assert!(letters[0].error.contains("poison marker"));
    assert_eq!(applied(&db).await, vec![(ids[0].to_string(), 1)]);

    // Still broken: retry fails, records the attempt, changes nothing.
    assert!(matches!(
        runner.retry("fussy", ids[1]).await,
        Err(ProjectionError::Handler(_))
    ));
    assert_eq!(dead_letters(&db, None).await.unwrap()[0].attempts, 2);

    fixed.store(true, Ordering::SeqCst);
    let outcome = runner.retry("fussy", ids[1]).await.unwrap();
    assert!(outcome.resumed);
    assert!(matches!(
        runner.retry("fussy", ids[1]).await,
        Err(ProjectionError::Rejected(_))
    ));
    runner.catch_up().await.unwrap();
    let mut expected: Vec<_> = ids.iter().map(|id| (id.to_string(), 1)).collect();
    expected.sort();
    assert_eq!(applied(&db).await, expected);
    let state = &runner.status().await.unwrap()[0];
    assert_eq!(
        (
            state.status.as_str(),
            state.checkpoint,
            state.dead_letters_open
        ),
        ("running", 3, 0)
    );
}

async fn poison_event_is_skipped_then_retry_applies_it_once(backend: Backend) {
    let (mut runner, db, fixed, ids, _guard) = fussy_runner(backend, DeadLetterPolicy::Skip).await;
    runner.catch_up().await.unwrap();
    let state = &runner.status().await.unwrap()[0];
    assert_eq!(
        (
            state.status.as_str(),
            state.checkpoint,
            state.dead_letters_open
        ),
        ("running", 3, 1)
    );
    assert_eq!(applied(&db).await.len(), 2);
    fixed.store(true, Ordering::SeqCst);
    let outcome = runner.retry("fussy", ids[1]).await.unwrap();
    assert!(!outcome.resumed);
    assert!(runner.retry("fussy", ids[1]).await.is_err());
    runner.catch_up().await.unwrap();
    let counts: Vec<i64> = applied(&db).await.into_iter().map(|(_, n)| n).collect();
    assert_eq!(counts, vec![1, 1, 1]);
    let letters = dead_letters(&db, None).await.unwrap();
    assert_eq!(letters[0].status, "resolved");
}

async fn undecodable_event_is_dead_lettered_by_every_reader(backend: Backend) {
    let (store, db, _guard) = fresh(backend).await;
    append_synthetic(&store, 0, 100).await.unwrap();
    let mut broken = marker(false);
    broken.event_type = "Scheduled".into();
    broken.data = serde_json::json!({ "garbage": true });
    let broken_id = broken.event_id;
    store
        .append(
            &tenant(),
            &StreamId::for_aggregate("encounter", Uuid::now_v7()),
            ExpectedVersion::NoStream,
            vec![broken],
        )
        .await
        .unwrap();
    append_synthetic(&store, 10_000, 100).await.unwrap();
    let mut runner = ProjectionRunner::new(store.clone(), db.clone())
        .await
        .unwrap();
    runner.catch_up().await.unwrap();
    let letters = dead_letters(&db, None).await.unwrap();
    let mut readers: Vec<_> = letters.iter().map(|l| l.projection.as_str()).collect();
    readers.sort();
    assert_eq!(
        readers,
        [
            "billing_queue",
            "ehr_writeback",
            "encounter_view",
            "integration_completeness"
        ]
    );
    assert!(letters.iter().all(|l| l.event_id == broken_id.to_string()
        && l.error.contains("does not decode")
        && l.status == "open"));
    let head = store.head_position().await.unwrap();
    for s in runner.status().await.unwrap() {
        assert_eq!(s.checkpoint, head, "{} must not stall", s.name);
    }
}

async fn rewind(db: &ReadDb, position: u64) {
    let mut tx = db.begin().await.unwrap();
    tx.run(
        "UPDATE projection_state SET position = ?, revision = revision + 1",
        &[Cell::Int(position as i64)],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn replaying_the_same_range_twice_changes_nothing(backend: Backend) {
    let (store, db, _guard) = fresh(backend).await;
    append_synthetic(&store, 0, 1_200).await.unwrap();
    let mut runner = ProjectionRunner::with_projections(
        store.clone(),
        db.clone(),
        standard_projections(),
        config(250, DeadLetterPolicy::Stop),
    )
    .await
    .unwrap();
    runner.catch_up().await.unwrap();
    let once = dump_all(&db).await;
    let head = store.head_position().await.unwrap();
    for position in [head / 2, 0] {
        rewind(&db, position).await;
        let report = runner.catch_up().await.unwrap();
        assert_eq!(report.events, head - position);
        assert_same_rows(&once, &dump_all(&db).await);
    }
    let encounter_rows = db
        .dump(EncounterViewRow::TABLE, "encounter_view")
        .await
        .unwrap();
    assert!(!encounter_rows.is_empty());
}

/// Pauses a projection's first apply until released: the moment between applying a
/// batch and committing it.
struct Gate {
    armed: AtomicBool,
    reached: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

/// On SQLite a batch is applied before its write transaction (projections apply in
/// parallel and queue only to write). Another runner that commits in between must
/// make the batch resync instead of committing what it read: without the check at
/// commit, the paused runner would write its batch over the other runner's (counting
/// those markers twice) and move the checkpoint back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_between_applying_and_writing_a_batch_forces_a_resync() {
    let (store, db, _guard) = fresh(Backend::Sqlite).await;
    let stream = StreamId::for_aggregate("marker", Uuid::now_v7());
    let append = |expected| {
        let (store, stream) = (store.clone(), stream.clone());
        async move {
            let events = (0..3).map(|_| marker(false)).collect();
            store
                .append(&tenant(), &stream, expected, events)
                .await
                .unwrap();
        }
    };
    let gate = Arc::new(Gate {
        armed: AtomicBool::new(true),
        reached: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let runner = |gate: Option<Arc<Gate>>| {
        let factory: ProjectionFactory = Arc::new(move || {
            Box::new(Fussy {
                rows: RowCache::default(),
                fixed: Arc::new(AtomicBool::new(true)),
                gate: gate.clone(),
                put_by_stream: false,
            })
        });
        ProjectionRunner::with_projections(
            store.clone(),
            db.clone(),
            vec![factory],
            config(100, DeadLetterPolicy::Stop),
        )
    };
    // The table is not empty when the paused runner starts, so it reads rows from
    // the database rather than knowing them absent.
    append(ExpectedVersion::NoStream).await;
    let mut other = runner(None).await.unwrap();
    other.catch_up().await.unwrap();
    let mut paused = runner(Some(gate.clone())).await.unwrap();
    append(ExpectedVersion::Exact(3)).await;
    let paused = tokio::spawn(async move {
        paused.catch_up().await.unwrap();
        paused
    });
    gate.reached.notified().await;
    other.catch_up().await.unwrap();
    append(ExpectedVersion::Exact(6)).await;
    other.catch_up().await.unwrap();
    gate.release.notify_one();
    let mut paused = paused.await.unwrap();
    paused.catch_up().await.unwrap();

    let marks = applied(&db).await;
    assert_eq!(marks.len(), 9);
    assert!(
        marks.iter().all(|(_, n)| *n == 1),
        "every marker counted once: {marks:?}"
    );
    let state = &status(&store, &db).await.unwrap()[0];
    assert_eq!(state.checkpoint, 9);
    assert_eq!(state.events_applied, 9);
}

/// One upsert may not carry two rows with one key (PostgreSQL refuses it): rows put
/// twice in a batch are written once, the last one put winning, in one batch or many.
async fn rows_put_twice_in_a_batch_keep_the_last(backend: Backend) {
    let (store, db, _guard) = fresh(backend).await;
    let streams: Vec<StreamId> = (0..2)
        .map(|_| StreamId::for_aggregate("marker", Uuid::now_v7()))
        .collect();
    for stream in &streams {
        let events = (0..3).map(|_| marker(false)).collect();
        store
            .append(&tenant(), stream, ExpectedVersion::NoStream, events)
            .await
            .unwrap();
    }
    for batch_size in [100, 2] {
        let factory: ProjectionFactory = Arc::new(|| {
            Box::new(Fussy {
                rows: RowCache::default(),
                fixed: Arc::new(AtomicBool::new(true)),
                gate: None,
                put_by_stream: true,
            })
        });
        let mut runner = ProjectionRunner::with_projections(
            store.clone(),
            db.clone(),
            vec![factory],
            config(batch_size, DeadLetterPolicy::Stop),
        )
        .await
        .unwrap();
        runner.rebuild("fussy", |_| {}).await.unwrap();
        let mut marks = applied(&db).await;
        marks.sort();
        let mut expected = vec![(streams[0].to_string(), 3), (streams[1].to_string(), 6)];
        expected.sort();
        assert_eq!(marks, expected, "batch size {batch_size}");
    }
}
