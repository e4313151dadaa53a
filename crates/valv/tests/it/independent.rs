//! Valv's signed checkpoints, proofs and receipts checked by an implementation that shares no
//! code with Valv: Go's `golang.org/x/mod/sumdb/note` and `golang.org/x/mod/sumdb/tlog`
//! (Debian's golang-golang-x-mod-dev), driven by `gocheck/check.go`. `.ci/run` installs Go.
//!
//! The checker runs on the server's real output (all of it must pass) and on corrupted copies
//! (each must fail, on the check that was corrupted), so a checker that passes everything fails
//! this test.

use crate::harness::Server;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const INSTALL: &str = ".ci/run installs it: apt-get install -y golang-go golang-golang-x-mod-dev";

/// The `go` command: on PATH, or where Debian and the upstream tarball put it.
fn go_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("go")).collect::<Vec<_>>()).unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/lib/go/bin/go", "/usr/local/go/bin/go"].map(PathBuf::from))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("the `go` command is missing; {INSTALL}"))
}

/// The GOPATH root that holds `src/golang.org/x/mod/sumdb/{note,tlog}`: from `dpkg -L`, else
/// the folders Debian has used.
fn sumdb_gopath() -> PathBuf {
    const NOTE: &str = "src/golang.org/x/mod/sumdb/note";
    let complete = |root: &Path| root.join(NOTE).join("note.go").is_file() && root.join("src/golang.org/x/mod/sumdb/tlog/tlog.go").is_file();
    let listed = Command::new("dpkg").args(["-L", "golang-golang-x-mod-dev"]).output().map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    listed
        .lines()
        .filter_map(|l| l.trim().strip_suffix(NOTE).map(PathBuf::from))
        .chain(["/usr/share/gocode", "/usr/lib/go", "/usr/share/go"].map(PathBuf::from))
        .find(|root| complete(root))
        .unwrap_or_else(|| panic!("Go's golang.org/x/mod/sumdb sources are missing (package golang-golang-x-mod-dev); {INSTALL}"))
}

