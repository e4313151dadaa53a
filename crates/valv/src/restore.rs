//! `valv restore FILE --identity KEYFILE --data-dir DIR [--ledger FILE] [--drill]` and
//! `valv backup verify`: a backup decrypted and loaded into an empty directory, then checked —
//! the manifest's signature (by the checkpoint key the backup itself carries, unwrapped with the
//! KEK), every count, the content hash, the audit log recomputed against the manifest's
//! checkpoint, the erasure ledger's signature and that it continues the backup's — and every
//! erasure of the ledger applied, also those made after the backup. An erased patient's data key
//! is never written to the new directory at all. Any failure removes what the restore made.
//!
//! A drill (and `valv backup verify`) restores into a temporary directory, adds sample
//! decryptions under every KEK version, records its result in the live server's audit log and
//! removes the temporary directory.

use crate::config::{resolve, Config, FILE_NAME};
use crate::datadir;
use std::collections::{BTreeMap, HashSet};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;
use valv_audit::ledger::Ledger;
use valv_backup::frame::{Digest32, Frame};
use valv_backup::{FrameReader, Manifest};
use valv_server::backup::{DirFile, ObjectPiece, CONFIG_FILE, FILE_KIND, KEK_FILE, OBJECTS_TALLY, OBJECT_KIND, TLS_CERT_FILE, TLS_KEY_FILE};
use valv_server::erasure::LEDGER_FILE;
use valv_store::dump::{BulkLoad, Census, Row};
use valv_store::sqlite::Access;

pub struct Request<'a> {
    pub file: &'a Path,
    pub identity: &'a Path,
    pub ledger: Option<&'a Path>,
}

/// What a restore did, in words, and its figures.
pub struct Restored {
    pub summary: String,
    pub resources: u64,
    pub seconds: f64,
}

/// Restores into `target`, which must not exist or be empty.
pub async fn restore(req: &Request<'_>, target: &Path) -> Result<Restored, String> {
    restore_at(req, target, false).await
}

/// [`restore`]; for a drill, the paths of the backup's configuration that point outside the data
/// directory are moved into it (see [`rebase_for_drill`]).
async fn restore_at(req: &Request<'_>, target: &Path, drill: bool) -> Result<Restored, String> {
    let created = prepare_target(target)?;
    let result = restore_into(req, target, drill).await;
    if result.is_err() {
        remove_made(target, created);
    }
    result
}

/// A drill: a restore into a temporary directory with sample decryptions, recorded in the audit
/// log of the server at `live` (which need not be running). The result is returned as well.
pub async fn drill(req: &Request<'_>, live: &Path) -> Result<String, String> {
    let opened = datadir::open_existing(live, Access::Serve).await?;
    let tmp = std::env::temp_dir().join(format!("valv-drill-{}", valv_crypto::hex::encode(&valv_store::vault::random_bytes::<8>().map_err(|e| e.to_string())?)));
    let result = restore_at(req, &tmp, true).await;
    let _ = std::fs::remove_dir_all(&tmp);
    let (outcome, text) = match &result {
        Ok(r) => ("passed", r.summary.clone()),
        Err(e) => ("FAILED", e.clone()),
    };
    let reason = format!("restore drill of {} {outcome}: {text}", req.file.display());
    // A failed drill is recorded as one (outcome error): the compliance report counts only passed drills.
    let recorded = if result.is_ok() {
        valv_server::people::api::audit_local(&opened.app, "restore-drill", None, reason.clone(), valv_server::now_ms()).await
    } else {
        valv_server::people::api::audit_local_failure(&opened.app, "restore-drill", reason.clone(), valv_server::now_ms()).await
    };
    recorded
        .map_err(|e| format!("{reason} — but its audit entry failed: {}", e.diagnostics))?;
    result.map(|r| format!("drill passed (recorded in the audit log of {}): {}", live.display(), r.summary))
}

/// Creates `target` (owner only) or checks it is an empty directory; whether it was created.
fn prepare_target(target: &Path) -> Result<bool, String> {
    match std::fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(format!("{} is not empty: a restore goes into a new or empty directory", target.display()));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            datadir::create_private_dir(target)?;
            Ok(true)
        }
        Err(e) => Err(format!("{}: {e}", target.display())),
    }
}

