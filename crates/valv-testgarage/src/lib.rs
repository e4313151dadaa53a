//! Tests only: a throwaway single-node Garage — the self-hosted S3-compatible store — in a
//! temporary folder on free loopback ports, with one bucket and one access key allowed on it;
//! stopped and removed when dropped. Garage is AGPL: it runs as a separate test server, never
//! linked. The binary is `VALV_TEST_GARAGE`, else `target/garage/bin/garage` (where `.ci/run`
//! installs it with `cargo install --locked garage`), else `garage` on the PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the `garage` binary is.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VALV_TEST_GARAGE") {
        return PathBuf::from(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/garage/bin/garage");
    if workspace.exists() {
        return workspace;
    }
    PathBuf::from("garage")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Garage {
    dir: PathBuf,
    child: Child,
    /// `http://127.0.0.1:<port>`, the S3 API.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    /// A running node with bucket `valv` and a key allowed to read and write it.
    pub fn start() -> Garage {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("random");
        let dir = std::env::temp_dir().join(format!("valv-garage-{}", u64::from_le_bytes(r)));
        std::fs::create_dir_all(&dir).expect("garage dir");
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("random");
        let (rpc, s3) = (free_port(), free_port());
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n",
            d = dir.display(),
            secret = hex(&secret)
        );
        std::fs::write(dir.join("garage.toml"), config).expect("garage config");
        let log = std::fs::File::create(dir.join("garage.log")).expect("garage log");
        let child = Command::new(bin())
            .arg("-c")
            .arg(dir.join("garage.toml"))
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (cargo install --locked garage; .ci/run does)", bin().display()));
        let mut g = Garage { dir, child, endpoint: format!("http://127.0.0.1:{s3}"), region: "garage".into(), bucket: "valv".into(), key_id: String::new(), secret: String::new() };
        let node = g.until_ok(&["node", "id", "-q"]);
        let node = node.split('@').next().unwrap_or_default().to_string();
        // Each step is tried until the node answers it (it is still starting at first).
        g.until_ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.until_ok(&["layout", "apply", "--version", "1"]);
        g.until_ok(&["bucket", "create", "valv"]);
        let key = g.until_ok(&["key", "create", "valv-test"]);
        let field = |name: &str| key.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_else(|| panic!("no {name} in: {key}"));
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.until_ok(&["bucket", "allow", "--read", "--write", "--owner", "valv", "--key", "valv-test"]);
        g
    }

    fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin()).arg("-c").arg(self.dir.join("garage.toml")).args(args).output().expect("run garage")
    }

    /// Runs a command until it succeeds (the node is still starting), for up to 20 s.
    fn until_ok(&self, args: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let out = self.command(args);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(20), "garage {args:?}: {}; log: {}", String::from_utf8_lossy(&out.stderr), self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }

    /// Garage's own folders (metadata and data blocks), to scan for plaintext.
    pub fn files(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
