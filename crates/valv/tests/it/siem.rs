//! Live SIEM forwarding against a real collector: Debian's rsyslog receiving RFC 5425 syslog over
//! TLS (imtcp with the gtls driver, packages rsyslog and rsyslog-gnutls), with a throwaway CA.

use crate::harness::{metric, temp_dir, wait_metric, Server};
use base64::Engine as _;
use serde_json::json;
use sha2::Digest;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// An rsyslogd listening with TLS on one port, writing each received message's raw text as a line.
struct Collector {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Collector {
    /// Generates a CA and a certificate for `localhost`, writes the configuration and starts rsyslogd.
    fn start() -> Collector {
        assert!(std::path::Path::new(RSYSLOGD).exists(), "{RSYSLOGD} is missing: apt-get install rsyslog rsyslog-gnutls");
        let dir = temp_dir("siem-rsyslog");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "valv test SIEM CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params").signed_by(&key, &issuer).expect("server certificate");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
        std::fs::create_dir_all(dir.join("work")).expect("work dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let d = dir.display();
        // The input's own ruleset keeps rsyslogd's internal messages out of the output file;
        // %rawmsg% is the SYSLOG-MSG exactly as framed (without the octet count).
        let conf = format!(
            r#"global(workDirectory="{d}/work" maxMessageSize="64k"
       DefaultNetstreamDriverCAFile="{d}/ca.pem"
       DefaultNetstreamDriverCertFile="{d}/cert.pem"
       DefaultNetstreamDriverKeyFile="{d}/key.pem")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
template(name="raw" type="string" string="%rawmsg%\n")
ruleset(name="siem") {{ action(type="omfile" file="{d}/received.log" template="raw") }}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="siem")
"#
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).expect("write");
        let check = Command::new(RSYSLOGD).args(["-N1", "-f"]).arg(dir.join("rsyslog.conf")).output().expect("run rsyslogd -N1");
        assert!(check.status.success(), "rsyslogd rejects the configuration: {}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
        let mut c = Collector { dir, port, child: None };
        c.resume();
        c
    }