/// Takes back what a failed restore wrote: the directory if it made it, else its content.
fn remove_made(target: &Path, created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(target);
    } else if let Ok(entries) = std::fs::read_dir(target) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// Rows per load transaction: large, since each commit writes every page it touched (the
/// search-token index's pages are touched all over).
const LOAD_BATCH: usize = 16_384;

/// What the reading thread hands over.
enum Msg {
    File(DirFile),
    Object(ObjectPiece),
    Rows(Vec<Row>),
    End { manifest: String, digest: Digest32 },
    Failed(String),
}

/// Decrypts and decodes on a thread of its own, a few batches ahead of the loading.
fn spawn_reader(file: &Path, identities: Vec<valv_age::Identity>) -> Result<tokio::sync::mpsc::Receiver<Msg>, String> {
    let input = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let name = file.display().to_string();
    std::thread::Builder::new()
        .name("valv-restore-reader".into())
        .spawn(move || {
            let msg = match read_all(BufReader::with_capacity(1 << 20, input), &identities, &tx) {
                Ok(end) => end,
                Err(e) => Msg::Failed(format!("{name}: {e}")),
            };
            let _ = tx.blocking_send(msg);
        })
        .map_err(|e| format!("cannot start the reader: {e}"))?;
    Ok(rx)
}

fn read_all(input: impl std::io::Read, identities: &[valv_age::Identity], tx: &tokio::sync::mpsc::Sender<Msg>) -> Result<Msg, String> {
    let plain = valv_age::decrypt(input, identities).map_err(|e| format!("cannot decrypt the backup: {e}"))?;
    // The age payload authenticates chunk by chunk: a flipped bit or a cut is found here.
    let mut frames = FrameReader::new(plain).map_err(|e| e.to_string())?;
    let mut batch = Vec::with_capacity(LOAD_BATCH);
    let send = |m: Msg| tx.blocking_send(m).map_err(|_| "the restore stopped".to_string());
    loop {
        match frames.next_frame().map_err(|e| e.to_string())? {
            Some(Frame::Row(FILE_KIND, payload)) => send(Msg::File(DirFile::decode(payload).map_err(|e| e.to_string())?))?,
            Some(Frame::Row(OBJECT_KIND, payload)) => {
                if !batch.is_empty() {
                    send(Msg::Rows(std::mem::take(&mut batch)))?;
                }
                send(Msg::Object(ObjectPiece::decode(payload).map_err(|e| e.to_string())?))?;
            }
            Some(Frame::Row(kind, payload)) => {
                let row = Row::decode(kind, payload).map_err(|e| e.to_string())?.ok_or_else(|| format!("the backup holds frames of an unknown kind {kind}"))?;
                batch.push(row);
                if batch.len() == LOAD_BATCH {
                    send(Msg::Rows(std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH))))?;
                }
            }
            Some(Frame::Manifest(manifest)) => {
                if !batch.is_empty() {
                    send(Msg::Rows(batch))?;
                }
                return Ok(Msg::End { manifest, digest: frames.digest() });
            }
            None => return Err("the backup ends before its manifest".into()),
        }
    }
}

/// The erasure ledger given (or found beside the backup), and the patients it names (read
/// before its signature can be checked, which needs the backup's key: only used to leave keys
/// out, and checked before the restore counts as done).
fn read_ledger(req: &Request<'_>) -> Result<(PathBuf, String, HashSet<String>), String> {
    let path = match req.ledger {
        Some(p) => p.to_path_buf(),
        None => req.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join(LEDGER_FILE),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!("the erasure ledger {}: {e} (give the newest copy with --ledger FILE: without it, patients erased after the backup would come back)", path.display())
    })?;
    let patients = valv_audit::note::Note::parse(&text)
        .map_err(|e| format!("the erasure ledger {} is not a signed ledger: {e}", path.display()))?
        .text()
        .lines()
        .skip(3)
        .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
        .collect();
    Ok((path, text, patients))
}

