//! `chartline identity …`: patient matching for evaluation and bulk onboarding.
//!
//! Why it exists: before a telehealth platform is connected to an EHR, its patient
//! list has to be matched against the EHR's (`--against`), and each list de-duplicated
//! on its own; operators need to run that on files and read the result as CSV. The
//! matching rules all live in `chartline_domain::identity`; this module only reads
//! CSV (reporting malformed rows with their line number and skipping them), prints
//! pairs, and runs the synthetic benchmark.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use chartline_domain::identity::normalize::{parse_iso_date, parse_sex};
use chartline_domain::identity::synthetic::bench_stream;
use chartline_domain::identity::{
    GradeThresholds, LiveMatcher, MatchConfig, MatchIndex, MatchOutcome, PatientRecord,
    RefitPolicy, decide_outcome,
};
use chartline_domain::patient::{Identifier, MatchGrade};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Score candidate pairs and print them as CSV `left_id,right_id,score,grade`.
    ///
    /// Without `--against`, finds duplicates within `--records`; with it, links each
    /// record of `--records` to the records of `--against`.
    Match {
        /// CSV with a header row: record_id, given_name, family_name, birth_date
        /// (YYYY-MM-DD) are required columns; sex, address_line, city, state,
        /// postal_code, phone, email, mrn, mrn_system are optional.
        #[arg(long)]
        records: PathBuf,
        /// The known patients to link against (same columns).
        #[arg(long)]
        against: Option<PathBuf>,
        /// Probability from which a pair is `certain` (default 0.99).
        #[arg(long)]
        threshold_certain: Option<f64>,
        /// Probability from which a pair is `possible` (default 0.30).
        #[arg(long)]
        threshold_possible: Option<f64>,
        /// Also print pairs graded certainly_not.
        #[arg(long)]
        all_candidates: bool,
        /// Assigning authority of MRNs whose row has no mrn_system.
        #[arg(long, default_value = "default")]
        default_mrn_system: String,
    },
    /// Matches synthetic incoming records against synthetic known patients, in memory,
    /// and reports time and peak memory as JSON.
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        known: usize,
        #[arg(long, default_value_t = 10_000)]
        incoming: usize,
        #[arg(long, default_value = "target/bench/identity.json")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Registrations one at a time, as the identity reactor sees them, against a
    /// tenant of `--known` patients: the incremental matcher (`LiveMatcher`) against
    /// the former per-registration rebuild. Reports registrations/s of each as JSON.
    BenchRegistrations {
        #[arg(long, default_value_t = 5_000)]
        known: usize,
        /// Registrations through the incremental matcher.
        #[arg(long, default_value_t = 2_000)]
        registrations: usize,
        /// Registrations through the per-registration rebuild (each costs O(known)).
        #[arg(long, default_value_t = 20)]
        rebuild_registrations: usize,
        #[arg(long, default_value = "target/bench/identity_registrations.json")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

pub fn run(command: IdentityCommand) -> anyhow::Result<ExitCode> {
    match command {
        IdentityCommand::Match {
            records,
            against,
            threshold_certain,
            threshold_possible,
            all_candidates,
            default_mrn_system,
        } => {
            let options = MatchOptions {
                records,
                against,
                thresholds: GradeThresholds::from_certain_and_possible(
                    threshold_certain,
                    threshold_possible,
                )?,
                all_candidates,
                default_mrn_system,
            };
            let stdout = io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            match_files(&options, &mut out, &mut io::stderr())
        }
        IdentityCommand::Bench {
            known,
            incoming,
            out,
            seed,
        } => bench(known, incoming, &out, seed),
        IdentityCommand::BenchRegistrations {
            known,
            registrations,
            rebuild_registrations,
            out,
            seed,
        } => bench_registrations(known, registrations, rebuild_registrations, &out, seed),
    }
}

const REQUIRED_COLUMNS: [&str; 4] = ["record_id", "given_name", "family_name", "birth_date"];
const OPTIONAL_COLUMNS: [&str; 9] = [
    "sex",
    "address_line",
    "city",
    "state",
    "postal_code",
    "phone",
    "email",
    "mrn",
    "mrn_system",
];

/// A file that cannot be read as a whole (the run stops: fix the file or the path).
#[derive(Debug, thiserror::Error)]
pub enum CsvFileError {
    #[error("cannot read the header row: {0}")]
    Header(#[source] csv::Error),
    #[error("the file is empty: a header row is required")]
    Empty,
    #[error("missing required column(s): {}", .0.join(", "))]
    MissingColumns(Vec<&'static str>),
    #[error("column {0:?} appears more than once in the header")]
    DuplicateColumn(String),
}

/// A row that was skipped (reported on stderr; the rest of the file is used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "line {}: {}", self.line, self.message)
    }
}

/// Reads patient records from CSV. Whole-file problems are errors; row problems are
/// collected and the row skipped.
pub fn read_records(
    input: impl Read,
    default_mrn_system: &str,
) -> Result<(Vec<PatientRecord>, Vec<RowError>), CsvFileError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let header = reader.byte_headers().map_err(CsvFileError::Header)?.clone();
    if header.is_empty() {
        return Err(CsvFileError::Empty);
    }
    let mut positions: HashMap<String, usize> = HashMap::new();
    for (position, name) in header.iter().enumerate() {
        let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
        if positions.insert(name.clone(), position).is_some() {
            return Err(CsvFileError::DuplicateColumn(name));
        }
    }
    let missing: Vec<&'static str> = REQUIRED_COLUMNS
        .into_iter()
        .filter(|column| !positions.contains_key(*column))
        .collect();
    if !missing.is_empty() {
        return Err(CsvFileError::MissingColumns(missing));
    }
    let column = |name: &str| positions.get(name).copied();
    let columns: HashMap<&'static str, Option<usize>> = REQUIRED_COLUMNS
        .into_iter()
        .chain(OPTIONAL_COLUMNS)
        .map(|name| (name, column(name)))
        .collect();

    let mut records = Vec::new();
    let mut errors = Vec::new();
    let mut first_line_of_id: HashMap<String, u64> = HashMap::new();
    let mut row = csv::ByteRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_byte_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {}
            Err(error) => {
                let line = error.position().map_or(line, csv::Position::line);
                errors.push(RowError {
                    line,
                    message: format!("unreadable CSV: {error}"),
                });
                continue;
            }
        }
        let line = row.position().map_or(line, csv::Position::line);
        if row.len() == 1 && row.get(0).is_some_and(<[u8]>::is_empty) {
            continue; // a blank line
        }
        match parse_row(&row, header.len(), &columns, default_mrn_system) {
            Ok(record) => {
                if let Some(first) = first_line_of_id.get(&record.record_id) {
                    errors.push(RowError {
                        line,
                        message: format!(
                            "duplicate record_id {:?} (first on line {first})",
                            record.record_id
                        ),
                    });
                    continue;
                }
                first_line_of_id.insert(record.record_id.clone(), line);
                records.push(record);
            }
            Err(message) => errors.push(RowError { line, message }),
        }
    }
    Ok((records, errors))
}

