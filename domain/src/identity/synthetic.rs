//! Synthetic patients with known truth, for the accuracy evaluation and the benchmark.
//!
//! Why it exists: matching quality can only be measured against ground truth, and
//! real PHI may not be used. The generator builds households (partners share an
//! address and often a phone and surname; children share both; twins share birth date,
//! address and surname), then derives records with the errors real registration data
//! has: typos, nicknames, swapped day/month and transposed digits, moved addresses,
//! surnames changed at marriage, missing fields, formatting noise. A fraction of people
//! get very common names, and some get a *namesake* — a different person with the same
//! name, sex and birth date — the hardest non-match there is.
//!
//! Pure and deterministic: a seed in, the same records out (SplitMix64, no `rand`).

use chrono::{Datelike, NaiveDate};

use super::normalize::nicknames_of;
use super::prng::SplitMix64;
use super::record::PatientRecord;
use crate::patient::{Identifier, Sex};

/// The assigning authority of synthetic MRNs.
pub const SYNTHETIC_MRN_SYSTEM: &str = "urn:chartline:synthetic-ehr";

const FEMALE_NAMES: &[&str] = &[
    "mary",
    "patricia",
    "jennifer",
    "linda",
    "elizabeth",
    "barbara",
    "susan",
    "jessica",
    "sarah",
    "karen",
    "nancy",
    "margaret",
    "lisa",
    "betty",
    "sandra",
    "ashley",
    "katherine",
    "emily",
    "donna",
    "michelle",
    "dorothy",
    "carol",
    "amanda",
    "melissa",
    "deborah",
    "stephanie",
    "rebecca",
    "laura",
    "sharon",
    "cynthia",
    "amy",
    "angela",
    "anna",
    "brenda",
    "pamela",
    "nicole",
    "emma",
    "helen",
    "samantha",
    "christine",
    "debra",
    "rachel",
    "carolyn",
    "janet",
    "maria",
    "heather",
    "diane",
    "julie",
    "joyce",
    "victoria",
    "kelly",
    "christina",
    "lauren",
    "joan",
    "evelyn",
    "olivia",
    "judith",
    "megan",
    "cheryl",
    "andrea",
    "hannah",
    "martha",
    "jacqueline",
    "frances",
    "gloria",
    "ann",
    "teresa",
    "kathleen",
    "sara",
    "janice",
    "jean",
    "alice",
    "madison",
    "doris",
    "abigail",
    "julia",
    "judy",
    "grace",
    "denise",
    "amber",
    "marilyn",
    "beverly",
    "danielle",
    "theresa",
    "sophia",
    "marie",
    "diana",
    "brittany",
    "natalie",
    "isabella",
    "charlotte",
    "rose",
    "alexis",
    "kayla",
    "zoe",
    "ines",
    "chloe",
    "sofia",
    "beatriz",
    "yesenia",
    "mei",
    "aaliyah",
];

const MALE_NAMES: &[&str] = &[
    "james",
    "robert",
    "john",
    "michael",
    "david",
    "william",
    "richard",
    "joseph",
    "thomas",
    "christopher",
    "charles",
    "daniel",
    "matthew",
    "anthony",
    "mark",
    "donald",
    "steven",
    "paul",
    "andrew",
    "joshua",
    "kenneth",
    "kevin",
    "brian",
    "george",
    "timothy",
    "ronald",
    "edward",
    "jason",
    "jeffrey",
    "ryan",
    "jacob",
    "gary",
    "nicholas",
    "eric",
    "jonathan",
    "stephen",
    "larry",
    "justin",
    "scott",
    "brandon",
    "benjamin",
    "samuel",
    "gregory",
    "alexander",
    "frank",
    "patrick",
    "raymond",
    "jack",
    "dennis",
    "jerry",
    "tyler",
    "aaron",
    "jose",
    "adam",
    "nathan",
    "henry",
    "douglas",
    "zachary",
    "peter",
    "kyle",
    "ethan",
    "walter",
    "noah",
    "jeremy",
    "christian",
    "keith",
    "roger",
    "terry",
    "gerald",
    "harold",
    "sean",
    "austin",
    "carl",
    "arthur",
    "lawrence",
    "dylan",
    "jesse",
    "jordan",
    "bryan",
    "billy",
    "joe",
    "bruce",
    "gabriel",
    "logan",
    "albert",
    "willie",
    "alan",
    "juan",
    "wayne",
    "elijah",
    "randy",
    "roy",
    "vincent",
    "ralph",
    "eugene",
    "russell",
    "bobby",
    "mason",
    "philip",
    "louis",
    "omar",
    "tariq",
    "hiroshi",
    "rafael",
    "dmitri",
];

