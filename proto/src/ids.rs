//! Validated identifiers that travel on the wire and end up in NATS subjects and SQL:
//! tenants and stream ids. Parsing is the only way to build them, so every other
//! layer can rely on their shape (no dots, wildcards or whitespace in subjects).

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "invalid tenant id {0:?}: use 1-63 chars of a-z, 0-9, '_' or '-', starting with a letter or digit"
    )]
    InvalidTenant(String),
    #[error(
        "invalid stream id {0:?}: expected <category>-<uuid> or <category>-<name> (lowercase a-z, 0-9, '_', '-')"
    )]
    InvalidStream(String),
}

fn is_slug(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// An organization. Every stream belongs to exactly one tenant; every read is scoped.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if is_slug(value, 63) {
            Ok(TenantId(value.to_owned()))
        } else {
            Err(IdError::InvalidTenant(value.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        TenantId::parse(&value)
    }
}

impl From<TenantId> for String {
    fn from(value: TenantId) -> Self {
        value.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `<category>-<id>`: `encounter-<uuid>`, `patient-<uuid>`, `rpm-<uuid>`, `policy-billing`.
/// The category is the part before the first '-'.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

/// Longest accepted stream id (category + '-' + 36-char uuid fits comfortably).
pub const MAX_STREAM_ID_LEN: usize = 100;

impl StreamId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let invalid = || IdError::InvalidStream(value.to_owned());
        if value.len() > MAX_STREAM_ID_LEN {
            return Err(invalid());
        }
        let (category, rest) = value.split_once('-').ok_or_else(invalid)?;
        let category_ok = !category.is_empty()
            && category.len() <= 32
            && category
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase())
            && category
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !category_ok || !is_slug(rest, MAX_STREAM_ID_LEN) {
            return Err(invalid());
        }
        Ok(StreamId(value.to_owned()))
    }

    /// The stream of one aggregate instance: `<category>-<uuid>`.
    pub fn for_aggregate(category: &str, id: Uuid) -> Self {
        StreamId::parse(&format!("{category}-{id}")).expect("categories are static slugs")
    }

    pub fn category(&self) -> &str {
        self.0
            .split_once('-')
            .map_or(&self.0, |(category, _)| category)
    }

    /// The part after the category: a uuid for aggregate streams.
    pub fn id_part(&self) -> &str {
        self.0.split_once('-').map_or("", |(_, id)| id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StreamId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        StreamId::parse(&value)
    }
}

impl From<StreamId> for String {
    fn from(value: StreamId) -> Self {
        value.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids() {
        let id = Uuid::from_u128(7);
        let stream = StreamId::for_aggregate("encounter", id);
        assert_eq!(stream.category(), "encounter");
        assert_eq!(stream.id_part(), id.to_string());
        assert_eq!(
            StreamId::parse("policy-billing").unwrap().category(),
            "policy"
        );
        for bad in [
            "",
            "encounter",
            "encounter-",
            "-abc",
            "Encounter-1",
            "enc.ounter-1",
            "encounter-a b",
            "encounter-*",
            "encounter->",
        ] {
            assert!(StreamId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(StreamId::parse(&format!("x-{}", "a".repeat(120))).is_err());
    }

    #[test]
    fn tenant_ids() {
        assert!(TenantId::parse("clinic-a").is_ok());
        for bad in [
            "",
            "Clinic",
            "a.b",
            "a*",
            "a>",
            "-a",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let json: Result<TenantId, _> = serde_json::from_str("\"a.b\"");
        assert!(json.is_err());
    }
}