fn parse_row(
    row: &csv::ByteRecord,
    expected_fields: usize,
    columns: &HashMap<&'static str, Option<usize>>,
    default_mrn_system: &str,
) -> Result<PatientRecord, String> {
    if row.len() != expected_fields {
        return Err(format!(
            "expected {expected_fields} fields as in the header, found {}",
            row.len()
        ));
    }
    let field = |name: &str| -> Result<Option<String>, String> {
        let Some(position) = columns.get(name).copied().flatten() else {
            return Ok(None);
        };
        let bytes = row.get(position).unwrap_or_default();
        let text = std::str::from_utf8(bytes).map_err(|_| format!("{name} is not valid UTF-8"))?;
        Ok((!text.is_empty()).then(|| text.to_string()))
    };
    let record_id = field("record_id")?.ok_or("record_id is empty")?;
    let birth_date = field("birth_date")?
        .map(|text| parse_iso_date(&text))
        .transpose()
        .map_err(|error| format!("birth_date: {error}"))?;
    let sex = match field("sex")? {
        Some(text) => parse_sex(&text).map_err(|error| format!("sex: {error}"))?,
        None => None,
    };
    let identifiers = match field("mrn")? {
        Some(value) => vec![Identifier {
            system: field("mrn_system")?.unwrap_or_else(|| default_mrn_system.to_string()),
            value,
        }],
        None => Vec::new(),
    };
    Ok(PatientRecord {
        record_id,
        given_name: field("given_name")?.unwrap_or_default(),
        family_name: field("family_name")?.unwrap_or_default(),
        birth_date,
        sex,
        address_line: field("address_line")?,
        city: field("city")?,
        state: field("state")?,
        postal_code: field("postal_code")?,
        phone: field("phone")?,
        email: field("email")?,
        identifiers,
    })
}

