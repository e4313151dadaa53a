//! Starts the real `valv` binary in a temporary data directory and talks HTTPS to it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn valv() -> Command {
    Command::new(env!("CARGO_BIN_EXE_valv"))
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).expect("randomness");
    let dir = std::env::temp_dir().join(format!("valv-it-{tag}-{}", u64::from_le_bytes(r)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The PostgreSQL cluster of this test process when the suite runs on PostgreSQL
/// (`VALV_TEST_STORE=postgres`, as `.ci/run`'s second pass): every data directory `init` makes
/// gets a database of its own there, named in its `valv.toml`.
pub fn postgres() -> Option<&'static valv_testpg::Cluster> {
    static CLUSTER: std::sync::OnceLock<Option<valv_testpg::Cluster>> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| (std::env::var("VALV_TEST_STORE").as_deref() == Ok("postgres")).then(valv_testpg::Cluster::start_for_process)).as_ref()
}

/// What `init` is given to choose the suite's backend: nothing for SQLite (the default), a new
/// database for PostgreSQL.
fn store_env() -> Vec<(String, String)> {
    match postgres() {
        Some(pg) => vec![("VALV_STORE".into(), "postgres".into()), ("VALV_DATABASE_URL".into(), pg.url_of("valv_owner", &pg.create_database()))],
        None => Vec::new(),
    }
}

/// A data directory's database as a database administrator reaches it — the file on SQLite, the
/// role owning the database on PostgreSQL — for tests that edit rows behind Valv's back. Values
/// come back as text: integers in decimal, blobs in lower-case hex, NULL as "".
pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(&'static valv_testpg::Cluster, String),
}

impl Db {
    /// The database `data`'s configuration names.
    pub fn of(data: &Path) -> Db {
        let config = std::fs::read_to_string(data.join("valv.toml")).unwrap_or_default();
        match (postgres(), config.split_once("dbname=")) {
            (Some(pg), Some((_, rest))) => Db::Postgres(pg, rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or_default().to_string()),
            _ => {
                // The audit log's file attached as the server attaches it: `audit_entries` and
                // the other audit tables are found there by their plain names.
                let db = data.join("valv.db");
                let conn = rusqlite::Connection::open(&db).expect("open the SQLite database");
                valv_store::sqlite::attach_audit(&conn, &db).expect("attach the audit log's file");
                Db::Sqlite(conn)
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(..))
    }

    /// Runs statements (`;`-separated); the rows the last one changed.
    pub fn execute(&self, sql: &str) -> u64 {
        match self {
            // Several statements may come at once (the rows changed are the last one's).
            Db::Sqlite(c) => {
                c.execute_batch(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                c.changes()
            }
            // The owner must first disable the triggers that keep the audit log append-only
            // (as a database administrator bent on an edit would).
            Db::Postgres(pg, db) => {
                let triggers = |on: &str| format!("ALTER TABLE audit_entries {on} TRIGGER USER; ALTER TABLE audit_checkpoints {on} TRIGGER USER");
                pg.execute("valv_owner", db, &triggers("DISABLE"));
                let changed = pg.execute("valv_owner", db, sql);
                pg.execute("valv_owner", db, &triggers("ENABLE"));
                changed
            }
        }
    }

    /// A copy of the data directory `from` at `to`, with a copy of its database (the server on
    /// it must be stopped).
    pub fn copy_data_dir(from: &Path, to: &Path) {
        copy_files(from, to);
        if let Db::Postgres(pg, db) = Db::of(from) {
            let copy = pg.copy_database(&db);
            let path = to.join("valv.toml");
            let config = std::fs::read_to_string(&path).expect("valv.toml").replace(&format!("dbname={db}"), &format!("dbname={copy}"));
            std::fs::write(&path, config).expect("valv.toml");
        }
    }

    /// The database's files on disk: the SQLite file and its WAL, or the PostgreSQL cluster's.
    pub fn files(&self, data: &Path) -> PathBuf {
        match self {
            Db::Sqlite(_) => data.to_path_buf(),
            Db::Postgres(pg, _) => pg.files().to_path_buf(),
        }
    }

    /// `zeroblob(length(column))` in the database's dialect.
    pub fn zeros_like(&self, column: &str) -> String {
        match self {
            Db::Sqlite(_) => format!("zeroblob(length({column}))"),
            Db::Postgres(..) => format!("decode(repeat('00', length({column})), 'hex')"),
        }
    }

    /// The rows of a query, each column as text.
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let n = stmt.column_count();
                let rows = stmt.query_map([], |r| {
                    (0..n)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => String::new(),
                                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                                rusqlite::types::ValueRef::Real(v) => v.to_string(),
                                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).to_string(),
                                rusqlite::types::ValueRef::Blob(b) => hex(b),
                            })
                        })
                        .collect::<rusqlite::Result<Vec<String>>>()
                });
                rows.expect("query").collect::<Result<_, _>>().expect("rows")
            }
            Db::Postgres(pg, db) => pg
                .query("valv_owner", db, sql)
                .into_iter()
                .map(|row| row.into_iter().map(|v| v.strip_prefix("\\x").map(str::to_string).unwrap_or(v)).collect())
                .collect(),
        }
    }

    /// A blob literal in the database's dialect.
    pub fn blob(&self, bytes: &[u8]) -> String {
        match self {
            Db::Sqlite(_) => format!("x'{}'", hex(bytes)),
            Db::Postgres(..) => format!("'\\x{}'::bytea", hex(bytes)),
        }
    }
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read").flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_files(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

