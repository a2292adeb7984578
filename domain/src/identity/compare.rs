//! Field-by-field comparison of two normalized records into discrete agreement levels.
//!
//! Why it exists: Fellegi–Sunter does not weigh raw similarity scores; it weighs which
//! *level* of agreement each field reached (exact / close / else, with date-specific
//! levels for the typing errors that really happen). This module is the one place
//! that decides those levels, so the EM estimation, the scoring and the human-readable
//! trace all agree on them.
//!
//! Household-level fields (street address, postal code, city and phone) are one
//! comparison, [`Field::Household`]: partners, children and twins share all of them,
//! and Fellegi–Sunter assumes fields independent given the match status, so counting
//! them separately would add up one fact — living together — four times and make a
//! spouse look like the same person.

use serde::{Deserialize, Serialize};
use strsim::{jaro_winkler, osa_distance};

use super::normalize::SURNAME_PARTICLES;
use super::record::NormalizedRecord;
use crate::patient::Sex;

/// The compared fields, in the order of a [`ComparisonVector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    GivenName,
    FamilyName,
    BirthDate,
    Sex,
    Household,
    Email,
}

pub const FIELD_COUNT: usize = 6;

impl Field {
    pub const ALL: [Field; FIELD_COUNT] = [
        Field::GivenName,
        Field::FamilyName,
        Field::BirthDate,
        Field::Sex,
        Field::Household,
        Field::Email,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Level names, best agreement first; the last is always the disagreement level.
    pub fn level_names(self) -> &'static [&'static str] {
        match self {
            Field::GivenName => &["exact", "nickname", "close", "else"],
            Field::FamilyName => &["exact", "close", "else"],
            Field::BirthDate => &["exact", "day_month_swapped", "digit_typo", "else"],
            Field::Sex => &["agree", "disagree"],
            Field::Household => &[
                "same_address_and_phone",
                "same_address",
                "same_phone",
                "same_postal_code",
                "same_area",
                "else",
            ],
            Field::Email => &["exact", "close", "else"],
        }
    }

    pub fn level_count(self) -> usize {
        self.level_names().len()
    }

    pub fn name(self) -> &'static str {
        match self {
            Field::GivenName => "given_name",
            Field::FamilyName => "family_name",
            Field::BirthDate => "birth_date",
            Field::Sex => "sex",
            Field::Household => "household",
            Field::Email => "email",
        }
    }
}

/// The level index reached per field (0 = best), or [`MISSING`] when either side lacks
/// the value. Small and `Hash` so that millions of pairs collapse into a histogram of
/// distinct patterns for EM.
pub type ComparisonVector = [u8; FIELD_COUNT];

/// Marks a field missing on either side: it contributes weight 0.
pub const MISSING: u8 = u8::MAX;

pub mod level {
    //! Named level indices, for rules that look at specific levels.
    pub const GIVEN_EXACT: u8 = 0;
    pub const GIVEN_NICKNAME: u8 = 1;
    pub const GIVEN_CLOSE: u8 = 2;
    pub const FAMILY_EXACT: u8 = 0;
    pub const DATE_EXACT: u8 = 0;
    pub const DATE_SWAPPED: u8 = 1;
    pub const DATE_TYPO: u8 = 2;
    pub const DATE_ELSE: u8 = 3;
}

/// Jaro–Winkler similarity from which two names count as "close".
pub const NAME_CLOSE_JARO_WINKLER: f64 = 0.9;
/// Jaro–Winkler similarity from which two address lines, cities or emails are "close".
pub const TEXT_CLOSE_JARO_WINKLER: f64 = 0.92;

pub fn compare_records(left: &NormalizedRecord, right: &NormalizedRecord) -> ComparisonVector {
    [
        compare_given_names(left, right),
        compare_family_names(left, right),
        compare_birth_dates(left, right),
        compare_sex(left.sex, right.sex),
        compare_household(left, right),
        compare_emails(left.email.as_deref(), right.email.as_deref()),
    ]
}

pub fn compare_given_names(left: &NormalizedRecord, right: &NormalizedRecord) -> u8 {
    if left.given.is_empty() || right.given.is_empty() {
        return MISSING;
    }
    if left.given == right.given {
        return 0;
    }
    let (left_first, right_first) = (left.given_canonical(), right.given_canonical());
    if left_first == right_first {
        return 1;
    }
    let initial_only = |name: &str| name.len() == 1;
    let same_initial = left.given.as_bytes()[0] == right.given.as_bytes()[0];
    if (initial_only(&left.given) || initial_only(&right.given)) && same_initial {
        return 2;
    }
    if jaro_winkler(&left.given, &right.given) >= NAME_CLOSE_JARO_WINKLER
        || jaro_winkler(left_first, right_first) >= NAME_CLOSE_JARO_WINKLER
    {
        return 2;
    }
    3
}