pub struct MatchOptions {
    pub records: PathBuf,
    pub against: Option<PathBuf>,
    pub thresholds: GradeThresholds,
    pub all_candidates: bool,
    pub default_mrn_system: String,
}

fn load(
    path: &Path,
    default_mrn_system: &str,
    errors_out: &mut dyn Write,
) -> anyhow::Result<Vec<PatientRecord>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (records, errors) = read_records(io::BufReader::new(file), default_mrn_system)
        .with_context(|| format!("{} is not a usable patient CSV", path.display()))?;
    for error in &errors {
        writeln!(errors_out, "{}: {error} (row skipped)", path.display())?;
    }
    if !errors.is_empty() {
        writeln!(
            errors_out,
            "{}: {} record(s) read, {} malformed row(s) skipped",
            path.display(),
            records.len(),
            errors.len()
        )?;
    }
    Ok(records)
}

pub fn grade_name(grade: MatchGrade) -> &'static str {
    match grade {
        MatchGrade::Certain => "certain",
        MatchGrade::Probable => "probable",
        MatchGrade::Possible => "possible",
        MatchGrade::CertainlyNot => "certainly_not",
    }
}

/// Runs `identity match`: pairs on `out`, row errors on `errors_out`.
pub fn match_files(
    options: &MatchOptions,
    out: &mut dyn Write,
    errors_out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let config = MatchConfig {
        thresholds: options.thresholds,
        ..MatchConfig::default()
    };
    let left_records = load(&options.records, &options.default_mrn_system, errors_out)?;
    let (right_records, result) = match &options.against {
        Some(against) => {
            let right_records = load(against, &options.default_mrn_system, errors_out)?;
            let index = MatchIndex::build_with(right_records.iter().cloned(), config)?;
            let result = index.link(&left_records, true);
            (right_records, result)
        }
        None => {
            let index = MatchIndex::build_with(left_records.iter().cloned(), config)?;
            let result = index.dedupe(true);
            (left_records.clone(), result)
        }
    };
    let mut pairs: Vec<_> = result
        .pairs
        .into_iter()
        .filter(|pair| options.all_candidates || pair.grade != MatchGrade::CertainlyNot)
        .collect();
    pairs.sort_by(|left, right| {
        left.left
            .cmp(&right.left)
            .then(right.score.total_cmp(&left.score))
            .then(left.right.cmp(&right.right))
    });
    let mut writer = csv::Writer::from_writer(out);
    writer.write_record(["left_id", "right_id", "score", "grade"])?;
    for pair in pairs {
        writer.write_record([
            left_records[pair.left as usize].record_id.as_str(),
            right_records[pair.right as usize].record_id.as_str(),
            &format!("{:.6}", pair.score),
            grade_name(pair.grade),
        ])?;
    }
    writer.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Peak resident set size (VmHWM) of this process, in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes * 1024)
}

