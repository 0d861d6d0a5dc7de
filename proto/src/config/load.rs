//! Reading a config file: JSON when the name ends in `.json`, TOML otherwise.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::model::Config;
use super::validate::ConfigErrors;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {errors}")]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

/// The syntax a config document is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    pub fn for_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Toml,
        }
    }
}

/// A document that does not parse, with where in it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ParseError {
    /// Where the problem is, e.g. `listeners[0].protocol_port`; empty when
    /// the document as a whole is malformed.
    pub path: String,
    pub message: String,
}

impl ParseError {
    fn new(path: serde_path_to_error::Path, message: String) -> ParseError {
        let path = path.to_string();
        ParseError {
            path: if path == "." { String::new() } else { path },
            message,
        }
    }
}

/// Finds the first place where `written` (the document as parsed into
/// plain values) holds an array and `meant` (the parsed config written
/// back, where every struct is an object) an object there.
fn positional(
    written: &serde_json::Value,
    meant: &serde_json::Value,
    path: &mut String,
) -> Result<(), ParseError> {
    use serde_json::Value;
    let at = path.len();
    match (written, meant) {
        (Value::Array(_), Value::Object(_)) => Err(ParseError {
            path: path.clone(),
            message: "expected an object with named fields, found an array \
                      (the positional form is not accepted)"
                .to_owned(),
        }),
        (Value::Object(w), Value::Object(m)) => w.iter().try_for_each(|(k, w)| {
            let Some(m) = m.get(k) else { return Ok(()) };
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k);
            let r = positional(w, m, path);
            path.truncate(at);
            r
        }),
        (Value::Array(w), Value::Array(m)) => {
            w.iter().zip(m).enumerate().try_for_each(|(i, (w, m))| {
                path.push_str(&format!("[{i}]"));
                let r = positional(w, m, path);
                path.truncate(at);
                r
            })
        }
        _ => Ok(()),
    }
}

impl Config {
    /// Parses a document without validating it.
    pub fn parse(text: &str, format: Format) -> Result<Config, String> {
        Config::parse_at(text, format).map_err(|e| e.to_string())
    }

    /// Parses a document without validating it; an error says where.
    pub fn parse_at(text: &str, format: Format) -> Result<Config, ParseError> {
        let config = match format {
            Format::Toml => {
                let de = toml::Deserializer::new(text);
                serde_path_to_error::deserialize(de).map_err(|e| {
                    ParseError::new(e.path().clone(), e.into_inner().message().to_owned())
                })
            }
            Format::Json => {
                let mut de = serde_json::Deserializer::from_str(text);
                let config: Config = serde_path_to_error::deserialize(&mut de)
                    .map_err(|e| ParseError::new(e.path().clone(), e.into_inner().to_string()))?;
                // serde_json stops after the first value: without this a
                // truncated or doubled body (`{"generation":3} {"x":[`)
                // would pass as the short config before it, and applying
                // that removes every listener it lacks.
                de.end().map_err(|e| ParseError {
                    path: String::new(),
                    message: format!("{e}: a config is one JSON object with nothing after it"),
                })?;
                Ok(config)
            }
        }?;
        // Written as it was parsed, then compared: serde accepts a struct
        // written as an array of its fields in order, a form no one writes
        // on purpose and one a shifted or corrupted document can fall into.
        let written = match format {
            Format::Toml => toml::from_str::<toml::Table>(text)
                .map_err(|e| e.to_string())
                .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string())),
            Format::Json => {
                serde_json::from_str::<serde_json::Value>(text).map_err(|e| e.to_string())
            }
        };
        let meant = serde_json::to_value(&config).map_err(|e| e.to_string());
        // Neither can fail for a document that just parsed as a config.
        let (written, meant) = written
            .and_then(|w| meant.map(|m| (w, m)))
            .map_err(|message| ParseError {
                path: String::new(),
                message,
            })?;
        positional(&written, &meant, &mut String::new())?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config =
            Config::parse(&text, Format::for_path(path)).map_err(|message| LoadError::Parse {
                path: path.to_owned(),
                message,
            })?;
        config.validate().map_err(|errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"generation": 3, "listeners": [{"id": "l", "protocol": "TCP",
        "bind_addresses": ["127.0.0.1"], "protocol_port": 80, "default_pool_id": "p"}],
        "pools": [{"id": "p", "protocol": "TCP", "lb_algorithm": "MAGLEV",
        "members": [{"id": "m", "address": "192.0.2.1", "protocol_port": 80}],
        "healthmonitor": {"type": "TCP", "delay": 5, "timeout": 3, "max_retries": 3}}]}"#;

    fn json_err(text: &str) -> ParseError {
        Config::parse_at(text, Format::Json).expect_err(text)
    }

    #[test]
    fn anything_after_the_document_is_refused() {
        assert!(Config::parse_at(GOOD, Format::Json).is_ok());
        assert!(Config::parse_at(&format!("{GOOD}\n  "), Format::Json).is_ok());
        for text in [
            r#"{"generation":3} {"x":["#.to_owned(),
            format!("{GOOD}}}"),
            format!("{GOOD},{GOOD}"),
        ] {
            let e = json_err(&text);
            assert!(e.message.contains("trailing characters"), "{e}");
            assert!(e.path.is_empty(), "{e:?}");
        }
    }

    #[test]
    fn structs_written_as_arrays_are_refused_where_they_are() {
        let cases = [
            ("[3, [], []]".to_owned(), ""),
            (
                GOOD.replace(
                    r#"{"id": "l", "protocol": "TCP",
        "bind_addresses": ["127.0.0.1"], "protocol_port": 80, "default_pool_id": "p"}"#,
                    r#"["l", "TCP", ["127.0.0.1"], 80]"#,
                ),
                "listeners[0]",
            ),
            (
                GOOD.replace(
                    r#"{"id": "m", "address": "192.0.2.1", "protocol_port": 80}"#,
                    r#"["m", "192.0.2.1", 80]"#,
                ),
                "pools[0].members[0]",
            ),
            (
                GOOD.replace(
                    r#"{"type": "TCP", "delay": 5, "timeout": 3, "max_retries": 3}"#,
                    r#"["TCP", 5, 3, 3]"#,
                ),
                "pools[0].healthmonitor",
            ),
        ];
        for (text, path) in cases {
            let e = json_err(&text);
            assert_eq!(e.path, path, "{e}");
            assert!(e.message.contains("positional form"), "{e}");
        }
        let toml = "generation = 1\nlisteners = [[\"l\", \"TCP\", [\"127.0.0.1\"], 80]]\n";
        if let Err(e) = Config::parse_at(toml, Format::Toml) {
            assert!(e.path.starts_with("listeners"), "{e}");
        } else {
            panic!("a positional TOML listener parsed");
        }
    }
}