const SURNAMES: &[&str] = &[
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
    "clark",
    "ramirez",
    "lewis",
    "robinson",
    "walker",
    "young",
    "allen",
    "king",
    "wright",
    "scott",
    "torres",
    "nguyen",
    "hill",
    "flores",
    "green",
    "adams",
    "nelson",
    "baker",
    "hall",
    "rivera",
    "campbell",
    "mitchell",
    "carter",
    "roberts",
    "gomez",
    "phillips",
    "evans",
    "turner",
    "diaz",
    "parker",
    "cruz",
    "edwards",
    "collins",
    "reyes",
    "stewart",
    "morris",
    "morales",
    "murphy",
    "cook",
    "rogers",
    "gutierrez",
    "ortiz",
    "morgan",
    "cooper",
    "peterson",
    "bailey",
    "reed",
    "kelly",
    "howard",
    "ramos",
    "kim",
    "cox",
    "ward",
    "richardson",
    "watson",
    "brooks",
    "chavez",
    "wood",
    "james",
    "bennett",
    "gray",
    "mendoza",
    "ruiz",
    "hughes",
    "price",
    "alvarez",
    "castillo",
    "sanders",
    "patel",
    "myers",
    "long",
    "ross",
    "foster",
    "jimenez",
    "o'brien",
    "de la cruz",
    "van der berg",
    "mcdonald",
    "o'connor",
    "müller",
    "garcía lópez",
    "d'angelo",
    "st. john",
    "nakamura",
    "okafor",
    "kowalski",
    "schmidt",
    "novak",
    "haddad",
    "fitzgerald",
];

/// Syllables for the long tail of rarer surnames.
const SURNAME_SYLLABLES: &[&str] = &[
    "bar", "ber", "cal", "dan", "del", "dor", "fen", "gar", "hal", "har", "kel", "ken", "lan",
    "lor", "mar", "mel", "nor", "pen", "ral", "ros", "sal", "son", "ten", "val", "ver", "wel",
    "wick", "ton", "ley", "man", "field", "berg", "ford", "more", "stein", "ski", "ez", "ova",
];

const STREETS: &[&str] = &[
    "main",
    "oak",
    "pine",
    "maple",
    "cedar",
    "elm",
    "washington",
    "lake",
    "hill",
    "park",
    "walnut",
    "sunset",
    "lincoln",
    "jackson",
    "church",
    "river",
    "highland",
    "spring",
    "center",
    "forest",
    "meadow",
    "willow",
    "jefferson",
    "madison",
    "franklin",
    "chestnut",
    "cherry",
    "broad",
    "market",
    "mill",
    "union",
    "prospect",
    "ridge",
    "valley",
    "grove",
    "sycamore",
    "birch",
    "aspen",
    "magnolia",
    "dogwood",
    "lakeview",
    "fairview",
    "adams",
];

/// (long form, USPS abbreviation)
const STREET_TYPES: &[(&str, &str)] = &[
    ("Street", "St"),
    ("Avenue", "Ave"),
    ("Road", "Rd"),
    ("Lane", "Ln"),
    ("Drive", "Dr"),
    ("Court", "Ct"),
    ("Boulevard", "Blvd"),
    ("Place", "Pl"),
];

/// (city, state, first three ZIP digits, area code)
const CITIES: &[(&str, &str, &str, &str)] = &[
    ("Chicago", "IL", "606", "312"),
    ("Springfield", "IL", "627", "217"),
    ("Peoria", "IL", "616", "309"),
    ("Saint Louis", "MO", "631", "314"),
    ("Kansas City", "MO", "641", "816"),
    ("Milwaukee", "WI", "532", "414"),
    ("Madison", "WI", "537", "608"),
    ("Minneapolis", "MN", "554", "612"),
    ("Saint Paul", "MN", "551", "651"),
    ("Des Moines", "IA", "503", "515"),
    ("Omaha", "NE", "681", "402"),
    ("Indianapolis", "IN", "462", "317"),
    ("Columbus", "OH", "432", "614"),
    ("Cleveland", "OH", "441", "216"),
    ("Detroit", "MI", "482", "313"),
    ("Grand Rapids", "MI", "495", "616"),
    ("Louisville", "KY", "402", "502"),
    ("Nashville", "TN", "372", "615"),
    ("Memphis", "TN", "381", "901"),
    ("Atlanta", "GA", "303", "404"),
    ("Houston", "TX", "770", "713"),
    ("Dallas", "TX", "752", "214"),
    ("Austin", "TX", "787", "512"),
    ("San Antonio", "TX", "782", "210"),
    ("Phoenix", "AZ", "850", "602"),
    ("Denver", "CO", "802", "303"),
    ("Seattle", "WA", "981", "206"),
    ("Portland", "OR", "972", "503"),
    ("Boston", "MA", "021", "617"),
    ("Hartford", "CT", "061", "860"),
    ("Newark", "NJ", "071", "973"),
    ("Philadelphia", "PA", "191", "215"),
    ("Pittsburgh", "PA", "152", "412"),
    ("Baltimore", "MD", "212", "410"),
    ("Richmond", "VA", "232", "804"),
    ("Charlotte", "NC", "282", "704"),
    ("Miami", "FL", "331", "305"),
    ("Tampa", "FL", "336", "813"),
    ("Fort Worth", "TX", "761", "817"),
    ("Albuquerque", "NM", "871", "505"),
];

