//! Tests only: a throwaway PostgreSQL 15 cluster from Debian's binaries — `initdb` into a
//! temporary folder, started on a free loopback port, stopped and removed when dropped (or, for
//! a cluster shared by a whole test process, when that process ends, by a watchdog). Run as root
//! (CI), the server runs as the `postgres` user through `runuser`, as PostgreSQL refuses root.
//!
//! It holds two roles besides the superuser: `valv_owner`, owning the database `valv` and every
//! database made with [`Cluster::create_database`] (the role migrations run as), and `valv_app`,
//! a plain login role (the role Valv serves with). Authentication is `trust` on loopback: the
//! tests of passwords and TLS make their own settings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// `VALV_TEST_PG_BIN`, or Debian's PostgreSQL 15.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("VALV_TEST_PG_BIN").map_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"), PathBuf::from);
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: apt-get install postgresql-15 (.ci/run does)", path.display());
    path
}

fn output_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a command");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn is_root() -> bool {
    output_of(Command::new("id").arg("-u")) == "0"
}

/// A command running a PostgreSQL program, as `postgres` when this process is root.
fn pg_command(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin(program));
        c
    } else {
        Command::new(bin(program))
    }
}

fn run_pg(program: &str, args: &[&str]) -> Output {
    pg_command(program).args(args).output().expect("run a PostgreSQL program")
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// A new temporary folder for a cluster, owned by `postgres` when this process is root.
fn new_dir() -> PathBuf {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).expect("random");
    let dir = std::env::temp_dir().join(format!("valv-pg-{}", u64::from_le_bytes(r)));
    std::fs::create_dir_all(&dir).expect("cluster dir");
    if is_root() {
        let id = |flag: &str| output_of(Command::new("id").args([flag, "postgres"])).parse::<u32>().expect("the postgres user exists");
        std::os::unix::fs::chown(&dir, Some(id("-u")), Some(id("-g"))).expect("chown the cluster dir");
    }
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

pub struct Cluster {
    dir: PathBuf,
    pub port: u16,
    databases: AtomicU64,
}

impl Cluster {
    /// A new cluster, stopped and removed when the value is dropped.
    pub fn start() -> Cluster {
        let dir = new_dir();
        let out = run_pg("initdb", &["-D", &display(&dir.join("data")), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let cluster = Cluster { dir, port: free_port(), databases: AtomicU64::new(0) };
        cluster.start_again();
        cluster.psql("CREATE ROLE valv_owner LOGIN; CREATE ROLE valv_app LOGIN; CREATE DATABASE valv OWNER valv_owner;");
        cluster
    }

    /// A cluster for a whole test process (a static never dropped): a watchdog stops and removes
    /// it once this process has ended, however it ended.
    pub fn start_for_process() -> Cluster {
        let cluster = Cluster::start();
        let stop = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {pg_ctl} -D {data} -m immediate -w stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = if is_root() { format!("runuser -u postgres -- {}", display(&bin("pg_ctl"))) } else { display(&bin("pg_ctl")) },
            data = display(&cluster.dir.join("data")),
            dir = display(&cluster.dir),
        );
        // Never waited for: it must outlive this process (then init reaps it).
        #[allow(clippy::zombie_processes)]
        Command::new("sh").args(["-c", &stop]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start the cluster's watchdog");
        cluster
    }

    /// Runs SQL statements (`;`-separated, each on its own) as the superuser.
    pub fn psql(&self, sql: &str) {
        for statement in sql.split_terminator(';').map(str::trim).filter(|s| !s.is_empty()) {
            let out = run_pg("psql", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", statement]);
            assert!(out.status.success(), "{statement}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    fn psql_on(&self, role: &str, database: &str, statement: &str) -> String {
        self.try_psql_on(role, database, statement).unwrap_or_else(|e| panic!("{statement}: {e}"))
    }

    /// The output of `statement` on `database` as `role`, or PostgreSQL's error.
    fn try_psql_on(&self, role: &str, database: &str, statement: &str) -> Result<String, String> {
        let out = run_pg(
            "psql",
            &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", role, "-d", database, "-v", "ON_ERROR_STOP=1", "-A", "-t", "-F", "\u{1f}", "-R", "\u{1e}", "-c", statement],
        );
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// The rows of a query on `database` as `role` (through psql), each column as text: `bytea`
    /// as `\\x` and hex, NULL as empty.
    pub fn query(&self, role: &str, database: &str, statement: &str) -> Vec<Vec<String>> {
        let text = self.psql_on(role, database, statement);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        if text.is_empty() {
            return Vec::new();
        }
        text.split('\u{1e}').map(|r| r.split('\u{1f}').map(str::to_string).collect()).collect()
    }

    /// Runs a statement that returns no rows on `database` as `role`; the count of its command
    /// tag (`UPDATE 3`: 3).
    pub fn execute(&self, role: &str, database: &str, statement: &str) -> u64 {
        self.try_execute(role, database, statement).unwrap_or_else(|e| panic!("{statement}: {e}"))
    }

    /// As [`Cluster::execute`], with PostgreSQL's error when the statement fails.
    pub fn try_execute(&self, role: &str, database: &str, statement: &str) -> Result<u64, String> {
        let text = self.try_psql_on(role, database, statement)?;
        Ok(text.trim().rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0))
    }

    /// A new empty database owned by `valv_owner`; returns its name.
    pub fn create_database(&self) -> String {
        let name = format!("valv_{}", self.databases.fetch_add(1, Ordering::Relaxed) + 1);
        self.psql(&format!("CREATE DATABASE {name} OWNER valv_owner"));
        name
    }

    /// The cluster's files (its data directory, WAL and log).
    pub fn files(&self) -> &Path {
        &self.dir
    }

    /// A copy of `database` as a new database (no session may be connected to it: a server
    /// just killed may still be leaving, so this waits for it); returns the copy's name.
    pub fn copy_database(&self, database: &str) -> String {
        let name = format!("valv_{}", self.databases.fetch_add(1, Ordering::Relaxed) + 1);
        for attempt in 0.. {
            let out = run_pg("psql", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c", &format!("CREATE DATABASE {name} TEMPLATE {database} OWNER valv_owner")]);
            if out.status.success() {
                break;
            }
            assert!(attempt < 50, "copying {database}: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        name
    }

    /// A streaming-replication standby of this cluster (`pg_basebackup -R`, a port of its own),
    /// made synchronous: from here on a commit on this cluster returns only once the standby has
    /// flushed it (`synchronous_standby_names = '*'`, `synchronous_commit = on`, the default).
    pub fn standby(&self) -> Cluster {
        let dir = new_dir();
        let out = run_pg(
            "pg_basebackup",
            &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-D", &display(&dir.join("data")), "-R", "-X", "stream", "-c", "fast", "--no-sync"],
        );
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        let standby = Cluster { dir, port: free_port(), databases: AtomicU64::new(self.databases.load(Ordering::Relaxed)) };
        standby.start_again();
        self.psql("ALTER SYSTEM SET synchronous_standby_names = '*'; SELECT pg_reload_conf()");
        for attempt in 0.. {
            let state = self.query("postgres", "postgres", "SELECT sync_state FROM pg_stat_replication");
            if state.first().and_then(|r| r.first()).map(String::as_str) == Some("sync") {
                break;
            }
            assert!(attempt < 300, "the standby never became synchronous: {state:?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        standby
    }

    /// Promotes this standby to a primary (`pg_ctl promote`, waiting until it accepts writes).
    pub fn promote(&self) {
        let out = run_pg("pg_ctl", &["-D", &display(&self.dir.join("data")), "-w", "-t", "60", "promote"]);
        assert!(out.status.success(), "pg_ctl promote: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the server (again, after [`Cluster::stop`]).
    pub fn start_again(&self) {
        let options = format!("-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=off -c max_connections=300", self.port, display(&self.dir));
        let out = run_pg("pg_ctl", &["-D", &display(&self.dir.join("data")), "-o", &options, "-l", &display(&self.dir.join("log")), "-w", "-t", "60", "start"]);
        assert!(out.status.success(), "pg_ctl start: {}{}", String::from_utf8_lossy(&out.stderr), std::fs::read_to_string(self.dir.join("log")).unwrap_or_default());
    }

    /// Stops the server at once (as a crash would).
    pub fn stop(&self) {
        let out = run_pg("pg_ctl", &["-D", &display(&self.dir.join("data")), "-m", "immediate", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The connection string for `role` on the database `valv`.
    pub fn url(&self, role: &str) -> String {
        self.url_of(role, "valv")
    }

    /// The connection string for `role` on `database`.
    pub fn url_of(&self, role: &str, database: &str) -> String {
        format!("host=127.0.0.1 port={} user={role} dbname={database}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = run_pg("pg_ctl", &["-D", &display(&self.dir.join("data")), "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
