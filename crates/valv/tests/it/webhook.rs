//! The alert webhook against a real receiver: `tests/webhook/receiver.js`, Node's own HTTPS
//! server checking the Standard Webhooks signature with Node's own crypto. Alerts arrive signed,
//! in the order they were raised, each accepted once; refusals are retried; an outage and a
//! restart lose and repeat nothing; of two servers on one database, one delivers.

use crate::access::{now_ms, people, Spec, LONG_SESSIONS};
use crate::detect::count;
use crate::harness::{postgres, temp_dir, wait_metric, Server};
use crate::identity::login;
use base64::Engine as _;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The receiver, started and stopped on one port.
struct Receiver {
    dir: PathBuf,
    port: u16,
    secret: String,
    child: Option<Child>,
}

impl Receiver {
    fn start(dir: &Path, secret: &str, fail_first: u32) -> Receiver {
        let (ca, cert, key) = crate::oidc::test_pki();
        std::fs::write(dir.join("hook-ca.pem"), ca).expect("write");
        std::fs::write(dir.join("hook-cert.pem"), cert).expect("write");
        std::fs::write(dir.join("hook-key.pem"), key).expect("write");
        let mut r = Receiver { dir: dir.to_path_buf(), port: 0, secret: secret.to_string(), child: None };
        r.resume(fail_first);
        r
    }

