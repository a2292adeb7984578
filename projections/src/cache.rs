//! Typed read-model rows and the per-projection row cache that makes batches cheap.
//!
//! A projection reads and changes rows through a [`RowCache`]: the first access to a key
//! loads it from the database (inside the batch's transaction), later accesses hit
//! memory, and at the end of the batch every changed row is written back with a few
//! multi-row upserts, in the same transaction as the checkpoint. On rollback the batch's
//! changes are dropped and the cache falls back to what was committed.
//!
//! Consistency rules (the engine keeps them):
//! - the cache only ever holds committed rows or the current batch's changes;
//! - it is reset whenever another writer may have changed the tables (the projection's
//!   `revision` moved, a blue-green swap happened);
//! - when a generation's tables were created empty by this cache's owner, the cache
//!   also remembers every key it ever wrote (as 64-bit hashes): a key never written is
//!   known absent without a query. This is what makes a rebuild fast.

use std::hash::{BuildHasherDefault, Hash, Hasher};

use crate::db::{Backend, Cell, TableSpec, Tx};
use crate::error::ProjectionError;

/// A read-model row: a Rust struct mapped to one table. Declare with [`read_model_row!`].
pub trait Row: Clone + Send + Sync + 'static {
    type Key: Hash + Eq + Clone + Send + Sync;
    const TABLE: &'static TableSpec;
    fn key(&self) -> Self::Key;
    fn key_cells(key: &Self::Key) -> Vec<Cell>;
    fn to_cells(&self) -> Vec<Cell>;
    fn from_cells(cells: Vec<Cell>) -> Result<Self, String>;
}

