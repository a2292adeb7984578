//! Rebuild benchmark: `cargo run --release -p chartline-projections --example
//! rebuild_bench -- [EVENTS] [STORE_URL] [READ_URL]` fills the store with synthetic
//! events up to EVENTS (default 1,000,000; an already filled store is reused) and
//! reports how fast all six read models are built from position 0 into READ_URL
//! (default: a fresh SQLite file next to a temporary store).

use std::time::Instant;

use chartline_infra::{AnyStore, EventStore};
use chartline_projections::ReadDb;
use chartline_projections::bench::{append_synthetic, rebuild_benchmark};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let events: u64 = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let dir = std::env::temp_dir().join(format!("chartline_bench_{}", std::process::id()));
    let url = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}/events.db", dir.display()));
    let read_url = args.next().unwrap_or_else(|| {
        format!(
            "sqlite://{}/read-{}.db",
            dir.display(),
            uuid::Uuid::new_v4().simple()
        )
    });
    let store = AnyStore::open(&url).await?;
    let head = store.head_position().await?;
    if head < events {
        let started = Instant::now();
        let written = append_synthetic(&store, head, events - head).await?;
        eprintln!(
            "appended {written} events in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let db = ReadDb::open(&read_url).await?;
    let report = rebuild_benchmark(store, db).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