const EMAIL_DOMAINS: &[&str] = &["example.com", "example.org", "example.net", "mail.example"];

/// A synthetic person: the truth behind one or more records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticPerson {
    pub person_id: u64,
    pub household_id: u64,
    pub given_name: String,
    pub family_name: String,
    pub birth_date: NaiveDate,
    pub sex: Sex,
    /// House number and street name; the street type is chosen per record (long/short).
    pub house_number: u32,
    pub street: String,
    pub street_type: usize,
    pub unit: Option<u32>,
    pub city: usize,
    pub postal_code: String,
    pub phone: String,
    pub email: Option<String>,
    pub mrn: String,
    /// The other twin, if any.
    pub twin_of: Option<u64>,
    /// The person whose name, sex and birth date this one shares, if any.
    pub namesake_of: Option<u64>,
}

/// Generates households one at a time.
#[derive(Debug, Clone)]
pub struct Population {
    rng: SplitMix64,
    next_person: u64,
    next_household: u64,
}

impl Population {
    pub fn new(seed: u64) -> Self {
        Population {
            rng: SplitMix64::new(seed),
            next_person: 0,
            next_household: 0,
        }
    }

    /// A skewed pick: low indices (the common names) come up far more often.
    fn skewed<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        let unit = self.rng.unit();
        items[((unit * unit * unit) * items.len() as f64) as usize % items.len()]
    }

    fn surname(&mut self) -> String {
        if self.rng.chance(0.55) {
            return self.skewed(SURNAMES).to_string();
        }
        // Long tail: two or three syllables, so that most surnames are rare.
        let syllables = 2 + self.rng.index(2);
        let mut name = String::new();
        for _ in 0..syllables {
            name.push_str(self.rng.pick::<&str>(SURNAME_SYLLABLES));
        }
        name
    }

    fn given_name(&mut self, sex: Sex) -> String {
        let names = if sex == Sex::Female {
            FEMALE_NAMES
        } else {
            MALE_NAMES
        };
        self.skewed(names).to_string()
    }

    fn birth_date(&mut self, first_year: i32, last_year: i32) -> NaiveDate {
        let span = (last_year - first_year + 1).max(1) as u64;
        let year = first_year + self.rng.below(span) as i32;
        let month = 1 + self.rng.below(12) as u32;
        let day = 1 + self.rng.below(28) as u32 + u32::from(self.rng.chance(0.07)) * 2;
        NaiveDate::from_ymd_opt(year, month, day)
            .or_else(|| NaiveDate::from_ymd_opt(year, month, 28))
            .unwrap_or_default()
    }

    fn phone(&mut self, city: usize) -> String {
        let area = CITIES[city].3;
        let exchange = 200 + self.rng.below(800);
        let line = self.rng.below(10_000);
        format!("{area}{exchange:03}{line:04}")
    }

    fn sex(&mut self) -> Sex {
        if self.rng.chance(0.5) {
            Sex::Female
        } else {
            Sex::Male
        }
    }

    fn email(&mut self, given: &str, family: &str) -> Option<String> {
        self.rng.chance(0.6).then(|| {
            let family: String = family.chars().filter(char::is_ascii_alphabetic).collect();
            format!(
                "{given}.{family}{}@{}",
                self.rng.below(1000),
                self.rng.pick(EMAIL_DOMAINS)
            )
        })
    }

    fn address(&mut self) -> (u32, String, usize, Option<u32>, usize, String) {
        let city = self.rng.index(CITIES.len());
        let house_number = 1 + self.rng.below(9_999) as u32;
        let street = self.rng.pick(STREETS).to_string();
        let street_type = self.rng.index(STREET_TYPES.len());
        let unit = self.rng.chance(0.25).then(|| 1 + self.rng.below(40) as u32);
        let postal_code = format!("{}{:02}", CITIES[city].2, self.rng.below(100));
        (house_number, street, street_type, unit, city, postal_code)
    }

    fn person(
        &mut self,
        household: &SyntheticPerson,
        given: String,
        sex: Sex,
        birth_date: NaiveDate,
        family: String,
    ) -> SyntheticPerson {
        let person_id = self.next_person;
        self.next_person += 1;
        let shares_phone = self.rng.chance(0.5);
        let phone = if shares_phone {
            household.phone.clone()
        } else {
            self.phone(household.city)
        };
        let email = self.email(&given, &family);
        SyntheticPerson {
            person_id,
            household_id: household.household_id,
            given_name: given,
            family_name: family,
            birth_date,
            sex,
            house_number: household.house_number,
            street: household.street.clone(),
            street_type: household.street_type,
            unit: household.unit,
            city: household.city,
            postal_code: household.postal_code.clone(),
            phone,
            email,
            mrn: format!("M{person_id:09}"),
            twin_of: None,
            namesake_of: None,
        }
    }

    /// One household: a head, maybe a partner, maybe children (sometimes twins).
    pub fn household(&mut self) -> Vec<SyntheticPerson> {
        let household_id = self.next_household;
        self.next_household += 1;
        let sex = self.sex();
        let common = self.rng.chance(0.1);
        let (given, family) = if common {
            let names = if sex == Sex::Female {
                FEMALE_NAMES
            } else {
                MALE_NAMES
            };
            (
                names[self.rng.index(5)].to_string(),
                SURNAMES[self.rng.index(3)].to_string(),
            )
        } else {
            (self.given_name(sex), self.surname())
        };
        let birth_date = self.birth_date(1935, 2004);
        let (house_number, street, street_type, unit, city, postal_code) = self.address();
        let template = SyntheticPerson {
            person_id: 0,
            household_id,
            given_name: String::new(),
            family_name: String::new(),
            birth_date,
            sex,
            house_number,
            street,
            street_type,
            unit,
            city,
            postal_code,
            phone: self.phone(city),
            email: None,
            mrn: String::new(),
            twin_of: None,
            namesake_of: None,
        };
        let head = self.person(&template, given, sex, birth_date, family.clone());
        let mut members = vec![head];
        let size_draw = self.rng.unit();
        if size_draw < 0.35 {
            return members;
        }
        // Partner: usually the other sex, born within a few years, often same surname.
        let partner_sex = if self.rng.chance(0.9) {
            if sex == Sex::Female {
                Sex::Male
            } else {
                Sex::Female
            }
        } else {
            sex
        };
        let partner_given = self.given_name(partner_sex);
        let partner_family = if self.rng.chance(0.7) {
            family.clone()
        } else {
            self.surname()
        };
        let year = birth_date.year();
        let partner_birth = self.birth_date(year - 6, year + 6);
        let partner = self.person(
            &template,
            partner_given,
            partner_sex,
            partner_birth,
            partner_family,
        );
        members.push(partner);
        if size_draw < 0.6 {
            return members;
        }
        let children = 1 + self.rng.index(3);
        let first_child_year = (year + 20 + self.rng.below(15) as i32).min(2023);
        for child in 0..children {
            let child_sex = self.sex();
            let child_given = self.given_name(child_sex);
            let child_birth = self.birth_date(
                first_child_year + 2 * child as i32,
                first_child_year + 2 * child as i32 + 1,
            );
            let child = self.person(
                &template,
                child_given,
                child_sex,
                child_birth,
                family.clone(),
            );
            members.push(child);
        }
        if self.rng.chance(0.35) {
            // Twins of the last child: same birth date, same home, another given name.
            let last = members
                .last()
                .cloned()
                .unwrap_or_else(|| members[0].clone());
            let twin_sex = if self.rng.chance(0.5) {
                last.sex
            } else {
                self.sex()
            };
            let mut twin_given = self.given_name(twin_sex);
            while twin_given == last.given_name {
                twin_given = self.given_name(twin_sex);
            }
            let mut twin = self.person(
                &template,
                twin_given,
                twin_sex,
                last.birth_date,
                last.family_name.clone(),
            );
            twin.phone = last.phone.clone();
            twin.twin_of = Some(last.person_id);
            let last_position = members.len() - 1;
            members[last_position].twin_of = Some(twin.person_id);
            members.push(twin);
        }
        members
    }

    /// A person elsewhere with the same name, sex and birth date as `original`.
    pub fn namesake(&mut self, original: &SyntheticPerson) -> SyntheticPerson {
        let mut household = self.household();
        let mut namesake = household.swap_remove(0);
        namesake.given_name = original.given_name.clone();
        namesake.family_name = original.family_name.clone();
        namesake.sex = original.sex;
        namesake.birth_date = original.birth_date;
        namesake.email = self.email(&original.given_name, &original.family_name);
        namesake.twin_of = None;
        namesake.namesake_of = Some(original.person_id);
        namesake
    }

    /// `count` people (whole households; the last one may be cut short).
    pub fn people(&mut self, count: usize) -> Vec<SyntheticPerson> {
        let mut people = Vec::with_capacity(count + 8);
        while people.len() < count {
            let household = self.household();
            people.extend(household);
        }
        people.truncate(count);
        for person in &mut people {
            // A twin whose sibling was cut off is no longer a twin in this set.
            if let Some(twin) = person.twin_of
                && twin >= count as u64
            {
                person.twin_of = None;
            }
        }
        people
    }

    pub fn rng(&mut self) -> &mut SplitMix64 {
        &mut self.rng
    }
}