async fn restore_into(req: &Request<'_>, target: &Path, drill: bool) -> Result<Restored, String> {
    let started = Instant::now();
    let identity_text = std::fs::read_to_string(req.identity).map_err(|e| format!("the identity {}: {e}", req.identity.display()))?;
    let identities = valv_age::Identity::from_file_text(&identity_text).map_err(|e| format!("the identity {}: {e}", req.identity.display()))?;
    let (ledger_path, ledger_text, ledger_patients) = read_ledger(req)?;
    let mut rx = spawn_reader(req.file, identities)?;

    let mut loader = Loader { target, drill, load: None, files: Vec::new(), census: Census::default(), erased: ledger_patients, samples: BTreeMap::new(), objects: None, expected: Default::default(), writing: None };
    let (signed, digest) = loop {
        match rx.recv().await.ok_or("the reader stopped")? {
            Msg::File(f) => loader.file(f)?,
            Msg::Object(piece) => loader.object(piece).await?,
            Msg::Rows(rows) => loader.rows(rows).await?,
            Msg::End { manifest, digest } => break (manifest, digest),
            Msg::Failed(e) => return Err(e),
        }
    };
    let census = loader.finish().await?;
    let loaded = started.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut loader.samples);
    drop(loader);

    let opened = datadir::open_for(target, None, Access::Serve).await?;
    let app = &opened.app;
    let verifier = app.log_keys().verifiers()?;
    let manifest = Manifest::open(&signed, &verifier).map_err(|e| e.to_string())?;
    let differences = census.differences(&manifest, digest);
    if !differences.is_empty() {
        return Err(format!("the backup does not match its manifest: {}", differences.join("; ")));
    }
    let reapplied = reapply_erasures(app, &census, &manifest, &ledger_path, &ledger_text, &verifier).await?;
    let audit_started = Instant::now();
    let entries = verify_audit(&opened, &manifest, &verifier).await?;
    let audit_secs = audit_started.elapsed().as_secs_f64();
    let decrypted = sample_decryptions(app, &samples).await?;
    datadir::write_secret(&target.join(LEDGER_FILE), ledger_text.as_bytes())?;

    let resources = census.tally.tables.get("resources").copied().unwrap_or(0);
    let summary = format!(
        "backup of {} ({} created {}) restored: {resources} resources, {} rows, checked against its signed manifest; audit log of {entries} entries verified against checkpoint {}; {} erasures in the backup, {reapplied} more re-applied from the ledger; {decrypted} sample decryptions under {} KEK version(s) (read and loaded in {loaded:.1} s, audit log checked in {audit_secs:.1} s)",
        manifest.origin,
        manifest.source,
        valv_fhir::date::format_instant(manifest.created),
        census.tally.tables.values().sum::<u64>(),
        manifest.checkpoint.map_or("none".to_string(), |(size, _)| size.to_string()),
        census.erasures().len(),
        samples.len(),
    );
    valv_server::people::api::audit_local(app, "restore", None, summary.clone(), valv_server::now_ms()).await.map_err(|e| format!("recording the restore: {}", e.diagnostics))?;
    Ok(Restored { summary, resources, seconds: started.elapsed().as_secs_f64() })
}

/// Loads what the reader hands over into the new directory.
struct Loader<'a> {
    target: &'a Path,
    /// A drill: nothing is written outside `target`.
    drill: bool,
    load: Option<BulkLoad>,
    /// Files waiting for the configuration to say where they go.
    files: Vec<DirFile>,
    census: Census,
    /// Patients of the ledger: their data keys are never written, their tokens never indexed.
    erased: HashSet<String>,
    /// Up to three data keys per KEK version, for sample decryptions.
    samples: BTreeMap<(String, String, u32), Vec<String>>,
    /// The file store objects go to (the configuration's; a drill's own folder).
    objects: Option<std::sync::Arc<dyn valv_files::ObjectStore>>,
    /// Each file record's object and the size its sealed object has.
    expected: std::collections::HashMap<String, u64>,
    writing: Option<Restoring>,
}

/// The file object being restored: its name, bytes so far, and its writer (`None` when the
/// store holds it already: restored into the bucket it came from).
type Restoring = (String, u64, Option<Box<dyn valv_files::ObjectWriter>>);