    /// (Re)starts it, on the port it had before if it had one.
    fn resume(&mut self, fail_first: u32) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhook/receiver.js");
        let mut child = Command::new("node")
            .arg(script)
            .env("PORT", self.port.to_string())
            .env("TLS_CERT", self.dir.join("hook-cert.pem"))
            .env("TLS_KEY", self.dir.join("hook-key.pem"))
            .env("SECRET", &self.secret)
            .env("OUT", self.dir.join("received.jsonl"))
            .env("FAIL_FIRST", fail_first.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(self.dir.join("receiver.log")).expect("log")))
            .spawn()
            .expect("node (the webhook receiver) must be installed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("READY line");
        let port = line.trim().strip_prefix("READY ").and_then(|p| p.parse().ok());
        self.port = port.unwrap_or_else(|| panic!("the receiver did not start: {line}; see {}", self.dir.join("receiver.log").display()));
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every request received so far, in order.
    fn requests(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("received.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    }

    /// The ids of the alerts it accepted, in order.
    fn accepted(&self) -> Vec<String> {
        self.requests().iter().filter(|r| r["status"] == 204).map(|r| r["body"]["data"]["id"].as_str().expect("alert id").to_string()).collect()
    }

    /// The accepted ids once `n` have been accepted.
    async fn until_accepted(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline {
            let ids = self.accepted();
            if ids.len() >= n {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("{n} alerts were not accepted within 45 s: {:#?}", self.requests());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fresh signing secret, `whsec_` and 32 random bytes.
fn new_secret() -> String {
    use ring::rand::SecureRandom as _;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut key).expect("randomness");
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key))
}

/// Wrong passwords for `user` until the account's guessing rule fires.
async fn guess_password(s: &Server, user: &str) {
    for i in 0..6 {
        assert_eq!(login(s, user, &format!("guess number {i}"), Some("123456")).await.status, 401);
    }
}

/// The ids of the alerts once `done` holds for them, sorted.
async fn alert_ids(s: &Server, done: impl Fn(&[Value]) -> bool) -> Vec<String> {
    sorted(crate::detect::until(s, done).await.iter().map(|a| a["id"].as_str().expect("id").to_string()).collect())
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// A metric's value, from its exact line.
async fn metric_value(s: &Server, name: &str) -> Option<u64> {
    let text = s.request("GET", "/metrics", None, None, &[]).await.text;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_real_webhook_signed_in_order_retried_and_once() {
    let dir = temp_dir("webhook-receiver");
    let secret = new_secret();
    // The first two deliveries are refused (503): the sender must retry.
    let mut r = Receiver::start(&dir, &secret, 2);
    let toml = format!("{LONG_SESSIONS}[alert_webhook]\nurl = \"https://127.0.0.1:{}/hooks/valv?token=in-the-query\"\nca_file = \"{}\"", r.port, dir.join("hook-ca.pem").display());
    let mut s = Server::start_configured("webhook", &[("VALV_ALERT_WEBHOOK_SECRET", &secret)], &toml);
    // The test clock is set at each step to the real time: the receiver refuses signatures more
    // than 5 minutes off.
    let mut now = now_ms();
    s.set_clock(now);
    let spec: Vec<Spec> = ["eva.one", "eva.two", "eva.three", "eva.four"].iter().map(|u| (u.to_string(), "nurse", vec![], None, None)).collect();
    people(&s, &mut now, &spec).await;
    s.set_clock(now_ms().max(now));

    // Alerts: one account's password guessed, and one address trying names it does not know.
    guess_password(&s, "eva.one").await;
    for i in 0..5 {
        assert_eq!(login(&s, &format!("someone.{i}"), "Summer2026!", None).await.status, 401);
    }
    let raised = alert_ids(&s, |l| count(l, "password-guessing-account") == 1 && count(l, "credential-stuffing") == 1).await;
    let alerts = crate::detect::until(&s, |_| true).await;
    let ids = r.until_accepted(raised.len()).await;
    assert_eq!(sorted(ids), raised, "every alert accepted, each once");
    let received = r.requests();
    assert!(received[..2].iter().all(|q| q["status"] == 503 && q["id"] == received[0]["id"]), "the refused alert was sent again under the same id: {received:#?}");
    for q in &received {
        assert!(q["signed"] == true && q["fresh"] == true, "every request carries a valid, fresh signature: {q}");
        assert_eq!((q["method"].as_str(), q["path"].as_str(), q["contentType"].as_str()), (Some("POST"), Some("/hooks/valv?token=in-the-query"), Some("application/json")));
        let alert = q["body"]["data"]["id"].as_str().expect("alert id");
        assert!(q["id"].as_str().is_some_and(|m| m.starts_with(&format!("{alert}_")) && m.len() == alert.len() + 17), "webhook-id is the alert's id and its row's digest: {q}");
    }
    // In the order raised (by their entries in the log); the alert as listed, without its
    // explanation (it may name a patient), with a link to it.
    let delivered: Vec<&Value> = received.iter().filter(|q| q["status"] == 204).map(|q| &q["body"]).collect();
    let entries: Vec<u64> = delivered.iter().map(|b| b["data"]["auditEntry"].as_u64().expect("auditEntry")).collect();
    assert!(entries.windows(2).all(|w| w[0] < w[1]), "in the log's order: {delivered:#?}");
    for body in &delivered {
        assert_eq!(body["type"], "valv.alert");
        let mut data = body["data"].clone();
        let fields = data.as_object_mut().expect("object");
        fields.remove("auditEntry");
        let url = fields.remove("url").expect("url");
        let mut shown = alerts.iter().find(|a| a["id"] == data["id"]).expect("a listed alert").clone();
        assert_eq!(url.as_str(), Some(format!("https://127.0.0.1:{}/admin/alerts/{}", s.port, data["id"].as_str().expect("id")).as_str()));
        shown.as_object_mut().expect("object").remove("explanation");
        assert_eq!(data, shown, "the payload is the alert as auditors see it, without the explanation");
    }
    assert_eq!(metric_value(&s, "valv_alert_webhook_delivered_total").await, Some(raised.len() as u64));
    assert!(metric_value(&s, "valv_alert_webhook_failures_total").await >= Some(2), "the refusals are counted");
    let log = std::fs::read_to_string(s.dir.join("server.log")).expect("server log");
    assert!(!log.contains("in-the-query") && !log.contains(&secret), "neither the URL's query nor the secret is logged");

    // An outage across a restart: what is raised meanwhile arrives once the receiver is back,
    // and nothing delivered before is sent again. The restarted server is a new lease holder: it
    // takes over once the old lease has run out.
    r.stop();
    guess_password(&s, "eva.two").await;
    let raised = alert_ids(&s, |l| count(l, "password-guessing-account") == 2).await;
    s.restart();
    let clock = now_ms().max(now) + 31_000;
    s.set_clock(clock);
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.resume(0);
    r.until_accepted(raised.len()).await;
    wait_metric(&s, "valv_alert_webhook_lag_entries", Duration::from_secs(20), |n| n == 0).await;
    assert_eq!(sorted(r.accepted()), raised, "each alert accepted once, across the outage and the restart");

    // Two servers on one database: one delivers, the other watches; when the first stops, the
    // second takes over once the lease has run out.
    if postgres().is_some() {
        let b = s.sibling("webhook-b");
        b.set_clock(clock);
        let before = (metric_value(&s, "valv_alert_webhook_delivered_total").await, r.accepted().len());
        guess_password(&b, "eva.three").await;
        let raised = alert_ids(&s, |l| count(l, "password-guessing-account") == 3).await;
        r.until_accepted(raised.len()).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(sorted(r.accepted()), raised, "each alert once with two servers: {:#?}", r.requests());
        let delivered = [metric_value(&s, "valv_alert_webhook_delivered_total").await, metric_value(&b, "valv_alert_webhook_delivered_total").await];
        assert_eq!(delivered, [before.0.map(|n| n + (raised.len() - before.1) as u64), Some(0)], "the holder delivered, the other watched");
        s.kill9();
        let before = r.accepted().len();
        b.set_clock(clock + 31_000);
        guess_password(&b, "eva.four").await;
        let raised = alert_ids(&b, |l| count(l, "password-guessing-account") == 4).await;
        r.until_accepted(raised.len()).await;
        assert_eq!(sorted(r.accepted()), raised, "the second server took over: {:#?}", r.requests());
        assert_eq!(metric_value(&b, "valv_alert_webhook_delivered_total").await, Some((raised.len() - before) as u64));
    }
}