fn title_case(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            let mut characters = word.chars();
            characters.next().map_or_else(String::new, |first| {
                first.to_uppercase().chain(characters).collect()
            })
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The record an EHR holds for the person: clean, title-cased, with the MRN.
pub fn clean_record(person: &SyntheticPerson, record_id: String) -> PatientRecord {
    let (city, state, _, _) = CITIES[person.city];
    let street_type = STREET_TYPES[person.street_type].0;
    let unit = person
        .unit
        .map(|unit| format!(" Apt {unit}"))
        .unwrap_or_default();
    PatientRecord {
        record_id,
        given_name: title_case(&person.given_name),
        family_name: title_case(&person.family_name),
        birth_date: Some(person.birth_date),
        sex: Some(person.sex),
        address_line: Some(format!(
            "{} {} {street_type}{unit}",
            person.house_number,
            title_case(&person.street)
        )),
        city: Some(city.to_string()),
        state: Some(state.to_string()),
        postal_code: Some(person.postal_code.clone()),
        phone: Some(person.phone.clone()),
        email: person.email.clone(),
        identifiers: vec![Identifier {
            system: SYNTHETIC_MRN_SYSTEM.to_string(),
            value: person.mrn.clone(),
        }],
    }
}

/// What was done to a noisy record (for debugging the evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perturbation {
    Nickname,
    GivenNameTypo,
    FamilyNameTypo,
    MarriedSurname,
    HyphenatedSurname,
    DayMonthSwapped,
    BirthDateDigitTypo,
    BirthDateDigitsTransposed,
    Moved,
    PhoneTypo,
    MissingFields,
    SexError,
}