pub fn compare_family_names(left: &NormalizedRecord, right: &NormalizedRecord) -> u8 {
    if left.family.is_empty() || right.family.is_empty() {
        return MISSING;
    }
    if left.family == right.family {
        return 0;
    }
    if jaro_winkler(&left.family, &right.family) >= NAME_CLOSE_JARO_WINKLER {
        return 1;
    }
    // Multi-part and hyphenated surnames: "garcia lopez" / "garcia", "smith jones" / "jones".
    let significant = |part: &&str| part.len() >= 3 && !SURNAME_PARTICLES.contains(part);
    let shares_a_part = left
        .family_parts()
        .filter(significant)
        .any(|part| right.family_parts().any(|other| other == part));
    if shares_a_part { 1 } else { 2 }
}

pub fn compare_birth_dates(left: &NormalizedRecord, right: &NormalizedRecord) -> u8 {
    use chrono::Datelike;
    let (Some(left), Some(right)) = (left.birth_date, right.birth_date) else {
        return MISSING;
    };
    if left == right {
        return level::DATE_EXACT;
    }
    let swapped =
        left.year() == right.year() && left.month() == right.day() && left.day() == right.month();
    if swapped {
        return level::DATE_SWAPPED;
    }
    // One mistyped digit or two adjacent digits transposed in YYYYMMDD.
    let digits = |date: chrono::NaiveDate| {
        let mut packed = date.year().unsigned_abs() * 10_000 + date.month() * 100 + date.day();
        let mut text = [0u8; 8];
        for slot in text.iter_mut().rev() {
            *slot = (packed % 10) as u8;
            packed /= 10;
        }
        text
    };
    let (left_digits, right_digits) = (digits(left), digits(right));
    let differing: Vec<usize> = (0..8)
        .filter(|&position| left_digits[position] != right_digits[position])
        .collect();
    let typo = match differing.as_slice() {
        [_] => true,
        [first, second] => {
            *second == first + 1
                && left_digits[*first] == right_digits[*second]
                && left_digits[*second] == right_digits[*first]
        }
        _ => false,
    };
    if typo {
        level::DATE_TYPO
    } else {
        level::DATE_ELSE
    }
}

pub fn compare_sex(left: Option<Sex>, right: Option<Sex>) -> u8 {
    match (left, right) {
        (Some(left), Some(right)) => u8::from(left != right),
        _ => MISSING,
    }
}

/// Street address, postal code, city and phone as one household-level comparison.
/// Levels: the same home (address line exact or close, in the same locality) and the
/// same phone; the same home only; the same phone only; the same ZIP; the same city or
/// ZIP area; else. Missing when neither side pair has an address part or phones.
pub fn compare_household(left: &NormalizedRecord, right: &NormalizedRecord) -> u8 {
    let phone = compare_phones(left.phone.as_deref(), right.phone.as_deref());
    let same_phone = matches!(phone, 0 | 1);
    match (compare_residence(left, right), same_phone) {
        (Some(Residence::SameHome), true) => 0,
        (Some(Residence::SameHome), false) => 1,
        (_, true) => 2,
        (Some(Residence::SamePostalCode), false) => 3,
        (Some(Residence::SameArea), false) => 4,
        (Some(Residence::Elsewhere), false) => 5,
        (None, false) if phone == MISSING => MISSING,
        (None, false) => 5,
    }
}

/// Where two records say the person lives, relative to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residence {
    SameHome,
    SamePostalCode,
    SameArea,
    Elsewhere,
}