    /// (Re)starts rsyslogd on the same port and waits until it accepts connections.
    fn resume(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("rsyslogd.pid"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("rsyslogd.out")).expect("log");
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn rsyslogd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "rsyslogd did not listen; see {}", self.dir.join("rsyslogd.out").display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the collector disappears as in a crash or a network outage.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every complete line received so far.
    fn lines(&self) -> Vec<String> {
        let text = std::fs::read(self.dir.join("received.log")).unwrap_or_default();
        let text = String::from_utf8(text).expect("received messages are UTF-8");
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Checks one received message against the stored log; returns its leaf index.
fn check_message(line: &str, stored: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    let (pri, rest) = line.strip_prefix('<').and_then(|l| l.split_once(">1 ")).unwrap_or_else(|| panic!("not RFC 5424: {line}"));
    assert!(pri == "109" || pri == "108", "facility 13, notice or warning: {line}");
    let fields: Vec<&str> = rest.splitn(5, ' ').collect();
    assert_eq!(fields.len(), 5, "{line}");
    assert!(fields[0].ends_with('Z') && fields[0].contains('T'), "RFC 3339 timestamp: {line}");
    assert_eq!((fields[2], fields[4].split(' ').next()), ("valv", Some("audit")), "APP-NAME and MSGID: {line}");
    let sd_start = line.find("[valv@32473 index=\"").unwrap_or_else(|| panic!("no structured data: {line}"));
    let sd = &line[sd_start..];
    let sd_end = sd.find("\"] ").unwrap_or_else(|| panic!("unterminated structured data: {line}"));
    let (index, leaf) = sd["[valv@32473 index=\"".len()..sd_end].split_once("\" leaf=\"").unwrap_or_else(|| panic!("{line}"));
    let index: u64 = index.parse().unwrap_or_else(|_| panic!("index: {line}"));
    let msg = &sd[sd_end + 3..];
    let entry = msg.strip_prefix('\u{feff}').unwrap_or_else(|| panic!("MSG starts with a BOM: {line}"));
    let (stored_leaf, _) = stored.get(index as usize).unwrap_or_else(|| panic!("index {index} is not stored"));
    let mut h = sha2::Sha256::new();
    h.update([0u8]);
    h.update(entry.as_bytes());
    assert_eq!(h.finalize().as_slice(), stored_leaf.as_slice(), "entry {index} is the canonical JSON of the stored leaf");
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(leaf).expect("base64"), *stored_leaf, "leaf in the structured data");
    let value: serde_json::Value = serde_json::from_str(entry).expect("JSON");
    assert_eq!(pri == "109", value["outcome"] == "success", "severity follows the outcome: {line}");
    index
}

/// Waits until every stored entry arrived; returns the indices in arrival order.
async fn wait_for_all(c: &Collector, s: &Server, within: Duration) -> Vec<u64> {
    let deadline = Instant::now() + within;
    loop {
        let stored = s.audit_rows();
        let indices: Vec<u64> = c.lines().iter().map(|l| check_message(l, &stored)).collect();
        let mut seen = vec![false; stored.len()];
        indices.iter().for_each(|&i| seen[i as usize] = true);
        if seen.iter().all(|&b| b) {
            return indices;
        }
        assert!(Instant::now() < deadline, "{} of {} entries arrived: {indices:?}; see {}", seen.iter().filter(|&&b| b).count(), stored.len(), s.dir.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first arrival of every index is in order with no gap (re-sends after an outage are allowed).
fn assert_in_order(indices: &[u64], total: usize) {
    let mut firsts = Vec::new();
    for &i in indices {
        if !firsts.contains(&i) {
            firsts.push(i);
        }
    }
    assert_eq!(firsts, (0..total as u64).collect::<Vec<_>>(), "arrival order: {indices:?}");
}

#[tokio::test]
async fn audit_entries_reach_rsyslog_over_tls_and_catch_up_after_an_outage() {
    let mut c = Collector::start();
    let address = format!("127.0.0.1:{}", c.port);
    let ca = c.dir.join("ca.pem").display().to_string();
    let mut s = Server::start_with("siem", &[("VALV_SIEM_ADDRESS", &address), ("VALV_SIEM_SERVER_NAME", "localhost"), ("VALV_SIEM_CA_FILE", &ca)]);

    // Live: successes and a failure (warning severity) arrive, each the stored canonical entry.
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Forwarded"}]})).await.id();
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    assert_eq!(s.get("/fhir/Patient?family=forwarded").await.status, 200);
    assert_eq!(s.get("/fhir/Patient/nobody").await.status, 404);
    let indices = wait_for_all(&c, &s, Duration::from_secs(10)).await;
    assert_in_order(&indices, s.audit_lines());
    wait_metric(&s, "valv_siem_lag_entries", Duration::from_secs(5), |v| v == 0).await;

    // Outage: requests are not held up, the lag shows, and the backlog follows once it is back.
    c.stop();
    for _ in 0..3 {
        let r = s.get(&format!("/fhir/Patient/{p}")).await;
        assert_eq!(r.status, 200, "requests never wait for the collector: {}", r.text);
    }
    wait_metric(&s, "valv_siem_lag_entries", Duration::from_secs(5), |v| v > 0).await;
    wait_metric(&s, "valv_siem_failures_total", Duration::from_secs(5), |v| v > 0).await;
    c.resume();
    let indices = wait_for_all(&c, &s, Duration::from_secs(15)).await;
    let total = s.audit_lines();
    assert_in_order(&indices, total);
    wait_metric(&s, "valv_siem_lag_entries", Duration::from_secs(5), |v| v == 0).await;
    assert!(metric(&s, "valv_siem_forwarded_total").await >= total as u64);

    // Restart: the saved position is where forwarding resumes, not the start of the log.
    let position = s.data.join("siem.position");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&position).unwrap_or_default().trim() != total.to_string() {
        assert!(Instant::now() < deadline, "siem.position never reached {total}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.kill9();
    s.restart();
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    let indices = wait_for_all(&c, &s, Duration::from_secs(10)).await;
    assert_in_order(&indices, s.audit_lines());
    assert_eq!(indices.iter().filter(|&&i| i == 0).count(), 1, "a restart does not re-send the log: {indices:?}");
}

/// Two servers on one PostgreSQL database, both configured to forward: one does (no entry
/// arrives twice while both run); when it is killed the other takes over from the position the
/// first shared in the database, not from the start of the log (it has no position file).
#[tokio::test]
async fn of_two_servers_one_forwards_and_the_other_takes_over_where_it_was() {
    if crate::harness::postgres().is_none() {
        println!("skipped: several servers on one database need the PostgreSQL backend (VALV_TEST_STORE=postgres)");
        return;
    }
    let c = Collector::start();
    let address = format!("127.0.0.1:{}", c.port);
    let ca = c.dir.join("ca.pem").display().to_string();
    let mut a = Server::start_with("siem-two-a", &[("VALV_SIEM_ADDRESS", &address), ("VALV_SIEM_SERVER_NAME", "localhost"), ("VALV_SIEM_CA_FILE", &ca)]);
    let mut b = a.sibling("siem-two-b");
    // The copy took the first server's position file with it: without one, a takeover that
    // ignored the shared position would send the log again from entry 0.
    b.kill9();
    let _ = std::fs::remove_file(b.data.join("siem.position"));
    b.restart();

    let p = a.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Twice"}]})).await.id();
    for s in [&a, &b, &a, &b] {
        assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    let indices = wait_for_all(&c, &a, Duration::from_secs(15)).await;
    assert_in_order(&indices, a.audit_lines());
    let mut distinct = indices.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), indices.len(), "one server forwards, so no entry arrives twice: {indices:?}");
    let log = |s: &Server| std::fs::read_to_string(s.dir.join("server.log")).expect("log");
    assert!(log(&a).contains("this server forwards audit entries to the SIEM collector"), "server 1 forwards");
    assert!(!log(&b).contains("this server forwards audit entries to the SIEM collector"), "server 2 waits");

    // The forwarding server dies; the other sends what follows, from the shared position.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    a.kill9();
    for _ in 0..3 {
        assert_eq!(b.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    let indices = wait_for_all(&c, &b, Duration::from_secs(20)).await;
    assert_in_order(&indices, b.audit_lines());
    assert_eq!(indices.iter().filter(|&&i| i == 0).count(), 1, "the takeover did not re-send the log from its start: {indices:?}");
    assert!(log(&b).contains("this server forwards audit entries to the SIEM collector"), "server 2 took over");
}
