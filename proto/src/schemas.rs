//! JSON Schemas of every event, command and reply, generated from the Rust types and
//! committed under `proto/schemas/` so systems in other languages can validate against
//! them. `schemas_match_committed_files` fails when the code and the files drift;
//! regenerate with `make schemas` (sets `CHARTLINE_BLESS=1`).

use chartline_domain::encounter::{EncounterCommand, EncounterEvent};
use chartline_domain::patient::{PatientCommand, PatientEvent};
use chartline_domain::rpm::{RpmCommand, RpmEvent};
use schemars::schema_for;

use crate::commands::{CommandReply, CommandRequest};
use crate::envelope::{EventEnvelope, NewEvent};

/// `(file stem, schema)` for every published message type.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    let to_json =
        |schema: schemars::Schema| serde_json::to_value(schema).expect("schemas serialize");
    vec![
        ("event-envelope", to_json(schema_for!(EventEnvelope))),
        ("new-event", to_json(schema_for!(NewEvent))),
        ("command-reply", to_json(schema_for!(CommandReply))),
        (
            "encounter-command",
            to_json(schema_for!(CommandRequest<EncounterCommand>)),
        ),
        (
            "patient-command",
            to_json(schema_for!(CommandRequest<PatientCommand>)),
        ),
        (
            "rpm-command",
            to_json(schema_for!(CommandRequest<RpmCommand>)),
        ),
        ("encounter-event", to_json(schema_for!(EncounterEvent))),
        ("patient-event", to_json(schema_for!(PatientEvent))),
        ("rpm-event", to_json(schema_for!(RpmEvent))),
    ]
}

/// The schema with every object's keys in sorted order, so the committed files do not
/// depend on whether some other crate in a build turned on `serde_json/preserve_order`.
pub fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn schemas_match_committed_files() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let bless = std::env::var("CHARTLINE_BLESS").is_ok_and(|v| v == "1");
        let mut drifted = Vec::new();
        for (name, schema) in super::all() {
            let path = dir.join(format!("{name}.schema.json"));
            let generated = serde_json::to_string_pretty(&super::sorted(schema)).unwrap() + "\n";
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &generated).unwrap();
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(committed) if committed == generated => {}
                _ => drifted.push(path.display().to_string()),
            }
        }
        assert!(
            drifted.is_empty(),
            "JSON Schemas drifted from the code; run `make schemas` and commit: {drifted:?}"
        );
    }
}
