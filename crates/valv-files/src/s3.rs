//! Objects in an S3-compatible bucket (AWS S3, Garage, Ceph RGW, …) through the official
//! `aws-sdk-s3`: the SDK family Valv already uses for KMS, so its HTTP client, signing and
//! runtime are shared rather than a second stack (`object_store` would add reqwest and its own).
//!
//! An object is `<prefix><name>` with no metadata: nothing about the patient or the Binary
//! reaches the bucket but sealed bytes under a random name. A write is a multipart upload, one
//! part per [`PART`] bytes held in memory, completed by `finish` (so nothing is visible before);
//! a write dropped unfinished aborts its upload. A file under one part is a single PutObject.
//! Credentials come only from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`), never from the configuration.

use crate::{check_name, FilesError, ObjectStore, ObjectWriter};
use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls;
use std::path::PathBuf;

/// Bytes per uploaded part (S3's minimum is 5 MiB for all but the last).
pub const PART: usize = 8 << 20;

/// Where the bucket is.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    /// An endpoint other than AWS's (Garage, a VPC endpoint); `https:` unless on loopback.
    pub endpoint: Option<String>,
    /// A CA certificate (PEM) to trust for the endpoint besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Prepended to every object name (e.g. `valv/`).
    pub prefix: String,
}

pub struct S3 {
    client: Client,
    bucket: String,
    prefix: String,
}

fn remote<E: std::error::Error + 'static, R: std::fmt::Debug>(what: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> FilesError {
    FilesError::Io(std::io::Error::other(format!("S3 {what}: {}", DisplayErrorContext(&e))))
}

/// Refuses an endpoint that would send credentials and sealed data in the clear off the machine.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.starts_with("https://") {
        return Ok(());
    }
    let host = endpoint.strip_prefix("http://").and_then(|r| r.split(['/', ':']).next()).unwrap_or("");
    let rest = endpoint.strip_prefix("http://").unwrap_or("");
    if host == "127.0.0.1" || host == "localhost" || rest.starts_with("[::1]") {
        Ok(())
    } else {
        Err(format!("S3: the endpoint {endpoint} must be https: (plain http only on loopback)"))
    }
}

impl S3 {
    /// A client for the bucket, with the environment's credentials; nothing is sent yet.
    pub fn from_env(s: &S3Settings) -> Result<S3, String> {
        let id = std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| "S3: AWS_ACCESS_KEY_ID is not set".to_string())?;
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| "S3: AWS_SECRET_ACCESS_KEY is not set".to_string())?;
        let token = std::env::var("AWS_SESSION_TOKEN").ok().filter(|t| !t.is_empty());
        Self::connect(s, id, secret, token)
    }

    /// A client for the bucket with these credentials.
    pub fn connect(s: &S3Settings, id: String, secret: String, token: Option<String>) -> Result<S3, String> {
        if s.bucket.is_empty() {
            return Err("S3: no bucket is configured".into());
        }
        let mut trust = tls::TrustStore::default();
        if let Some(ca) = &s.ca_file {
            trust = trust.with_pem_certificate(std::fs::read(ca).map_err(|e| format!("S3: CA file {}: {e}", ca.display()))?);
        }
        let tls_context = tls::TlsContext::builder().with_trust_store(trust).build().map_err(|e| format!("S3: TLS: {e}"))?;
        let http = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring)).tls_context(tls_context).build_https();
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(s.region.clone()))
            .credentials_provider(Credentials::new(id, secret, token, None, "environment"))
            .http_client(http)
            // Path-style (`endpoint/bucket/key`): what self-hosted stores answer without DNS.
            .force_path_style(true);
        if let Some(e) = &s.endpoint {
            check_endpoint(e)?;
            config = config.endpoint_url(e);
        }
        Ok(S3 { client: Client::from_conf(config.build()), bucket: s.bucket.clone(), prefix: s.prefix.clone() })
    }

    fn key(&self, name: &str) -> Result<String, FilesError> {
        check_name(name)?;
        Ok(format!("{}{name}", self.prefix))
    }
}

struct S3Writer {
    client: Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
    held: Vec<u8>,
    parts: Vec<CompletedPart>,
    size: u64,
    finished: bool,
}

