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

/// The query for a `read_stream` direction.
pub(crate) fn read_stream(direction: super::Direction) -> &'static str {
    match direction {
        super::Direction::Forwards => READ_STREAM_FORWARDS,
        super::Direction::Backwards => READ_STREAM_BACKWARDS,
    }
}