/// Address line, postal code and city compared together; `None` when either side has
/// none of them.
pub fn compare_residence(left: &NormalizedRecord, right: &NormalizedRecord) -> Option<Residence> {
    let both = |a: &Option<Box<str>>, b: &Option<Box<str>>| match (a, b) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    };
    let same_postal = both(&left.postal_code, &right.postal_code);
    let same_state = both(&left.state, &right.state);
    let same_city = both(&left.city, &right.city).map(|same| same && same_state != Some(false));
    let same_line = both(&left.address_line, &right.address_line);
    if same_postal.is_none() && same_city.is_none() && same_line.is_none() {
        return None;
    }
    // An address line only means "same home" in the same locality (or with no
    // locality to contradict it).
    let same_locality = match (same_postal, same_city) {
        (Some(postal), Some(city)) => postal || city,
        (Some(postal), None) => postal,
        (None, Some(city)) => city,
        (None, None) => true,
    };
    if let (Some(left_line), Some(right_line)) = (&left.address_line, &right.address_line)
        && same_locality
        && (left_line == right_line || similar_address_lines(left_line, right_line))
    {
        return Some(Residence::SameHome);
    }
    if same_postal == Some(true) {
        return Some(Residence::SamePostalCode);
    }
    let same_area = |a: &Option<Box<str>>, b: &Option<Box<str>>| match (a, b) {
        (Some(a), Some(b)) => a[..3] == b[..3],
        _ => false,
    };
    if same_city == Some(true) || same_area(&left.postal_code, &right.postal_code) {
        return Some(Residence::SameArea);
    }
    Some(Residence::Elsewhere)
}

/// Same house number and a close street, or a close line overall.
fn similar_address_lines(left: &str, right: &str) -> bool {
    if jaro_winkler(left, right) >= TEXT_CLOSE_JARO_WINKLER {
        return true;
    }
    let mut left_words = left.split(' ');
    let mut right_words = right.split(' ');
    match (left_words.next(), right_words.next()) {
        (Some(left_number), Some(right_number))
            if left_number == right_number && left_number.bytes().any(|b| b.is_ascii_digit()) =>
        {
            let left_street = left_words.next().unwrap_or("");
            let right_street = right_words.next().unwrap_or("");
            !left_street.is_empty()
                && jaro_winkler(left_street, right_street) >= NAME_CLOSE_JARO_WINKLER
        }
        _ => false,
    }
}

/// E.164 numbers: exact, or "close" when one digit differs or two adjacent digits are
/// transposed.
pub fn compare_phones(left: Option<&str>, right: Option<&str>) -> u8 {
    let (Some(left), Some(right)) = (left, right) else {
        return MISSING;
    };
    if left == right {
        return 0;
    }
    if left.len() == right.len() && osa_distance(left, right) <= 1 {
        return 1;
    }
    2
}

