//! Where the store lives (`database` in the controller's config).
//!
//! - A path: an SQLite file, the embedded default (one controller).
//! - A `postgres://` URL, or a table with `url` and `password_file`:
//!   PostgreSQL, shared by several controllers.
//!
//! The password never sits in the config: a URL that carries one is
//! refused, and `password_file` (mode 0600, like every other secret the
//! controller reads) supplies it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{read_secret, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// SQLite file, created (with its directory) if missing.
    Sqlite(PathBuf),
    Postgres {
        /// `postgres://user@host:port/dbname?sslmode=...`, no password.
        url: String,
        password_file: Option<PathBuf>,
        /// Connections this controller holds at most.
        max_connections: u32,
    },
}

impl From<PathBuf> for Database {
    fn from(p: PathBuf) -> Database {
        Database::Sqlite(p)
    }
}

impl Default for Database {
    fn default() -> Database {
        Database::Sqlite(PathBuf::from("/var/lib/siphon-control/siphon.db"))
    }
}

pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

#[derive(Deserialize)]
#[serde(untagged)]
enum Spelled {
    Text(String),
    Table(Table),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    url: String,
    password_file: Option<PathBuf>,
    max_connections: Option<u32>,
}

fn is_postgres(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

impl<'de> Deserialize<'de> for Database {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Database, D::Error> {
        use serde::de::Error;
        let (url, password_file, max_connections) = match Spelled::deserialize(d)
            .map_err(|_| D::Error::custom("expected an SQLite file path, a postgres:// URL, or a table { url, password_file, max_connections }"))?
        {
            Spelled::Text(s) if !is_postgres(&s) => {
                if s.contains("://") {
                    return Err(D::Error::custom(format!(
                        "{s}: only postgres:// URLs are taken (or an SQLite file path)"
                    )));
                }
                return Ok(Database::Sqlite(PathBuf::from(s)));
            }
            Spelled::Text(url) => (url, None, None),
            Spelled::Table(t) => (t.url, t.password_file, t.max_connections),
        };
        if !is_postgres(&url) {
            return Err(D::Error::custom(format!(
                "{url}: the table form is for PostgreSQL (a postgres:// URL)"
            )));
        }
        let parsed = url::Url::parse(&url)
            .map_err(|e| D::Error::custom(format!("{}: {e}", redact(&url))))?;
        if parsed.password().is_some() {
            return Err(D::Error::custom(
                "the database URL holds a password: put it in password_file (mode 0600) instead",
            ));
        }
        let max_connections = max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(D::Error::custom("max_connections must be at least 1"));
        }
        Ok(Database::Postgres {
            url,
            password_file,
            max_connections,
        })
    }
}

/// `url` with any password replaced, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(database URL)".into(),
    }
}

impl Database {
    /// How errors and logs name it: the file, or the URL (no password).
    pub fn name(&self) -> String {
        match self {
            Database::Sqlite(p) => p.display().to_string(),
            Database::Postgres { url, .. } => redact(url),
        }
    }

    /// The URL `sqlx` connects to, with the password read in; reading it
    /// checks the file's mode as for every secret.
    pub fn connect_url(&self) -> Result<String, ConfigError> {
        match self {
            Database::Sqlite(p) => Ok(sqlite_url(p)),
            Database::Postgres {
                url,
                password_file: Some(f),
                ..
            } => {
                let raw = read_secret(f, "database.password_file")?;
                let text = String::from_utf8(raw).map_err(|_| ConfigError::Invalid {
                    path: f.clone(),
                    field: "database.password_file".into(),
                    problem: "not UTF-8".into(),
                })?;
                let password = text.trim_end_matches(['\n', '\r']);
                let mut u = url::Url::parse(url).map_err(|e| ConfigError::Invalid {
                    path: f.clone(),
                    field: "database.url".into(),
                    problem: e.to_string(),
                })?;
                u.set_password(Some(password))
                    .map_err(|()| ConfigError::Invalid {
                        path: f.clone(),
                        field: "database.url".into(),
                        problem: "this URL cannot carry a password (no host?)".into(),
                    })?;
                Ok(u.to_string())
            }
            Database::Postgres { url, .. } => Ok(url.clone()),
        }
    }

    /// The SQLite file's directory, to create before opening.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(p) => p.parent().filter(|d| !d.as_os_str().is_empty()),
            Database::Postgres { .. } => None,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres { .. })
    }
}

/// `sqlite://` URL of `path`: created if missing; `%`, `?` and `#` in the
/// name are escaped (sqlx decodes them back).
fn sqlite_url(path: &Path) -> String {
    let p = path.display().to_string();
    if p == ":memory:" {
        return "sqlite::memory:".into();
    }
    let escaped = p
        .replace('%', "%25")
        .replace('?', "%3F")
        .replace('#', "%23");
    format!("sqlite://{escaped}?mode=rwc")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Deserialize)]
    struct W {
        database: Database,
    }

    fn parse(text: &str) -> Result<Database, String> {
        toml::from_str::<W>(text)
            .map(|w| w.database)
            .map_err(|e| e.message().to_owned())
    }

    #[test]
    fn a_path_is_sqlite_and_a_url_is_postgres() {
        assert_eq!(
            parse(r#"database = "/var/lib/x.db""#).unwrap(),
            Database::Sqlite("/var/lib/x.db".into())
        );
        assert_eq!(
            parse(r#"database = "postgres://siphon@db1:5432/siphon""#).unwrap(),
            Database::Postgres {
                url: "postgres://siphon@db1:5432/siphon".into(),
                password_file: None,
                max_connections: DEFAULT_MAX_CONNECTIONS,
            }
        );
        let t = parse(
            "[database]\nurl = \"postgresql://siphon@db1/siphon\"\npassword_file = \"/etc/siphon/db-password\"\nmax_connections = 4\n",
        )
        .unwrap();
        assert!(matches!(
            t,
            Database::Postgres {
                max_connections: 4,
                ..
            }
        ));
    }

    #[test]
    fn a_password_in_the_config_is_refused_and_never_echoed() {
        let text = "listen = \"127.0.0.1:9876\"\ndatabase = \"postgres://siphon:hunter2hunter2@db1/siphon\"\n";
        let e = crate::config::ControlConfig::parse(text, Path::new("control.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("password_file"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse(r#"database = "postgres://siphon:hunter2hunter2@db1/siphon""#).unwrap_err();
        assert!(e.contains("password_file"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse(r#"database = "mysql://db1/siphon""#).unwrap_err();
        assert!(e.contains("only postgres://"), "{e}");
        let e = parse("[database]\nurl = \"/a/file.db\"\n").unwrap_err();
        assert!(e.contains("PostgreSQL"), "{e}");
    }

    #[test]
    fn the_password_file_goes_into_the_url_escaped() {
        let dir = siphon_testkit::TempDir::new("db-password");
        let f = dir.path("pw");
        siphon_testkit::pki::write_secret(&f, "p@ss/w:rd\n");
        let db = Database::Postgres {
            url: "postgres://siphon@127.0.0.1:5432/siphon".into(),
            password_file: Some(f),
            max_connections: 1,
        };
        let url = db.connect_url().unwrap();
        let u = url::Url::parse(&url).unwrap();
        assert_eq!(u.password(), Some("p%40ss%2Fw%3Ard"));
        assert!(!db.name().contains("w:rd"), "{}", db.name());
    }

    #[test]
    fn sqlite_names_are_escaped() {
        assert_eq!(
            sqlite_url(Path::new("/tmp/a?b#c%d.db")),
            "sqlite:///tmp/a%3Fb%23c%25d.db?mode=rwc"
        );
    }
}