/// A text literal (quotes doubled).
pub fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The port in `valv serve`'s line "Valv serving HTTPS on https://127.0.0.1:PORT/fhir …".
fn served_port(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("Valv serving HTTPS on https://127.0.0.1:")?;
    rest.split('/').next()?.parse().ok()
}

/// Runs a `valv` subcommand against a data directory; returns stdout, panics on failure.
pub fn run_ok(data: &Path, args: &[&str]) -> String {
    run_ok_env(data, args, &[])
}

/// [`run_ok`] with extra environment variables.
/// Owned variables as the `(&str, &str)` pairs the helpers take.
pub fn as_env(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub fn run_ok_env(data: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let store = if args.first() == Some(&"init") { store_env() } else { Vec::new() };
    let out = valv().arg("--data-dir").arg(data).args(args).envs(as_env(&store)).envs(env.iter().copied()).output().expect("run valv");
    assert!(out.status.success(), "valv {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs a `valv` subcommand expecting a refusal: returns its reason, which must be one line.
pub fn run_refused(data: &Path, args: &[&str]) -> String {
    let out = valv().arg("--data-dir").arg(data).args(args).output().expect("run valv");
    assert!(!out.status.success(), "valv {args:?} must fail");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "valv {args:?}: {err}");
    err
}

pub fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or("").trim().to_string()
}

/// An unlabelled metric of `/metrics` (panics if it is not there).
pub async fn metric(s: &Server, name: &str) -> u64 {
    let text = s.request("GET", "/metrics", None, None, &[]).await.text;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Waits (at most `within`) until the metric satisfies `ok`; its value then.
pub async fn wait_metric(s: &Server, name: &str, within: Duration, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let v = metric(s, name).await;
        if ok(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The loader's scopes: everything, and explicitly the access facts (care teams, consents,
/// patients' providers, organisations), which a wildcard does not cover.
pub const LOADER_SCOPES: &str = "system/*.cruds system/CareTeam.cud system/Consent.cud system/Patient.cud system/Organization.cud";

pub struct Server {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    /// The first admin key: users and configuration, no patient data.
    pub admin_key: String,
    /// A service key holding `system/*.cruds`: the loader the FHIR helpers below use.
    pub data_key: String,
    /// An auditor's API key: the audit log and AuditEvents.
    pub auditor_key: String,
    /// A second admin's key, made on first use: approves what the first admin asks for.
    approver: std::sync::OnceLock<String>,
    child: Option<Child>,
    env: Vec<(String, String)>,
    tls: Arc<rustls::ClientConfig>,
}

impl Server {
    pub fn start(tag: &str) -> Server {
        Self::start_with(tag, &[])
    }

    /// Initialises a data directory, then serves it with extra `VALV_*` variables.
    pub fn start_with(tag: &str, env: &[(&str, &str)]) -> Server {
        Self::start_configured(tag, env, "")
    }

    /// As [`Server::start_with`], with the `key = value` lines of `toml` replacing those keys in
    /// the `valv.toml` that init wrote; keys it lacks go under their section's header, and
    /// `[[array]]` tables are appended.
    pub fn start_configured(tag: &str, env: &[(&str, &str)], toml: &str) -> Server {
        let dir = temp_dir(tag);
        let data = dir.join("valv-data");
        Self::start_at(dir, data, env, toml)
    }

    /// As [`Server::start_configured`] with the data directory at `data` (e.g. on a small mount
    /// for disk faults); the log, clock and the rest stay in a temporary directory.
    pub fn start_on(tag: &str, data: &Path, env: &[(&str, &str)], toml: &str) -> Server {
        Self::start_at(temp_dir(tag), data.to_path_buf(), env, toml)
    }

    /// As [`Server::start_with`], with `env` given also to `init` and the harness's other
    /// commands (e.g. a key provider every process must reach).
    pub fn start_everywhere(tag: &str, env: &[(&str, &str)]) -> Server {
        let dir = temp_dir(tag);
        let data = dir.join("valv-data");
        Self::start_at_with(dir, data, env, "", env)
    }

    /// As [`Server::start_configured`], with `env` given also to `init` and the harness's
    /// other commands.
    pub fn start_configured_everywhere(tag: &str, env: &[(&str, &str)], toml: &str) -> Server {
        let dir = temp_dir(tag);
        let data = dir.join("valv-data");
        Self::start_at_with(dir, data, env, toml, env)
    }

    fn start_at(dir: PathBuf, data: PathBuf, env: &[(&str, &str)], toml: &str) -> Server {
        Self::start_at_with(dir, data, env, toml, &[])
    }

    fn start_at_with(dir: PathBuf, data: PathBuf, env: &[(&str, &str)], toml: &str, command_env: &[(&str, &str)]) -> Server {
        let run_ok = |data: &Path, args: &[&str]| run_ok_env(data, args, command_env);
        let admin_key = last_line(&run_ok(&data, &["init"]));
        if !toml.is_empty() {
            let path = data.join("valv.toml");
            let mut text = std::fs::read_to_string(&path).expect("valv.toml");
            // The section the lines below belong to, while it is one init wrote.
            let mut section: Option<String> = None;
            for line in toml.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if line.starts_with("[[") {
                    section = None;
                    text = format!("{}\n{line}\n", text.trim_end());
                    continue;
                }
                if line.starts_with('[') {
                    section = text.lines().any(|l| l.trim() == line).then(|| line.to_string());
                    if section.is_none() {
                        text = format!("{}\n{line}\n", text.trim_end());
                    }
                    continue;
                }
                let key = line.split('=').next().unwrap_or("").trim();
                // The key as written in the same section (`backend` is in [store] and [files]).
                let in_section = |l: &&str| l.split('=').next().is_some_and(|k| k.trim() == key);
                let existing = match &section {
                    Some(header) => text.lines().skip_while(|l| l.trim() != header).skip(1).take_while(|l| !l.trim_start().starts_with('[')).find(in_section),
                    None => text.lines().find(in_section),
                }
                .map(str::to_string);
                match (existing, &section) {
                    (Some(old), _) => text = text.replacen(&old, line, 1),
                    (None, Some(header)) => text = text.replacen(&format!("{header}\n"), &format!("{header}\n{line}\n"), 1),
                    (None, None) => text = format!("{}\n{line}\n", text.trim_end()),
                }
            }
            std::fs::write(&path, text).expect("write valv.toml");
        }
        assert!(admin_key.starts_with("valv_"), "init prints the admin key last: {admin_key}");
        let data_key = last_line(&run_ok(&data, &["apikey", "create", "--name", "loader", "--role", "service", "--scope", LOADER_SCOPES]));
        let auditor_key = last_line(&run_ok(&data, &["apikey", "create", "--name", "audit-reader", "--role", "auditor"]));
        // The test client opens a fresh connection per request, far beyond the per-source rate of
        // new connections a real client needs; tests of that limit set it themselves (later wins).
        let mut all: Vec<(String, String)> = vec![
            ("VALV_LIMITS_NEW_CONNECTIONS_PER_MINUTE".into(), "6000000".into()),
            ("VALV_LIMITS_NEW_CONNECTIONS_BURST".into(), "100000".into()),
        ];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut env = all;
        // Every server reads its time from this file once a test writes it (system time before).
        env.push(("VALV_TEST_CLOCK_FILE".into(), dir.join("clock").display().to_string()));
        let mut s = Server { tls: client_tls(&data.join("tls/cert.pem")), dir, data, port: 0, admin_key, data_key, auditor_key, approver: Default::default(), child: None, env };
        s.restart();
        s
    }

    /// A second server on this one's database (PostgreSQL): a copy of the data directory's files
    /// — configuration, key file, TLS certificate — served on a port of its own, sharing
    /// everything the database holds (keys, sessions, the audit log). Its clock file is its own.
    pub fn sibling(&self, tag: &str) -> Server {
        let dir = temp_dir(tag);
        let data = dir.join("valv-data");
        copy_files(&self.data, &data);
        let clock = dir.join("clock").display().to_string();
        let env = self.env.iter().map(|(k, v)| (k.clone(), if k == "VALV_TEST_CLOCK_FILE" { clock.clone() } else { v.clone() })).collect();
        let (admin_key, data_key, auditor_key) = (self.admin_key.clone(), self.data_key.clone(), self.auditor_key.clone());
        let mut s = Server { tls: client_tls(&data.join("tls/cert.pem")), dir, data, port: 0, admin_key, data_key, auditor_key, approver: Default::default(), child: None, env };
        s.restart();
        s
    }

    /// (Re)starts the server process on a port the kernel picks and waits until it answers.
    /// The port is read from the line `valv serve` prints once it listens: choosing a free port
    /// first and waiting for a listener on it raced with parallel tests (another process could
    /// take the port in between, and its listener was taken for this server's).
    pub fn restart(&mut self) {
        // A server still running (a test that did not stop it) is not left behind.
        self.kill9();
        let mut cmd = valv();
        cmd.arg("--data-dir").arg(&self.data).args(["serve", "--listen", "127.0.0.1:0"]);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.log")).expect("log file"),
        ));
        let mut child = cmd.spawn().expect("spawn valv serve");
        let stdout = child.stdout.take().expect("stdout");
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads stdout to its end, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = served_port(&line) {
                    let _ = tx.send(port);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(port) => self.port = port,
            Err(_) => panic!("valv serve did not start; see {}", self.dir.join("server.log").display()),
        }
    }

    /// A second admin's API key (two-person rule for accounts made over the admin API).
    pub fn approver_key(&self) -> &str {
        self.approver.get_or_init(|| last_line(&run_ok(&self.data, &["apikey", "create", "--name", "second-admin", "--role", "admin"])))
    }

    /// Approves, as the second admin, what awaits approval for `username`; returns the approval
    /// code of a pending enrollment.
    pub async fn approve(&self, username: &str) -> Option<String> {
        let r = self.request("POST", &format!("/admin/users/{username}/approve"), Some(self.approver_key()), None, &[]).await;
        assert_eq!(r.status, 200, "approve {username}: {}", r.text);
        r.json["approval_code"].as_str().map(str::to_string)
    }

    /// The test clock's file (the server reads the time from it when `VALV_TEST_CLOCK_FILE` is set).
    pub fn clock_file(&self) -> PathBuf {
        self.dir.join("clock")
    }

    /// Sets the server's clock (ms since the epoch); needs `VALV_TEST_CLOCK_FILE` = [`Server::clock_file`].
    pub fn set_clock(&self, ms: i64) {
        std::fs::write(self.clock_file(), ms.to_string()).expect("write clock");
    }

    /// Sets an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Entries in the audit log (read from the database beside the running server).
    pub fn audit_lines(&self) -> usize {
        self.audit_rows().len()
    }

    /// Every stored audit entry: (leaf hash, sealed bytes).
    pub fn audit_rows(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.db().query("SELECT leaf_hash, sealed FROM audit_entries ORDER BY idx").iter().map(|r| (unhex(&r[0]), unhex(&r[1]))).collect()
    }

    /// The server's database as its administrator reaches it, behind Valv's back.
    pub fn db(&self) -> Db {
        Db::of(&self.data)
    }

    /// SIGKILL: no shutdown code runs.
    /// Sends SIGTERM to the server process.
    pub fn signal_term(&self) {
        let pid = self.child.as_ref().expect("a running server").id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    }

    /// Waits up to `within` for the server process to exit; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn request(&self, method: &str, path: &str, key: Option<&str>, body: Option<&Value>, headers: &[(&str, &str)]) -> Resp {
        let raw = body.map(|b| serde_json::to_vec(b).expect("json"));
        self.request_raw(method, path, key, raw, headers).await
    }

    pub async fn request_raw(&self, method: &str, path: &str, key: Option<&str>, body: Option<Vec<u8>>, headers: &[(&str, &str)]) -> Resp {
        self.try_request(method, path, key, body, headers).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A client for a server this harness did not start (data directory, port, key).
    pub fn client_for(data: &Path, port: u16, data_key: &str) -> Client {
        Client { port, tls: client_tls(&data.join("tls/cert.pem")), data_key: data_key.to_string() }
    }

    /// A client presenting a client certificate (PEM chain and key) for mutual TLS.
    pub fn client_with_cert(&self, chain_pem: &str, key_pem: &str) -> Client {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>().expect("chain");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(&self.data.join("tls/cert.pem")))
            .with_client_auth_cert(chain, key)
            .expect("client cert");
        Client { port: self.port, tls: Arc::new(tls), data_key: self.data_key.clone() }
    }

    /// A handle that can talk to the server from other tasks.
    pub fn client(&self) -> Client {
        Client { port: self.port, tls: self.tls.clone(), data_key: self.data_key.clone() }
    }

    pub async fn try_request(&self, method: &str, path: &str, key: Option<&str>, body: Option<Vec<u8>>, headers: &[(&str, &str)]) -> Result<Resp, String> {
        self.client().try_request(method, path, key, body, headers).await
    }

    /// The key the helpers below send: the admin's for `/admin/…`, the loader's for the rest.
    fn key_for(&self, path: &str) -> &str {
        if path.starts_with("/admin/") { &self.admin_key } else { &self.data_key }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request("GET", path, Some(self.key_for(path)), None, &[]).await
    }
    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.request("POST", path, Some(self.key_for(path)), Some(body), &[]).await
    }
    pub async fn put(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        self.request("PUT", path, Some(self.key_for(path)), Some(body), headers).await
    }
    pub async fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, Some(self.key_for(path)), None, &[]).await
    }
}