/// Emails: exact, or "close" for the same local part at another domain, or a one-key
/// typo that leaves the digits alone.
pub fn compare_emails(left: Option<&str>, right: Option<&str>) -> u8 {
    let (Some(left), Some(right)) = (left, right) else {
        return MISSING;
    };
    if left == right {
        return 0;
    }
    fn local(email: &str) -> &str {
        email.split('@').next().unwrap_or("")
    }
    // A one-key typo counts, but not a different number: john.smith1@ and
    // john.smith2@ are two people.
    let digits =
        |email: &str| -> String { local(email).chars().filter(char::is_ascii_digit).collect() };
    if local(left) == local(right)
        || (osa_distance(left, right) <= 1 && digits(left) == digits(right))
    {
        return 1;
    }
    2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::record::PatientRecord;
    use chrono::NaiveDate;

    fn record(given: &str, family: &str, birth: (i32, u32, u32)) -> PatientRecord {
        PatientRecord {
            record_id: "x".into(),
            given_name: given.into(),
            family_name: family.into(),
            birth_date: NaiveDate::from_ymd_opt(birth.0, birth.1, birth.2),
            ..PatientRecord::default()
        }
    }

    fn given_level(left: &str, right: &str) -> u8 {
        compare_given_names(
            &record(left, "a", (2000, 1, 1)).normalize(),
            &record(right, "a", (2000, 1, 1)).normalize(),
        )
    }

    fn family_level(left: &str, right: &str) -> u8 {
        compare_family_names(
            &record("a", left, (2000, 1, 1)).normalize(),
            &record("a", right, (2000, 1, 1)).normalize(),
        )
    }

    fn date_level(left: (i32, u32, u32), right: (i32, u32, u32)) -> u8 {
        compare_birth_dates(
            &record("a", "b", left).normalize(),
            &record("a", "b", right).normalize(),
        )
    }

    #[test]
    fn given_name_levels() {
        assert_eq!(given_level("JOSÉ", "jose"), 0);
        assert_eq!(given_level("Bob", "Robert"), 1);
        assert_eq!(given_level("Liz", "Beth"), 1);
        assert_eq!(given_level("Jonathon", "Jonathan"), 2);
        assert_eq!(given_level("J", "John"), 2);
        assert_eq!(given_level("Mary", "Susan"), 3);
        assert_eq!(given_level("", "Susan"), MISSING);
    }

    #[test]
    fn family_name_levels() {
        assert_eq!(family_level("O'Brien", "OBRIEN"), 0);
        assert_eq!(family_level("Johnson", "Jonhson"), 1);
        assert_eq!(family_level("García López", "Lopez"), 1);
        assert_eq!(family_level("Smith-Jones", "Jones"), 1);
        assert_eq!(family_level("De La Cruz", "La Rosa"), 2);
        assert_eq!(family_level("Smith", "Nguyen"), 2);
    }

    #[test]
    fn birth_date_levels() {
        assert_eq!(date_level((1980, 3, 4), (1980, 3, 4)), level::DATE_EXACT);
        assert_eq!(date_level((1980, 3, 4), (1980, 4, 3)), level::DATE_SWAPPED);
        assert_eq!(date_level((1980, 3, 4), (1980, 3, 9)), level::DATE_TYPO);
        assert_eq!(date_level((1980, 3, 12), (1980, 3, 21)), level::DATE_TYPO);
        assert_eq!(date_level((1980, 3, 4), (1908, 3, 4)), level::DATE_TYPO);
        assert_eq!(date_level((1980, 3, 4), (1975, 6, 20)), level::DATE_ELSE);
        assert_eq!(date_level((1980, 3, 4), (1981, 4, 3)), level::DATE_ELSE);
    }

    #[test]
    fn household_levels() {
        let at = |line: Option<&str>, city: &str, zip: &str, phone: Option<&str>| {
            PatientRecord {
                address_line: line.map(Into::into),
                city: Some(city.into()),
                state: Some("IL".into()),
                postal_code: Some(zip.into()),
                phone: phone.map(Into::into),
                ..PatientRecord::default()
            }
            .normalize()
        };
        let phone = Some("312-555-0101");
        let home = at(Some("12 Elm Street Apt 3"), "Chicago", "60614", phone);
        let level = |other: &NormalizedRecord| compare_household(&home, other);
        assert_eq!(
            level(&at(
                Some("12 ELM ST #3"),
                "chicago",
                "60614",
                Some("(312) 555 0101")
            )),
            0
        );
        assert_eq!(level(&at(Some("12 Elm St"), "Chicago", "60614", None)), 1);
        assert_eq!(
            level(&at(
                Some("12 Elm St"),
                "Chicago",
                "60614",
                Some("312-555-9999")
            )),
            1
        );
        assert_eq!(level(&at(Some("98 Oak Ave"), "Peoria", "61602", phone)), 2);
        assert_eq!(level(&at(Some("98 Oak Ave"), "Chicago", "60614", None)), 3);
        assert_eq!(level(&at(Some("98 Oak Ave"), "Chicago", "60657", None)), 4);
        assert_eq!(
            level(&at(Some("12 Elm Street Apt 3"), "Peoria", "61602", None)),
            5
        );
        assert_eq!(level(&PatientRecord::default().normalize()), MISSING);
        let phone_only = PatientRecord {
            phone: Some("773 555 8888".into()),
            ..PatientRecord::default()
        };
        assert_eq!(level(&phone_only.normalize()), 5);
    }

    #[test]
    fn phone_email_and_sex_levels() {
        assert_eq!(
            compare_phones(Some("+15552013344"), Some("+15552013344")),
            0
        );
        assert_eq!(
            compare_phones(Some("+15552013344"), Some("+15552013434")),
            1
        );
        assert_eq!(
            compare_phones(Some("+15552013344"), Some("+15559990000")),
            2
        );
        assert_eq!(compare_phones(None, Some("+15559990000")), MISSING);
        assert_eq!(compare_emails(Some("a.b@x.com"), Some("a.b@y.org")), 1);
        assert_eq!(compare_emails(Some("a.b@x.com"), Some("a.bb@x.com")), 1);
        assert_eq!(compare_emails(Some("a.b@x.com"), Some("zz@x.com")), 2);
        assert_eq!(compare_emails(Some("a.b1@x.com"), Some("a.b2@x.com")), 2);
        assert_eq!(compare_sex(Some(Sex::Female), Some(Sex::Female)), 0);
        assert_eq!(compare_sex(Some(Sex::Female), Some(Sex::Male)), 1);
        assert_eq!(compare_sex(None, Some(Sex::Male)), MISSING);
    }
}
