//! Reading timestamps back: every envelope carries two (`recorded_at` and
//! `metadata.occurred_at`), and a catch-up or an audit replay reads millions. Both
//! fields deserialize through [`deserialize_utc`] (JSON from the store service and
//! JetStream), and the stores parse the `recorded_at` column with [`parse_utc`].
//!
//! [`parse_utc`] reads the one shape Chartline writes, `YYYY-MM-DDTHH:MM:SS[.f…]Z`
//! (chrono's RFC 3339 output in UTC, 0 to 9 fraction digits), with a few byte
//! comparisons, and hands anything else to chrono's parser, so it accepts exactly what
//! chrono accepts and yields the same instant. chrono's general parser was 7 % of the
//! client's work in a PostgreSQL `read_all`.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, Utc};

/// An RFC 3339 timestamp as a UTC instant; the same result as
/// `text.parse::<DateTime<FixedOffset>>()` converted to UTC.
pub fn parse_utc(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match written_shape(text.as_bytes()) {
        Some(at) => Ok(at),
        None => text
            .parse::<DateTime<FixedOffset>>()
            .map(|at| at.with_timezone(&Utc)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z` with a valid date and time; `None` for anything
/// else (other offsets, leap seconds, lower case, invalid dates), which the caller
/// leaves to chrono.
fn written_shape(b: &[u8]) -> Option<DateTime<Utc>> {
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[b.len() - 1] != b'Z'
    {
        return None;
    }
    let digits = |field: &[u8]| {
        field.iter().try_fold(0u32, |value, &c| {
            c.is_ascii_digit().then(|| value * 10 + u32::from(c - b'0'))
        })
    };
    let nanos = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            digits(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let second = digits(&b[17..19])?;
    if second > 59 {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(
        digits(&b[0..4])? as i32,
        digits(&b[5..7])?,
        digits(&b[8..10])?,
    )?;
    let time =
        NaiveTime::from_hms_nano_opt(digits(&b[11..13])?, digits(&b[14..16])?, second, nanos)?;
    Some(date.and_time(time).and_utc())
}

/// `#[serde(deserialize_with)]` for a `DateTime<Utc>` field, through [`parse_utc`].
pub fn deserialize_utc<'de, D>(deserializer: D) -> Result<DateTime<Utc>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Rfc3339;
    impl serde::de::Visitor<'_> for Rfc3339 {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 timestamp")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            parse_utc(text).map_err(E::custom)
        }
    }
    deserializer.deserialize_str(Rfc3339)
}

#[cfg(test)]
mod tests {
    use chrono::{SecondsFormat, TimeZone};
    use proptest::prelude::*;

    use super::*;

    fn chrono_says(text: &str) -> Option<DateTime<Utc>> {
        text.parse::<DateTime<FixedOffset>>()
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    #[test]
    fn agrees_with_chrono_on_written_and_unusual_shapes() {
        for text in [
            "2026-11-26T15:20:24Z",
            "2026-11-26T15:20:24.1Z",
            "2026-11-26T15:20:24.123Z",
            "2026-11-26T15:20:24.123456Z",
            "2026-11-26T15:20:24.123456789Z",
            "2024-02-29T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            // Left to chrono:
            "2026-11-26T15:20:24+02:00",
            "2026-11-26T15:20:24.5-05:30",
            "2016-12-31T23:59:60Z",
            "2026-11-26t15:20:24z",
            "2026-11-26 15:20:24Z",
            // Refused by both:
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-26T24:00:00Z",
            "2026-11-26T15:20:24.Z",
            "2026-11-26T15:20:24.1234567890Z",
            "2026-11-26T15:2a:24Z",
            "2026-11-26T15:20:24",
            "",
            "not a time",
        ] {
            assert_eq!(parse_utc(text).ok(), chrono_says(text), "{text:?}");
        }
        assert!(written_shape(b"2026-11-26T15:20:24.123456Z").is_some());
        assert!(parse_utc("2023-02-29T00:00:00Z").is_err());
    }

    #[test]
    fn envelope_timestamps_deserialize_through_it() {
        #[derive(serde::Deserialize)]
        struct At {
            #[serde(deserialize_with = "deserialize_utc")]
            at: DateTime<Utc>,
        }
        let at: At = serde_json::from_str(r#"{"at":"2026-11-26T15:20:24.000001Z"}"#).unwrap();
        assert_eq!(at.at, Utc.timestamp_micros(1_795_706_424_000_001).unwrap());
        let escaped: At = serde_json::from_str(r#"{"at":"2026-11-26T15:20:24\u005a"}"#).unwrap();
        assert_eq!(escaped.at, Utc.timestamp_opt(1_795_706_424, 0).unwrap());
        assert!(serde_json::from_str::<At>(r#"{"at":"2026-02-30T00:00:00Z"}"#).is_err());
        assert!(serde_json::from_str::<At>(r#"{"at":17}"#).is_err());
    }

    proptest! {
        /// Every instant chrono writes, in every precision, reads back the same way
        /// chrono reads it.
        #[test]
        fn reads_what_chrono_writes(
            seconds in -62_135_596_800i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
        ) {
            let at = Utc.timestamp_opt(seconds, nanos).unwrap();
            for format in [
                SecondsFormat::Secs,
                SecondsFormat::Millis,
                SecondsFormat::Micros,
                SecondsFormat::Nanos,
                SecondsFormat::AutoSi,
            ] {
                let text = at.to_rfc3339_opts(format, true);
                prop_assert_eq!(parse_utc(&text).ok(), chrono_says(&text));
                prop_assert!(written_shape(text.as_bytes()).is_some());
            }
        }
    }
}
