//! BIRD 2's control socket: the line protocol `birdc` speaks, for the
//! few commands the agent needs (`configure`, `configure check`, `show
//! protocols`, `show bfd sessions`).
//!
//! Every reply line starts with a four-digit code and a `-` (more lines
//! follow) or a space (the last line); a line starting with a space
//! continues the previous code. Codes 0xxx end a command well, 1xxx and
//! 2xxx carry tables, 8xxx and 9xxx are errors (runtime, parse).

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one command may take, connection included: BIRD answers in
/// milliseconds, and the agent must not hang on a stuck daemon.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest reply taken (a `show protocols` of a few sessions is a
/// few hundred bytes).
const MAX_REPLY: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum BirdError {
    #[error("BIRD's control socket {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD did not answer {command:?} within {COMMAND_TIMEOUT:?}")]
    Timeout { command: String },
    #[error("BIRD's reply to {command:?} is not its protocol: {line:?}")]
    Protocol { command: String, line: String },
    #[error("BIRD refused {command:?}: {message}")]
    Refused { command: String, message: String },
}

/// One reply: its lines, each with its code (continuations carry the
/// code of the line they continue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub lines: Vec<(u16, String)>,
}

impl Reply {
    /// The code of the last line.
    pub fn code(&self) -> u16 {
        self.lines.last().map_or(0, |l| l.0)
    }

    /// The lines with `code`.
    pub fn with(&self, code: u16) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(move |l| l.0 == code)
            .map(|l| l.1.as_str())
    }

    /// All the text, one line each, for messages.
    pub fn text(&self) -> String {
        let lines: Vec<&str> = self.lines.iter().map(|l| l.1.trim()).collect();
        lines.join("; ")
    }
}

/// Parses one line: its code and whether it is the last, or a
/// continuation (`None` code) of the line before.
fn parse_line(line: &str) -> Option<(Option<u16>, bool, &str)> {
    if let Some(rest) = line.strip_prefix(' ') {
        return Some((None, false, rest));
    }
    let code = line.get(..4)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    match line.as_bytes().get(4) {
        Some(b'-') => Some((Some(code), false, &line[5..])),
        Some(b' ') => Some((Some(code), true, &line[5..])),
        None => Some((Some(code), true, "")),
        _ => None,
    }
}

/// Reads one reply from `lines`.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    command: &str,
    socket: &Path,
) -> Result<Reply, BirdError> {
    let io = |source| BirdError::Io {
        socket: socket.to_owned(),
        source,
    };
    let mut lines = Vec::new();
    let mut size = 0;
    let mut last_code = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await.map_err(io)?;
        if n == 0 {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        size += n;
        if size > MAX_REPLY {
            return Err(BirdError::Protocol {
                command: command.into(),
                line: format!("a reply over {MAX_REPLY} bytes"),
            });
        }
        let line = line.trim_end_matches(['\n', '\r']);
        let Some((code, last, text)) = parse_line(line) else {
            return Err(BirdError::Protocol {
                command: command.into(),
                line: line.into(),
            });
        };
        let code = code.unwrap_or(last_code);
        last_code = code;
        lines.push((code, text.to_owned()));
        if last {
            return Ok(Reply { lines });
        }
    }
}

/// A BIRD daemon, by its control socket.
#[derive(Debug, Clone)]
pub struct Bird {
    pub socket: PathBuf,
}

impl Bird {
    pub fn new(socket: impl Into<PathBuf>) -> Bird {
        Bird {
            socket: socket.into(),
        }
    }

    /// Runs `command` on a connection of its own; an error code (8xxx,
    /// 9xxx) is [`BirdError::Refused`].
    pub async fn command(&self, command: &str) -> Result<Reply, BirdError> {
        let run = async {
            let io = |source| BirdError::Io {
                socket: self.socket.clone(),
                source,
            };
            let stream = UnixStream::connect(&self.socket).await.map_err(io)?;
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            read_reply(&mut read, "(greeting)", &self.socket).await?;
            write
                .write_all(format!("{command}\n").as_bytes())
                .await
                .map_err(io)?;
            read_reply(&mut read, command, &self.socket).await
        };
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, run)
            .await
            .map_err(|_| BirdError::Timeout {
                command: command.into(),
            })??;
        if reply.code() >= 8000 {
            return Err(BirdError::Refused {
                command: command.into(),
                message: reply.text(),
            });
        }
        Ok(reply)
    }

    /// Checks `file` as a config without applying it.
    pub async fn check(&self, file: &Path) -> Result<(), BirdError> {
        let command = format!("configure check \"{}\"", file.display());
        let reply = self.command(&command).await?;
        // 0020 "Configuration OK"; anything else said what is wrong.
        if reply.code() == 20 {
            Ok(())
        } else {
            Err(BirdError::Refused {
                command,
                message: reply.text(),
            })
        }
    }

    /// Reloads the config BIRD was started with (which the agent wrote).
    pub async fn configure(&self) -> Result<(), BirdError> {
        let reply = self.command("configure").await?;
        // 0003 reconfigured, 0004 in progress, 0018 "Reconfiguration
        // confirmed", 0019 nothing to do: all mean it took the file.
        match reply.code() {
            3 | 4 | 18 | 19 => Ok(()),
            _ => Err(BirdError::Refused {
                command: "configure".into(),
                message: reply.text(),
            }),
        }
    }

    /// `show protocols`: each protocol's name, kind, state and info.
    pub async fn protocols(&self) -> Result<Vec<Protocol>, BirdError> {
        let reply = self.command("show protocols").await?;
        Ok(reply.with(1002).filter_map(Protocol::parse).collect())
    }

    /// `show bfd sessions`: each session's peer and state.
    pub async fn bfd_sessions(&self) -> Result<Vec<BfdSession>, BirdError> {
        let reply = self.command("show bfd sessions").await?;
        Ok(reply.with(1020).filter_map(BfdSession::parse).collect())
    }
}

