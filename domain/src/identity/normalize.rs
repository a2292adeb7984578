//! Normalization of demographics before they are compared.
//!
//! Why it exists: most disagreements between two records of the same person are
//! formatting, not facts — "O'Brien" / "OBRIEN", "123 Main Street Apt 4" /
//! "123 MAIN ST #4", "(555) 201-3344" / "+15552013344". Standardizing name and
//! address alone raised matching sensitivity from 81.3% to 91.6% (Grannis 2019), so
//! every rule here is applied to both sides before any comparison or blocking key.
//!
//! Every function is pure and total over its input: a value that cannot be
//! normalized becomes `None` (treated as missing, weight 0) except dates and sex,
//! whose errors are returned so that bulk loaders can report the row.

use chrono::NaiveDate;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

use crate::patient::Sex;

/// Why a date or sex value was rejected. A caller reading files reports the row and
/// skips it; a caller with a form asks the user to correct the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("invalid date {0:?}: expected a real calendar date as YYYY-MM-DD")]
    InvalidDate(String),
    #[error("invalid sex {0:?}: expected F, M, O/X or U (or female, male, other, unknown)")]
    InvalidSex(String),
}

/// Lowercases and folds accents and ligatures to ASCII where a plain-ASCII spelling
/// is conventional ("José" → "jose", "Müller" → "muller", "Straße" → "strasse").
/// Characters without an ASCII fold (e.g. CJK) are kept, lowercased.
pub fn fold_to_ascii_lowercase(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    let mut folded = String::with_capacity(text.len());
    for character in text.nfkd() {
        if is_combining_mark(character) {
            continue;
        }
        match character {
            'ß' => folded.push_str("ss"),
            'æ' | 'Æ' => folded.push_str("ae"),
            'œ' | 'Œ' => folded.push_str("oe"),
            'ø' | 'Ø' => folded.push('o'),
            'ł' | 'Ł' => folded.push('l'),
            'đ' | 'Đ' => folded.push('d'),
            'þ' | 'Þ' => folded.push_str("th"),
            'ı' => folded.push('i'),
            '\u{2019}' | '\u{2018}' | '`' => folded.push('\''),
            '\u{2010}'..='\u{2015}' => folded.push('-'),
            other => folded.extend(other.to_lowercase()),
        }
    }
    folded
}