/// Replaces, deletes, inserts or transposes one letter (never the first).
fn typo(rng: &mut SplitMix64, text: &str) -> String {
    let mut characters: Vec<char> = text.chars().collect();
    if characters.len() < 3 {
        return text.to_string();
    }
    let position = 1 + rng.index(characters.len() - 1);
    let letter = (b'a' + rng.below(26) as u8) as char;
    match rng.below(4) {
        0 => characters[position] = letter,
        1 => {
            characters.remove(position);
        }
        2 => characters.insert(position, letter),
        _ => {
            let other = if position + 1 < characters.len() {
                position + 1
            } else {
                position - 1
            };
            characters.swap(position, other);
        }
    }
    characters.into_iter().collect()
}

fn date_from_digits(digits: &[u8; 8]) -> Option<NaiveDate> {
    let number = |range: std::ops::Range<usize>| {
        digits[range]
            .iter()
            .fold(0u32, |value, digit| value * 10 + u32::from(*digit))
    };
    NaiveDate::from_ymd_opt(number(0..4) as i32, number(4..6), number(6..8))
}

fn date_digits(date: NaiveDate) -> [u8; 8] {
    let mut packed = date.year().unsigned_abs() * 10_000 + date.month() * 100 + date.day();
    let mut digits = [0u8; 8];
    for slot in digits.iter_mut().rev() {
        *slot = (packed % 10) as u8;
        packed /= 10;
    }
    digits
}

fn format_phone(rng: &mut SplitMix64, digits: &str) -> String {
    let (area, exchange, line) = (&digits[0..3], &digits[3..6], &digits[6..10]);
    match rng.below(5) {
        0 => format!("({area}) {exchange}-{line}"),
        1 => format!("{area}.{exchange}.{line}"),
        2 => format!("+1 {area} {exchange} {line}"),
        3 => format!("1-{area}-{exchange}-{line}"),
        _ => digits.to_string(),
    }
}