impl S3Writer {
    async fn send_part(&mut self) -> Result<(), FilesError> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let made = self.client.create_multipart_upload().bucket(&self.bucket).key(&self.key).send().await.map_err(|e| remote("starting an upload", e))?;
                let id = made.upload_id().ok_or_else(|| FilesError::Io(std::io::Error::other("S3 gave no upload id")))?.to_string();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let number = i32::try_from(self.parts.len() + 1).map_err(|_| FilesError::Io(std::io::Error::other("too many parts")))?;
        let body = ByteStream::from(std::mem::take(&mut self.held));
        let sent = self.client.upload_part().bucket(&self.bucket).key(&self.key).upload_id(upload_id).part_number(number).body(body).send().await.map_err(|e| remote("uploading a part", e))?;
        self.parts.push(CompletedPart::builder().part_number(number).set_e_tag(sent.e_tag().map(str::to_string)).build());
        self.held = Vec::with_capacity(PART);
        Ok(())
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, mut piece: &[u8]) -> Result<(), FilesError> {
        self.size += piece.len() as u64;
        while !piece.is_empty() {
            let take = (PART - self.held.len()).min(piece.len());
            self.held.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
            if self.held.len() == PART {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, FilesError> {
        match self.upload_id.clone() {
            None => {
                let body = ByteStream::from(std::mem::take(&mut self.held));
                self.client.put_object().bucket(&self.bucket).key(&self.key).body(body).send().await.map_err(|e| remote("storing an object", e))?;
            }
            Some(id) => {
                if !self.held.is_empty() {
                    self.send_part().await?;
                }
                let done = CompletedMultipartUpload::builder().set_parts(Some(std::mem::take(&mut self.parts))).build();
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(id)
                    .multipart_upload(done)
                    .send()
                    .await
                    .map_err(|e| remote("completing an upload", e))?;
            }
        }
        self.finished = true;
        Ok(self.size)
    }
}

impl Drop for S3Writer {
    /// An unfinished multipart upload is aborted so that its parts do not linger in the bucket.
    fn drop(&mut self) {
        let (Some(id), false) = (self.upload_id.take(), self.finished) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let abort = self.client.abort_multipart_upload().bucket(&self.bucket).key(&self.key).upload_id(id);
        runtime.spawn(async move {
            if let Err(e) = abort.send().await {
                tracing_free_warn(&format!("S3: an unfinished upload could not be aborted: {}", DisplayErrorContext(&e)));
            }
        });
    }
}

/// valv-files has no logger of its own: a failed abort goes to standard error (the bucket's
/// lifecycle rule for incomplete uploads is the backstop, docs/FILES.md).
fn tracing_free_warn(message: &str) {
    eprintln!("{message}");
}

#[async_trait]
impl ObjectStore for S3 {
    async fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>, FilesError> {
        let key = self.key(name)?;
        if self.size(name).await?.is_some() {
            return Err(FilesError::Exists(name.to_string()));
        }
        Ok(Box::new(S3Writer { client: self.client.clone(), bucket: self.bucket.clone(), key, upload_id: None, held: Vec::new(), parts: Vec::new(), size: 0, finished: false }))
    }

    async fn size(&self, name: &str) -> Result<Option<u64>, FilesError> {
        let key = self.key(name)?;
        match self.client.head_object().bucket(&self.bucket).key(&key).send().await {
            Ok(head) => Ok(Some(u64::try_from(head.content_length().unwrap_or(0)).unwrap_or(0))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(remote("reading an object's size", e)),
        }
    }

    async fn read_range(&self, name: &str, start: u64, end: u64) -> Result<Vec<u8>, FilesError> {
        let key = self.key(name)?;
        if start >= end {
            // Nothing to fetch, but the object must exist and hold the range.
            let size = self.size(name).await?.ok_or_else(|| FilesError::Missing(name.to_string()))?;
            return if start > end || end > size { Err(FilesError::Range { name: name.to_string(), start, end, size }) } else { Ok(Vec::new()) };
        }
        // One GET: its Content-Range tells the object's size, so no HEAD is needed first.
        let got = match self.client.get_object().bucket(&self.bucket).key(&key).range(format!("bytes={start}-{}", end - 1)).send().await {
            Ok(g) => g,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Err(FilesError::Missing(name.to_string())),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                let size = self.size(name).await?.unwrap_or(0);
                return Err(FilesError::Range { name: name.to_string(), start, end, size });
            }
            Err(e) => return Err(remote("reading an object", e)),
        };
        let size = got.content_range().and_then(|r| r.rsplit('/').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
        let bytes = got.body.collect().await.map_err(|e| FilesError::Io(std::io::Error::other(format!("S3 reading an object: {e}"))))?.into_bytes();
        if bytes.len() as u64 != end - start {
            return Err(FilesError::Range { name: name.to_string(), start, end, size });
        }
        Ok(bytes.to_vec())
    }

    async fn delete(&self, name: &str) -> Result<(), FilesError> {
        let key = self.key(name)?;
        self.client.delete_object().bucket(&self.bucket).key(&key).send().await.map_err(|e| remote("deleting an object", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::check_endpoint;

    #[test]
    fn only_loopback_may_be_plain_http() {
        for ok in ["https://s3.eu-north-1.amazonaws.com", "http://127.0.0.1:3900", "http://localhost:3900", "http://[::1]:3900"] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in ["http://s3.example.org", "http://127.0.0.1.example.org", "ftp://x", "http://10.0.0.1:3900"] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
