//! The SQLite read-model transaction: `BEGIN IMMEDIATE` waits for another transaction's
//! write lock asynchronously, so on a one-thread runtime the holder still runs, commits,
//! and both transactions' rows are there. (A wait in SQLite's busy handler would block
//! the only thread for the whole busy timeout, and the holder could not commit.)

use std::time::{Duration, Instant};

use chartline_projections::{Cell, ReadDb};

use crate::harness::{Backend, Guard, fresh_url};

/// A fresh SQLite read-model database with one table, and its URL.
async fn sqlite_with_table(create: &str) -> (ReadDb, String, Guard) {
    let (url, guard) = fresh_url(Backend::Sqlite).await;
    let db = ReadDb::open(&url).await.unwrap();
    let mut setup = db.begin().await.unwrap();
    setup.run(create, &[]).await.unwrap();
    setup.commit().await.unwrap();
    (db, url, guard)
}

async fn count_rows(db: &ReadDb, table: &str) -> i64 {
    let rows = db
        .fetch(
            &format!("SELECT COUNT(*) FROM {table}"),
            &[],
            &[chartline_projections::db::Kind::Int],
        )
        .await
        .unwrap();
    match rows.as_slice() {
        [row] => match row.as_slice() {
            [Cell::Int(count)] => *count,
            other => panic!("unexpected count {other:?}"),
        },
        other => panic!("unexpected rows {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_sqlite_transaction_waits_for_the_write_lock_without_blocking_its_holder() {
    let (db, url, _guard) =
        sqlite_with_table("CREATE TABLE lock_probe (id INTEGER PRIMARY KEY, who TEXT NOT NULL)")
            .await;
    // The waiter opens the file on its own, as another process would: write
    // transactions of one `ReadDb` also queue in process, which would hide SQLite's
    // lock from this test.
    let other = ReadDb::open(&url).await.unwrap();

    let mut holder = db.begin().await.unwrap();
    holder
        .run(
            "INSERT INTO lock_probe (id, who) VALUES (?, ?)",
            &[Cell::Int(1), Cell::Text("holder".into())],
        )
        .await
        .unwrap();
    let started = Instant::now();
    let holder_task = async move {
        // Holds the write lock across an await, as a projection batch does.
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.commit().await.unwrap();
        started.elapsed()
    };
    let waiter_task = async {
        let mut waiter = other.begin().await.unwrap();
        let waited = started.elapsed();
        waiter
            .run(
                "INSERT INTO lock_probe (id, who) VALUES (?, ?)",
                &[Cell::Int(2), Cell::Text("waiter".into())],
            )
            .await
            .unwrap();
        waiter.commit().await.unwrap();
        waited
    };
    let (holder_committed, waiter_began) = tokio::join!(holder_task, waiter_task);
    assert!(
        waiter_began >= holder_committed,
        "the waiter began ({waiter_began:?}) before the holder committed ({holder_committed:?})"
    );
    assert!(
        waiter_began < Duration::from_secs(5),
        "the waiter took {waiter_began:?}: it blocked the runtime instead of waiting asynchronously"
    );
    let rows = db
        .fetch(
            "SELECT id, who FROM lock_probe ORDER BY id",
            &[],
            &[
                chartline_projections::db::Kind::Int,
                chartline_projections::db::Kind::Text,
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![Cell::Int(1), Cell::Text("holder".into())],
            vec![Cell::Int(2), Cell::Text("waiter".into())],
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_sqlite_transaction_rolls_back_and_frees_the_lock() {
    let (db, _url, _guard) =
        sqlite_with_table("CREATE TABLE drop_probe (id INTEGER PRIMARY KEY)").await;
    {
        let mut abandoned = db.begin().await.unwrap();
        abandoned
            .run("INSERT INTO drop_probe (id) VALUES (?)", &[Cell::Int(7)])
            .await
            .unwrap();
        // Dropped without commit, as when a batch's future is cancelled.
    }
    let next = tokio::time::timeout(Duration::from_secs(5), db.begin())
        .await
        .expect("the lock was freed")
        .unwrap();
    next.commit().await.unwrap();
    assert_eq!(count_rows(&db, "drop_probe").await, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_read_transaction_refuses_to_write() {
    let (db, _url, _guard) =
        sqlite_with_table("CREATE TABLE read_probe (id INTEGER PRIMARY KEY)").await;
    let mut read = db.begin_read().await.unwrap();
    let error = read
        .run("INSERT INTO read_probe (id) VALUES (?)", &[Cell::Int(1)])
        .await
        .expect_err("a read transaction must not write");
    assert!(error.to_string().contains("read-only"), "{error}");
    read.rollback().await.unwrap();
    assert_eq!(count_rows(&db, "read_probe").await, 0);
}