/// Declares a read-model row struct and its table: key columns first, then the others.
#[macro_export]
macro_rules! read_model_row {
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $table:literal {
            key { $($kfield:ident : $kty:ty),+ $(,)? }
            columns { $($(#[$fmeta:meta])* $field:ident : $fty:ty),* $(,)? }
            indexes [$($index:literal),* $(,)?]
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $(pub $kfield: $kty,)+
            $($(#[$fmeta])* pub $field: $fty,)*
        }

        impl $crate::cache::Row for $name {
            type Key = ($($kty,)+);
            const TABLE: &'static $crate::db::TableSpec = &$crate::db::TableSpec {
                name: $table,
                columns: &[
                    $($crate::db::Column {
                        name: stringify!($kfield),
                        kind: <$kty as $crate::db::CellValue>::KIND,
                    },)+
                    $($crate::db::Column {
                        name: stringify!($field),
                        kind: <$fty as $crate::db::CellValue>::KIND,
                    },)*
                ],
                key: [$(stringify!($kfield)),+].len(),
                indexes: &[$($index),*],
            };

            fn key(&self) -> Self::Key {
                ($(self.$kfield.clone(),)+)
            }

            fn key_cells(key: &Self::Key) -> Vec<$crate::db::Cell> {
                let ($($kfield,)+) = key;
                vec![$($crate::db::CellValue::to_cell($kfield)),+]
            }

            fn to_cells(&self) -> Vec<$crate::db::Cell> {
                vec![
                    $($crate::db::CellValue::to_cell(&self.$kfield),)+
                    $($crate::db::CellValue::to_cell(&self.$field),)*
                ]
            }

            fn from_cells(cells: Vec<$crate::db::Cell>) -> Result<Self, String> {
                let mut cells = cells.into_iter();
                Ok($name {
                    $($kfield: $crate::db::CellValue::from_cell(
                        cells.next().ok_or_else(|| format!("missing column {}", stringify!($kfield)))?,
                    ).map_err(|e| format!("{}: {e}", stringify!($kfield)))?,)+
                    $($field: $crate::db::CellValue::from_cell(
                        cells.next().ok_or_else(|| format!("missing column {}", stringify!($field)))?,
                    ).map_err(|e| format!("{}: {e}", stringify!($field)))?,)*
                })
            }
        }
    };
}

/// Rows kept in memory per table between batches before the cache is cleared (bounds
/// memory). 20,000 keeps about 90 pages' worth of encounter rows, far more than the
/// distance between related events in the log; 200,000 made the rebuild's RSS grow
/// by 220 MiB between its first and second half at 1M events.
pub const DEFAULT_CACHE_ROWS: usize = 20_000;

/// A fast, non-cryptographic hasher for the row caches (keys are our own data, so
/// hash flooding is no concern): words are folded in FxHash-style and the result is
/// finished with the MurmurHash3 mixer, so every output bit depends on every input
/// bit. SipHash (the std default) cost about 7% of a rebuild's instructions.
#[derive(Default, Clone, Copy)]
pub struct FastHasher {
    hash: u64,
}

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let mut h = self.hash;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type FastBuild = BuildHasherDefault<FastHasher>;
type HashSet<K> = std::collections::HashSet<K, FastBuild>;

/// Orders key cells as both databases order their primary keys (integers numerically,
/// text by bytes, which is SQLite's default collation and PostgreSQL's `C` order; the
/// order only has to be good, not exact).
fn key_order(a: &[Cell], b: &[Cell]) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for (x, y) in a.iter().zip(b) {
        let order = match (x, y) {
            (Cell::Int(x), Cell::Int(y)) => x.cmp(y),
            (Cell::Real(x), Cell::Real(y)) => x.total_cmp(y),
            (Cell::Text(x), Cell::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
            (Cell::Null, Cell::Null) => Ordering::Equal,
            (Cell::Null, _) => Ordering::Less,
            (_, Cell::Null) => Ordering::Greater,
            (Cell::Int(_) | Cell::Real(_), Cell::Text(_)) => Ordering::Less,
            (Cell::Text(_), Cell::Int(_) | Cell::Real(_)) => Ordering::Greater,
            (Cell::Int(x), Cell::Real(y)) => (*x as f64).total_cmp(y),
            (Cell::Real(x), Cell::Int(y)) => x.total_cmp(&(*y as f64)),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    Ordering::Equal
}

fn key_hash<K: Hash>(key: &K) -> u64 {
    let mut hasher = FastHasher::default();
    key.hash(&mut hasher);
    hasher.finish()
}

/// A cached row under its key and the key's hash (computed once per access: the keys
/// are tuples of strings, and hashing them again for every probe of every map cost more
/// than the probes).
struct Slot<K, V> {
    hash: u64,
    key: K,
    value: V,
}

type Slots<K, V> = hashbrown::HashTable<Slot<K, V>>;

fn find<'a, K: Eq, V>(slots: &'a Slots<K, V>, hash: u64, key: &K) -> Option<&'a V> {
    slots.find(hash, |s| s.key == *key).map(|s| &s.value)
}

fn find_mut<'a, K: Eq, V>(slots: &'a mut Slots<K, V>, hash: u64, key: &K) -> Option<&'a mut V> {
    slots
        .find_mut(hash, |s| s.key == *key)
        .map(|s| &mut s.value)
}

fn take<K: Eq, V>(slots: &mut Slots<K, V>, hash: u64, key: &K) -> Option<V> {
    slots
        .find_entry(hash, |s| s.key == *key)
        .ok()
        .map(|entry| entry.remove().0.value)
}

/// Adds a key that is not in `slots` (the caller checked).
fn add<K, V>(slots: &mut Slots<K, V>, hash: u64, key: K, value: V) -> &mut V {
    &mut slots
        .insert_unique(hash, Slot { hash, key, value }, |s| s.hash)
        .into_mut()
        .value
}

/// A row changed in the current batch; `created`: the database does not have its key
/// (it was absent when the batch looked, and only this projection writes the table).
struct Changed<R> {
    row: R,
    created: bool,
}

impl<R> Changed<R> {
    fn stored(row: R) -> Self {
        Changed {
            row,
            created: false,
        }
    }
}

/// A batch's rows as cells: new rows to insert, the others to upsert.
#[derive(Default)]
struct Prepared {
    inserts: Vec<Vec<Cell>>,
    upserts: Vec<Vec<Cell>>,
}

/// The rows of one table as seen by one projection instance. See the module docs.
///
/// A key is in at most one of `committed` and `dirty`: a row moves to `dirty` when it
/// is changed and back to `committed` when the batch commits.
pub struct RowCache<R: Row> {
    physical: String,
    backend: Backend,
    select_sql: String,
    /// Committed rows (`None`: known absent).
    committed: Slots<R::Key, Option<R>>,
    /// Rows changed in the current batch.
    dirty: Slots<R::Key, Changed<R>>,
    /// Hashes of every key that exists, when this instance owns the table since empty.
    known: Option<HashSet<u64>>,
    pending_known: Vec<u64>,
    capacity: usize,
    /// Generated upsert statements by rows per statement.
    upserts: Vec<(usize, String)>,
    /// This batch's changed rows as cells, ready to write (see [`RowCache::prepare`]).
    prepared: Option<Prepared>,
    /// Rows written with [`RowCache::put`] in this batch: written, never kept.
    put: Vec<R>,
}

impl<R: Row> Default for RowCache<R> {
    fn default() -> Self {
        RowCache {
            physical: String::new(),
            backend: Backend::Sqlite,
            select_sql: String::new(),
            committed: Slots::new(),
            dirty: Slots::new(),
            known: None,
            pending_known: Vec::new(),
            capacity: DEFAULT_CACHE_ROWS,
            upserts: Vec::new(),
            prepared: None,
            put: Vec::new(),
        }
    }
}

impl<R: Row> RowCache<R> {
    /// Points the cache at one generation's table and forgets everything. `empty` says
    /// the table was just created empty and only this instance will write it.
    pub fn reset(&mut self, backend: Backend, generation: i64, empty: bool) {
        self.physical = R::TABLE.physical(generation);
        self.backend = backend;
        self.select_sql = backend.select_by_key(R::TABLE, &self.physical);
        self.upserts.clear();
        self.committed.clear();
        self.dirty.clear();
        self.pending_known.clear();
        self.prepared = None;
        self.put.clear();
        self.known = empty.then(HashSet::default);
    }

    /// Makes sure `key` (whose hash is `hash`) is in `dirty` or `committed`.
    async fn load(&mut self, tx: &mut Tx, key: &R::Key, hash: u64) -> Result<(), ProjectionError> {
        if find(&self.dirty, hash, key).is_some() || find(&self.committed, hash, key).is_some() {
            return Ok(());
        }
        if let Some(known) = &self.known
            && !known.contains(&hash)
        {
            add(&mut self.committed, hash, key.clone(), None);
            return Ok(());
        }
        let rows = tx
            .fetch(&self.select_sql, &R::key_cells(key), &R::TABLE.kinds())
            .await?;
        let row = match rows.into_iter().next() {
            Some(cells) => {
                Some(
                    R::from_cells(cells).map_err(|message| ProjectionError::CorruptRow {
                        table: self.physical.clone(),
                        message,
                    })?,
                )
            }
            None => None,
        };
        add(&mut self.committed, hash, key.clone(), row);
        Ok(())
    }

    /// The current row for `key` (this batch's change if any), read-only.
    pub async fn get(&mut self, tx: &mut Tx, key: &R::Key) -> Result<Option<&R>, ProjectionError> {
        let hash = key_hash(key);
        self.load(tx, key, hash).await?;
        if let Some(changed) = find(&self.dirty, hash, key) {
            return Ok(Some(&changed.row));
        }
        Ok(find(&self.committed, hash, key).and_then(Option::as_ref))
    }

    /// The row for `key`, to change (it is written back at the end of the batch).
    pub async fn get_mut(
        &mut self,
        tx: &mut Tx,
        key: &R::Key,
    ) -> Result<Option<&mut R>, ProjectionError> {
        let hash = key_hash(key);
        self.load(tx, key, hash).await?;
        if find(&self.dirty, hash, key).is_none() {
            match take(&mut self.committed, hash, key) {
                Some(Some(row)) => {
                    add(&mut self.dirty, hash, key.clone(), Changed::stored(row));
                }
                Some(None) => {
                    add(&mut self.committed, hash, key.clone(), None);
                    return Ok(None);
                }
                None => return Ok(None),
            }
        }
        Ok(find_mut(&mut self.dirty, hash, key).map(|changed| &mut changed.row))
    }

    /// The row for `key` to change, created by `make` when absent.
    pub async fn get_or_insert_with(
        &mut self,
        tx: &mut Tx,
        key: &R::Key,
        make: impl FnOnce() -> R,
    ) -> Result<&mut R, ProjectionError> {
        let hash = key_hash(key);
        self.load(tx, key, hash).await?;
        if find(&self.dirty, hash, key).is_none() {
            let changed = match take(&mut self.committed, hash, key) {
                Some(Some(row)) => Changed::stored(row),
                _ => {
                    self.pending_known.push(hash);
                    Changed {
                        row: make(),
                        created: true,
                    }
                }
            };
            return Ok(&mut add(&mut self.dirty, hash, key.clone(), changed).row);
        }
        Ok(&mut find_mut(&mut self.dirty, hash, key)
            .expect("found above")
            .row)
    }

    /// Writes `row` as it is, replacing any stored row with its key, without reading
    /// it first and without keeping it in memory afterwards: for rows that are written
    /// once and never read back by the projection (a reading, a log line), where
    /// [`RowCache::get_or_insert_with`] would look each new key up in the database
    /// and then hold it in the cache. The caller makes the write idempotent (the same
    /// event writes the same row).
    pub fn put(&mut self, row: R) {
        let key = row.key();
        let hash = key_hash(&key);
        take(&mut self.dirty, hash, &key);
        take(&mut self.committed, hash, &key);
        if self.known.is_some() {
            self.pending_known.push(hash);
        }
        self.prepared = None;
        self.put.push(row);
    }

    /// Keys of the rows whose `column` equals `value` (a secondary-index lookup that
    /// also sees this batch's changes); `matches` tells whether a row qualifies.
    pub async fn keys_where(
        &mut self,
        tx: &mut Tx,
        column: &str,
        value: Cell,
        matches: impl Fn(&R) -> bool,
    ) -> Result<Vec<R::Key>, ProjectionError> {
        let sql = self.backend.select_where(R::TABLE, &self.physical, column);
        let rows = tx.fetch(&sql, &[value], &R::TABLE.kinds()).await?;
        let mut keys = Vec::new();
        let mut seen = HashSet::default();
        for cells in rows {
            let row = R::from_cells(cells).map_err(|message| ProjectionError::CorruptRow {
                table: self.physical.clone(),
                message,
            })?;
            let key = row.key();
            let hash = key_hash(&key);
            if find(&self.dirty, hash, &key).is_some() {
                continue;
            }
            if seen.insert(key.clone()) {
                keys.push(key.clone());
            }
            if find(&self.committed, hash, &key).is_none() {
                add(&mut self.committed, hash, key, Some(row));
            }
        }
        for slot in &self.dirty {
            if matches(&slot.value.row) && seen.insert(slot.key.clone()) {
                keys.push(slot.key.clone());
            }
        }
        Ok(keys)
    }

    /// Converts this batch's changed rows to cells now, so that [`RowCache::flush`]
    /// only writes them (the engine prepares before it queues for SQLite's write lock).
    /// The batch must not change rows between this and the flush, which consumes it.
    pub fn prepare(&mut self) {
        if self.prepared.is_none() {
            let mut rows: Vec<(Vec<Cell>, bool)> = self
                .dirty
                .iter()
                .map(|slot| (slot.value.row.to_cells(), slot.value.created))
                .chain(self.put.iter().map(|row| (row.to_cells(), false)))
                .collect();
            // In key order, the database inserts walk the table's B-tree forwards
            // instead of jumping around it.
            // One row per key (the last one put), as one upsert statement requires.
            let key = R::TABLE.key;
            rows.sort_by(|a, b| key_order(&a.0[..key], &b.0[..key]));
            rows.dedup_by(|later, earlier| {
                let same = key_order(&later.0[..key], &earlier.0[..key]).is_eq();
                if same {
                    std::mem::swap(later, earlier);
                }
                same
            });
            let mut prepared = Prepared::default();
            for (cells, created) in rows {
                if created && self.backend.inserts_apart() {
                    prepared.inserts.push(cells);
                } else {
                    prepared.upserts.push(cells);
                }
            }
            self.prepared = Some(prepared);
        }
    }

    /// Writes this batch's changed rows.
    pub async fn flush(&mut self, tx: &mut Tx) -> Result<(), ProjectionError> {
        if self.dirty.is_empty() && self.put.is_empty() {
            return Ok(());
        }
        self.prepare();
        let prepared = self.prepared.take().expect("prepared above");
        if !prepared.inserts.is_empty() {
            tx.insert_rows(
                R::TABLE,
                &self.physical,
                &prepared.inserts,
                &mut self.upserts,
            )
            .await?;
        }
        tx.upsert_rows(
            R::TABLE,
            &self.physical,
            &prepared.upserts,
            &mut self.upserts,
        )
        .await
    }

    /// The batch committed: its rows become the cached committed state.
    pub fn commit(&mut self) {
        self.prepared = None;
        self.put.clear();
        if self.committed.len() + self.dirty.len() > self.capacity {
            self.committed.clear();
        }
        for Slot { hash, key, value } in self.dirty.drain() {
            add(&mut self.committed, hash, key, Some(value.row));
        }
        if let Some(known) = &mut self.known {
            known.extend(self.pending_known.drain(..));
        } else {
            self.pending_known.clear();
        }
    }

    /// The batch rolled back: forget its changes (the database still has the old rows).
    pub fn rollback(&mut self) {
        self.prepared = None;
        self.put.clear();
        self.dirty.clear();
        self.pending_known.clear();
    }
}

/// What the engine needs from each of a projection's caches, object-safe.
pub trait CacheControl: Send {
    fn reset(&mut self, backend: Backend, generation: i64, empty: bool);
    fn prepare(&mut self);
    fn flush<'a>(
        &'a mut self,
        tx: &'a mut Tx,
    ) -> futures::future::BoxFuture<'a, Result<(), ProjectionError>>;
    fn commit(&mut self);
    fn rollback(&mut self);
    fn table(&self) -> &'static TableSpec;
}

impl<R: Row> CacheControl for RowCache<R> {
    fn reset(&mut self, backend: Backend, generation: i64, empty: bool) {
        RowCache::reset(self, backend, generation, empty)
    }
    fn prepare(&mut self) {
        RowCache::prepare(self)
    }
    fn flush<'a>(
        &'a mut self,
        tx: &'a mut Tx,
    ) -> futures::future::BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(RowCache::flush(self, tx))
    }
    fn commit(&mut self) {
        RowCache::commit(self)
    }
    fn rollback(&mut self) {
        RowCache::rollback(self)
    }
    fn table(&self) -> &'static TableSpec {
        R::TABLE
    }
}
