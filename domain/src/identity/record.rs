//! The two shapes of a patient record inside the matcher.
//!
//! Why it exists: callers hand in what they received ([`PatientRecord`], raw strings
//! from a CSV row, an intake form or the `Patient` aggregate's demographics); the
//! matcher only ever compares [`NormalizedRecord`]s, built once per record so that a
//! million known patients are normalized once, not once per comparison.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::normalize::{
    canonical_given_name, normalize_address_line, normalize_city, normalize_email,
    normalize_family_name, normalize_given_name, normalize_phone, normalize_postal_code,
    normalize_state,
};
use crate::patient::{Demographics, Identifier, Sex};

/// A record as received. Free-text fields are kept verbatim; `birth_date` and `sex`
/// are already parsed (their parse errors belong to whoever read the source).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PatientRecord {
    /// The caller's id for this record (a CSV `record_id`, a patient UUID, an MRN…).
    pub record_id: String,
    pub given_name: String,
    pub family_name: String,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<Sex>,
    pub address_line: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    /// Trusted identifiers (MRNs with their assigning authority).
    pub identifiers: Vec<Identifier>,
}

impl PatientRecord {
    /// The record the identity service matches for a registration.
    pub fn from_demographics(
        record_id: impl Into<String>,
        demographics: &Demographics,
        identifiers: Vec<Identifier>,
    ) -> Self {
        PatientRecord {
            record_id: record_id.into(),
            given_name: demographics.given_name.clone(),
            family_name: demographics.family_name.clone(),
            birth_date: Some(demographics.birth_date),
            sex: match demographics.sex {
                Sex::Unknown => None,
                known => Some(known),
            },
            address_line: demographics.address_line.clone(),
            city: demographics.city.clone(),
            state: demographics.state.clone(),
            postal_code: demographics.postal_code.clone(),
            phone: demographics.phone.clone(),
            email: demographics.email.clone(),
            identifiers,
        }
    }

    pub fn normalize(&self) -> NormalizedRecord {
        let given = normalize_given_name(&self.given_name);
        let canonical = canonical_given_name(&given);
        let first_given = given.split(' ').next().unwrap_or("");
        let given_canonical = (canonical != first_given).then(|| canonical.into());
        let (family_parts, family) = normalize_family_name(&self.family_name);
        let family_parts = (family_parts != family).then(|| family_parts.into_boxed_str());
        let boxed = |value: Option<String>| value.map(String::into_boxed_str);
        NormalizedRecord {
            record_id: self.record_id.as_str().into(),
            given: given.as_str().into(),
            given_canonical,
            family: family.into_boxed_str(),
            family_parts,
            birth_date: self.birth_date,
            sex: self.sex.filter(|sex| *sex != Sex::Unknown),
            address_line: boxed(
                self.address_line
                    .as_deref()
                    .and_then(normalize_address_line),
            ),
            city: boxed(self.city.as_deref().and_then(normalize_city)),
            state: boxed(self.state.as_deref().and_then(normalize_state)),
            postal_code: boxed(self.postal_code.as_deref().and_then(normalize_postal_code)),
            phone: boxed(self.phone.as_deref().and_then(normalize_phone)),
            email: boxed(self.email.as_deref().and_then(normalize_email)),
            identifiers: self
                .identifiers
                .iter()
                .filter_map(normalize_identifier)
                .collect(),
        }
    }
}

/// An identifier compared exactly after trimming, removing inner whitespace and
/// uppercasing the value (MRNs are case-insensitive in every EHR we integrate with;
/// leading zeros are significant). Empty system or value → dropped.
fn normalize_identifier(identifier: &Identifier) -> Option<Identifier> {
    let system = identifier.system.trim();
    let value: String = identifier
        .value
        .chars()
        .filter(|character| !character.is_whitespace())
        .flat_map(char::to_uppercase)
        .collect();
    (!system.is_empty() && !value.is_empty()).then(|| Identifier {
        system: system.to_string(),
        value,
    })
}

/// A record after normalization (see `normalize`). Empty `given`/`family` and `None`
/// fields are missing values: they weigh 0 in matching.
///
/// Strings are boxed slices and derived forms are stored only when they differ from
/// the base form: with a million known patients the index is mostly these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedRecord {
    pub record_id: Box<str>,
    /// Folded tokens joined by one space ("mary ann").
    pub given: Box<str>,
    /// The formal name behind a nickname, when it differs from `given` ("robert" for "bob").
    given_canonical: Option<Box<str>>,
    /// Compact family name ("garcialopez").
    pub family: Box<str>,
    /// Spaced family name when it has several parts ("garcia lopez").
    family_parts: Option<Box<str>>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<Sex>,
    pub address_line: Option<Box<str>>,
    pub city: Option<Box<str>>,
    pub state: Option<Box<str>>,
    pub postal_code: Option<Box<str>>,
    pub phone: Option<Box<str>>,
    pub email: Option<Box<str>>,
    pub identifiers: Box<[Identifier]>,
}

impl NormalizedRecord {
    /// The nickname-resolved first given name ("bob smith" → "robert").
    pub fn given_canonical(&self) -> &str {
        self.given_canonical
            .as_deref()
            .unwrap_or_else(|| self.given.split(' ').next().unwrap_or(""))
    }

    /// The family name's parts ("garcia lopez" → garcia, lopez).
    pub fn family_parts(&self) -> impl Iterator<Item = &str> {
        self.family_parts
            .as_deref()
            .unwrap_or(&self.family)
            .split(' ')
            .filter(|part| !part.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_normalizes_every_field() {
        let record = PatientRecord {
            record_id: "r1".into(),
            given_name: "Bob".into(),
            family_name: "García-López".into(),
            birth_date: NaiveDate::from_ymd_opt(1970, 1, 2),
            sex: Some(Sex::Unknown),
            address_line: Some("12 North Elm Street".into()),
            city: Some("Saint Paul".into()),
            state: Some("Minnesota".into()),
            postal_code: Some("55101-2222".into()),
            phone: Some("(651) 555-0100".into()),
            email: Some("Bob@Example.com".into()),
            identifiers: vec![Identifier {
                system: " urn:ehr ".into(),
                value: " ab 12 ".into(),
            }],
        };
        let normalized = record.normalize();
        assert_eq!(&*normalized.given, "bob");
        assert_eq!(normalized.given_canonical(), "robert");
        assert_eq!(&*normalized.family, "garcialopez");
        assert_eq!(
            normalized.family_parts().collect::<Vec<_>>(),
            ["garcia", "lopez"]
        );
        assert_eq!(normalized.sex, None);
        assert_eq!(normalized.address_line.as_deref(), Some("12 n elm st"));
        assert_eq!(normalized.city.as_deref(), Some("st paul"));
        assert_eq!(normalized.state.as_deref(), Some("mn"));
        assert_eq!(normalized.postal_code.as_deref(), Some("55101"));
        assert_eq!(normalized.phone.as_deref(), Some("+16515550100"));
        assert_eq!(normalized.email.as_deref(), Some("bob@example.com"));
        assert_eq!(
            normalized.identifiers.as_ref(),
            [Identifier {
                system: "urn:ehr".into(),
                value: "AB12".into()
            }]
        );
    }

    #[test]
    fn derived_forms_fall_back_to_the_base_form() {
        let record = PatientRecord {
            given_name: "Ann Marie".into(),
            family_name: "Smith".into(),
            ..PatientRecord::default()
        };
        let normalized = record.normalize();
        assert_eq!(normalized.given_canonical(), "ann");
        assert_eq!(normalized.family_parts().collect::<Vec<_>>(), ["smith"]);
    }
}
