//! The AWS KMS key provider (the official `aws-sdk-kms`) against `moto_server` from PyPI. No real
//! KMS is reachable from here, so moto, an emulator of the KMS API, stands in: it checks the
//! calls, the aliases, key states and encryption contexts as KMS does, but not the signatures of
//! the requests or any IAM policy. The server starts with its KEK in "KMS", serves, rotates to a
//! new KMS key version, restarts and serves; a retired version's key is scheduled for deletion in
//! KMS; a KMS that goes away mid-run fails closed while cached keys serve out their lifetime, and
//! one unreachable at start stops the start with one line.

use crate::harness::{as_env, run_ok_env, valv, Server};
use crate::keys::{status_env, wait_rewrapped};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `moto_server`: `VALV_TEST_MOTO_SERVER`, or on the PATH (.ci/run installs it in a venv).
fn moto_server() -> PathBuf {
    if let Some(p) = std::env::var_os("VALV_TEST_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("moto_server")).find(|p| p.exists()))
        .expect("moto_server is installed (pip install \"moto[server]\"; .ci/run does, in a venv)")
}

/// A moto server on a free loopback port, killed when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    fn provider(&self) -> String {
        format!("aws-kms:alias/valv-kek?region=eu-north-1&endpoint=http://127.0.0.1:{}", self.port)
    }

    /// One KMS JSON-protocol call, asked of moto directly (unsigned: moto does not check).
    async fn call(&self, target: &str, body: &Value) -> Value {
        let body = body.to_string();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect moto");
        let request = format!(
            "POST / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Amz-Target: TrentService.{target}\r\nContent-Type: application/x-amz-json-1.1\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20261206/eu-north-1/kms/aws4_request, SignedHeaders=host, Signature=0\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        );
        s.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}\n{body}");
        serde_json::from_str(body).expect("a JSON answer")
    }

    /// The KMS key each of the KEK's aliases names: (alias, key id).
    async fn aliases(&self) -> Vec<(String, String)> {
        let list = self.call("ListAliases", &json!({})).await;
        let mut out: Vec<_> = list["Aliases"]
            .as_array()
            .expect("aliases")
            .iter()
            .filter(|a| a["AliasName"].as_str().is_some_and(|n| n.starts_with("alias/valv-kek/")))
            .map(|a| (a["AliasName"].as_str().unwrap_or_default().to_string(), a["TargetKeyId"].as_str().unwrap_or_default().to_string()))
            .collect();
        out.sort();
        out
    }

    async fn key_state(&self, key_id: &str) -> String {
        self.call("DescribeKey", &json!({"KeyId": key_id})).await["KeyMetadata"]["KeyState"].as_str().expect("state").to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kms_env(moto: &Moto) -> Vec<(String, String)> {
    vec![
        ("VALV_KEY_PROVIDER".into(), moto.provider()),
        // moto accepts any credentials; the provider reads them from the environment only.
        ("AWS_ACCESS_KEY_ID".into(), "AKIAVALVTEST".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "valv-test-secret".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_its_kek_in_kms_serves_rotates_restarts_retires_and_serves() {
    let moto = Moto::start();
    let vars = kms_env(&moto);
    let env = as_env(&vars);
    let mut s = Server::start_everywhere("awskms", &env);
    assert!(!s.data.join("keys/kek.key").exists(), "no key file with a KMS provider");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Kmsberg"}]})).await;
    assert_eq!(p.status, 201, "{}", p.text);
    let patient = p.id();
    let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}})).await;
    assert_eq!(o.status, 201, "{}", o.text);

    let st = status_env(&s, &env);
    assert_eq!((st["provider"].as_str(), st["kek_id"].as_str(), st["current_version"].as_u64()), (Some("aws-kms"), Some("valv-kek"), Some(1)), "{st}");
    let first = moto.aliases().await;
    assert_eq!(first.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(), ["alias/valv-kek/v1"]);

    // Rotate in KMS while the server runs: a new KMS key, and the server rewraps in the background.
    let out = run_ok_env(&s.data, &["keys", "rotate"], &env);
    assert!(out.contains("version 2 is now current"), "{out}");
    let st = wait_rewrapped(&s, &env).await;
    assert_eq!(st["to_rewrap"], 0, "{st}");
    let aliases = moto.aliases().await;
    assert_eq!(aliases.len(), 2, "{aliases:?}");
    assert_ne!(aliases[0].1, aliases[1].1, "each version is a KMS key of its own");

    // Restart: nothing cached; everything reads under version 2 from KMS. Then retire version 1.
    s.restart();
    assert_eq!(s.get(&format!("/fhir/Patient/{patient}")).await.status, 200);
    run_ok_env(&s.data, &["keys", "retire", "1"], &env);
    assert_eq!(moto.key_state(&first[0].1).await, "PendingDeletion", "the retired version's key is on its way out of KMS");
    assert_eq!(moto.aliases().await.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(), ["alias/valv-kek/v2"]);
    s.restart();
    assert_eq!(s.get(&format!("/fhir/Observation/{}", o.id())).await.status, 200, "version 1 is not needed");
    assert_eq!(status_env(&s, &env)["versions"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_that_goes_away_fails_closed_and_one_unreachable_at_start_stops_it() {
    let moto = Moto::start();
    let vars = kms_env(&moto);
    let env = as_env(&vars);
    let mut s = Server::start_everywhere("awskms-gone", &env);
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.id();
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    drop(moto);
    // A new patient needs a new data key wrapped by KMS: refused, nothing stored.
    let fresh = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Afterkms"}]})).await;
    assert_eq!(fresh.status, 503, "{}", fresh.text);
    assert!(fresh.text.contains("key provider"), "{}", fresh.text);
    assert_eq!(s.get("/fhir/Patient?family=Afterkms").await.total(), 0, "nothing was stored");
    // The patient whose key is cached is still served (the cache keeps keys at most 300 s).
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    s.kill9();

    // With KMS unreachable the server does not start: one line says why.
    let out = valv().arg("--data-dir").arg(&s.data).args(["serve", "--listen", "127.0.0.1:0"]).envs(env.iter().copied()).output().expect("run valv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("AWS KMS: listing aliases"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Without credentials in the environment neither.
    let no_creds = [("VALV_KEY_PROVIDER", env[0].1)];
    let out = valv().arg("--data-dir").arg(&s.data).args(["keys", "status"]).env_remove("AWS_ACCESS_KEY_ID").envs(no_creds).output().expect("run valv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("AWS_ACCESS_KEY_ID is not set"), "{err}");
}
