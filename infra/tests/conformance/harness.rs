//! Starts each backend fresh for one test: a temporary SQLite file, a new PostgreSQL
//! database, a store service on real NATS with its own subject root.

use std::time::Duration;

use chartline_infra::store::nats::{NatsEventStore, serve};
use chartline_infra::store::postgres::PostgresStore;
use chartline_infra::store::sqlite::SqliteStore;
use uuid::Uuid;

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const NATS_URL: &str = "nats://127.0.0.1:4222";

pub fn pg_admin_url() -> String {
    std::env::var("CHARTLINE_TEST_PG").unwrap_or_else(|_| PG_ADMIN_URL.to_string())
}

pub fn nats_url() -> String {
    std::env::var("CHARTLINE_TEST_NATS").unwrap_or_else(|_| NATS_URL.to_string())
}

/// Removes what a test created when it ends (best effort; a failed test may leave a
/// small database or file behind, named `chartline_t_*`).
pub struct Guard {
    cleanup: Option<Box<dyn FnOnce() + Send>>,
    _service: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
    }
}

pub async fn sqlite_store() -> (SqliteStore, Guard) {
    let (store, guard, _) = sqlite_store_with_url().await;
    (store, guard)
}

pub async fn sqlite_store_with_url() -> (SqliteStore, Guard, String) {
    let dir = std::env::temp_dir().join(format!("chartline_t_{}", Uuid::new_v4().simple()));
    let url = format!("sqlite://{}", dir.join("events.db").display());
    let store = SqliteStore::open(&url).await.expect("open SQLite store");
    let guard = Guard {
        cleanup: Some(Box::new(move || {
            let _ = std::fs::remove_dir_all(dir);
        })),
        _service: None,
    };
    (store, guard, url)
}

/// Two SQLite stores on one temporary file: two processes sharing the embedded store.
pub async fn sqlite_store_pair() -> (SqliteStore, SqliteStore, Guard) {
    let (first, guard, url) = sqlite_store_with_url().await;
    let second = SqliteStore::open(&url)
        .await
        .expect("open a second SQLite store on the same file");
    (first, second, guard)
}

/// Creates an empty database and returns its URL.
pub async fn fresh_pg_database() -> (String, String) {
    let admin = pg_admin_url();
    let name = format!("chartline_t_{}", Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(&admin).await.unwrap_or_else(|e| {
        panic!("PostgreSQL must be running at {admin} (run `make services`): {e}")
    });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("create test database");
    pool.close().await;
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    (format!("{base}/{name}"), name)
}

fn drop_database_later(name: String) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        // Runs on a plain thread with its own runtime: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(pool) = sqlx::PgPool::connect(&pg_admin_url()).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&pool)
                        .await;
                    }
                });
            }
        })
        .join();
    })
}

pub async fn postgres_store() -> (PostgresStore, Guard) {
    let (store, guard, _) = postgres_store_with_url().await;
    (store, guard)
}

async fn postgres_store_with_url() -> (PostgresStore, Guard, String) {
    let (url, name) = fresh_pg_database().await;
    let store = PostgresStore::open(&url)
        .await
        .expect("open PostgreSQL store");
    let guard = Guard {
        cleanup: Some(drop_database_later(name)),
        _service: None,
    };
    (store, guard, url)
}

/// Two PostgreSQL stores on one fresh database: two store service instances.
pub async fn postgres_store_pair() -> (PostgresStore, PostgresStore, Guard) {
    let (first, guard, url) = postgres_store_with_url().await;
    let second = PostgresStore::open(&url)
        .await
        .expect("open a second PostgreSQL store on the same database");
    (first, second, guard)
}

pub async fn connect_nats() -> async_nats::Client {
    let url = nats_url();
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("NATS must be running at {url} (run `make services`): {e}"))
}

/// A store service (PostgreSQL behind it) on its own subject root, and a client.
pub async fn nats_store() -> (NatsEventStore, Guard) {
    let (backing, pg_guard) = postgres_store().await;
    let root = format!("chartline-t{}", Uuid::new_v4().simple());
    let server_client = connect_nats().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service_root = root.clone();
    tokio::spawn(async move {
        serve(server_client, backing, service_root, async {
            let _ = stopped.await;
        })
        .await
        .expect("store service");
    });
    let client = NatsEventStore::new(connect_nats().await).with_root(root);
    // The service subscribes asynchronously: wait until it answers.
    for _ in 0..50 {
        if chartline_infra::EventStore::head_position(&client)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut guard = pg_guard;
    guard._service = Some(stop);
    (client, guard)
}
