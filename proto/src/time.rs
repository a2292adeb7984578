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
//!
//! [`write_rfc3339`] is the other direction for the append path, which writes two
//! timestamps per event into the hash input: the bytes chrono's `to_rfc3339_opts(format,
//! true)` writes, without its formatting machinery (chrono for anything unusual).

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveTime, SecondsFormat, Timelike, Utc};

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

/// Appends `at.to_rfc3339_opts(format, true)` to `out`, byte for byte. Years 0–9999
/// without a leap second take a direct path; anything else goes through chrono.
pub fn write_rfc3339(out: &mut Vec<u8>, at: DateTime<Utc>, format: SecondsFormat) {
    let year = at.year();
    let nanos = at.nanosecond();
    let fraction = match format {
        SecondsFormat::Secs => Some(0),
        SecondsFormat::Millis => Some(3),
        SecondsFormat::Micros => Some(6),
        SecondsFormat::Nanos => Some(9),
        SecondsFormat::AutoSi if nanos == 0 => Some(0),
        SecondsFormat::AutoSi if nanos.is_multiple_of(1_000_000) => Some(3),
        SecondsFormat::AutoSi if nanos.is_multiple_of(1_000) => Some(6),
        SecondsFormat::AutoSi => Some(9),
        _ => None,
    };
    let Some(fraction) = fraction.filter(|_| (0..=9999).contains(&year) && nanos < 1_000_000_000)
    else {
        out.extend_from_slice(at.to_rfc3339_opts(format, true).as_bytes());
        return;
    };
    push_digits(out, year as u32, 4);
    for (separator, value) in [
        (b'-', at.month()),
        (b'-', at.day()),
        (b'T', at.hour()),
        (b':', at.minute()),
        (b':', at.second()),
    ] {
        out.push(separator);
        push_digits(out, value, 2);
    }
    if fraction > 0 {
        out.push(b'.');
        push_digits(out, nanos / 10u32.pow(9 - fraction), fraction);
    }
    out.push(b'Z');
}

/// `value`'s last `width` decimal digits, zero-padded.
fn push_digits(out: &mut Vec<u8>, value: u32, width: u32) {
    for place in (0..width).rev() {
        out.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
    }
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

    #[test]
    fn writes_what_chrono_writes_at_the_edges() {
        for (seconds, nanos) in [
            (0, 0),
            (1_795_706_424, 1),
            (1_795_706_424, 120_000_000),
            (1_795_706_424, 123_456_000),
            (1_795_706_424, 999_999_999),
            // A leap second (nanos ≥ 10⁹) and years outside 0–9999 go through chrono.
            (1_483_228_799, 1_500_000_000),
            (-62_167_219_201, 0),
            (253_402_300_800, 5_000),
            (-62_135_596_800, 0),
        ] {
            let at = Utc.timestamp_opt(seconds, nanos).unwrap();
            for format in FORMATS {
                let mut out = Vec::new();
                write_rfc3339(&mut out, at, format);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    at.to_rfc3339_opts(format, true),
                    "{seconds} {nanos} {format:?}"
                );
            }
        }
    }

    const FORMATS: [SecondsFormat; 5] = [
        SecondsFormat::Secs,
        SecondsFormat::Millis,
        SecondsFormat::Micros,
        SecondsFormat::Nanos,
        SecondsFormat::AutoSi,
    ];

    proptest! {
        /// The direct writer writes what chrono writes.
        #[test]
        fn writes_what_chrono_writes(
            seconds in -62_167_219_200i64..253_402_300_800,
            nanos in prop_oneof![
                Just(0u32),
                (0u32..1_000).prop_map(|ms| ms * 1_000_000),
                (0u32..1_000_000).prop_map(|us| us * 1_000),
                0u32..1_000_000_000,
            ],
        ) {
            let at = Utc.timestamp_opt(seconds, nanos).unwrap();
            for format in FORMATS {
                let mut out = Vec::new();
                write_rfc3339(&mut out, at, format);
                prop_assert_eq!(String::from_utf8(out).unwrap(), at.to_rfc3339_opts(format, true));
            }
        }

        /// Every instant chrono writes, in every precision, reads back the same way
        /// chrono reads it.
        #[test]
        fn reads_what_chrono_writes(
            seconds in -62_135_596_800i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
        ) {
            let at = Utc.timestamp_opt(seconds, nanos).unwrap();
            for format in FORMATS {
                let text = at.to_rfc3339_opts(format, true);
                prop_assert_eq!(parse_utc(&text).ok(), chrono_says(&text));
                prop_assert!(written_shape(text.as_bytes()).is_some());
            }
        }
    }
}
