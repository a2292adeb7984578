//! Layered configuration: command-line flags > `CHARTLINE_*` environment variables >
//! a config file > built-in defaults.
//!
//! The config file (TOML, given by `--config FILE` anywhere on the command line or by
//! `CHARTLINE_CONFIG`) holds flat keys named like the environment variables without
//! the prefix, e.g. `store_url = "postgres://…"`, `nats_url = "nats://…"`,
//! `only = "billing,rpm"`, `listen = "127.0.0.1:8080"`. Before the command line is
//! parsed, each key becomes `CHARTLINE_<KEY>` unless that variable is already set, so
//! every flag that reads an environment variable also reads the file, with the right
//! precedence. Secrets belong in the environment, not in this file.

use std::path::PathBuf;

use anyhow::Context;

/// Finds the config file (`--config FILE`, `--config=FILE` or `CHARTLINE_CONFIG`) and
/// removes the flag from the arguments handed to clap.
pub fn take_config_path(args: &mut Vec<String>) -> Option<PathBuf> {
    let mut found = None;
    let mut index = 1;
    while index < args.len() {
        if args[index] == "--config" && index + 1 < args.len() {
            found = Some(PathBuf::from(args.remove(index + 1)));
            args.remove(index);
        } else if let Some(path) = args[index].strip_prefix("--config=") {
            found = Some(PathBuf::from(path));
            args.remove(index);
        } else {
            index += 1;
        }
    }
    found.or_else(|| std::env::var_os("CHARTLINE_CONFIG").map(PathBuf::from))
}

/// The environment assignments a config file implies (only for unset variables).
pub fn assignments(
    text: &str,
    is_set: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<(String, String)>> {
    let table: toml::Table = toml::from_str(text).context("config file is not valid TOML")?;
    let mut out = Vec::new();
    for (key, value) in table {
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .or_else(|| v.as_integer().map(|i| i.to_string()))
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join(","),
            other => anyhow::bail!("config key {key}: nested tables are not supported ({other:?})"),
        };
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            anyhow::bail!("config key {key:?}: use letters, digits and '_'");
        }
        let variable = format!("CHARTLINE_{}", key.to_ascii_uppercase());
        if !is_set(&variable) {
            out.push((variable, value));
        }
    }
    Ok(out)
}

/// Makes each config value the default of the flags that read its variable, in every
/// subcommand: defaults rank below the environment and the command line.
pub fn apply_as_defaults(
    command: clap::Command,
    assignments: &[(String, String)],
) -> clap::Command {
    let ids: Vec<(clap::Id, &'static str)> = command
        .get_arguments()
        .filter_map(|arg| {
            let variable = arg.get_env()?.to_str()?;
            let (_, value) = assignments.iter().find(|(name, _)| name == variable)?;
            // Leaked once at start-up: clap keeps defaults as 'static strings.
            Some((
                arg.get_id().clone(),
                &*Box::leak(value.clone().into_boxed_str()),
            ))
        })
        .collect();
    let mut command = command;
    for (id, value) in ids {
        command = command.mut_arg(id, |arg| arg.default_value(value));
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |sub| apply_as_defaults(sub, assignments));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_fills_only_unset_variables() {
        let text = "store_url = \"postgres://db/x\"\nonly = [\"billing\", \"rpm\"]\nlisten = \"0.0.0.0:9\"\n";
        let mut got = assignments(text, |v| v == "CHARTLINE_LISTEN").unwrap();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("CHARTLINE_ONLY".to_string(), "billing,rpm".to_string()),
                (
                    "CHARTLINE_STORE_URL".to_string(),
                    "postgres://db/x".to_string()
                ),
            ]
        );
        assert!(assignments("[nested]\nx = 1\n", |_| false).is_err());
        assert!(assignments("not toml", |_| false).is_err());
    }

    #[test]
    fn config_values_rank_below_flags_and_environment() {
        #[derive(clap::Parser, Debug)]
        struct Demo {
            #[arg(long, env = "CHARTLINE_TEST_ONLY_CFG", default_value = "builtin")]
            store: String,
        }
        let assignments = vec![(
            "CHARTLINE_TEST_ONLY_CFG".to_string(),
            "from-file".to_string(),
        )];
        let command = apply_as_defaults(<Demo as clap::CommandFactory>::command(), &assignments);
        let parsed = |args: &[&str]| {
            let matches = command.clone().get_matches_from(args);
            <Demo as clap::FromArgMatches>::from_arg_matches(&matches)
                .unwrap()
                .store
        };
        assert_eq!(parsed(&["demo"]), "from-file");
        assert_eq!(parsed(&["demo", "--store", "flag"]), "flag");
    }

    #[test]
    fn config_flag_is_taken_out_of_the_arguments() {
        let mut args: Vec<String> = ["chartline", "serve", "--config", "c.toml", "--only", "rpm"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(take_config_path(&mut args), Some(PathBuf::from("c.toml")));
        assert_eq!(args, ["chartline", "serve", "--only", "rpm"]);
    }
}
