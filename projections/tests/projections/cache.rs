//! `RowCache` against a real database: a batch sees its own changes, a rolled-back batch
//! leaves the committed rows (served from memory or reloaded) as they were, secondary
//! lookups merge the database's rows with the batch's without duplicates, and what the
//! cache wrote is what a fresh cache reads back.

use chartline_projections::cache::RowCache;
use chartline_projections::db::Tx;
use chartline_projections::{Cell, ReadDb};

use crate::harness::{Backend, fresh_url};

chartline_projections::read_model_row! {
    pub struct ProbeRow in "cache_probe" {
        key { owner: String, n: i64 }
        columns { label: String, count: i64 }
        indexes ["label"]
    }
}

fn key(n: i64) -> (String, i64) {
    ("owner-1".to_string(), n)
}

fn probe(n: i64, label: &str) -> ProbeRow {
    ProbeRow {
        owner: "owner-1".into(),
        n,
        label: label.into(),
        count: 0,
    }
}

async fn count_of(cache: &mut RowCache<ProbeRow>, tx: &mut Tx, n: i64) -> Option<i64> {
    cache.get(tx, &key(n)).await.unwrap().map(|row| row.count)
}

async fn keys_labelled(cache: &mut RowCache<ProbeRow>, tx: &mut Tx, label: &str) -> Vec<i64> {
    let mut keys: Vec<i64> = cache
        .keys_where(tx, "label", Cell::Text(label.into()), |row| {
            row.label == label
        })
        .await
        .unwrap()
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    keys.sort_unstable();
    keys
}

async fn the_cache_keeps_batches_apart(backend: Backend) {
    let (url, _guard) = fresh_url(backend).await;
    let db = ReadDb::open(&url).await.unwrap();
    let table = <ProbeRow as chartline_projections::cache::Row>::TABLE;
    let mut setup = db.begin().await.unwrap();
    for sql in db.backend().create_table(table, &table.physical(1)) {
        setup.run(&sql, &[]).await.unwrap();
    }
    setup.commit().await.unwrap();
    let mut cache = RowCache::<ProbeRow>::default();
    cache.reset(db.backend(), 1, true);

    // Batch 1 creates rows 0..3 (label a) and commits.
    let mut tx = db.begin().await.unwrap();
    for n in 0..3 {
        let row = cache
            .get_or_insert_with(&mut tx, &key(n), || probe(n, "a"))
            .await
            .unwrap();
        row.count += 1;
    }
    cache.flush(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    cache.commit();

    // Batch 2 changes row 0, creates row 9, sees both, then rolls back.
    let mut tx = db.begin().await.unwrap();
    cache
        .get_mut(&mut tx, &key(0))
        .await
        .unwrap()
        .unwrap()
        .count = 100;
    cache
        .get_or_insert_with(&mut tx, &key(9), || probe(9, "a"))
        .await
        .unwrap();
    assert_eq!(count_of(&mut cache, &mut tx, 0).await, Some(100));
    assert_eq!(count_of(&mut cache, &mut tx, 9).await, Some(0));
    cache.flush(&mut tx).await.unwrap();
    tx.rollback().await.unwrap();
    cache.rollback();

    // Batch 3 sees the committed rows only.
    let mut tx = db.begin().await.unwrap();
    assert_eq!(count_of(&mut cache, &mut tx, 0).await, Some(1));
    assert_eq!(count_of(&mut cache, &mut tx, 9).await, None);
    assert!(cache.get_mut(&mut tx, &key(9)).await.unwrap().is_none());
    assert_eq!(count_of(&mut cache, &mut tx, 9).await, None);
    // Row 1 moves to label b in this batch, row 5 is new with label b: a lookup by label
    // merges the database's rows with the batch's changes, each key once.
    cache
        .get_mut(&mut tx, &key(1))
        .await
        .unwrap()
        .unwrap()
        .label = "b".into();
    cache
        .get_or_insert_with(&mut tx, &key(5), || probe(5, "b"))
        .await
        .unwrap();
    assert_eq!(keys_labelled(&mut cache, &mut tx, "a").await, vec![0, 2]);
    assert_eq!(keys_labelled(&mut cache, &mut tx, "b").await, vec![1, 5]);
    // `put` replaces row 2 without reading it.
    cache.put(ProbeRow {
        count: 7,
        ..probe(2, "a")
    });
    cache.flush(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    cache.commit();

    // A fresh cache over the same table reads back exactly that.
    let mut fresh = RowCache::<ProbeRow>::default();
    fresh.reset(db.backend(), 1, false);
    let mut tx = db.begin().await.unwrap();
    for (n, expected) in [
        (0, Some((1, "a"))),
        (1, Some((1, "b"))),
        (2, Some((7, "a"))),
        (5, Some((0, "b"))),
        (9, None),
    ] {
        let row = fresh.get(&mut tx, &key(n)).await.unwrap();
        let got = row.map(|row| (row.count, row.label.clone()));
        assert_eq!(
            got,
            expected.map(|(count, label)| (count, label.to_string())),
            "row {n}"
        );
    }
    tx.rollback().await.unwrap();
}

crate::on_both_backends!(the_cache_keeps_batches_apart);
