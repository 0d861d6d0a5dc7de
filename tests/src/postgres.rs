//! A throwaway PostgreSQL server for the tests: Debian's `postgresql`
//! package (`.ci/run` installs it), a cluster made by `initdb` in a temp
//! dir and run by `pg_ctl` as the `postgres` user, reachable on
//! 127.0.0.1 at a free port and on a Unix socket in that dir, with
//! password (SCRAM) authentication. Stopped and removed on drop, however
//! the test ends. No mock and no in-memory stand-in.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::TempDir;

/// The cluster's superuser.
pub const USER: &str = "postgres";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    /// The Unix socket's directory.
    pub socket_dir: PathBuf,
    pub port: u16,
    password: String,
    /// A file holding the password alone (as the controller reads it).
    pub password_file: PathBuf,
    running: bool,
    dir: TempDir,
}

/// Where PostgreSQL's server programs are: `$SIPHON_PG_BIN`, else the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them off
/// `PATH`), else `PATH`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SIPHON_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `program` of `bin` run as the `postgres` user.
fn as_postgres(bin: &Path, program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", USER, "--"]).arg(bin.join(program));
    c
}

impl Postgres {
    /// Starts a cluster for `test`, or says why it cannot and returns
    /// `None`: it needs root (to run the server as `postgres`) and the
    /// `postgresql` package. Under `SIPHON_REQUIRE_ROOT_TESTS=1` (CI) a
    /// missing one is a failure, not a skip.
    pub fn start_or_skip(test: &str) -> Option<Postgres> {
        if !crate::root_or_skip(test) {
            return None;
        }
        let Some(bin) = bin_dir() else {
            crate::skip_or_fail(test, "PostgreSQL's initdb was not found (install Debian's postgresql package, or set SIPHON_PG_BIN)");
            return None;
        };
        Some(Postgres::start(bin))
    }

    fn start(bin: PathBuf) -> Postgres {
        let dir = TempDir::new("postgres");
        let password = format!("siphon-test-{}", std::process::id());
        let password_file = dir.path("password");
        // 0600 as every secret the controller reads; `postgres` owns it
        // (for initdb) and root reads it anyway.
        crate::pki::write_secret(&password_file, &format!("{password}\n"));
        let socket_dir = dir.path("socket");
        std::fs::create_dir(&socket_dir).unwrap_or_else(|e| panic!("socket dir: {e}"));
        // The server runs as `postgres`: its dir, socket dir and password
        // file are its own (the `postgres` user comes with the package).
        run(
            Command::new("chown").arg(format!("{USER}:{USER}")).args([
                &dir.0,
                &socket_dir,
                &password_file,
            ]),
            "chown",
        );
        let data = dir.path("data");
        run(
            as_postgres(&bin, "initdb")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    USER,
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .arg(format!("--pwfile={}", password_file.display()))
                .arg("--no-sync"),
            "initdb",
        );
        let mut pg = Postgres {
            bin,
            data,
            socket_dir,
            port: crate::free_port(),
            password,
            password_file,
            running: false,
            dir,
        };
        pg.start_server();
        pg
    }

    /// Starts the server (again, after [`Postgres::stop`]) on the same
    /// port and data, and waits until it takes connections.
    pub fn start_server(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.socket_dir.display()
        );
        run(
            as_postgres(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.path("server.log"))
                .args(["-o", &options, "-w", "-t", "30", "start"]),
            "pg_ctl start",
        );
        self.running = true;
    }

    /// Stops the server at once (`immediate`: as if it died), keeping its
    /// data.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        self.running = false;
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// A connection URL for `database` over TCP, without the password
    /// (which comes from [`Postgres::password_file`]).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `sql` through `psql` on the Unix socket; its output, unaligned
    /// and without headers.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = run(
            Command::new("psql")
                .env("PGPASSWORD", &self.password)
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
                .args(["-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql]),
            "psql",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `sql` through `psql` over TCP with `password`, as a client
    /// of [`Postgres::url`] would; whatever it did (a refusal too).
    pub fn psql_tcp(&self, password: &str, database: &str, sql: &str) -> Output {
        Command::new("psql")
            .env("PGPASSWORD", password)
            .arg(self.url(database))
            .args(["-Atq", "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("psql: {e}"))
    }

    /// A new empty database.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }

    /// The server's log, for a failing test's message.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The data dir (mode 0700, the server's) goes with the temp dir
        // after this.
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throwaway_cluster_takes_password_logins_stops_and_starts_again() {
        let Some(mut pg) = Postgres::start_or_skip("throwaway PostgreSQL") else {
            return;
        };
        pg.create_database("siphon");
        assert_eq!(pg.psql("siphon", "SELECT 1 + 1"), "2");
        pg.psql("siphon", "CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
        // Over TCP, with the password: what the controller will do.
        let tcp = pg.psql_tcp(pg.password(), "siphon", "SELECT x FROM t");
        assert_eq!(
            String::from_utf8_lossy(&tcp.stdout).trim(),
            "7",
            "{}",
            pg.log_text()
        );
        let wrong = pg.psql_tcp("wrong", "siphon", "SELECT 1");
        assert!(!wrong.status.success(), "a wrong password is refused");
        // Stopped as if it died, started again: the data is still there.
        pg.stop();
        let down = pg.psql_tcp(pg.password(), "siphon", "SELECT 1");
        assert!(!down.status.success());
        pg.start_server();
        assert_eq!(pg.psql("siphon", "SELECT x FROM t"), "7");
    }
}