/// A record of `person` as a telehealth intake form might capture it, with errors.
pub fn noisy_record(
    person: &SyntheticPerson,
    record_id: String,
    rng: &mut SplitMix64,
) -> (PatientRecord, Vec<Perturbation>) {
    let mut record = clean_record(person, record_id);
    let mut applied = Vec::new();
    record.identifiers.clear();
    if rng.chance(0.1) {
        // Some intakes come from the same EHR and carry the MRN.
        record.identifiers.push(Identifier {
            system: SYNTHETIC_MRN_SYSTEM.to_string(),
            value: person.mrn.clone(),
        });
    }

    // Given name.
    let nicknames: Vec<&str> = nicknames_of(&person.given_name).collect();
    let draw = rng.unit();
    if draw < 0.15 && !nicknames.is_empty() {
        record.given_name = title_case(rng.pick::<&str>(&nicknames));
        applied.push(Perturbation::Nickname);
    } else if draw < 0.21 {
        record.given_name = title_case(&typo(rng, &person.given_name));
        applied.push(Perturbation::GivenNameTypo);
    } else if draw < 0.26 {
        record.given_name = record.given_name.to_uppercase();
    }

    // Family name.
    let draw = rng.unit();
    if person.sex == Sex::Female && draw < 0.06 {
        let mut population = Population::new(rng.next_u64());
        record.family_name = title_case(&population.surname());
        applied.push(Perturbation::MarriedSurname);
    } else if person.sex == Sex::Female && draw < 0.09 {
        let mut population = Population::new(rng.next_u64());
        record.family_name = format!(
            "{}-{}",
            record.family_name,
            title_case(&population.surname())
        );
        applied.push(Perturbation::HyphenatedSurname);
    } else if draw < 0.14 {
        record.family_name = title_case(&typo(rng, &person.family_name));
        applied.push(Perturbation::FamilyNameTypo);
    } else if draw < 0.2 {
        record.family_name = record.family_name.to_uppercase();
    }

    // Birth date.
    let draw = rng.unit();
    let birth = person.birth_date;
    if draw < 0.025 && birth.day() <= 12 && birth.day() != birth.month() {
        record.birth_date = NaiveDate::from_ymd_opt(birth.year(), birth.day(), birth.month());
        applied.push(Perturbation::DayMonthSwapped);
    } else if draw < 0.05 {
        let mut digits = date_digits(birth);
        let position = 2 + rng.index(5);
        digits.swap(position, position + 1);
        if let Some(date) = date_from_digits(&digits).filter(|date| *date != birth) {
            record.birth_date = Some(date);
            applied.push(Perturbation::BirthDateDigitsTransposed);
        }
    } else if draw < 0.075 {
        let mut digits = date_digits(birth);
        let position = 2 + rng.index(6);
        digits[position] = rng.below(10) as u8;
        if let Some(date) = date_from_digits(&digits).filter(|date| *date != birth) {
            record.birth_date = Some(date);
            applied.push(Perturbation::BirthDateDigitTypo);
        }
    }

    // Sex.
    let draw = rng.unit();
    if draw < 0.03 {
        record.sex = None;
        applied.push(Perturbation::MissingFields);
    } else if draw < 0.035 {
        record.sex = Some(if person.sex == Sex::Female {
            Sex::Male
        } else {
            Sex::Female
        });
        applied.push(Perturbation::SexError);
    }

    // Address: moved, reformatted or missing.
    let draw = rng.unit();
    if draw < 0.15 {
        let mut population = Population::new(rng.next_u64());
        let mut elsewhere = population.household().swap_remove(0);
        elsewhere.given_name = person.given_name.clone();
        let moved = clean_record(&elsewhere, String::new());
        record.address_line = moved.address_line;
        record.city = moved.city;
        record.state = moved.state;
        record.postal_code = moved.postal_code;
        if rng.chance(0.5) {
            record.phone = moved.phone;
        }
        applied.push(Perturbation::Moved);
    } else if draw < 0.55 {
        let (_, short) = STREET_TYPES[person.street_type];
        let unit = person
            .unit
            .map(|unit| format!(" #{unit}"))
            .unwrap_or_default();
        record.address_line = Some(format!(
            "{} {} {short}.{unit}",
            person.house_number,
            person.street.to_uppercase()
        ));
        if rng.chance(0.3) {
            record.state = Some(
                match CITIES[person.city].1 {
                    "IL" => "Illinois",
                    "TX" => "Texas",
                    "MN" => "Minnesota",
                    other => other,
                }
                .to_string(),
            );
        }
    } else if draw < 0.62 {
        record.address_line = None;
        record.postal_code = None;
        applied.push(Perturbation::MissingFields);
    }

    // Phone: formats, typos, missing.
    let draw = rng.unit();
    if draw < 0.2 {
        record.phone = None;
    } else if let Some(phone) = record.phone.take() {
        let mut digits = phone;
        if draw < 0.23 {
            let mut bytes = digits.into_bytes();
            let position = 3 + rng.index(7);
            bytes[position] = b'0' + rng.below(10) as u8;
            digits = String::from_utf8(bytes).unwrap_or_default();
            applied.push(Perturbation::PhoneTypo);
        }
        record.phone = Some(format_phone(rng, &digits));
    }

    // Email: often missing at intake, sometimes shouting.
    let draw = rng.unit();
    if draw < 0.35 {
        record.email = None;
    } else if draw < 0.5 {
        record.email = record.email.map(|email| email.to_uppercase());
    }
    (record, applied)
}

/// Known records, incoming records and the truth linking them.
#[derive(Debug, Clone)]
pub struct EvaluationSet {
    pub known: Vec<PatientRecord>,
    /// The person behind each known record.
    pub known_person: Vec<u64>,
    pub incoming: Vec<PatientRecord>,
    pub incoming_person: Vec<u64>,
    /// What was done to each incoming record.
    pub incoming_perturbations: Vec<Vec<Perturbation>>,
    /// Pairs of person ids that are twins.
    pub twins: Vec<(u64, u64)>,
    /// Pairs of person ids sharing name, sex and birth date.
    pub namesakes: Vec<(u64, u64)>,
}

