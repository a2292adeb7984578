//! Fresh backends per test (a temporary SQLite file, a new PostgreSQL database), a
//! helper to append domain events through the real store, and row-by-row dumps.

use chartline_infra::{AnyStore, EventStore, ExpectedVersion};
use chartline_projections::bench::new_event;
use chartline_projections::cache::Row;
use chartline_projections::db::TableSpec;
use chartline_projections::models::billing_queue::{
    BillingItemRow, BillingPatientRow, BillingRpmDayRow, BillingRpmEnrollmentRow,
};
use chartline_projections::models::ehr_writeback::WriteBackRow;
use chartline_projections::models::encounter_view::EncounterViewRow;
use chartline_projections::models::identity_review::IdentityReviewRow;
use chartline_projections::models::integration_completeness::CompletenessRow;
use chartline_projections::models::rpm_timeseries::{
    RpmDailyRow, RpmDayRow, RpmEnrollmentRow, RpmMonthRow, RpmPeriodRow, RpmReadingRow,
};
use chartline_projections::{Cell, ReadDb};
use chartline_proto::codec::DomainEvent;
use chartline_proto::{Actor, StreamId, TenantId};
use uuid::Uuid;

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Removes what a test created when dropped (best effort).
pub struct Guard(Option<Box<dyn FnOnce() + Send>>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(cleanup) = self.0.take() {
            cleanup();
        }
    }
}

fn pg_admin_url() -> String {
    std::env::var("CHARTLINE_TEST_PG").unwrap_or_else(|_| PG_ADMIN_URL.to_string())
}

/// A fresh, empty database URL of the backend.
pub async fn fresh_url(backend: Backend) -> (String, Guard) {
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(format!("chartline_t_{}", Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            let url = format!("sqlite://{}/events.db", dir.display());
            (
                url,
                Guard(Some(Box::new(move || {
                    let _ = std::fs::remove_dir_all(dir);
                }))),
            )
        }
        Backend::Postgres => {
            let admin = pg_admin_url();
            let name = format!("chartline_t_{}", Uuid::new_v4().simple());
            let pool = sqlx::PgPool::connect(&admin).await.unwrap_or_else(|e| {
                panic!("PostgreSQL must be running at {admin} (run `make services`): {e}")
            });
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            let base = admin.rsplit_once('/').unwrap().0.to_string();
            let url = format!("{base}/{name}");
            (
                url,
                Guard(Some(Box::new(move || {
                    let _ = std::thread::spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        runtime.block_on(async {
                            if let Ok(pool) = sqlx::PgPool::connect(&pg_admin_url()).await {
                                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                )))
                                .execute(&pool)
                                .await;
                            }
                        });
                    })
                    .join();
                }))),
            )
        }
    }
}

/// A fresh store with the read models in the same database.
pub async fn fresh(backend: Backend) -> (AnyStore, ReadDb, Guard) {
    let (url, guard) = fresh_url(backend).await;
    let store = AnyStore::open(&url).await.expect("open store");
    let db = ReadDb::open(&url).await.expect("open read db");
    (store, db, guard)
}

pub fn tenant() -> TenantId {
    TenantId::parse("default").unwrap()
}

/// Appends domain events to one stream through the real store.
pub async fn append<E: DomainEvent>(
    store: &AnyStore,
    stream: &StreamId,
    events: Vec<(Actor, E)>,
) -> Vec<Uuid> {
    let new_events: Vec<_> = events
        .iter()
        .map(|(actor, event)| new_event(&tenant(), actor.clone(), event))
        .collect();
    let ids = new_events.iter().map(|e| e.event_id).collect();
    store
        .append(&tenant(), stream, ExpectedVersion::Any, new_events)
        .await
        .expect("append");
    ids
}

/// Every read-model table of the standard projections.
pub fn all_tables() -> Vec<&'static TableSpec> {
    vec![
        EncounterViewRow::TABLE,
        WriteBackRow::TABLE,
        BillingItemRow::TABLE,
        BillingPatientRow::TABLE,
        BillingRpmEnrollmentRow::TABLE,
        BillingRpmDayRow::TABLE,
        RpmEnrollmentRow::TABLE,
        RpmReadingRow::TABLE,
        RpmDailyRow::TABLE,
        RpmDayRow::TABLE,
        RpmPeriodRow::TABLE,
        RpmMonthRow::TABLE,
        IdentityReviewRow::TABLE,
        CompletenessRow::TABLE,
    ]
}

/// Every row of every read model (through the views), in key order.
pub async fn dump_all(db: &ReadDb) -> Vec<(&'static str, Vec<Vec<Cell>>)> {
    let mut dump = Vec::new();
    for spec in all_tables() {
        dump.push((spec.name, db.dump(spec, spec.name).await.expect("dump")));
    }
    dump
}

/// Asserts two dumps are equal, naming the first differing row.
pub fn assert_same_rows(
    left: &[(&'static str, Vec<Vec<Cell>>)],
    right: &[(&'static str, Vec<Vec<Cell>>)],
) {
    assert_eq!(left.len(), right.len());
    for ((table, a), (_, b)) in left.iter().zip(right) {
        for (index, (row_a, row_b)) in a.iter().zip(b).enumerate() {
            assert_eq!(row_a, row_b, "{table}: row {index} differs");
        }
        assert_eq!(a.len(), b.len(), "{table}: row counts differ");
    }
}

/// Rows of one view as column name → cell maps, filtered by a key prefix.
pub async fn rows(
    db: &ReadDb,
    spec: &TableSpec,
) -> Vec<std::collections::BTreeMap<&'static str, Cell>> {
    db.dump(spec, spec.name)
        .await
        .unwrap()
        .into_iter()
        .map(|cells| spec.columns.iter().map(|c| c.name).zip(cells).collect())
        .collect()
}
