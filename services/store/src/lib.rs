//! Event store service: serves the configured store (PostgreSQL in production) over
//! NATS request/reply on `chartline.store.<tenant>.<operation>`. Any number of instances
//! may run: they share the subjects through a queue group, and every write goes through
//! the database's single-writer lock (see `chartline_infra::store`).

#![forbid(unsafe_code)]

use chartline_infra::EventStore;
use chartline_infra::store::StoreError;

/// Serves `store` on NATS until `shutdown` resolves; in-flight requests finish first.
pub async fn run<S: EventStore>(
    client: async_nats::Client,
    store: S,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), StoreError> {
    chartline_infra::store::nats::serve(client, store, root.to_string(), shutdown).await
}