/// An EHR's known patients (a few of them registered twice) and a batch of intake
/// records: 75% of the people come back with a noisy record, plus new people who are
/// not known at all (a fifth of the batch).
pub fn evaluation_set(seed: u64, people: usize) -> EvaluationSet {
    let mut population = Population::new(seed);
    let mut persons = population.people(people);
    let namesake_count = people / 50;
    for step in 0..namesake_count {
        let original = persons[(step * 37) % people].clone();
        let mut namesake = population.namesake(&original);
        namesake.person_id = 1_000_000_000 + step as u64;
        namesake.mrn = format!("N{step:09}");
        persons.push(namesake);
    }
    let mut rng = SplitMix64::new(seed ^ 0x005E_ED0F_1DE7);
    let mut set = EvaluationSet {
        known: Vec::new(),
        known_person: Vec::new(),
        incoming: Vec::new(),
        incoming_person: Vec::new(),
        incoming_perturbations: Vec::new(),
        twins: Vec::new(),
        namesakes: Vec::new(),
    };
    for person in &persons {
        set.known
            .push(clean_record(person, format!("K{:07}", set.known.len())));
        set.known_person.push(person.person_id);
        if rng.chance(0.04) {
            // A duplicate chart already in the EHR.
            let (mut duplicate, _) =
                noisy_record(person, format!("K{:07}", set.known.len()), &mut rng);
            duplicate.identifiers = vec![Identifier {
                system: SYNTHETIC_MRN_SYSTEM.to_string(),
                value: format!("D{}", person.mrn),
            }];
            set.known.push(duplicate);
            set.known_person.push(person.person_id);
        }
        if let Some(twin) = person.twin_of
            && twin > person.person_id
        {
            set.twins.push((person.person_id, twin));
        }
        if let Some(original) = person.namesake_of {
            set.namesakes.push((original, person.person_id));
        }
        if rng.chance(0.75) {
            let (record, applied) =
                noisy_record(person, format!("I{:07}", set.incoming.len()), &mut rng);
            set.incoming.push(record);
            set.incoming_person.push(person.person_id);
            set.incoming_perturbations.push(applied);
        }
    }
    // Twins always come in: an intake record for each twin.
    for (first, second) in set.twins.clone() {
        for twin in [first, second] {
            if !set.incoming_person.contains(&twin)
                && let Some(person) = persons.iter().find(|person| person.person_id == twin)
            {
                let (record, applied) =
                    noisy_record(person, format!("I{:07}", set.incoming.len()), &mut rng);
                set.incoming.push(record);
                set.incoming_person.push(twin);
                set.incoming_perturbations.push(applied);
            }
        }
    }
    // New people, never seen by the EHR.
    let mut newcomers = Population::new(seed ^ 0xA11CE);
    let wanted = set.incoming.len() / 4;
    for person in newcomers.people(wanted) {
        let (record, applied) =
            noisy_record(&person, format!("I{:07}", set.incoming.len()), &mut rng);
        set.incoming.push(record);
        set.incoming_person.push(2_000_000_000 + person.person_id);
        set.incoming_perturbations.push(applied);
    }
    set
}

/// What happens to a tenant's patients, in log order, as the identity service sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryEvent {
    /// A registration (demographics only: identifiers come later, by link).
    Registered(PatientRecord),
    /// An EHR identifier linked to the patient (automatic link or a resolved review).
    IdentifierLinked {
        record_id: String,
        identifier: Identifier,
    },
    /// The patient's chart was merged into another: no longer a candidate.
    Merged { record_id: String },
}

/// A synthetic registration log for `people` people: each registers once (whole
/// households, so partners, children and twins), a fifth of them come back as a noisy
/// near-duplicate and a twentieth have a namesake registering; about half of the
/// registrations get an MRN linked soon after, and a third of the near-duplicates are
/// later merged away. Deterministic for a seed.
pub fn registry_events(seed: u64, people: usize) -> Vec<RegistryEvent> {
    let mut population = Population::new(seed);
    let persons = population.people(people);
    let mut rng = SplitMix64::new(seed ^ 0x5E01D);
    let mut events = Vec::new();
    // Events held back to come a few registrations later: (due after, event).
    let mut later: Vec<(usize, RegistryEvent)> = Vec::new();
    let mut registrations = 0usize;
    let next_id = |rng: &mut SplitMix64| {
        // Random ids, so that id order (the rebuild's order) is not arrival order.
        format!("{:016x}", rng.next_u64())
    };
    let mrn = |person: &SyntheticPerson| Identifier {
        system: "urn:synthetic-ehr".into(),
        value: format!("MRN{:07}", person.person_id),
    };
    for person in &persons {
        let mut arrivals = vec![(clean_record(person, next_id(&mut rng)), false)];
        if rng.chance(0.2) {
            let (noisy, _) = noisy_record(person, next_id(&mut rng), &mut rng);
            arrivals.push((noisy, true));
        }
        if rng.chance(0.05) {
            let namesake = population.namesake(person);
            arrivals.push((clean_record(&namesake, next_id(&mut rng)), false));
        }
        for (mut record, duplicate) in arrivals {
            record.identifiers.clear();
            let record_id = record.record_id.clone();
            events.push(RegistryEvent::Registered(record));
            registrations += 1;
            if rng.chance(0.5) {
                let due = registrations + rng.index(4);
                later.push((
                    due,
                    RegistryEvent::IdentifierLinked {
                        record_id: record_id.clone(),
                        identifier: mrn(person),
                    },
                ));
            }
            if duplicate && rng.chance(0.33) {
                let due = registrations + 1 + rng.index(8);
                later.push((due, RegistryEvent::Merged { record_id }));
            }
            let (due, waiting): (Vec<_>, Vec<_>) =
                later.drain(..).partition(|(due, _)| *due <= registrations);
            later = waiting;
            events.extend(due.into_iter().map(|(_, event)| event));
        }
    }
    events.extend(later.into_iter().map(|(_, event)| event));
    events
}

