//! Encrypted backups: a consistent snapshot of the store ([`valv_store::Store::snapshot`]) and
//! the data directory's own files (configuration, the key file of a file KEK), framed
//! ([`valv_backup`]) and encrypted with age to the configured X25519 recipients — the server
//! never holds an identity that opens them — and ended by a manifest signed with the log's
//! checkpoint key. Written while the server serves: the snapshot reads on a connection of its
//! own, and the framing and encryption run on a blocking thread, a few batches behind.

use crate::App;
use std::io::Write;
use valv_age::Recipient;
use valv_backup::fields::{Dec, Enc};
use valv_backup::{FrameWriter, Manifest};
use valv_store::dump::{Census, Row};

/// The frame kind of a data-directory file (store rows use kinds below 0x80).
pub const FILE_KIND: u8 = 0x80;
/// The name under which the configuration travels.
pub const CONFIG_FILE: &str = "valv.toml";
/// The name under which a file KEK travels (restored to the configured key file's place).
pub const KEK_FILE: &str = "kek";
/// The names under which the data directory's own TLS certificate and key travel.
pub const TLS_CERT_FILE: &str = "tls-cert";
pub const TLS_KEY_FILE: &str = "tls-key";

/// A file of the data directory carried in a backup.
pub struct DirFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl DirFile {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.str(&self.name).bytes(&self.bytes);
        e.finish()
    }

    pub fn decode(payload: &[u8]) -> Result<Self, valv_backup::BackupError> {
        let mut d = Dec::new(payload);
        let file = DirFile { name: d.string()?, bytes: d.bytes()?.to_vec() };
        d.finish()?;
        Ok(file)
    }
}

/// What a finished backup holds.
pub struct Written<W> {
    pub manifest: Manifest,
    pub signed_manifest: String,
    pub out: W,
}

/// Writes a backup of `app`'s store and `files` to `out`, encrypted to `recipients`; `progress`
/// hears the rows written so far after each batch.
pub async fn write<W: Write + Send + 'static>(
    app: &App,
    files: Vec<DirFile>,
    recipients: Vec<Recipient>,
    out: W,
    now: i64,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<Written<W>, String> {
    if recipients.is_empty() {
        return Err("no backup recipient: give --recipient age1… or set [backup] recipients".into());
    }
    let random = valv_age::Randomness {
        file_key: valv_store::vault::random_bytes().map_err(|e| e.to_string())?,
        ephemeral: recipients.iter().map(|_| valv_store::vault::random_bytes()).collect::<Result<_, _>>().map_err(|e| e.to_string())?,
        nonce: valv_store::vault::random_bytes().map_err(|e| e.to_string())?,
    };
    let keys = app.log_keys.clone();
    let store = app.vault.store().clone();
    let source = store.backend();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Row>>(4);
    let writer = tokio::task::spawn_blocking(move || -> Result<Written<W>, String> {
        let failed = |e: &dyn std::fmt::Display| format!("writing the backup: {e}");
        let age = valv_age::encrypt(out, &recipients, random).map_err(|e| failed(&e))?;
        let mut frames = FrameWriter::new(age).map_err(|e| failed(&e))?;
        for f in &files {
            frames.frame(FILE_KIND, &f.encode()).map_err(|e| failed(&e))?;
        }
        let mut census = Census::default();
        let mut rows = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            for row in &batch {
                census.add(row);
                let (kind, payload) = row.encode();
                frames.frame(kind, &payload).map_err(|e| failed(&e))?;
            }
            rows += batch.len() as u64;
            progress(rows);
        }
        let signer = keys.signer()?;
        let manifest = census.manifest(keys.origin(), now, source, frames.digest());
        let signed_manifest = manifest.sign(&signer).map_err(|e| e.to_string())?;
        let age = frames.finish(&signed_manifest).map_err(|e| failed(&e))?;
        let out = age.finish().map_err(|e| failed(&e))?;
        Ok(Written { manifest, signed_manifest, out })
    });
    let snapshot = store.snapshot(tx).await;
    let written = writer.await.map_err(|e| format!("the backup writer failed: {e}"))??;
    snapshot.map_err(|e| format!("reading the snapshot: {e}"))?;
    Ok(written)
}