/// Builds check.go once, offline, in GOPATH mode against Debian's sources; returns the binary.
pub(crate) fn build_checker(work: &Path) -> PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/gocheck/check.go");
    let bin = work.join("check");
    let out = Command::new(go_binary())
        .args(["build", "-o"])
        .arg(&bin)
        .arg(src)
        .current_dir(work)
        .env("GO111MODULE", "off")
        .env("GOPATH", sumdb_gopath())
        .env("GOCACHE", work.join("gocache"))
        .env("GOENV", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap_or_else(|e| panic!("running go: {e}; {INSTALL}"));
    assert!(out.status.success(), "go build check.go failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    bin
}

/// Writes a spec and runs the checker on it; returns (exit code, stdout).
pub(crate) fn check(bin: &Path, work: &Path, name: &str, spec: &[String]) -> (i32, String) {
    let file = format!("{name}.spec");
    std::fs::write(work.join(&file), spec.join("\n") + "\n").expect("write spec");
    let out = Command::new(bin).arg(&file).current_dir(work).output().expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let code = out.status.code().unwrap_or_else(|| panic!("{name}: checker killed by a signal: {stdout}"));
    assert_ne!(code, 2, "{name}: the checker refused its input as malformed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    (code, stdout)
}

/// Runs a corrupted spec: it must fail with exit status 1, and `expect` must start its first
/// failing line. With `only`, that must be the one failing line.
fn must_fail(bin: &Path, work: &Path, name: &str, spec: &[String], expect: &str, only: bool) {
    let (code, out) = check(bin, work, name, spec);
    assert_eq!(code, 1, "{name}: the independent checker must reject it:\n{out}");
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert!(fails.first().is_some_and(|l| l.starts_with(expect)), "{name}: expected a line starting '{expect}':\n{out}");
    if only {
        assert_eq!(fails.len(), 1, "{name}: only the corrupted check may fail:\n{out}");
        assert_eq!(out.lines().count(), spec.len(), "{name}: one line per check:\n{out}");
    }
}

/// The latest signed checkpoint once it covers every stored entry, and its size.
pub(crate) async fn settled_checkpoint(s: &Server) -> (String, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.request("GET", "/audit/checkpoint", None, None, &[]).await;
        if r.status == 200 {
            let size: usize = r.text.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("checkpoint without a size line: {}", r.text));
            if size == s.audit_lines() {
                return (r.text, size);
            }
        }
        assert!(Instant::now() < deadline, "no checkpoint covered the log within 10 s (last: {} {})", r.status, r.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn hashes(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("no proof array: {v}")).iter().map(|h| h.as_str().expect("base64 string").to_string()).collect()
}

/// Flips one bit of the i-th byte of a base64 value.
fn flip_b64(b64: &str, i: usize) -> String {
    let mut bytes = B64.decode(b64).expect("base64");
    bytes[i] ^= 0x01;
    B64.encode(bytes)
}

/// Flips a bit in the signature (past the 4-byte key ID) of a note's last signature line.
fn flip_signature(note: &str) -> String {
    let body = note.strip_suffix('\n').expect("note ends in a newline");
    let (head, last) = body.rsplit_once('\n').expect("signature line");
    let (prefix, sig) = last.rsplit_once(' ').expect("— name signature");
    format!("{head}\n{prefix} {}\n", flip_b64(sig, 4 + 10))
}

pub(crate) fn line(fields: impl IntoIterator<Item = String>) -> String {
    fields.into_iter().collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn go_sumdb_verifies_checkpoints_proofs_and_receipts() {
    let started = Instant::now();
    let s = Server::start("independent");
    let work = s.dir.join("gocheck");
    std::fs::create_dir_all(&work).expect("work dir");
    let bin = build_checker(&work);

    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","gender":"female"})).await.id();
    for _ in 0..4 {
        assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    let (early, m0) = settled_checkpoint(&s).await;
    // One entry per read; a tree whose size is a power of two has no right edge to check, so the
    // count is chosen around however many entries the writes above left.
    let reads = if (m0 + 8).is_power_of_two() { 9 } else { 8 };
    for i in 0..reads {
        let path = if i % 3 == 0 { "/fhir/Patient/nobody".to_string() } else { format!("/fhir/Patient/{p}") };
        s.get(&path).await;
    }
    let (note, n) = settled_checkpoint(&s).await;
    assert!(m0 >= 2 && m0 < n && !n.is_power_of_two(), "sizes {m0} -> {n}");
    let rows = s.audit_rows();
    assert!(rows.len() >= n, "{} stored entries, checkpoint of {n}", rows.len());
    let leaves: Vec<[u8; 32]> = rows[..n].iter().map(|(l, _)| l.as_slice().try_into().expect("32-byte leaf hash")).collect();
    let leaf = |i: usize| B64.encode(leaves[i]);

    let vkey = s.request("GET", "/audit/key", None, None, &[]).await.text.trim().to_string();
    std::fs::write(work.join("checkpoint"), &note).expect("write");
    std::fs::write(work.join("early.checkpoint"), &early).expect("write");
    let mut spec = vec![format!("vkey {vkey}"), "checkpoint checkpoint".to_string()];
    spec.push(line(std::iter::once("leaves".to_string()).chain((0..n).map(leaf))));
    for i in 0..n {
        let r = s.request("GET", &format!("/audit/proof/inclusion?index={i}&size={n}"), None, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!((r.json["index"].as_u64(), r.json["tree_size"].as_u64()), (Some(i as u64), Some(n as u64)), "{}", r.text);
        spec.push(line(["inclusion".to_string(), i.to_string(), leaf(i)].into_iter().chain(hashes(&r.json["proof"]))));
    }
    for m in 1..=n {
        let r = s.request("GET", &format!("/audit/proof/consistency?from={m}&to={n}"), None, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!((r.json["from"].as_u64(), r.json["to"].as_u64()), (Some(m as u64), Some(n as u64)), "{}", r.text);
        let root_m = B64.encode(valv_audit::merkle::root(&leaves[..m]));
        spec.push(line(["consistency".to_string(), m.to_string(), root_m].into_iter().chain(hashes(&r.json["proof"]))));
    }
    let r = s.request("GET", &format!("/audit/proof/consistency?from={m0}&to={n}"), None, None, &[]).await;
    spec.push(line(["consistency-note".to_string(), "early.checkpoint".to_string()].into_iter().chain(hashes(&r.json["proof"]))));
    for i in [0, n / 2, n - 1] {
        let r = s.request("GET", &format!("/audit/proof/inclusion?index={i}&size={n}"), None, None, &[("accept", "text/plain")]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        std::fs::write(work.join(format!("receipt-{i}")), &r.text).expect("write");
        spec.push(format!("receipt receipt-{i} {}", leaf(i)));
    }

    // The server's own output: every check passes, one line each.
    let (code, out) = check(&bin, &work, "good", &spec);
    assert_eq!(code, 0, "Go's sumdb rejects Valv's audit output:\n{out}");
    assert_eq!(out.lines().count(), spec.len(), "one line per check:\n{out}");
    assert!(out.lines().all(|l| l.starts_with("ok ")), "{out}");
    assert!(out.contains("ok checkpoint: origin=valv.local/audit/") && out.contains(&format!(" size={n} ")), "{out}");
    assert_eq!(out.matches(", same checkpoint)").count(), 3, "receipts carry the latest checkpoint:\n{out}");

    // Corrupted copies: each must fail, on the check that was corrupted.
    let find = |prefix: &str| spec.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line '{prefix}'"));
    let with = |idx: usize, new: String| {
        let mut v = spec.clone();
        v[idx] = new;
        v
    };
    let cp_line = find("checkpoint ");

    std::fs::write(work.join("badsig.checkpoint"), flip_signature(&note)).expect("write");
    must_fail(&bin, &work, "signature", &with(cp_line, "checkpoint badsig.checkpoint".into()), "FAIL checkpoint: signature: invalid signature", false);

    let (text, sigs) = note.split_once("\n\n").expect("note text and signatures");
    let grown = text.replacen(&format!("\n{n}\n"), &format!("\n{}\n", n + 1), 1);
    assert_ne!(grown, text);
    std::fs::write(work.join("grown.checkpoint"), format!("{grown}\n\n{sigs}")).expect("write");
    must_fail(&bin, &work, "size edited under the signature", &with(cp_line, "checkpoint grown.checkpoint".into()), "FAIL checkpoint: signature: invalid signature", false);

    let i = n / 2;
    let incl = find(&format!("inclusion {i} "));
    let mut f: Vec<String> = spec[incl].split(' ').map(str::to_string).collect();
    let last = f.len() - 1;
    f[last] = flip_b64(&f[last], 0);
    must_fail(&bin, &work, "inclusion proof hash", &with(incl, f.join(" ")), &format!("FAIL inclusion index={i} "), true);

    let mut f: Vec<String> = spec[incl].split(' ').map(str::to_string).collect();
    f[1] = (i + 1).to_string();
    must_fail(&bin, &work, "inclusion wrong index", &with(incl, f.join(" ")), &format!("FAIL inclusion index={} ", i + 1), true);

    let mut f: Vec<String> = spec[incl].split(' ').map(str::to_string).collect();
    f[2] = leaf(i + 1);
    must_fail(&bin, &work, "inclusion wrong leaf", &with(incl, f.join(" ")), &format!("FAIL inclusion index={i} "), true);

    let cons = find("consistency 3 ");
    let mut f: Vec<String> = spec[cons].split(' ').map(str::to_string).collect();
    assert!(f.len() > 3, "a consistency proof from 3 is not empty: {}", spec[cons]);
    f[3] = flip_b64(&f[3], 31);
    must_fail(&bin, &work, "consistency proof hash", &with(cons, f.join(" ")), "FAIL consistency from=3 ", true);

    let leaves_line = find("leaves ");
    let mut f: Vec<String> = spec[leaves_line].split(' ').map(str::to_string).collect();
    f.swap(2, 3);
    must_fail(&bin, &work, "leaves swapped", &with(leaves_line, f.join(" ")), "FAIL leaves: tree hash", true);

    std::fs::write(work.join("badsig.early.checkpoint"), flip_signature(&early)).expect("write");
    let cn = find("consistency-note ");
    must_fail(&bin, &work, "older checkpoint signature", &with(cn, spec[cn].replacen("early.checkpoint", "badsig.early.checkpoint", 1)), "FAIL consistency-note: older checkpoint: signature", true);

    let receipt = std::fs::read_to_string(work.join("receipt-0")).expect("receipt");
    let mut rl: Vec<String> = receipt.split('\n').map(str::to_string).collect();
    assert_eq!((rl[0].as_str(), rl[1].as_str()), ("c2sp.org/tlog-proof@v1", "index 0"), "{receipt}");
    rl[2] = flip_b64(&rl[2], 7);
    std::fs::write(work.join("bad-receipt-0"), rl.join("\n")).expect("write");
    let rc = find("receipt receipt-0 ");
    must_fail(&bin, &work, "receipt proof hash", &with(rc, spec[rc].replacen("receipt-0", "bad-receipt-0", 1)), "FAIL receipt index=0 ", true);

    eprintln!("independent: {n} entries, {} checks, {:.1} s", spec.len(), started.elapsed().as_secs_f64());
}
