//! Mutual TLS: a client certificate from the configured CA, valid for a service's DNS name,
//! authenticates that service; no certificate, one from another CA, or one naming no service
//! does not.

use crate::harness::Server;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().expect("key");
    let pem = params.self_signed(&key).expect("CA").pem();
    Ca { params, key, pem }
}

/// A client certificate for `dns_name` signed by `ca`: (chain PEM, key PEM).
fn client_cert(ca: &Ca, dns_name: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec![dns_name.to_string()]).expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &Issuer::from_params(&ca.params, &ca.key)).expect("sign");
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn client_certificates_authenticate_services() {
    let good = ca("Valv test client CA");
    let other = ca("Someone else's CA");
    let dir = crate::harness::temp_dir("mtls-ca");
    let ca_file = dir.join("client-ca.pem");
    std::fs::write(&ca_file, &good.pem).expect("write CA");
    let config = format!("[mtls]\nclient_ca = \"{}\"\n[[mtls.services]]\nname = \"lab-importer\"\ndns_name = \"importer.svc.test\"\nrole = \"service\"\nscopes = \"system/Patient.rs\"\n", ca_file.display());
    let s = Server::start_configured("mtls", &[], &config);

    let (chain, key) = client_cert(&good, "importer.svc.test");
    let importer = s.client_with_cert(&chain, &key);
    let me = importer.get("/auth/me", None).await.expect("request");
    assert_eq!((me.status, me.json["name"].as_str(), me.json["kind"].as_str()), (200, Some("lab-importer"), Some("service")), "{}", me.text);
    assert_eq!(importer.get("/fhir/Patient", None).await.expect("request").status, 200, "the service may search (its scopes say Patient.rs)");
    let write = importer.try_request("POST", "/fhir/Patient", None, Some(b"{\"resourceType\":\"Patient\"}".to_vec()), &[]).await.expect("request");
    assert_eq!(write.status, 403, "its scopes allow no create: {}", write.text);

    // No certificate: the handshake succeeds (people use tokens) but there is no identity.
    assert_eq!(s.client().get("/fhir/Patient", None).await.expect("request").status, 401);
    // A certificate from another CA is refused at the handshake.
    let (chain, key) = client_cert(&other, "importer.svc.test");
    let refused = s.client_with_cert(&chain, &key).get("/fhir/Patient", None).await;
    assert!(refused.is_err() || refused.as_ref().is_ok_and(|r| r.status == 401), "another CA's certificate is refused: {refused:?}");
    // The right CA but a name no service has: 401.
    let (chain, key) = client_cert(&good, "intruder.svc.test");
    let unmapped = s.client_with_cert(&chain, &key).get("/fhir/Patient", None).await.expect("request");
    assert_eq!(unmapped.status, 401, "{}", unmapped.text);
    // A bearer credential on a certificate connection takes precedence over the certificate.
    let with_key = importer.get("/auth/me", Some(&s.admin_key)).await.expect("request");
    assert_eq!(with_key.json["roles"][0], "admin", "{}", with_key.text);

    let log = crate::harness::run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("\"agent_id\":\"mtls:lab-importer\""), "requests by the certificate are audited under the service");
    assert!(log.contains("certificate-not-mapped"));
    let _ = std::fs::remove_dir_all(&dir);
}
