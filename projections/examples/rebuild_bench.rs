//! Rebuild benchmark: `cargo run --release -p chartline-projections --example
//! rebuild_bench -- [EVENTS] [STORE_URL] [READ_URL]` fills the store with synthetic
//! events up to EVENTS (default 1,000,000; an already filled store is reused) and
//! reports how fast all six read models are built from position 0 into READ_URL
//! (default: a fresh SQLite file next to a temporary store). With `LIVE_SECONDS` set,
//! it then follows the log live while appending 500 events/s for that many seconds
//! and prints the lag (`chartline projections bench` runs all of it per backend).

use std::time::Instant;

/// The product binary's allocator (services/chartline/src/main.rs), so this example
/// measures what `chartline projections bench` measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chartline_infra::{AnyStore, EventStore};
use chartline_projections::ReadDb;
use chartline_projections::bench::{append_synthetic, live_lag_benchmark, rebuild_benchmark};

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
    let mut report = rebuild_benchmark(store.clone(), db).await?;
    let samples = std::mem::take(&mut report.rss.samples).len();
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("({samples} RSS samples)");
    if let Some(seconds) = std::env::var("LIVE_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        let db = ReadDb::open(&read_url).await?;
        let live = live_lag_benchmark(store, db, 500.0, seconds).await?;
        println!("{}", serde_json::to_string_pretty(&live)?);
    }
    Ok(())
}
