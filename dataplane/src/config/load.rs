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

impl Config {
    /// Parses a document without validating it.
    pub fn parse(text: &str, format: Format) -> Result<Config, String> {
        Config::parse_at(text, format).map_err(|e| e.to_string())
    }

    /// Parses a document without validating it; an error says where.
    pub fn parse_at(text: &str, format: Format) -> Result<Config, ParseError> {
        match format {
            Format::Toml => {
                let de = toml::Deserializer::new(text);
                serde_path_to_error::deserialize(de).map_err(|e| {
                    ParseError::new(e.path().clone(), e.into_inner().message().to_owned())
                })
            }
            Format::Json => {
                let mut de = serde_json::Deserializer::from_str(text);
                serde_path_to_error::deserialize(&mut de)
                    .map_err(|e| ParseError::new(e.path().clone(), e.into_inner().to_string()))
            }
        }
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