/// One line of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    /// `BGP`, `Static`, `BFD`, ...
    pub kind: String,
    /// `up`, `start`, `down`, ...
    pub state: String,
    /// For BGP: `Established`, `Active`, `Connect`, ... with the last
    /// error, if any.
    pub info: String,
}

impl Protocol {
    /// `name proto table state since info...` (since is a time, or a
    /// date and a time).
    fn parse(line: &str) -> Option<Protocol> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, kind, state) = (*words.first()?, *words.get(1)?, *words.get(3)?);
        // Since: one word (`12:01:02.123`) or two (`2026-12-02 12:01:02`).
        let info_at = if words
            .get(5)
            .is_some_and(|w| w.contains(':') && words[4].contains('-'))
        {
            6
        } else {
            5
        };
        Some(Protocol {
            name: name.into(),
            kind: kind.into(),
            state: state.into(),
            info: words.get(info_at..).unwrap_or_default().join(" "),
        })
    }
}

/// One line of `show bfd sessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdSession {
    pub peer: String,
    pub interface: String,
    /// `Up`, `Down`, `Init`, `AdminDown`.
    pub state: String,
}

impl BfdSession {
    /// A row (the table's name and heading come with the same code,
    /// and have no address first).
    fn parse(line: &str) -> Option<BfdSession> {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.first()?.parse::<std::net::IpAddr>().ok()?;
        Some(BfdSession {
            peer: (*words.first()?).into(),
            interface: (*words.get(1)?).into(),
            state: (*words.get(2)?).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;

    async fn reply_of(text: &str) -> Result<Reply, BirdError> {
        let mut r = BufReader::new(text.as_bytes());
        read_reply(&mut r, "show protocols", Path::new("/test")).await
    }

    #[tokio::test]
    async fn a_show_protocols_reply_is_read_to_its_last_line() {
        let text = "2002-Name       Proto      Table      State  Since         Info\n\
                    1002-device1    Device     ---        up     11:39:13.786  \n\
                    \x20    amps       BGP        ---        start  11:39:13.786  Passive\n\
                    1002-up1        BGP        ---        up     11:39:14.678  Established   \n\
                    0000 \n\
                    0001 BIRD 2.0.12 ready.\n";
        let reply = reply_of(text).await.unwrap();
        assert_eq!(reply.code(), 0);
        let protocols: Vec<Protocol> = reply.with(1002).filter_map(Protocol::parse).collect();
        assert_eq!(protocols.len(), 3, "{protocols:?}");
        assert_eq!(protocols[1].name, "amps");
        assert_eq!(protocols[1].info, "Passive");
        assert_eq!(protocols[2].state, "up");
        assert_eq!(protocols[2].info, "Established");
    }

    #[tokio::test]
    async fn dates_in_since_and_errors_in_info_are_kept_apart() {
        let p = Protocol::parse(
            "up1  BGP  ---  start  2026-12-02 11:39:14  Active  Socket: Connection refused",
        )
        .unwrap();
        assert_eq!(p.state, "start");
        assert_eq!(p.info, "Active Socket: Connection refused");
    }

    #[tokio::test]
    async fn a_reply_that_is_not_the_protocol_is_an_error() {
        assert!(matches!(
            reply_of("hello\n").await,
            Err(BirdError::Protocol { .. })
        ));
        assert!(matches!(
            reply_of("0002-Reading\n").await,
            Err(BirdError::Io { .. })
        ));
    }

    #[test]
    fn bfd_sessions_are_read_from_their_table() {
        let s = BfdSession::parse("198.18.1.12  br0  Up  11:39:14.996  0.100  0.300").unwrap();
        assert_eq!(s.peer, "198.18.1.12");
        assert_eq!(s.state, "Up");
        assert_eq!(BfdSession::parse("bfd1:"), None);
        assert_eq!(
            BfdSession::parse("IP address   Interface  State  Since  Interval  Timeout"),
            None
        );
    }
}
