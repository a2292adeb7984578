//! The sandbox EHR's storage: one SQLite connection (WAL, `synchronous=NORMAL`) behind a
//! mutex, used through `rusqlite` on the calling thread.
//!
//! Every statement here touches a handful of rows by primary key or index, so it takes
//! microseconds. sqlx's SQLite driver ran each statement on a worker thread and handed
//! rows back over a channel; in `chartline bench ehr` those thread switches made the
//! sandbox about a third of the machine's CPU (the same finding as the event store's,
//! ARCHITECTURE.md "Two SQLite drivers").
//!
//! Each method is one transaction at most, so a crash leaves either a whole version
//! (resource row, history row, search keys) or none of it.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

pub(super) type StorageError = rusqlite::Error;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS resources (rtype TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (rtype, id));
    CREATE TABLE IF NOT EXISTS history (rtype TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (rtype, id, version));
    CREATE TABLE IF NOT EXISTS search_keys (rtype TEXT NOT NULL, param TEXT NOT NULL, system TEXT NOT NULL, value TEXT NOT NULL, id TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS search_keys_lookup ON search_keys (rtype, param, system, value);
    CREATE INDEX IF NOT EXISTS search_keys_by_id ON search_keys (rtype, id);
";

/// Where the sandbox keeps its data: `sqlite::memory:`, `sqlite://PATH` or `sqlite:PATH`
/// (a `?query` suffix is ignored; the file and its directory are created if missing).
fn open_connection(url: &str) -> Result<Connection, String> {
    let failed = |e: rusqlite::Error| format!("opening the sandbox database {url}: {e}");
    if url == "sqlite::memory:" {
        return Connection::open_in_memory().map_err(failed);
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| {
            format!("sandbox database {url}: expected sqlite::memory: or sqlite://PATH")
        })?;
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!("sandbox database {url}: no file path"));
    }
    if let Some(parent) = Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let connection = Connection::open(path).map_err(failed)?;
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .map_err(failed)?;
    Ok(connection)
}

pub(super) struct Storage {
    connection: Mutex<Connection>,
}