fn bench(known: usize, incoming: usize, out: &Path, seed: u64) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut stream = bench_stream(seed, known, incoming);
    let index = MatchIndex::build_with(stream.by_ref(), MatchConfig::default())?;
    let incoming_records = stream.into_incoming();
    let build_seconds = started.elapsed().as_secs_f64();

    let matching = Instant::now();
    let result = index.link(&incoming_records, true);
    let match_seconds = matching.elapsed().as_secs_f64();
    let total_seconds = started.elapsed().as_secs_f64();

    let count = |grade: MatchGrade| {
        result
            .pairs
            .iter()
            .filter(|pair| pair.grade == grade)
            .count()
    };
    let report = serde_json::json!({
        "known": known,
        "incoming": incoming_records.len(),
        "build_seconds": build_seconds,
        "match_seconds": match_seconds,
        "total_seconds": total_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "pairs_compared": result.pairs_compared,
        "grades": {
            "certain": count(MatchGrade::Certain),
            "probable": count(MatchGrade::Probable),
            "possible": count(MatchGrade::Possible),
            "certainly_not": count(MatchGrade::CertainlyNot),
        },
        "em": result.model.em,
        "note": "build_seconds includes generating the synthetic known records (streamed into the index)",
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(parent) = out.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(out, format!("{text}\n"))
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// An outcome as the reactor acts on it: the kind and the candidates' ids and grades.
fn outcome_summary(outcome: &MatchOutcome) -> (u8, Vec<(String, MatchGrade)>) {
    match outcome {
        MatchOutcome::New => (0, vec![]),
        MatchOutcome::Link(candidate) => (1, vec![(candidate.record_id.clone(), candidate.grade)]),
        MatchOutcome::Review(candidates) => (
            2,
            candidates
                .iter()
                .take(5)
                .map(|candidate| (candidate.record_id.clone(), candidate.grade))
                .collect(),
        ),
    }
}

fn bench_registrations(
    known: usize,
    registrations: usize,
    rebuild_registrations: usize,
    out: &Path,
    seed: u64,
) -> anyhow::Result<ExitCode> {
    let mut stream = bench_stream(seed, known, registrations.max(rebuild_registrations));
    let known_records: Vec<PatientRecord> = stream.by_ref().collect();
    let incoming: Vec<PatientRecord> = stream
        .into_incoming()
        .into_iter()
        .map(|mut record| {
            // A registration carries demographics only.
            record.identifiers.clear();
            record
        })
        .collect();

    // Incremental: replay the tenant (start-up), then one registration at a time.
    let started = Instant::now();
    let mut matcher = LiveMatcher::new(MatchConfig::default(), RefitPolicy::default());
    for record in &known_records {
        matcher.observe_registration(record.clone())?;
    }
    let startup_seconds = started.elapsed().as_secs_f64();
    let matching = Instant::now();
    let mut incremental_outcomes = Vec::new();
    for record in incoming.iter().take(registrations) {
        incremental_outcomes.push(decide_outcome(
            matcher.resolve_registration(record.clone())?,
        ));
    }
    let incremental_seconds = matching.elapsed().as_secs_f64();

    // The former reactor: a MatchIndex built from every other patient (in id order)
    // for each registration.
    let mut rebuilt: std::collections::BTreeMap<String, PatientRecord> = known_records
        .into_iter()
        .map(|record| (record.record_id.clone(), record))
        .collect();
    let rebuilding = Instant::now();
    let mut same_outcome = 0usize;
    for (position, record) in incoming.iter().take(rebuild_registrations).enumerate() {
        let index = MatchIndex::build_with(rebuilt.values().cloned(), MatchConfig::default())?;
        let outcome = index.outcome(record);
        if incremental_outcomes
            .get(position)
            .is_some_and(|incremental| outcome_summary(incremental) == outcome_summary(&outcome))
        {
            same_outcome += 1;
        }
        rebuilt.insert(record.record_id.clone(), record.clone());
    }
    let rebuild_seconds = rebuilding.elapsed().as_secs_f64();
    let compared = rebuild_registrations.min(incremental_outcomes.len());

    let per_second = |count: usize, seconds: f64| count as f64 / seconds.max(1e-9);
    let report = serde_json::json!({
        "known": known,
        "build_profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "incremental": {
            "startup_seconds": startup_seconds,
            "registrations": incremental_outcomes.len(),
            "seconds": incremental_seconds,
            "registrations_per_second": per_second(incremental_outcomes.len(), incremental_seconds),
            "model_fits": matcher.fits(),
        },
        "rebuild_per_registration": {
            "registrations": rebuild_registrations,
            "seconds": rebuild_seconds,
            "registrations_per_second": per_second(rebuild_registrations, rebuild_seconds),
        },
        "same_outcome_as_rebuild": format!("{same_outcome}/{compared}"),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(parent) = out.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(out, format!("{text}\n"))
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "record_id,given_name,family_name,birth_date,sex,address_line,city,state,postal_code,phone,email,mrn";

    fn read(text: &str) -> Result<(Vec<PatientRecord>, Vec<RowError>), CsvFileError> {
        read_records(text.as_bytes(), "urn:test")
    }

    #[test]
    fn valid_rows_are_read_in_any_column_order() {
        let csv = "birth_date,family_name,record_id,given_name,phone,mrn,mrn_system\n\
                   1970-01-02,O'Brien,a1,Peggy,(312) 555-0101,123,urn:ehr\n\
                   ,Smith,a2,John,,,\n";
        let (records, errors) = read(csv).unwrap();
        assert_eq!(errors, vec![]);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].record_id, "a1");
        assert_eq!(records[0].family_name, "O'Brien");
        assert_eq!(
            records[0].birth_date,
            chrono::NaiveDate::from_ymd_opt(1970, 1, 2)
        );
        assert_eq!(records[0].phone.as_deref(), Some("(312) 555-0101"));
        assert_eq!(
            records[0].identifiers,
            vec![Identifier {
                system: "urn:ehr".into(),
                value: "123".into()
            }]
        );
        assert_eq!(records[1].birth_date, None);
        assert_eq!(records[1].identifiers, vec![]);
    }

    #[test]
    fn missing_required_columns_are_a_file_error() {
        let error = read("record_id,given_name,sex\na,b,F\n").unwrap_err();
        assert_eq!(
            error.to_string(),
            "missing required column(s): family_name, birth_date"
        );
        assert!(matches!(read("").unwrap_err(), CsvFileError::Empty));
        assert!(matches!(
            read("record_id,given_name,family_name,birth_date,given_name\n").unwrap_err(),
            CsvFileError::DuplicateColumn(column) if column == "given_name"
        ));
    }

    #[test]
    fn malformed_rows_are_reported_with_their_line_and_skipped() {
        let csv = format!(
            "{HEADER}\n\
             r1,Ann,Lee,1980-02-30,F,,,,,,,\n\
             r2,Bo,Kim,1980-01-01,F\n\
             ,Cy,Ray,1980-01-01,M,,,,,,,\n\
             r4,Di,Poe,01/02/1980,F,,,,,,,\n\
             r5,Ed,Fox,1980-01-01,Q,,,,,,,\n\
             r6,Flo,Wu,1980-01-01,F,,,,,,,\n\
             r6,Gus,Wu,1980-01-01,M,,,,,,,\n"
        );
        let (records, errors) = read(&csv).unwrap();
        assert_eq!(
            records
                .iter()
                .map(|r| r.record_id.as_str())
                .collect::<Vec<_>>(),
            ["r6"]
        );
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "line 2: birth_date: invalid date \"1980-02-30\": expected a real calendar date as YYYY-MM-DD",
                "line 3: expected 12 fields as in the header, found 5",
                "line 4: record_id is empty",
                "line 5: birth_date: invalid date \"01/02/1980\": expected a real calendar date as YYYY-MM-DD",
                "line 6: sex: invalid sex \"Q\": expected F, M, O/X or U (or female, male, other, unknown)",
                "line 8: duplicate record_id \"r6\" (first on line 7)",
            ]
        );
    }

    fn temp_csv(name: &str, contents: &str) -> PathBuf {
        let directory =
            std::env::temp_dir().join(format!("chartline-identity-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn match_prints_graded_pairs_and_reports_bad_rows() {
        let known = temp_csv(
            "known.csv",
            &format!(
                "{HEADER}\n\
                 k1,Margaret,O'Brien,1954-03-09,F,12 North Elm Street,Chicago,IL,60614,312-555-0101,peg@example.com,M1\n\
                 k2,Thomas,Nguyen,1990-11-30,M,77 Lake Ave,Peoria,IL,61602,309-555-0199,,M2\n"
            ),
        );
        let incoming = temp_csv(
            "incoming.csv",
            &format!(
                "{HEADER}\n\
                 i1,Peggy,OBRIEN,1954-03-09,F,12 N Elm St,Chicago,IL,60614,(312) 555-0101,,\n\
                 i2,Tom,Nguyen,1990-13-30,M,,,,,,,\n\
                 i3,Zed,Quux,2001-01-01,M,1 Far Rd,Tampa,FL,33601,813-555-0100,,\n"
            ),
        );
        let options = MatchOptions {
            records: incoming,
            against: Some(known),
            thresholds: GradeThresholds::default(),
            all_candidates: false,
            default_mrn_system: "urn:test".into(),
        };
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let code = match_files(&options, &mut out, &mut errors).unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "left_id,right_id,score,grade");
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[1].starts_with("i1,k1,"), "{out}");
        assert!(lines[1].ends_with(",certain"), "{out}");
        let errors = String::from_utf8(errors).unwrap();
        assert!(
            errors.contains("incoming.csv: line 3: birth_date: invalid date \"1990-13-30\""),
            "{errors}"
        );
        assert!(
            errors.contains("2 record(s) read, 1 malformed row(s) skipped"),
            "{errors}"
        );
    }

    #[test]
    fn match_fails_clearly_on_missing_columns() {
        let broken = temp_csv("broken.csv", "id,name\n1,x\n");
        let options = MatchOptions {
            records: broken,
            against: None,
            thresholds: GradeThresholds::default(),
            all_candidates: false,
            default_mrn_system: "urn:test".into(),
        };
        let error = match_files(&options, &mut Vec::new(), &mut Vec::new()).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("is not a usable patient CSV"), "{message}");
        assert!(
            message.contains(
                "missing required column(s): record_id, given_name, family_name, birth_date"
            ),
            "{message}"
        );
    }
}
