//! The SQLite counterpart of the store benchmark's pgbench runs: how fast SQLite itself
//! commits events-shaped rows on this machine, with nothing of the store around it.
//!
//! One connection, the store's own schema (migrations 0001 and 0002: the events table
//! and its three indexes, the streams registry), WAL with `synchronous=NORMAL` (the
//! store's default), one cached insert statement per row and one commit per batch to a
//! stream that exists (so, as in the store, no registry row), rows of the store
//! benchmark's sizes, and the store's checkpointing (the writer's own automatic
//! checkpoint at 4,000 pages, `PASSIVE` checkpoints every 2 ms from a second
//! connection on another thread). No hashing, no JSON, no planning: the
//! physical limit the store's SQLite figures are compared with in docs/benchmarks.md.
//!
//! ```sh
//! cargo run --release -p chartline-infra --example raw_sqlite -- 10 200000   # 10-row commits
//! cargo run --release -p chartline-infra --example raw_sqlite -- 1 30000      # 1-row commits
//! ```

use std::time::Instant;

const DATA: &str = r#"{"n":12345,"note":"vital signs recorded during a telehealth visit","patient":"pat-0001","values":{"diastolic":80,"pulse":64,"systolic":120}}"#;
const METADATA: &str = r#"{"actor":{"id":"chartline-bench","kind":"system"},"causation_id":null,"contains_phi":false,"correlation_id":"019ac1d2-3b4c-7d5e-8f90-123456789abc","occurred_at":"2026-11-26T18:00:00.123456789Z","source":"bench","tenant":"default"}"#;

fn main() -> rusqlite::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments: ROWS_PER_COMMIT TOTAL_ROWS"))
        .collect();
    let batch = args.first().copied().unwrap_or(10).max(1);
    let total = args.get(1).copied().unwrap_or(200_000);
    let path = std::env::temp_dir().join(format!("raw_sqlite_{}.db", std::process::id()));
    let connection = rusqlite::Connection::open(&path)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.execute_batch(include_str!("../migrations/sqlite/0001_event_store.sql"))?;
    connection.execute_batch(include_str!(
        "../migrations/sqlite/0002_stream_registry.sql"
    ))?;
    connection.pragma_update(None, "wal_autocheckpoint", 4_000)?;
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let checkpointer = {
        let (path, running) = (path.clone(), std::sync::Arc::clone(&running));
        std::thread::spawn(move || -> rusqlite::Result<()> {
            let connection = rusqlite::Connection::open(&path)?;
            connection.busy_timeout(std::time::Duration::ZERO)?;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(2));
                // Busy while the writer checkpoints itself: the next round tries again.
                let _ = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
            Ok(())
        })
    };
    let stream = "bench-raw-1";
    let start = Instant::now();
    let mut position = 0i64;
    while (position as usize) < total {
        let tx = connection.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (global_position, event_id, tenant_id, stream_id, \
                 stream_version, event_type, schema_version, data, metadata, recorded_at, \
                 prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for _ in 0..batch {
                position += 1;
                let hash = format!("{:064x}", position as u128 * 0x9e37_79b9_7f4a_7c15);
                insert.execute(rusqlite::params![
                    position,
                    uuid::Uuid::now_v7().to_string(),
                    "default",
                    stream,
                    position,
                    "BenchmarkRecorded",
                    1,
                    DATA,
                    METADATA,
                    "2026-11-26T18:00:00.123456Z",
                    hash,
                    hash,
                ])?;
            }
        }
        tx.commit()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    checkpointer.join().expect("checkpoint thread")?;
    println!(
        "{batch}-row commits: {:.0} rows/s, {:.0} commits/s",
        position as f64 / seconds,
        position as f64 / batch as f64 / seconds
    );
    drop(connection);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(())
}
