//! NATS subject builders: the one place subject shapes are spelled.
//!
//! API boundary: external systems publish commands to and consume events from these
//! subjects (see docs/integration.md). Tenants and categories are validated slugs, so
//! a subject never gains extra tokens or wildcards from user input.

use crate::ids::TenantId;

/// Prefix of every Chartline subject.
pub const ROOT: &str = "chartline";

/// JetStream stream that carries every committed event.
pub const EVENTS_STREAM: &str = "CHARTLINE_EVENTS";

/// `chartline.store.<tenant>.<operation>`: the event store service's request/reply API.
pub fn store(tenant: &TenantId, operation: &str) -> String {
    format!("{ROOT}.store.{tenant}.{operation}")
}

/// Wildcard the store service subscribes to (all tenants, all operations).
pub fn store_wildcard() -> String {
    format!("{ROOT}.store.*.*")
}

/// `chartline.cmd.<tenant>.<service>.<command>`: service command request/reply.
pub fn command(tenant: &TenantId, service: &str, command: &str) -> String {
    format!("{ROOT}.cmd.{tenant}.{service}.{command}")
}

/// Wildcard a service subscribes to for its commands (all tenants).
pub fn command_wildcard(service: &str) -> String {
    format!("{ROOT}.cmd.*.{service}.*")
}

/// `chartline.evt.<tenant>.<category>.<event_type>`: published committed events.
pub fn event(tenant: &TenantId, category: &str, event_type: &str) -> String {
    format!("{ROOT}.evt.{tenant}.{category}.{event_type}")
}

/// Subjects captured by the `CHARTLINE_EVENTS` JetStream stream.
pub fn events_wildcard() -> String {
    format!("{ROOT}.evt.>")
}

/// Splits `chartline.store.<tenant>.<operation>` or `chartline.cmd.<tenant>.<service>.<command>`
/// into its tokens after the root and kind; `None` when the subject is not of that kind.
pub fn parse<'a>(subject: &'a str, kind: &str) -> Option<Vec<&'a str>> {
    let mut tokens = subject.split('.');
    if tokens.next()? != ROOT || tokens.next()? != kind {
        return None;
    }
    Some(tokens.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_the_documented_shape() {
        let tenant = TenantId::parse("clinic-a").unwrap();
        assert_eq!(store(&tenant, "append"), "chartline.store.clinic-a.append");
        assert_eq!(
            command(&tenant, "scheduling", "schedule"),
            "chartline.cmd.clinic-a.scheduling.schedule"
        );
        assert_eq!(
            event(&tenant, "encounter", "NoteSigned"),
            "chartline.evt.clinic-a.encounter.NoteSigned"
        );
        assert_eq!(
            parse("chartline.cmd.clinic-a.scheduling.schedule", "cmd"),
            Some(vec!["clinic-a", "scheduling", "schedule"])
        );
        assert_eq!(parse("chartline.evt.clinic-a.x.y", "cmd"), None);
    }
}