/// Known records streamed for the benchmark; incoming records collected on the way.
///
/// Iterate it to get `known` clean records (feed it straight into
/// `MatchIndex::build_with`), then take [`BenchStream::into_incoming`]: about 70% of the
/// incoming records are noisy copies of known people, the rest new people.
#[derive(Debug)]
pub struct BenchStream {
    population: Population,
    rng: SplitMix64,
    pending: Vec<SyntheticPerson>,
    known_target: usize,
    known_emitted: usize,
    incoming_target: usize,
    incoming: Vec<PatientRecord>,
    seed: u64,
}

pub fn bench_stream(seed: u64, known: usize, incoming: usize) -> BenchStream {
    BenchStream {
        population: Population::new(seed),
        rng: SplitMix64::new(seed ^ 0xBE7C),
        pending: Vec::new(),
        known_target: known,
        known_emitted: 0,
        incoming_target: incoming,
        incoming: Vec::with_capacity(incoming),
        seed,
    }
}

impl Iterator for BenchStream {
    type Item = PatientRecord;

    fn next(&mut self) -> Option<PatientRecord> {
        if self.known_emitted >= self.known_target {
            return None;
        }
        if self.pending.is_empty() {
            self.pending = self.population.household();
            self.pending.reverse();
        }
        let person = self.pending.pop()?;
        let record = clean_record(&person, format!("K{:08}", self.known_emitted));
        self.known_emitted += 1;
        let copy_share = 0.7 * self.incoming_target as f64 / self.known_target.max(1) as f64;
        if self.incoming.len() < self.incoming_target && self.rng.chance(copy_share) {
            let record_id = format!("I{:08}", self.incoming.len());
            let (noisy, _) = noisy_record(&person, record_id, &mut self.rng);
            self.incoming.push(noisy);
        }
        Some(record)
    }
}

impl BenchStream {
    /// The incoming batch, topped up with new people. Drains the known stream first.
    pub fn into_incoming(mut self) -> Vec<PatientRecord> {
        for _ in self.by_ref() {}
        let mut newcomers = Population::new(self.seed ^ 0xA11CE);
        while self.incoming.len() < self.incoming_target {
            for person in newcomers.household() {
                if self.incoming.len() < self.incoming_target {
                    let record_id = format!("I{:08}", self.incoming.len());
                    let (noisy, _) = noisy_record(&person, record_id, &mut self.rng);
                    self.incoming.push(noisy);
                }
            }
        }
        self.incoming
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic() {
        let first = evaluation_set(7, 300);
        let second = evaluation_set(7, 300);
        assert_eq!(first.known, second.known);
        assert_eq!(first.incoming, second.incoming);
        assert_ne!(evaluation_set(8, 300).known, first.known);
    }

    #[test]
    fn twins_share_birth_date_home_and_surname_but_not_given_name() {
        let people = Population::new(3).people(2_000);
        let twins: Vec<(&SyntheticPerson, &SyntheticPerson)> = people
            .iter()
            .filter_map(|person| {
                let twin = person.twin_of.filter(|twin| *twin > person.person_id)?;
                Some((person, people.iter().find(|other| other.person_id == twin)?))
            })
            .collect();
        assert!(twins.len() >= 20, "only {} twin pairs", twins.len());
        for (first, second) in twins {
            assert_eq!(first.birth_date, second.birth_date);
            assert_eq!(first.family_name, second.family_name);
            assert_eq!(first.household_id, second.household_id);
            assert_eq!(first.phone, second.phone);
            assert_ne!(first.given_name, second.given_name);
        }
    }

    #[test]
    fn typos_change_exactly_one_thing() {
        let mut rng = SplitMix64::new(11);
        for _ in 0..200 {
            let changed = typo(&mut rng, "margaret");
            assert!(strsim::osa_distance("margaret", &changed) <= 1, "{changed}");
            assert!(changed.starts_with('m'));
        }
    }

    #[test]
    fn bench_stream_yields_the_requested_counts() {
        let mut stream = bench_stream(1, 5_000, 300);
        let known: Vec<PatientRecord> = stream.by_ref().collect();
        let incoming = stream.into_incoming();
        assert_eq!(known.len(), 5_000);
        assert_eq!(incoming.len(), 300);
        assert!(known.iter().all(|record| record.record_id.starts_with('K')));
    }
}