impl Storage {
    pub(super) fn open(url: &str) -> Result<Storage, String> {
        let connection = open_connection(url)?;
        let setup = |connection: &Connection| -> Result<(), rusqlite::Error> {
            connection.busy_timeout(Duration::from_secs(5))?;
            connection.pragma_update(None, "synchronous", "NORMAL")?;
            connection.set_prepared_statement_cache_capacity(32);
            connection.execute_batch(SCHEMA)
        };
        setup(&connection).map_err(|e| format!("sandbox schema: {e}"))?;
        Ok(Storage {
            connection: Mutex::new(connection),
        })
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding it cannot leave a transaction half-applied (rusqlite
        // rolls back an unfinished transaction on drop), so a poisoned lock is usable.
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ids of the resources of `rtype` findable by `param=system|value`, sorted.
    pub(super) fn find_ids(
        &self,
        rtype: &str,
        param: &str,
        system: &str,
        value: &str,
    ) -> Result<Vec<String>, StorageError> {
        let connection = self.connection();
        let mut statement = connection.prepare_cached(
            "SELECT DISTINCT id FROM search_keys WHERE rtype = ? AND param = ? AND system = ? AND value = ? ORDER BY id",
        )?;
        let ids = statement
            .query_map(params![rtype, param, system, value], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// The current version of a resource.
    pub(super) fn load(&self, rtype: &str, id: &str) -> Result<Option<Value>, StorageError> {
        let body: Option<String> = self
            .connection()
            .prepare_cached("SELECT body FROM resources WHERE rtype = ? AND id = ?")?
            .query_row(params![rtype, id], |row| row.get(0))
            .optional()?;
        Ok(body.and_then(|body| serde_json::from_str(&body).ok()))
    }

    /// The current version number of a resource, if it exists.
    pub(super) fn current_version(
        &self,
        rtype: &str,
        id: &str,
    ) -> Result<Option<i64>, StorageError> {
        self.connection()
            .prepare_cached("SELECT version FROM resources WHERE rtype = ? AND id = ?")?
            .query_row(params![rtype, id], |row| row.get(0))
            .optional()
    }

    /// Stores `resource` as version `version` of `rtype/id` (1 for a create), with its
    /// history row and search keys, in one transaction; returns it as stored.
    pub(super) fn store_version(
        &self,
        rtype: &str,
        id: &str,
        version: i64,
        mut resource: Value,
    ) -> Result<Value, StorageError> {
        resource["id"] = json!(id);
        resource["meta"]["versionId"] = json!(version.to_string());
        resource["meta"]["lastUpdated"] =
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        let body = resource.to_string();
        let keys = search_keys(&resource);
        let mut connection = self.connection();
        let tx = connection.transaction()?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO resources (rtype, id, version, body) VALUES (?, ?, ?, ?)",
        )?
        .execute(params![rtype, id, version, body])?;
        tx.prepare_cached("INSERT INTO history (rtype, id, version, body) VALUES (?, ?, ?, ?)")?
            .execute(params![rtype, id, version, body])?;
        tx.prepare_cached("DELETE FROM search_keys WHERE rtype = ? AND id = ?")?
            .execute(params![rtype, id])?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO search_keys (rtype, param, system, value, id) VALUES (?, ?, ?, ?, ?)",
            )?;
            for (param, system, value) in &keys {
                insert.execute(params![rtype, param, system, value, id])?;
            }
        }
        tx.commit()?;
        Ok(resource)
    }

    /// Removes the current version and its search keys (history keeps the versions).
    pub(super) fn delete(&self, rtype: &str, id: &str) -> Result<(), StorageError> {
        let mut connection = self.connection();
        let tx = connection.transaction()?;
        tx.prepare_cached("DELETE FROM resources WHERE rtype = ? AND id = ?")?
            .execute(params![rtype, id])?;
        tx.prepare_cached("DELETE FROM search_keys WHERE rtype = ? AND id = ?")?
            .execute(params![rtype, id])?;
        tx.commit()
    }

    /// The first 1,000 ids of `rtype` (a search without parameters).
    pub(super) fn list_ids(&self, rtype: &str) -> Result<Vec<String>, StorageError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare_cached("SELECT id FROM resources WHERE rtype = ? ORDER BY id LIMIT 1000")?;
        let ids = statement
            .query_map(params![rtype], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// Every stored version of a resource, newest first (empty when unknown).
    pub(super) fn history(&self, rtype: &str, id: &str) -> Result<Vec<(i64, Value)>, StorageError> {
        let connection = self.connection();
        let mut statement = connection.prepare_cached(
            "SELECT version, body FROM history WHERE rtype = ? AND id = ? ORDER BY version DESC",
        )?;
        let versions = statement
            .query_map(params![rtype, id], |row| {
                let body: String = row.get(1)?;
                Ok((
                    row.get(0)?,
                    serde_json::from_str(&body).unwrap_or(Value::Null),
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(versions)
    }

    /// One stored version of a resource.
    pub(super) fn read_version(
        &self,
        rtype: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<Value>, StorageError> {
        let body: Option<String> = self
            .connection()
            .prepare_cached("SELECT body FROM history WHERE rtype = ? AND id = ? AND version = ?")?
            .query_row(params![rtype, id, version], |row| row.get(0))
            .optional()?;
        Ok(body.map(|body| serde_json::from_str(&body).unwrap_or(Value::Null)))
    }

    /// `GET /_stats`: resources per type, stored versions, and every business key that
    /// more than one resource carries (duplicates).
    pub(super) fn stats(&self) -> Result<Value, StorageError> {
        let connection = self.connection();
        let mut counts = serde_json::Map::new();
        let mut statement = connection
            .prepare("SELECT rtype, COUNT(*) FROM resources GROUP BY rtype ORDER BY rtype")?;
        for row in statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })? {
            let (rtype, count) = row?;
            counts.insert(rtype, json!(count));
        }
        let mut statement = connection.prepare(
            "SELECT rtype, param, system, value, COUNT(DISTINCT id) FROM search_keys \
             GROUP BY rtype, param, system, value HAVING COUNT(DISTINCT id) > 1 ORDER BY rtype, value",
        )?;
        let duplicates = statement
            .query_map([], |row| {
                Ok(json!({
                    "resourceType": row.get::<_, String>(0)?,
                    "key": format!(
                        "{}={}|{}",
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?
                    ),
                    "count": row.get::<_, i64>(4)?,
                }))
            })?
            .collect::<Result<Vec<Value>, _>>()?;
        let versions: i64 =
            connection.query_row("SELECT COUNT(*) FROM history", [], |row| row.get(0))?;
        Ok(json!({"resources": counts, "versions": versions, "duplicates": duplicates}))
    }
}

/// Search keys a resource is findable by: identifiers and `meta.tag`s.
pub(super) fn search_keys(resource: &Value) -> Vec<(&'static str, String, String)> {
    let mut keys = Vec::new();
    let identifiers: Vec<&Value> = match &resource["identifier"] {
        Value::Array(list) => list.iter().collect(),
        Value::Object(_) => vec![&resource["identifier"]],
        _ => vec![],
    };
    for identifier in identifiers {
        if let (Some(system), Some(value)) =
            (identifier["system"].as_str(), identifier["value"].as_str())
        {
            keys.push(("identifier", system.to_string(), value.to_string()));
        }
    }
    for tag in resource["meta"]["tag"].as_array().into_iter().flatten() {
        if let (Some(system), Some(code)) = (tag["system"].as_str(), tag["code"].as_str()) {
            keys.push(("_tag", system.to_string(), code.to_string()));
        }
    }
    keys
}
