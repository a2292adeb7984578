//! The read queries both SQL backends run, written once.
//!
//! `$N` placeholders work on PostgreSQL and on SQLite (where `$1` is a parameter name
//! numbered by first appearance; every query here uses each placeholder once, in
//! order). The texts are built at compile time, so no read formats SQL at run time.

/// The columns every envelope decoder reads, in this order.
macro_rules! select_event {
    ($tail:literal) => {
        concat!(
            "SELECT global_position, event_id, stream_id, stream_version, event_type, ",
            "schema_version, data, metadata, recorded_at, prev_hash, hash FROM events ",
            $tail
        )
    };
}

/// `$1` stream, `$2` tenant, `$3` from version, `$4` limit.
pub(crate) const READ_STREAM_FORWARDS: &str = select_event!(
    "WHERE stream_id = $1 AND tenant_id = $2 AND stream_version >= $3 ORDER BY stream_version LIMIT $4"
);
/// `$1` stream, `$2` tenant, `$3` from version, `$4` limit.
pub(crate) const READ_STREAM_BACKWARDS: &str = select_event!(
    "WHERE stream_id = $1 AND tenant_id = $2 AND stream_version <= $3 ORDER BY stream_version DESC LIMIT $4"
);
/// `$1` after position, `$2` limit.
pub(crate) const READ_ALL: &str =
    select_event!("WHERE global_position > $1 ORDER BY global_position LIMIT $2");
/// `$1` tenant, `$2` after position, `$3` limit.
pub(crate) const READ_ALL_OF_TENANT: &str = select_event!(
    "WHERE tenant_id = $1 AND global_position > $2 ORDER BY global_position LIMIT $3"
);
/// `$1` stream, `$2` tenant: a whole stream as stored, for verification.
pub(crate) const STREAM_OF_TENANT: &str =
    select_event!("WHERE stream_id = $1 AND tenant_id = $2 ORDER BY stream_version");
/// `$1` stream: a whole stream as stored, whatever its tenant (`verify_all`).
pub(crate) const STREAM: &str = select_event!("WHERE stream_id = $1 ORDER BY stream_version");

/// Every stream that has events, with its tenant (`verify_all`). From the events, not
/// the streams registry: deleting a registry row must not hide a stream from audit.
pub(crate) const STREAMS_IN_LOG: &str =
    "SELECT stream_id, MIN(tenant_id) FROM events GROUP BY stream_id ORDER BY stream_id";
/// Count, first and last position of the global log (`verify_all`).
pub(crate) const LOG_EXTENT: &str =
    "SELECT COUNT(*), MIN(global_position), MAX(global_position) FROM events";
/// Each stored position followed by a gap, with the next stored position (`verify_all`;
/// run only when the count says positions are missing).
pub(crate) const LOG_JUMPS: &str = "SELECT global_position, next_position FROM \
     (SELECT global_position, LEAD(global_position) OVER (ORDER BY global_position) AS next_position \
     FROM events) AS log WHERE next_position > global_position + 1 ORDER BY global_position LIMIT $1";

/// `verify_all`'s check of the global log on either backend's pool: the runs of missing
/// positions (`VerifyReport::missing_positions`). A macro because the two pools share
/// no executor type this crate can name without sqlx's generic bounds.
macro_rules! missing_positions {
    ($pool:expr) => {
        async {
            let (count, first, last): (i64, Option<i64>, Option<i64>) =
                sqlx::query_as($crate::store::sql::LOG_EXTENT)
                    .fetch_one($pool)
                    .await?;
            // Positions are unique, so the count falls short of the last one exactly
            // when some are missing (before the first one included).
            if count == last.unwrap_or(0) {
                return Ok::<_, $crate::store::StoreError>(Vec::new());
            }
            let jumps: Vec<(i64, i64)> = sqlx::query_as($crate::store::sql::LOG_JUMPS)
                .bind($crate::store::MAX_REPORTED_GAPS as i64)
                .fetch_all($pool)
                .await?;
            let jumps: Vec<(u64, u64)> = jumps
                .into_iter()
                .map(|(before, next)| (before as u64, next as u64))
                .collect();
            Ok($crate::store::position_gaps(
                first.map(|f| f as u64),
                &jumps,
            ))
        }
    };
}
pub(crate) use missing_positions;

/// The query for a `read_stream` direction.
pub(crate) fn read_stream(direction: super::Direction) -> &'static str {
    match direction {
        super::Direction::Forwards => READ_STREAM_FORWARDS,
        super::Direction::Backwards => READ_STREAM_BACKWARDS,
    }
}
