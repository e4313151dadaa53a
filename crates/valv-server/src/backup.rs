//! Encrypted backups: a consistent snapshot of the store ([`valv_store::Store::snapshot`]) and
//! the data directory's own files (configuration, the key file of a file KEK), framed
//! ([`valv_backup`]) and encrypted with age to the configured X25519 recipients — the server
//! never holds an identity that opens them — and ended by a manifest signed with the log's
//! checkpoint key. Written while the server serves, in three stages on threads of their own, each
//! a few batches behind the one before: the snapshot reads on a connection of its own, the
//! framing (and the hash over it) runs on a blocking thread, the encryption and the writes on
//! another.

use crate::App;
use std::io::Write;
use valv_age::Recipient;
use valv_backup::fields::{Dec, Enc};
use valv_backup::{FrameWriter, Manifest};
use valv_store::dump::{Census, Row};

/// The frame kind of a data-directory file (store rows use kinds below 0x80).
pub const FILE_KIND: u8 = 0x80;
/// The frame kind of a piece of a file object (issue 13): its name, offset and sealed bytes.
/// The objects of every file record in the snapshot follow the rows, in pieces of [`CHUNK`].
pub const OBJECT_KIND: u8 = 0x81;
/// What the manifest counts objects as (beside the tables' rows).
pub const OBJECTS_TALLY: &str = "file_objects";

/// A piece of a file object carried in a backup (still sealed under the file's own key).
pub struct ObjectPiece {
    pub name: String,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

impl ObjectPiece {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.str(&self.name).u64(self.offset).bytes(&self.bytes);
        e.finish()
    }

    pub fn decode(payload: &[u8]) -> Result<Self, valv_backup::BackupError> {
        let mut d = Dec::new(payload);
        let piece = ObjectPiece { name: d.string()?, offset: d.u64()?, bytes: d.bytes()?.to_vec() };
        d.finish()?;
        Ok(piece)
    }
}
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

/// Bytes handed to the encrypter in blocks of this size.
const CHUNK: usize = 1 << 20;

/// The framed bytes on their way to the encrypting thread, in blocks of [`CHUNK`].
struct Chunks {
    block: Vec<u8>,
    out: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.block.extend_from_slice(buf);
        if self.block.len() >= CHUNK {
            self.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(CHUNK + CHUNK / 8));
        self.out.send(block).map_err(|_| std::io::Error::other("the backup encrypter stopped"))
    }
}

/// Encrypts and writes, on a thread of its own, what the [`Chunks`] it returns are given; the
/// thread ends (returning `out`) once they are dropped.
fn spawn_encrypter<W: Write + Send + 'static>(
    out: W,
    recipients: Vec<Recipient>,
    random: valv_age::Randomness,
) -> Result<(Chunks, std::thread::JoinHandle<std::io::Result<W>>), String> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let thread = std::thread::Builder::new()
        .name("valv-backup-encrypt".into())
        .spawn(move || {
            let mut age = valv_age::encrypt(out, &recipients, random).map_err(std::io::Error::other)?;
            for block in rx {
                age.write_all(&block)?;
            }
            age.finish().map_err(std::io::Error::other)
        })
        .map_err(|e| format!("cannot start the backup encrypter: {e}"))?;
    Ok((Chunks { block: Vec::with_capacity(CHUNK + CHUNK / 8), out: tx }, thread))
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
    let keys = app.log_keys();
    let store = app.vault.store().clone();
    let objects = app.files.store.clone();
    let runtime = tokio::runtime::Handle::current();
    let source = store.backend();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Row>>(4);
    let writer = tokio::task::spawn_blocking(move || -> Result<Written<W>, String> {
        let failed = |e: &dyn std::fmt::Display| format!("writing the backup: {e}");
        let (chunks, encrypter) = spawn_encrypter(out, recipients, random)?;
        let framed = || -> Result<(Manifest, String), String> {
            let mut frames = FrameWriter::new(chunks).map_err(|e| failed(&e))?;
            for f in &files {
                frames.frame(FILE_KIND, &f.encode()).map_err(|e| failed(&e))?;
            }
            let mut census = Census::default();
            let (mut rows, mut payload) = (0u64, Vec::new());
            let mut names = Vec::new();
            while let Some(batch) = rx.blocking_recv() {
                for row in &batch {
                    census.add(row);
                    if let Row::File(f) = row {
                        names.push(f.object.clone());
                    }
                    let kind = row.encode_into(&mut payload);
                    frames.frame(kind, &payload).map_err(|e| failed(&e))?;
                }
                rows += batch.len() as u64;
                progress(rows);
            }
            // The objects the snapshot's file records name (immutable; one erased since the
            // snapshot is gone and left out: the ledger erases its record again on restore).
            for name in &names {
                let Some(size) = runtime.block_on(objects.size(name)).map_err(|e| failed(&e))? else { continue };
                census.tally.row(OBJECTS_TALLY);
                let mut offset = 0;
                loop {
                    let end = size.min(offset + CHUNK as u64);
                    let bytes = runtime.block_on(objects.read_range(name, offset, end)).map_err(|e| failed(&e))?;
                    frames.frame(OBJECT_KIND, &ObjectPiece { name: name.clone(), offset, bytes }.encode()).map_err(|e| failed(&e))?;
                    offset = end;
                    if offset >= size {
                        break;
                    }
                }
            }
            let signer = keys.signer()?;
            let manifest = census.manifest(keys.origin(), now, source, frames.digest());
            let signed_manifest = manifest.sign(&signer).map_err(|e| e.to_string())?;
            frames.finish(&signed_manifest).map_err(|e| failed(&e))?.flush().map_err(|e| failed(&e))?;
            Ok((manifest, signed_manifest))
        };
        let framed = framed();
        // The encrypter's own failure (a full disk, say) explains a failed framing best.
        let out = encrypter.join().map_err(|_| "the backup encrypter failed".to_string())?.map_err(|e| failed(&e))?;
        let (manifest, signed_manifest) = framed?;
        Ok(Written { manifest, signed_manifest, out })
    });
    let snapshot = store.snapshot(tx).await;
    let written = writer.await.map_err(|e| format!("the backup writer failed: {e}"))??;
    snapshot.map_err(|e| format!("reading the snapshot: {e}"))?;
    Ok(written)
}