impl Loader<'_> {
    fn file(&mut self, f: DirFile) -> Result<(), String> {
        if self.load.is_some() {
            return Err("the backup holds a file after its rows".into());
        }
        match f.name.as_str() {
            CONFIG_FILE if self.drill => datadir::write_secret(&self.target.join(FILE_NAME), rebase_for_drill(&on_sqlite(&f.bytes)?)?.as_bytes()),
            CONFIG_FILE => datadir::write_secret(&self.target.join(FILE_NAME), &on_sqlite(&f.bytes)?),
            KEK_FILE | TLS_CERT_FILE | TLS_KEY_FILE => {
                self.files.push(f);
                Ok(())
            }
            other => Err(format!("the backup holds an unknown file '{other}'")),
        }
    }

    /// Opens the new store once the files are in place: the configuration says where it goes —
    /// the data directory's SQLite file, or, when the environment names PostgreSQL
    /// (`VALV_STORE`, `VALV_DATABASE_URL`, …), that database, which must be empty; its `[store]`
    /// section is then written into the restored `valv.toml`. A drill never loads into PostgreSQL.
    async fn load(&mut self) -> Result<&mut BulkLoad, String> {
        if self.load.is_none() {
            if !self.target.join(FILE_NAME).exists() {
                return Err("the backup holds no configuration".into());
            }
            let cfg = Config::load(self.target)?;
            for f in std::mem::take(&mut self.files) {
                let path = match f.name.as_str() {
                    KEK_FILE => &cfg.keys.key_file,
                    TLS_CERT_FILE => &cfg.server.tls_cert,
                    _ => &cfg.server.tls_key,
                };
                // A file kept outside the data directory (say the key file) stays as it is.
                let path = resolve(self.target, path);
                if !path.exists() {
                    datadir::write_secret(&path, &f.bytes)?;
                }
            }
            let elsewhere = cfg.store.backend != "sqlite";
            if elsewhere && self.drill {
                return Err("a drill loads into the embedded SQLite database, but VALV_STORE names another backend: unset it for the drill".into());
            }
            self.load = Some(datadir::open_bulk_load(self.target, &cfg).await?);
            if elsewhere {
                with_store(self.target, &cfg.store)?;
            }
        }
        self.load.as_mut().ok_or_else(|| "no store".to_string())
    }

    async fn rows(&mut self, mut rows: Vec<Row>) -> Result<(), String> {
        for row in &rows {
            self.census.add(row);
            if let Row::File(f) = row {
                self.expected.insert(f.object.clone(), valv_crypto::stream::sealed_len(f.size));
            }
        }
        rows.retain_mut(|row| match row {
            Row::DataKey { name, key, .. } => {
                let patient = name.strip_prefix("patient:");
                if patient.is_some_and(|p| self.erased.contains(p)) {
                    return false;
                }
                let sample = self.samples.entry((key.provider.clone(), key.kek_id.clone(), key.kek_version)).or_default();
                if sample.len() < 3 && (patient.is_some() || sample.is_empty()) {
                    sample.push(name.clone());
                }
                true
            }
            Row::Resource(r) => {
                if r.patient.as_ref().is_some_and(|p| self.erased.contains(p)) {
                    r.tokens.clear();
                }
                true
            }
            _ => true,
        });
        self.load().await?.load(&rows).await.map_err(|e| format!("loading the backup: {e}"))
    }

    /// A piece of a file object: pieces come in order, an object's first at offset 0.
    async fn object(&mut self, piece: ObjectPiece) -> Result<(), String> {
        self.load().await?;
        if self.objects.is_none() {
            let store: std::sync::Arc<dyn valv_files::ObjectStore> = if self.drill {
                std::sync::Arc::new(valv_files::LocalDir::new(self.target.join("files")))
            } else {
                Config::load(self.target)?.files.store(self.target)?
            };
            self.objects = Some(store);
        }
        let store = self.objects.clone().ok_or("no file store")?;
        if piece.offset == 0 {
            self.finish_object().await?;
            self.census.tally.row(OBJECTS_TALLY);
            let writer = match store.create(&piece.name).await {
                Ok(w) => Some(w),
                // Restored into the store it came from: the object must be the one recorded.
                Err(valv_files::FilesError::Exists(_)) => {
                    let held = store.size(&piece.name).await.map_err(|e| format!("restoring file object {}: {e}", piece.name))?;
                    if held.is_none() || held != self.expected.get(&piece.name).copied() {
                        return Err(format!("restoring file object {}: the file store holds another object (or a partial one) under its name", piece.name));
                    }
                    None
                }
                Err(e) => return Err(format!("restoring file object {}: {e}", piece.name)),
            };
            self.writing = Some((piece.name.clone(), 0, writer));
        }
        let Some((name, written, writer)) = self.writing.as_mut() else { return Err("the backup holds a file object's piece before its start".into()) };
        if *name != piece.name || *written != piece.offset {
            return Err(format!("the backup's file object {} is not whole (a piece at {} after {written} bytes of {name})", piece.name, piece.offset));
        }
        if let Some(w) = writer.as_mut() {
            w.write(&piece.bytes).await.map_err(|e| format!("restoring file object {name}: {e}"))?;
        }
        *written += piece.bytes.len() as u64;
        Ok(())
    }

    async fn finish_object(&mut self) -> Result<(), String> {
        if let Some((name, _, Some(w))) = self.writing.take() {
            w.finish().await.map_err(|e| format!("restoring file object {name}: {e}"))?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<Census, String> {
        self.finish_object().await?;
        self.load().await?;
        let load = self.load.take().ok_or("no store")?;
        load.finish().await.map_err(|e| format!("loading the backup: {e}"))?;
        Ok(std::mem::take(&mut self.census))
    }
}

/// Writes `store` into the restored `valv.toml`, so that later commands find the database
/// without the environment.
fn with_store(target: &Path, store: &crate::config::StoreConfig) -> Result<(), String> {
    let path = target.join(FILE_NAME);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut table: toml::Table = text.parse().map_err(|e| format!("the restored configuration: {e}"))?;
    table.insert("store".into(), store.to_toml_value()?);
    let text = toml::to_string(&table).map_err(|e| format!("the restored configuration: {e}"))?;
    std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    datadir::write_secret(&path, text.as_bytes())
}

/// The backup's configuration with its `[store]` section removed: a restore (and a drill) loads
/// into the embedded SQLite database of the new data directory, never into the database the
/// backed-up server used (which may be the live one) — unless the environment names a database
/// for the restore ([`Loader::load`]).
fn on_sqlite(config: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(config).map_err(|_| "the backup's configuration is not UTF-8".to_string())?;
    let mut table: toml::Table = text.parse().map_err(|e| format!("the backup's configuration: {e}"))?;
    if table.remove("store").is_none() {
        return Ok(config.to_vec());
    }
    toml::to_string(&table).map(String::into_bytes).map_err(|e| format!("the backup's configuration: {e}"))
}

/// A drill's configuration: an absolute database path (likely the live database's) becomes the
/// data directory's own `valv.db`, and an absolute key file or TLS file that does not exist here
/// (the restore would write it) its default place inside the data directory; files that exist
/// (say the live key file) are only read.
fn rebase_for_drill(config: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(config).map_err(|_| "the backup's configuration is not UTF-8".to_string())?;
    let mut table: toml::Table = text.parse().map_err(|e| format!("the backup's configuration: {e}"))?;
    let absolute = |v: &toml::Value| v.as_str().map(Path::new).filter(|p| p.is_absolute()).map(Path::to_path_buf);
    for (section, key, inside, always) in
        [("storage", "sqlite", "valv.db", true), ("keys", "key_file", "keys/kek.key", false), ("server", "tls_cert", "tls/cert.pem", false), ("server", "tls_key", "tls/key.pem", false)]
    {
        let Some(value) = table.get_mut(section).and_then(|s| s.as_table_mut()).and_then(|s| s.get_mut(key)) else { continue };
        if absolute(value).is_some_and(|p| always || !p.exists()) {
            *value = toml::Value::String(inside.into());
        }
    }
    // A drill's file objects stay in its own folder, whatever store the backup came from: its
    // re-applied erasures must delete nothing from the live one.
    if let Some(files) = table.get_mut("files").and_then(|s| s.as_table_mut()) {
        files.insert("backend".into(), toml::Value::String("local".into()));
        files.insert("dir".into(), toml::Value::String("files".into()));
    }
    toml::to_string(&table).map_err(|e| format!("the backup's configuration: {e}"))
}

/// Checks the ledger and applies the erasures it holds beyond the backup's; how many.
async fn reapply_erasures(app: &valv_server::App, census: &Census, manifest: &Manifest, path: &Path, text: &str, verifier: &[valv_audit::Verifier]) -> Result<usize, String> {
    let ledger = Ledger::open(text, verifier).map_err(|e| format!("the erasure ledger {} does not verify with this backup's checkpoint key ({e}): another server's, or altered", path.display()))?;
    if ledger.origin != manifest.origin {
        return Err(format!("the erasure ledger {} is of another log ({})", path.display(), ledger.origin));
    }
    let ours = census.erasures();
    if let Some((i, e)) = ours.iter().enumerate().find(|(i, e)| ledger.erasures.get(*i) != Some(e)) {
        return Err(format!(
            "the erasure ledger {} is older than the backup or not its own (it lacks erasure #{} of patient {}): give the newest copy with --ledger",
            path.display(),
            i + 1,
            e.patient
        ));
    }
    let newer = &ledger.erasures[ours.len()..];
    for e in newer {
        let done = app.vault.store().erase_patient(&e.patient, e.erased_at).await.map_err(|x| format!("re-applying erasure #{} of patient {}: {x}", e.seq, e.patient))?;
        for object in &done.objects {
            app.files.store.delete(object).await.map_err(|x| format!("re-applying erasure #{}: deleting a file object: {x}", e.seq))?;
        }
        if done.seq != e.seq {
            return Err(format!("re-applying erasure #{}: it became #{}", e.seq, done.seq));
        }
    }
    Ok(newer.len())
}

/// Recomputes the audit tree from the restored entries and checks every stored checkpoint and
/// the manifest's; the number of entries.
async fn verify_audit(opened: &datadir::Opened, manifest: &Manifest, verifier: &[valv_audit::Verifier]) -> Result<u64, String> {
    let store = opened.app.vault.store();
    let audit_key = opened.app.vault.named_key("audit", valv_server::now_ms()).await.map_err(|e| e.to_string())?;
    let report = valv_server::audit::log::verify(store, &audit_key, verifier, &[]).await.map_err(|e| e.to_string())?;
    if !report.problems.is_empty() {
        return Err(format!("the restored audit log does not verify: {}", report.problems.join("; ")));
    }
    if report.entries != manifest.audit_size {
        return Err(format!("the restored audit log has {} entries, the manifest states {}", report.entries, manifest.audit_size));
    }
    if let Some((size, root)) = manifest.checkpoint {
        let stored = store.checkpoint_at(size).await.map_err(|e| e.to_string())?;
        if stored.map(|c| c.root) != Some(root) {
            return Err(format!("the manifest's checkpoint {size} is not among the restored ones"));
        }
    }
    Ok(report.entries)
}

/// Unwraps the sampled data keys of every KEK version and opens a resource under each patient
/// key; how many decryptions succeeded (any failure is an error).
async fn sample_decryptions(app: &valv_server::App, samples: &BTreeMap<(String, String, u32), Vec<String>>) -> Result<usize, String> {
    let (vault, now) = (&app.vault, valv_server::now_ms());
    let mut done = 0;
    for ((_, kek_id, version), names) in samples {
        for name in names {
            let failed = |e: &dyn std::fmt::Display| format!("sample decryption under KEK {kek_id} version {version} ({name}): {e}");
            match name.strip_prefix("patient:") {
                Some(patient) => {
                    for (resource_type, id) in vault.store().resources_of(patient).await.map_err(|e| failed(&e))? {
                        let Some(v) = vault.fetch(&resource_type, &id, None).await.map_err(|e| failed(&e))? else { continue };
                        if !v.deleted {
                            vault.open_bytes(&v, now).await.map_err(|e| failed(&e))?;
                            done += 1;
                            break;
                        }
                    }
                }
                None => {
                    vault.named_key(name, now).await.map_err(|e| failed(&e))?;
                    done += 1;
                }
            }
        }
    }
    Ok(done)
}
