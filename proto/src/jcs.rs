//! RFC 8785 (JSON Canonicalization Scheme) writer for the hash chain.
//!
//! Byte-identical to the `serde_json_canonicalizer` crate (the tests below prove it on
//! arbitrary values), without its cost: that crate buffers every object, re-parses each
//! key as JSON to build its UTF-16 sort key and formats through a generic serializer,
//! which made hashing ≈ 40 % of an append's CPU. Here objects are sorted by borrowing
//! their keys, and every other value is written straight into the output.
//!
//! The rules (RFC 8785 §3.2): no whitespace; object members sorted by the UTF-16 code
//! units of their names; strings escaped as ECMAScript `JSON.stringify` does (`"` `\`,
//! the short escapes `\b \t \n \f \r`, other controls as lowercase `\u00xx`, everything
//! else literal); numbers as IEEE-754 doubles in ECMAScript `Number.toString` form.

use serde_json::Value;

/// Appends the canonical form of `value` to `out`.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => match number.as_i64() {
            // An integer a double holds exactly prints as its digits (ECMAScript writes
            // integral values below 10^21 without exponent): no shortest-float search.
            Some(integer) if integer.unsigned_abs() <= 1 << 53 => write_integer(out, integer),
            _ => write_number(
                out,
                number
                    .as_f64()
                    .expect("serde_json numbers without arbitrary precision are f64-convertible"),
            ),
        },
        Value::String(text) => write_string(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            // serde_json's map iterates in byte order of the names. UTF-8 byte order equals
            // UTF-16 code-unit order except around supplementary characters: re-sort only
            // when a name contains one.
            if sorted
                .iter()
                .any(|(name, _)| name.chars().any(|c| c as u32 > 0xFFFF))
            {
                sorted.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            } else if !sorted.is_sorted_by(|(a, _), (b, _)| a <= b) {
                sorted.sort_by_key(|(name, _)| *name);
            }
            out.push(b'{');
            for (index, (name, member)) in sorted.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_string(out, name);
                out.push(b':');
                write_value(out, member);
            }
            out.push(b'}');
        }
    }
}

/// Appends a double in ECMAScript `Number.prototype.toString` form.
pub fn write_number(out: &mut Vec<u8>, value: f64) {
    let mut buffer = ryu_js::Buffer::new();
    out.extend_from_slice(buffer.format_finite(value).as_bytes());
}

/// Appends an unsigned integer as [`write_number`] writes it (as a double).
pub fn write_unsigned(out: &mut Vec<u8>, value: u64) {
    if value <= 1 << 53 {
        write_integer(out, value as i64);
    } else {
        write_number(out, value as f64);
    }
}

/// Appends an integer in decimal, as [`write_number`] writes it when |value| ≤ 2^53.
fn write_integer(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    let mut magnitude = value.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Appends a string literal, escaped as RFC 8785 requires.
pub fn write_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0A => b"\\n",
            0x0C => b"\\f",
            0x0D => b"\\r",
            0x00..=0x1F => {
                out.extend_from_slice(&bytes[start..index]);
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xF)],
                ]);
                start = index + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..index]);
        out.extend_from_slice(escape);
        start = index + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::write_value;

    fn canonical(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        write_value(&mut out, value);
        out
    }

    fn reference(value: &Value) -> Vec<u8> {
        serde_json_canonicalizer::to_vec(value).expect("reference canonicalizes")
    }

    #[test]
    // 333333333.33333329 is RFC 8785's own example of a value that must round.
    #[allow(clippy::excessive_precision)]
    fn rfc_8785_examples_and_edge_cases_match_the_reference() {
        let cases = [
            json!({"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
                   "string": "\u{20ac}$\u{000F}\u{000a}A'\u{0042}\u{0022}\u{005c}\\\"/",
                   "literals": [null, true, false]}),
            json!({"\u{20ac}": "Euro Sign", "\r": "Carriage Return", "\u{fb33}": "Hebrew Letter Dalet With Dagesh",
                   "1": "One", "\u{1f600}": "Emoji: Grinning Face", "\u{0080}": "Control", "\u{00f6}": "Latin Small Letter O With Diaeresis"}),
            json!({"big": u64::MAX, "neg": i64::MIN, "exact": 9007199254740993u64, "zero": -0.0, "tiny": 5e-324}),
            json!([
                "\u{7f}",
                "\u{2028}\u{2029}",
                "/",
                "\u{0}\u{1}\u{1f}",
                "\u{ffff}",
                "\u{10000}"
            ]),
            json!({"\u{ffff}": 1, "\u{10000}": 2, "a\u{10000}": 3, "a\u{ffff}": 4}),
        ];
        for case in cases {
            assert_eq!(
                String::from_utf8(canonical(&case)).unwrap(),
                String::from_utf8(reference(&case)).unwrap(),
                "{case}"
            );
        }
    }

    pub(crate) fn any_json() -> impl Strategy<Value = Value> {
        let text =
            "[\\PC\\u{0}-\\u{1f}\"\\\\/\\u{7f}\\u{2028}\\u{ffff}\\u{10000}-\\u{10010}a-z]{0,12}";
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            (-1_000_000i64..1_000_000).prop_map(|n| json!(n)),
            (-3i64..=3).prop_map(|d| json!((1i64 << 53) + d)),
            (-3i64..=3).prop_map(|d| json!(-(1i64 << 53) + d)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            (-1_000_000i64..1_000_000, 0u32..6)
                .prop_map(|(m, e)| json!(m as f64 / 10f64.powi(e as i32))),
            text.prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(text, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn any_value_is_byte_identical_to_the_reference(value in any_json()) {
            prop_assert_eq!(canonical(&value), reference(&value));
        }
    }
}
