//! `chartline projections` as an operator runs it, as real OS processes: `kill -9` of
//! `projections run` in the middle of batches, then a restart, leaves every read model
//! equal row by row to a from-scratch rebuild (`projections rebuild NAME`), on SQLite
//! and on PostgreSQL; `status` and `dead-letters` report it.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chartline_infra::AnyStore;
use chartline_projections::models::standard_projections;
use chartline_projections::{Cell, ReadDb};

const BIN: &str = env!("CARGO_BIN_EXE_chartline");

fn projections(store: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["projections", "--store", store, "--batch-size", "400"])
        .args(args)
        .output()
        .expect("run chartline")
}

async fn dump(url: &str) -> Vec<(String, Vec<Vec<Cell>>)> {
    let db = ReadDb::open(url).await.unwrap();
    let mut out = Vec::new();
    for factory in standard_projections() {
        for spec in factory().tables() {
            out.push((
                spec.name.to_string(),
                db.dump(spec, spec.name).await.unwrap(),
            ));
        }
    }
    db.close().await;
    out
}

fn checkpoints(store: &str) -> Vec<u64> {
    let output = projections(store, &["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let statuses: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    statuses
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["checkpoint"].as_u64().unwrap())
        .collect()
}

fn kill_9_then_restart_equals_rebuild(store: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let head = runtime.block_on(async {
        let event_store = AnyStore::open(store).await.unwrap();
        chartline_projections::bench::append_synthetic(&event_store, 0, 6_000)
            .await
            .unwrap()
    });
    let mut partial = false;
    for step in 0..6u64 {
        let mut child = Command::new(BIN)
            .args([
                "projections",
                "--store",
                store,
                "--batch-size",
                "400",
                "run",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + 120 * step));
        let _ = child.kill(); // SIGKILL, mid-batch at some point
        let _ = child.wait();
        let now = checkpoints(store);
        partial |= now.iter().any(|c| *c > 0 && *c < head);
    }
    assert!(partial, "no kill landed while projections were part-way");
    let finish = projections(store, &["run", "--until-caught-up"]);
    assert!(
        finish.status.success(),
        "{}",
        String::from_utf8_lossy(&finish.stderr)
    );
    assert!(checkpoints(store).iter().all(|c| *c == head));
    let after_restart = runtime.block_on(dump(store));
    assert!(after_restart.iter().all(|(_, rows)| !rows.is_empty()));
    for factory in standard_projections() {
        let name = factory().name();
        let rebuilt = projections(store, &["rebuild", name]);
        assert!(
            rebuilt.status.success(),
            "{}",
            String::from_utf8_lossy(&rebuilt.stderr)
        );
        assert!(String::from_utf8_lossy(&rebuilt.stdout).contains("rebuilt"));
    }
    let rebuilt = runtime.block_on(dump(store));
    for ((table, a), (_, b)) in after_restart.iter().zip(&rebuilt) {
        assert_eq!(a.len(), b.len(), "{table}: row counts differ");
        for (index, (row_a, row_b)) in a.iter().zip(b).enumerate() {
            assert_eq!(row_a, row_b, "{table}: row {index} differs");
        }
    }
    let letters = projections(store, &["dead-letters"]);
    assert!(String::from_utf8_lossy(&letters.stdout).contains("no dead letters"));
    let headline = projections(store, &["headline"]);
    let figures: serde_json::Value = serde_json::from_slice(&headline.stdout).unwrap();
    assert!(figures["encounters"].as_i64().unwrap() > 0);
    assert!(figures["percent_fully_automated"].as_f64().unwrap() > 0.0);
}

#[test]
fn kill_9_during_projections_run_then_restart_equals_a_rebuild_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("chartline_t_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    kill_9_then_restart_equals_rebuild(&format!("sqlite://{}/events.db", dir.display()));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kill_9_during_projections_run_then_restart_equals_a_rebuild_on_postgres() {
    let admin = std::env::var("CHARTLINE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("chartline_t_{}", uuid::Uuid::new_v4().simple());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("PostgreSQL must be running (make services)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .unwrap();
    });
    let base = admin.rsplit_once('/').unwrap().0;
    kill_9_then_restart_equals_rebuild(&format!("{base}/{name}"));
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
    });
}