#[derive(Clone)]
pub struct Client {
    pub port: u16,
    pub data_key: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    pub async fn get(&self, path: &str, key: Option<&str>) -> Result<Resp, String> {
        self.try_request("GET", path, key, None, &[]).await
    }

    /// One request on a fresh connection; a failed connection is an error rather than a panic.
    pub async fn try_request(&self, method: &str, path: &str, key: Option<&str>, body: Option<Vec<u8>>, headers: &[(&str, &str)]) -> Result<Resp, String> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.map_err(|e| format!("connect: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("http: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let has_ct = headers.iter().any(|(h, _)| h.eq_ignore_ascii_case("content-type"));
        if body.is_some() && !has_ct {
            req = req.header("content-type", "application/fhir+json");
        }
        for (h, v) in headers {
            req = req.header(*h, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
        let bytes = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Resp { status, headers, json, text: String::from_utf8_lossy(&bytes).to_string(), bytes: bytes.to_vec() })
    }

}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub json: Value,
    pub text: String,
    /// The body as it came (binary bodies: `text` is lossy).
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn id(&self) -> String {
        self.json["id"].as_str().unwrap_or_else(|| panic!("no id in {}", self.text)).to_string()
    }
    /// Asserts an OperationOutcome with the given status and returns its diagnostics.
    pub fn outcome(&self, status: u16) -> String {
        assert_eq!(self.status, status, "expected {status}, got {}: {}", self.status, self.text);
        assert_eq!(self.json["resourceType"], "OperationOutcome", "{}", self.text);
        let d = self.json["issue"][0]["diagnostics"].as_str().unwrap_or("").to_string();
        assert!(!d.is_empty(), "OperationOutcome without diagnostics: {}", self.text);
        d
    }
    pub fn total(&self) -> u64 {
        self.json["total"].as_u64().unwrap_or_else(|| panic!("no total: {}", self.text))
    }
    pub fn entry_ids(&self) -> Vec<String> {
        self.json["entry"].as_array().map(|a| a.iter().filter_map(|e| e["resource"]["id"].as_str().map(str::to_string)).collect()).unwrap_or_default()
    }
}

fn roots(cert: &Path) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).expect("cert file") {
        roots.add(c.expect("cert")).expect("add root");
    }
    roots
}

fn client_tls(cert: &Path) -> Arc<rustls::ClientConfig> {
    let roots = roots(cert);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
