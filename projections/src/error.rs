//! Errors of the projection engine, split by what the engine does about them.

use chartline_infra::StoreError;

/// Why applying or managing a projection failed.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The handler cannot apply this event (undecodable payload, impossible data): the
    /// event is poison. The engine quarantines it in the dead-letter table and follows
    /// its policy; retrying the same code on the same event fails the same way.
    #[error("{0}")]
    Handler(String),
    /// The read-model database failed (unreachable, lock timeout, constraint): nothing of
    /// the batch was committed. The engine retries with backoff; callers may retry.
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    /// As `Database`, from the SQLite driver the read models are written with.
    #[error("read-model database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The event store failed to deliver events: retry with backoff.
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    /// Bad configuration or operator input (unknown projection, bad URL): fix and rerun.
    #[error("{0}")]
    Config(String),
    /// The request does not fit the projection's current state (e.g. retrying a dead
    /// letter that was already applied): nothing changed.
    #[error("{0}")]
    Rejected(String),
    /// A stored read-model row could not be decoded: the table is corrupt or from an
    /// incompatible version. Rebuild the projection.
    #[error("corrupt read-model row in {table}: {message}")]
    CorruptRow { table: String, message: String },
}

impl ProjectionError {
    pub fn handler(message: impl std::fmt::Display) -> Self {
        ProjectionError::Handler(message.to_string())
    }

    /// Poison (dead-letter it) as opposed to an infrastructure failure (retry it).
    pub fn is_poison(&self) -> bool {
        matches!(self, ProjectionError::Handler(_))
    }
}