/// Splits a name into folded tokens: apostrophes vanish ("O'Brien" → "obrien"),
/// hyphens, spaces, commas and periods separate tokens ("Smith-Jones" → smith, jones),
/// anything else that is not a letter or digit is dropped.
pub fn name_tokens(name: &str) -> Vec<String> {
    let folded = fold_to_ascii_lowercase(name);
    let mut tokens = Vec::new();
    let mut current = String::new();
    for character in folded.chars() {
        if character.is_alphanumeric() {
            current.push(character);
        } else if character == '\'' {
            // joined: o'brien -> obrien, d'angelo -> dangelo
        } else if !current.is_empty() {
            tokens.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

/// Courtesy titles dropped from given names.
const TITLES: &[&str] = &["mr", "mrs", "ms", "miss", "dr", "prof"];
/// Generational suffixes dropped from family names (a different DOB tells Sr from Jr).
const SUFFIXES: &[&str] = &["jr", "sr", "ii", "iii", "iv", "md", "phd"];
/// Surname particles: kept in the compact form, ignored as a "shared surname token".
pub const SURNAME_PARTICLES: &[&str] = &[
    "de", "del", "della", "la", "le", "da", "di", "do", "dos", "das", "van", "von", "der", "den",
    "ter", "du", "st", "bin", "al", "el", "y",
];

/// A normalized given name: folded tokens without titles, joined by one space
/// ("Dr. Mary-Ann" → "mary ann"). Empty when nothing usable is left.
pub fn normalize_given_name(name: &str) -> String {
    name_tokens(name)
        .into_iter()
        .filter(|token| !TITLES.contains(&token.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A normalized family name: `(spaced, compact)`. Tokens are folded, generational
/// suffixes dropped; `spaced` keeps token boundaries for multi-part and hyphenated
/// surnames ("García-López" → "garcia lopez"), `compact` is the concatenation
/// ("garcialopez", "De La Cruz" = "DeLaCruz" = "delacruz") used for exact and
/// Jaro–Winkler comparison.
pub fn normalize_family_name(name: &str) -> (String, String) {
    let tokens: Vec<String> = name_tokens(name)
        .into_iter()
        .filter(|token| !SUFFIXES.contains(&token.as_str()))
        .collect();
    (tokens.join(" "), tokens.concat())
}

/// Nickname → formal given name. Deliberately small and curated: only diminutives that
/// point to one formal name (so "Alex", "Sam", "Chris", "Pat" are absent — they are
/// shared by several names). Spelling variants with one sound are folded too
/// (Catherine/Katherine, Steven/Stephen).
const NICKNAMES: &[(&str, &str)] = &[
    ("abby", "abigail"),
    ("al", "albert"),
    ("andy", "andrew"),
    ("drew", "andrew"),
    ("tony", "anthony"),
    ("becky", "rebecca"),
    ("becca", "rebecca"),
    ("ben", "benjamin"),
    ("benny", "benjamin"),
    ("bill", "william"),
    ("billy", "william"),
    ("will", "william"),
    ("willy", "william"),
    ("liam", "william"),
    ("bob", "robert"),
    ("bobby", "robert"),
    ("rob", "robert"),
    ("robbie", "robert"),
    ("bert", "robert"),
    ("cathy", "katherine"),
    ("catherine", "katherine"),
    ("kathy", "katherine"),
    ("kate", "katherine"),
    ("katie", "katherine"),
    ("kathryn", "katherine"),
    ("chuck", "charles"),
    ("charlie", "charles"),
    ("cindy", "cynthia"),
    ("dan", "daniel"),
    ("danny", "daniel"),
    ("dave", "david"),
    ("davy", "david"),
    ("deb", "deborah"),
    ("debbie", "deborah"),
    ("debra", "deborah"),
    ("dick", "richard"),
    ("rick", "richard"),
    ("ricky", "richard"),
    ("rich", "richard"),
    ("richie", "richard"),
    ("don", "donald"),
    ("donnie", "donald"),
    ("ed", "edward"),
    ("eddie", "edward"),
    ("ted", "edward"),
    ("ned", "edward"),
    ("liz", "elizabeth"),
    ("lizzie", "elizabeth"),
    ("beth", "elizabeth"),
    ("betty", "elizabeth"),
    ("betsy", "elizabeth"),
    ("eliza", "elizabeth"),
    ("libby", "elizabeth"),
    ("fred", "frederick"),
    ("freddie", "frederick"),
    ("greg", "gregory"),
    ("hank", "henry"),
    ("harry", "henry"),
    ("jim", "james"),
    ("jimmy", "james"),
    ("jamie", "james"),
    ("jack", "john"),
    ("johnny", "john"),
    ("jon", "john"),
    ("jeff", "jeffrey"),
    ("jen", "jennifer"),
    ("jenny", "jennifer"),
    ("jerry", "gerald"),
    ("joe", "joseph"),
    ("joey", "joseph"),
    ("josh", "joshua"),
    ("ken", "kenneth"),
    ("kenny", "kenneth"),
    ("larry", "lawrence"),
    ("maggie", "margaret"),
    ("meg", "margaret"),
    ("peggy", "margaret"),
    ("marge", "margaret"),
    ("matt", "matthew"),
    ("mike", "michael"),
    ("mikey", "michael"),
    ("mickey", "michael"),
    ("nate", "nathan"),
    ("nick", "nicholas"),
    ("patty", "patricia"),
    ("patsy", "patricia"),
    ("trish", "patricia"),
    ("polly", "mary"),
    ("molly", "mary"),
    ("ron", "ronald"),
    ("ronnie", "ronald"),
    ("sandy", "sandra"),
    ("steve", "steven"),
    ("stephen", "steven"),
    ("sue", "susan"),
    ("susie", "susan"),
    ("tim", "timothy"),
    ("timmy", "timothy"),
    ("tom", "thomas"),
    ("tommy", "thomas"),
    ("vicky", "victoria"),
];

/// The formal name a given name's first token stands for (`"bob"` → `"robert"`);
/// the token itself when the table has no entry.
pub fn canonical_given_name(normalized_given: &str) -> &str {
    let first = normalized_given.split(' ').next().unwrap_or("");
    NICKNAMES
        .iter()
        .find(|(nickname, _)| *nickname == first)
        .map_or(first, |(_, formal)| formal)
}

/// The diminutives the table maps to `formal` (`"margaret"` → maggie, meg, peggy, marge).
pub fn nicknames_of(formal: &str) -> impl Iterator<Item = &'static str> + '_ {
    NICKNAMES
        .iter()
        .filter(move |(_, table_formal)| *table_formal == formal)
        .map(|(nickname, _)| *nickname)
}

/// Parses a birth date written as `YYYY-MM-DD` (the interchange format); surrounding
/// whitespace is ignored. Impossible dates (`1980-02-30`) are errors.
pub fn parse_iso_date(text: &str) -> Result<NaiveDate, NormalizeError> {
    let trimmed = text.trim();
    let bytes = trimmed.as_bytes();
    let shaped = bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(position, byte)| position == 4 || position == 7 || byte.is_ascii_digit());
    if !shaped {
        return Err(NormalizeError::InvalidDate(trimmed.to_string()));
    }
    NaiveDate::parse_from_str(trimmed, "%Y-%m-%d")
        .map_err(|_| NormalizeError::InvalidDate(trimmed.to_string()))
}

/// Parses the date shapes seen in US intake data: `YYYY-MM-DD`, `YYYYMMDD` and
/// `MM/DD/YYYY` (US order; `M/D/YYYY` too). Two-digit years are rejected: the century
/// of a birth year cannot be guessed safely.
pub fn parse_date(text: &str) -> Result<NaiveDate, NormalizeError> {
    let trimmed = text.trim();
    let invalid = || NormalizeError::InvalidDate(trimmed.to_string());
    if trimmed.contains('-') {
        return parse_iso_date(trimmed);
    }
    if trimmed.len() == 8 && trimmed.bytes().all(|byte| byte.is_ascii_digit()) {
        return NaiveDate::parse_from_str(trimmed, "%Y%m%d").map_err(|_| invalid());
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if let [month, day, year] = parts.as_slice() {
        let numeric = |part: &str, lengths: &[usize]| {
            lengths.contains(&part.len()) && part.bytes().all(|byte| byte.is_ascii_digit())
        };
        if numeric(month, &[1, 2]) && numeric(day, &[1, 2]) && numeric(year, &[4]) {
            let (month, day, year) = (
                month.parse().map_err(|_| invalid())?,
                day.parse().map_err(|_| invalid())?,
                year.parse().map_err(|_| invalid())?,
            );
            return NaiveDate::from_ymd_opt(year, month, day).ok_or_else(invalid);
        }
    }
    Err(invalid())
}

/// Administrative sex. `Ok(None)` for an empty or explicitly unknown value (missing:
/// neutral in matching); an unrecognised value is an error.
pub fn parse_sex(text: &str) -> Result<Option<Sex>, NormalizeError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "f" | "female" | "woman" => Ok(Some(Sex::Female)),
        "m" | "male" | "man" => Ok(Some(Sex::Male)),
        "o" | "x" | "other" | "nonbinary" | "non-binary" => Ok(Some(Sex::Other)),
        "" | "u" | "unknown" | "unk" => Ok(None),
        _ => Err(NormalizeError::InvalidSex(text.trim().to_string())),
    }
}

/// A phone number in E.164 (`+15552013344`). North American numbers without a
/// country code get `+1`; `+`/`011` mark an international number (8–15 digits kept).
/// Extensions (`x12`, `ext. 12`) are dropped. `None` for anything unusable: wrong
/// length, a NANP area code or exchange starting with 0/1, or a placeholder made of
/// one repeated digit (`999-999-9999`), which would otherwise "match" strangers.
pub fn normalize_phone(text: &str) -> Option<String> {
    let lowered = text.trim().to_ascii_lowercase();
    let without_extension = lowered.split(['x', 'e']).next().unwrap_or_default().trim();
    let international = without_extension.starts_with('+');
    let mut digits: String = without_extension
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    if !international && digits.starts_with("011") {
        digits.drain(..3);
        return international_number(&digits);
    }
    if international {
        if let Some(national) = digits.strip_prefix('1') {
            return north_american_number(national);
        }
        return international_number(&digits);
    }
    match digits.len() {
        10 => north_american_number(&digits),
        11 if digits.starts_with('1') => north_american_number(&digits[1..]),
        _ => None,
    }
}

fn north_american_number(ten_digits: &str) -> Option<String> {
    let bytes = ten_digits.as_bytes();
    let valid = bytes.len() == 10
        && bytes[0] >= b'2'
        && bytes[3] >= b'2'
        && !bytes.iter().all(|byte| *byte == bytes[0]);
    valid.then(|| format!("+1{ten_digits}"))
}

fn international_number(digits: &str) -> Option<String> {
    let valid = (8..=15).contains(&digits.len())
        && !digits.starts_with('0')
        && !digits.bytes().all(|byte| byte == digits.as_bytes()[0]);
    valid.then(|| format!("+{digits}"))
}

/// Local parts that intake forms use to mean "no email".
const PLACEHOLDER_EMAIL_LOCAL_PARTS: &[&str] = &[
    "none", "noemail", "no", "na", "n/a", "unknown", "declined", "test",
];

/// An email address trimmed and lowercased, with a `+tag` removed from the local part
/// (`Jane.Doe+portal@Example.COM` → `jane.doe@example.com`). `None` when it is not of
/// the form `local@domain.tld` or is a placeholder (`none@none.com`).
pub fn normalize_email(text: &str) -> Option<String> {
    let lowered = text.trim().to_lowercase();
    let (local, domain) = lowered.split_once('@')?;
    if local.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || lowered.chars().any(char::is_whitespace)
    {
        return None;
    }
    let local = local.split('+').next().unwrap_or(local);
    if local.is_empty() || PLACEHOLDER_EMAIL_LOCAL_PARTS.contains(&local) {
        return None;
    }
    Some(format!("{local}@{domain}"))
}

/// USPS Publication 28 standard abbreviations for the words that vary most.
const ADDRESS_WORDS: &[(&str, &str)] = &[
    ("street", "st"),
    ("str", "st"),
    ("avenue", "ave"),
    ("av", "ave"),
    ("road", "rd"),
    ("boulevard", "blvd"),
    ("drive", "dr"),
    ("lane", "ln"),
    ("court", "ct"),
    ("place", "pl"),
    ("terrace", "ter"),
    ("circle", "cir"),
    ("highway", "hwy"),
    ("parkway", "pkwy"),
    ("square", "sq"),
    ("trail", "trl"),
    ("way", "way"),
    ("apartment", "apt"),
    ("suite", "ste"),
    ("building", "bldg"),
    ("floor", "fl"),
    ("north", "n"),
    ("south", "s"),
    ("east", "e"),
    ("west", "w"),
    ("northeast", "ne"),
    ("northwest", "nw"),
    ("southeast", "se"),
    ("southwest", "sw"),
    ("first", "1st"),
    ("second", "2nd"),
    ("third", "3rd"),
    ("fourth", "4th"),
    ("fifth", "5th"),
];

/// A US street address line: folded, punctuation removed, `#` read as a unit
/// ("apt"), and USPS abbreviations applied to every word ("123 North Main Street,
/// Apartment 4B" → "123 n main st apt 4b"). `None` when empty.
pub fn normalize_address_line(text: &str) -> Option<String> {
    let folded = fold_to_ascii_lowercase(text).replace('#', " apt ");
    let words: Vec<&str> = folded
        .split(|character: char| !(character.is_alphanumeric() || character == '/'))
        .filter(|word| !word.is_empty())
        .map(|word| {
            ADDRESS_WORDS
                .iter()
                .find(|(long, _)| *long == word)
                .map_or(word, |(_, short)| short)
        })
        .collect();
    let mut normalized: Vec<&str> = Vec::with_capacity(words.len());
    for word in words {
        // "Apt #4" became "apt apt 4": keep one designator.
        if word == "apt" && normalized.last() == Some(&"apt") {
            continue;
        }
        normalized.push(word);
    }
    (!normalized.is_empty()).then(|| normalized.join(" "))
}

const CITY_WORDS: &[(&str, &str)] = &[("saint", "st"), ("fort", "ft"), ("mount", "mt")];

/// A city name folded, punctuation removed, and "Saint/Fort/Mount" abbreviated
/// ("St. Louis" = "Saint Louis" → "st louis").
pub fn normalize_city(text: &str) -> Option<String> {
    let tokens: Vec<String> = name_tokens(text)
        .into_iter()
        .map(|token| {
            CITY_WORDS
                .iter()
                .find(|(long, _)| *long == token)
                .map_or(token.clone(), |(_, short)| (*short).to_string())
        })
        .collect();
    (!tokens.is_empty()).then(|| tokens.join(" "))
}

const STATES: &[(&str, &str)] = &[
    ("alabama", "al"),
    ("alaska", "ak"),
    ("arizona", "az"),
    ("arkansas", "ar"),
    ("california", "ca"),
    ("colorado", "co"),
    ("connecticut", "ct"),
    ("delaware", "de"),
    ("district of columbia", "dc"),
    ("florida", "fl"),
    ("georgia", "ga"),
    ("hawaii", "hi"),
    ("idaho", "id"),
    ("illinois", "il"),
    ("indiana", "in"),
    ("iowa", "ia"),
    ("kansas", "ks"),
    ("kentucky", "ky"),
    ("louisiana", "la"),
    ("maine", "me"),
    ("maryland", "md"),
    ("massachusetts", "ma"),
    ("michigan", "mi"),
    ("minnesota", "mn"),
    ("mississippi", "ms"),
    ("missouri", "mo"),
    ("montana", "mt"),
    ("nebraska", "ne"),
    ("nevada", "nv"),
    ("new hampshire", "nh"),
    ("new jersey", "nj"),
    ("new mexico", "nm"),
    ("new york", "ny"),
    ("north carolina", "nc"),
    ("north dakota", "nd"),
    ("ohio", "oh"),
    ("oklahoma", "ok"),
    ("oregon", "or"),
    ("pennsylvania", "pa"),
    ("puerto rico", "pr"),
    ("rhode island", "ri"),
    ("south carolina", "sc"),
    ("south dakota", "sd"),
    ("tennessee", "tn"),
    ("texas", "tx"),
    ("utah", "ut"),
    ("vermont", "vt"),
    ("virginia", "va"),
    ("washington", "wa"),
    ("west virginia", "wv"),
    ("wisconsin", "wi"),
    ("wyoming", "wy"),
];

/// A US state as its two-letter postal code, lowercase ("Illinois" / "IL" → "il").
/// `None` for anything that is neither a code nor a state name.
pub fn normalize_state(text: &str) -> Option<String> {
    let spaced = name_tokens(text).join(" ");
    if spaced.len() == 2 && STATES.iter().any(|(_, code)| *code == spaced) {
        return Some(spaced);
    }
    STATES
        .iter()
        .find(|(name, _)| *name == spaced)
        .map(|(_, code)| (*code).to_string())
}

/// A 5-digit ZIP code. ZIP+4 keeps its first five digits ("60614-1234" → "60614");
/// a 4-digit value gets its leading zero back (spreadsheets drop it: "2134" → "02134").
/// `None` for anything else, and for "00000".
pub fn normalize_postal_code(text: &str) -> Option<String> {
    let trimmed = text.trim();
    let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    let only_digits_and_dash = trimmed
        .chars()
        .all(|character| character.is_ascii_digit() || character == '-' || character == ' ');
    if !only_digits_and_dash {
        return None;
    }
    let zip = match digits.len() {
        5 | 9 => digits[..5].to_string(),
        4 => format!("0{digits}"),
        _ => return None,
    };
    (zip != "00000").then_some(zip)
}

/// American Soundex of a folded name token ("Robert", "Rupert" → "R163"). Used for
/// blocking keys only, where a coarse phonetic bucket is what we want.
pub fn soundex(token: &str) -> Option<String> {
    let code = |character: char| match character {
        'b' | 'f' | 'p' | 'v' => Some(b'1'),
        'c' | 'g' | 'j' | 'k' | 'q' | 's' | 'x' | 'z' => Some(b'2'),
        'd' | 't' => Some(b'3'),
        'l' => Some(b'4'),
        'm' | 'n' => Some(b'5'),
        'r' => Some(b'6'),
        _ => None,
    };
    let mut letters = token.chars().filter(char::is_ascii_alphabetic);
    let first = letters.next()?.to_ascii_lowercase();
    let mut encoded = vec![first.to_ascii_uppercase() as u8];
    let mut previous = code(first);
    for letter in letters {
        let letter = letter.to_ascii_lowercase();
        let current = code(letter);
        if current.is_some() && current != previous {
            encoded.push(current.unwrap_or(b'0'));
            if encoded.len() == 4 {
                break;
            }
        }
        // 'h' and 'w' do not separate equal codes; vowels do.
        if letter != 'h' && letter != 'w' {
            previous = current;
        }
    }
    encoded.resize(4, b'0');
    String::from_utf8(encoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accents_ligatures_and_case_fold_to_ascii() {
        assert_eq!(fold_to_ascii_lowercase("José MÜLLER"), "jose muller");
        assert_eq!(fold_to_ascii_lowercase("Straße"), "strasse");
        assert_eq!(
            fold_to_ascii_lowercase("Søren Łukasz Æsir"),
            "soren lukasz aesir"
        );
        assert_eq!(fold_to_ascii_lowercase("Zoë"), "zoe");
    }

    #[test]
    fn given_names_lose_titles_and_punctuation() {
        assert_eq!(normalize_given_name("  Dr. Mary-Ann "), "mary ann");
        assert_eq!(normalize_given_name("JOSÉ"), "jose");
        assert_eq!(normalize_given_name("..."), "");
    }

    #[test]
    fn family_names_keep_parts_and_compact_form() {
        assert_eq!(
            normalize_family_name("O'Brien"),
            ("obrien".to_string(), "obrien".to_string())
        );
        assert_eq!(
            normalize_family_name("García-López"),
            ("garcia lopez".to_string(), "garcialopez".to_string())
        );
        assert_eq!(normalize_family_name("De La Cruz").1, "delacruz");
        assert_eq!(normalize_family_name("DeLaCruz").1, "delacruz");
        assert_eq!(normalize_family_name("Smith Jr.").1, "smith");
        assert_eq!(normalize_family_name("King III").1, "king");
    }

    #[test]
    fn nicknames_resolve_to_the_formal_name() {
        assert_eq!(canonical_given_name("bob"), "robert");
        assert_eq!(canonical_given_name("liz"), "elizabeth");
        assert_eq!(canonical_given_name("bill"), "william");
        assert_eq!(canonical_given_name("peggy"), "margaret");
        assert_eq!(canonical_given_name("catherine"), "katherine");
        assert_eq!(canonical_given_name("peggy sue"), "margaret");
        assert_eq!(canonical_given_name("robert"), "robert");
        // Ambiguous diminutives are deliberately not in the table.
        assert_eq!(canonical_given_name("alex"), "alex");
    }

    #[test]
    fn iso_dates_parse_and_impossible_dates_fail() {
        assert_eq!(
            parse_iso_date(" 1980-02-29 "),
            Ok(NaiveDate::from_ymd_opt(1980, 2, 29).unwrap())
        );
        assert_eq!(
            parse_iso_date("1981-02-29"),
            Err(NormalizeError::InvalidDate("1981-02-29".into()))
        );
        assert_eq!(
            parse_iso_date("1980-2-3"),
            Err(NormalizeError::InvalidDate("1980-2-3".into()))
        );
        assert_eq!(
            parse_iso_date("02/03/1980"),
            Err(NormalizeError::InvalidDate("02/03/1980".into()))
        );
    }

    #[test]
    fn us_and_compact_dates_parse() {
        let date = NaiveDate::from_ymd_opt(1980, 2, 3).unwrap();
        assert_eq!(parse_date("02/03/1980"), Ok(date));
        assert_eq!(parse_date("2/3/1980"), Ok(date));
        assert_eq!(parse_date("19800203"), Ok(date));
        assert_eq!(parse_date("1980-02-03"), Ok(date));
        assert!(parse_date("2/3/80").is_err());
        assert!(parse_date("13/01/1980").is_err());
        assert!(parse_date("yesterday").is_err());
    }

    #[test]
    fn sex_codes_and_words() {
        assert_eq!(parse_sex("F"), Ok(Some(Sex::Female)));
        assert_eq!(parse_sex(" male "), Ok(Some(Sex::Male)));
        assert_eq!(parse_sex("X"), Ok(Some(Sex::Other)));
        assert_eq!(parse_sex(""), Ok(None));
        assert_eq!(parse_sex("U"), Ok(None));
        assert_eq!(parse_sex("q"), Err(NormalizeError::InvalidSex("q".into())));
    }

    #[test]
    fn phones_become_e164() {
        assert_eq!(
            normalize_phone("(555) 201-3344").as_deref(),
            Some("+15552013344")
        );
        assert_eq!(
            normalize_phone("555.201.3344").as_deref(),
            Some("+15552013344")
        );
        assert_eq!(
            normalize_phone("1-555-201-3344").as_deref(),
            Some("+15552013344")
        );
        assert_eq!(
            normalize_phone("+1 555 201 3344").as_deref(),
            Some("+15552013344")
        );
        assert_eq!(
            normalize_phone("555-201-3344 x12").as_deref(),
            Some("+15552013344")
        );
        assert_eq!(
            normalize_phone("555-201-3344 ext. 12").as_deref(),
            Some("+15552013344")
        );
        assert_eq!(
            normalize_phone("+44 20 7946 0958").as_deref(),
            Some("+442079460958")
        );
        assert_eq!(
            normalize_phone("011 44 20 7946 0958").as_deref(),
            Some("+442079460958")
        );
    }

    #[test]
    fn unusable_phones_are_missing() {
        assert_eq!(normalize_phone("201-3344"), None);
        assert_eq!(normalize_phone("999-999-9999"), None);
        assert_eq!(normalize_phone("055-201-3344"), None);
        assert_eq!(normalize_phone("555-101-3344"), None);
        assert_eq!(normalize_phone("n/a"), None);
        assert_eq!(normalize_phone(""), None);
    }

    #[test]
    fn emails_are_trimmed_lowercased_and_untagged() {
        assert_eq!(
            normalize_email("  Jane.Doe+portal@Example.COM ").as_deref(),
            Some("jane.doe@example.com")
        );
        assert_eq!(normalize_email("none@none.com"), None);
        assert_eq!(normalize_email("jane@localhost"), None);
        assert_eq!(normalize_email("jane@@example.com"), None);
        assert_eq!(normalize_email("jane doe@example.com"), None);
        assert_eq!(normalize_email("@example.com"), None);
    }

    #[test]
    fn addresses_use_usps_abbreviations() {
        assert_eq!(
            normalize_address_line("123 North Main Street, Apartment 4B").as_deref(),
            Some("123 n main st apt 4b")
        );
        assert_eq!(
            normalize_address_line("123 N. MAIN ST. #4B").as_deref(),
            Some("123 n main st apt 4b")
        );
        assert_eq!(
            normalize_address_line("9 Elm Road Apt #2").as_deref(),
            Some("9 elm rd apt 2")
        );
        assert_eq!(
            normalize_address_line("40 Ocean Avenue Suite 300").as_deref(),
            Some("40 ocean ave ste 300")
        );
        assert_eq!(
            normalize_address_line("1 Oak Boulevard Southwest").as_deref(),
            Some("1 oak blvd sw")
        );
        assert_eq!(normalize_address_line(" , "), None);
    }

    #[test]
    fn cities_and_states() {
        assert_eq!(normalize_city("St. Louis").as_deref(), Some("st louis"));
        assert_eq!(normalize_city("Saint Louis").as_deref(), Some("st louis"));
        assert_eq!(normalize_state("Illinois").as_deref(), Some("il"));
        assert_eq!(normalize_state(" IL ").as_deref(), Some("il"));
        assert_eq!(normalize_state("new york").as_deref(), Some("ny"));
        assert_eq!(normalize_state("Atlantis"), None);
    }

    #[test]
    fn postal_codes_are_five_digit_zips() {
        assert_eq!(normalize_postal_code("60614").as_deref(), Some("60614"));
        assert_eq!(
            normalize_postal_code("60614-1234").as_deref(),
            Some("60614")
        );
        assert_eq!(normalize_postal_code("2134").as_deref(), Some("02134"));
        assert_eq!(normalize_postal_code("606"), None);
        assert_eq!(normalize_postal_code("00000"), None);
        assert_eq!(normalize_postal_code("SW1A 1AA"), None);
    }

    #[test]
    fn soundex_reference_codes() {
        assert_eq!(soundex("robert").as_deref(), Some("R163"));
        assert_eq!(soundex("rupert").as_deref(), Some("R163"));
        assert_eq!(soundex("ashcraft").as_deref(), Some("A261"));
        assert_eq!(soundex("tymczak").as_deref(), Some("T522"));
        assert_eq!(soundex("pfister").as_deref(), Some("P236"));
        assert_eq!(soundex("lee").as_deref(), Some("L000"));
        assert_eq!(soundex(""), None);
    }
}
