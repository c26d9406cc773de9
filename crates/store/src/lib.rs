//! Adapters from object storage: `s3://bucket/prefix`, `gs://…`, `az://…` (also `abfs://`,
//! `https://<account>.blob.core.windows.net/…`), `http(s)://…` and `file:///…`, through the
//! `object_store` crate (credentials and endpoints from the usual environment variables:
//! `AWS_*`, `GOOGLE_*`, `AZURE_*`).
//!
//! An adapter is a "directory" under the store's prefix holding `adapter_config.json` and
//! `adapter_model.safetensors` (and optionally a model card, `README.md`). [`AdapterStore::fetch`]
//! brings one into a local cache and returns that directory, which the PEFT loader reads as
//! any other:
//!
//! * **Versions.** Each distinct set of objects (their sizes and ETags) gets its own cache
//!   directory, built in a temporary directory and renamed into place when complete, so a
//!   reader never sees half an adapter or a mix of two versions; a new version under the same
//!   name is a new directory (the old one is removed by renaming it away first).
//! * **Verification.** Every download is checked against the size the store reports (and, for
//!   S3 single-part objects, against the MD5 its ETag is), hashed (sha256) as it streams to
//!   disk; a cache hit re-checks each file's size and sha256 against what was recorded, so a
//!   damaged cache is downloaded again, never loaded.
//! * **Limits.** Sizes are checked before anything is written: a config or card over
//!   [`MAX_SMALL_FILE`], weights over the caller's byte limit, are refused.
//! * **Offline.** When the store cannot be reached, the newest complete cached version is used
//!   (and said so in [`Fetched::note`]).

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use futures_util::StreamExt;
use md5::Digest as _;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreScheme};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The files of an adapter: (name, required).
pub const FILES: [(&str, bool); 3] = [
    ("adapter_config.json", true),
    ("adapter_model.safetensors", true),
    ("README.md", false),
];

/// Largest config or model card accepted (the weights have their own limit).
pub const MAX_SMALL_FILE: u64 = 1 << 20;

/// What can go wrong; every message names the URL or object.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Url(String),
    #[error("{0}")]
    NotFound(String),
    /// The store answered with an error, or could not be reached.
    #[error("{0}")]
    Store(String),
    /// The object is not what it claims to be (size, checksum) or is too large.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Does `s` name an object store location (`scheme://…`) rather than a local path?
pub fn is_url(s: &str) -> bool {
    match s.split_once("://") {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// The one runtime the stores' async clients run on (they need a reactor; callers are
/// synchronous: the server's blocking pool, the CLI). Never dropped.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lowrank-store")
            .enable_all()
            .build()
            .expect("cannot start the object store's I/O runtime")
    })
}

/// Run `f` on [`runtime`] and wait for it; callable from any thread, async or not.
fn block<F>(f: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("the object store's I/O runtime stopped")
}

/// Downloads and cache hits since start (for metrics and tests).
#[derive(Debug, Default)]
pub struct StoreStats {
    pub downloads: AtomicU64,
    pub downloaded_bytes: AtomicU64,
    pub cache_hits: AtomicU64,
    pub offline_hits: AtomicU64,
}

/// One adapter brought into the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The local directory to load.
    pub dir: PathBuf,
    /// The version's id (from the objects' sizes and ETags).
    pub version: String,
    /// Files downloaded now (0: a cache hit).
    pub downloaded: usize,
    /// Set when the cached version was used because the store could not be reached.
    pub note: Option<String>,
}

/// What the cache records of one version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Recorded {
    url: String,
    files: Vec<RecordedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RecordedFile {
    name: String,
    size: u64,
    e_tag: Option<String>,
    sha256: String,
}

const RECORD: &str = ".lowrank-cache.json";

/// An object store location holding adapters, with its local cache.
pub struct AdapterStore {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    scheme: ObjectStoreScheme,
    cache: PathBuf,
    /// Largest weights file fetched.
    max_weights: u64,
    pub stats: StoreStats,
}

impl std::fmt::Debug for AdapterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterStore")
            .field("url", &self.url)
            .field("cache", &self.cache)
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{}: {e}", path.display()))
}

fn size_of(m: &ObjectMeta) -> u64 {
    m.size
}

impl AdapterStore {
    /// Open `url` (the prefix under which adapters are "directories"); downloads go under
    /// `cache_root`, in a directory of this URL's own; no weights file over `max_weights`
    /// bytes is fetched.
    pub fn open(url: &str, cache_root: &Path, max_weights: u64) -> Result<Self> {
        let bad = |m: String| StoreError::Url(format!("adapters location `{url}`: {m}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let (scheme, prefix) =
            ObjectStoreScheme::parse(&parsed).map_err(|e| bad(format!("{e}")))?;
        let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
            ObjectStoreScheme::AmazonS3 => object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map(|s| Arc::new(s) as _),
            ObjectStoreScheme::GoogleCloudStorage => {
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map(|s| Arc::new(s) as _)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map(|s| Arc::new(s) as _)
            }
            ObjectStoreScheme::Http => {
                let origin = parsed.origin().ascii_serialization();
                // An http:// URL was asked for by name: plain HTTP is what the user wants.
                let opts =
                    object_store::ClientOptions::new().with_allow_http(parsed.scheme() == "http");
                object_store::http::HttpBuilder::new()
                    .with_url(origin)
                    .with_client_options(opts)
                    .build()
                    .map(|s| Arc::new(s) as _)
            }
            ObjectStoreScheme::Local => Ok(Arc::new(object_store::local::LocalFileSystem::new())),
            other => return Err(bad(format!("the scheme {other:?} is not supported"))),
        };
        let store = built.map_err(|e| bad(e.to_string()))?;
        let key = hex(&Sha256::digest(url.trim_end_matches('/').as_bytes())[..8]);
        let cache = cache_root.join(key);
        std::fs::create_dir_all(&cache).map_err(|e| io(&cache, e))?;
        Ok(AdapterStore {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
            scheme,
            cache,
            max_weights,
            stats: StoreStats::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The cache directory of this store.
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// `name` → its object path (`""`: the prefix itself is the adapter).
    fn location(&self, name: &str) -> Result<ObjPath> {
        let mut p = self.prefix.clone();
        for part in name.split('/').filter(|s| !s.is_empty()) {
            if part == "." || part == ".." {
                return Err(StoreError::Url(format!(
                    "adapter `{name}`: `.` and `..` are not allowed in a store path"
                )));
            }
            p = p.child(part);
        }
        Ok(p)
    }

    /// The adapters directly under the prefix: names whose `NAME/adapter_config.json` exists.
    pub fn list(&self) -> Result<Vec<String>> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let url = self.url.clone();
        block(async move {
            let depth = prefix.parts().count();
            let mut names = std::collections::BTreeSet::new();
            let mut s = store.list(Some(&prefix));
            while let Some(m) = s.next().await {
                let m = m.map_err(|e| StoreError::Store(format!("listing {url}: {e}")))?;
                let parts: Vec<String> =
                    m.location.parts().map(|p| p.as_ref().to_string()).collect();
                if parts.len() == depth + 2 && parts[depth + 1] == FILES[0].0 {
                    names.insert(parts[depth].clone());
                }
            }
            Ok(names.into_iter().collect())
        })
    }

    /// Bring adapter `name` (a "directory" under the prefix; `""` for the prefix itself)
    /// into the cache and return its local directory.
    pub fn fetch(&self, name: &str) -> Result<Fetched> {
        let base = self.location(name)?;
        let what = if name.is_empty() {
            self.url.clone()
        } else {
            format!("{}/{name}", self.url)
        };
        let slot = self.cache.join(if name.is_empty() {
            "_".to_string()
        } else {
            name.replace('/', "%2F")
        });
        std::fs::create_dir_all(&slot).map_err(|e| io(&slot, e))?;
        // Which objects there are now, and their versions.
        let heads = {
            let store = self.store.clone();
            let base = base.clone();
            block(async move {
                let mut out = vec![];
                for (f, required) in FILES {
                    match store.head(&base.child(f)).await {
                        Ok(m) => out.push(Some(m)),
                        Err(object_store::Error::NotFound { .. }) if !required => out.push(None),
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
        };
        let heads = match heads {
            Ok(h) => h,
            Err(object_store::Error::NotFound { path, .. }) => {
                return Err(StoreError::NotFound(format!(
                    "{what}: no adapter there ({path} does not exist)"
                )))
            }
            Err(e) => {
                // Unreachable store: fall back to the newest complete cached version.
                if let Some((dir, version)) = newest_complete(&slot) {
                    self.stats.offline_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Fetched {
                        dir,
                        version,
                        downloaded: 0,
                        note: Some(format!(
                            "{what}: the store cannot be reached ({e}); using the cached version"
                        )),
                    });
                }
                return Err(StoreError::Store(format!("{what}: {e}")));
            }
        };
        for (m, (f, _)) in heads.iter().zip(FILES) {
            if let Some(m) = m {
                self.check_size(&what, f, size_of(m))?;
            }
        }
        let version = version_id(&heads);
        let dir = slot.join(&version);
        if dir.is_dir() {
            match verify(&dir) {
                Ok(()) => {
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Fetched {
                        dir,
                        version,
                        downloaded: 0,
                        note: None,
                    });
                }
                Err(_) => remove_dir_atomically(&dir),
            }
        }
        // Download into a fresh temporary directory, then rename it into place.
        let tmp = slot.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let res = self.download(&what, &base, &heads, &tmp);
        let files = match res {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let rec = Recorded {
            url: what.clone(),
            files,
        };
        let record = tmp.join(RECORD);
        write_synced(
            &record,
            &serde_json::to_vec_pretty(&rec).unwrap_or_default(),
        )?;
        sync_dir(&tmp);
        // What was downloaded may be newer than the HEADs: name the version by what it is.
        let got_version = version_of_record(&rec);
        let dir = slot.join(&got_version);
        if dir.is_dir() {
            let _ = std::fs::remove_dir_all(&tmp);
        } else {
            std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
            sync_dir(&slot);
        }
        let n = rec.files.len();
        self.stats.downloads.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.downloaded_bytes.fetch_add(
            rec.files.iter().map(|f| f.size).sum::<u64>(),
            Ordering::Relaxed,
        );
        // Older versions are no longer needed (an adapter already loaded from one is in
        // memory): rename away, then delete.
        if let Ok(rd) = std::fs::read_dir(&slot) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n != got_version && !n.starts_with('.') && e.path().is_dir() {
                    remove_dir_atomically(&e.path());
                }
            }
        }
        Ok(Fetched {
            dir,
            version: got_version,
            downloaded: n,
            note: None,
        })
    }

    fn check_size(&self, what: &str, file: &str, size: u64) -> Result<()> {
        let limit = if file == FILES[1].0 {
            self.max_weights
        } else {
            MAX_SMALL_FILE
        };
        if size > limit {
            return Err(StoreError::Corrupt(format!(
                "{what}/{file}: {size} bytes, more than the {limit} allowed"
            )));
        }
        Ok(())
    }

    /// Stream each present object to `tmp`, checking its size (and MD5 where the ETag is one).
    fn download(
        &self,
        what: &str,
        base: &ObjPath,
        heads: &[Option<ObjectMeta>],
        tmp: &Path,
    ) -> Result<Vec<RecordedFile>> {
        std::fs::create_dir_all(tmp).map_err(|e| io(tmp, e))?;
        let mut files = vec![];
        for ((f, _), head) in FILES.iter().zip(heads) {
            if head.is_none() {
                continue;
            }
            let store = self.store.clone();
            let loc = base.child(*f);
            let path = tmp.join(f);
            let what_f = format!("{what}/{f}");
            let limit = if *f == FILES[1].0 {
                self.max_weights
            } else {
                MAX_SMALL_FILE
            };
            let s3 = matches!(self.scheme, ObjectStoreScheme::AmazonS3);
            let name = f.to_string();
            let rec = block(async move {
                let r = store
                    .get(&loc)
                    .await
                    .map_err(|e| StoreError::Store(format!("{what_f}: {e}")))?;
                let meta = r.meta.clone();
                let size = size_of(&meta);
                if size > limit {
                    return Err(StoreError::Corrupt(format!(
                        "{what_f}: {size} bytes, more than the {limit} allowed"
                    )));
                }
                let mut out = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
                let (mut sha, mut md5, mut n) = (Sha256::new(), md5::Md5::new(), 0u64);
                let mut st = r.into_stream();
                while let Some(chunk) = st.next().await {
                    let chunk = chunk.map_err(|e| {
                        StoreError::Store(format!("{what_f}: download failed: {e}"))
                    })?;
                    n += chunk.len() as u64;
                    if n > size {
                        return Err(StoreError::Corrupt(format!(
                            "{what_f}: more bytes than the {size} the store announced"
                        )));
                    }
                    sha.update(&chunk);
                    md5.update(&chunk);
                    out.write_all(&chunk).map_err(|e| io(&path, e))?;
                }
                if n != size {
                    return Err(StoreError::Corrupt(format!(
                        "{what_f}: {n} bytes received, the store announced {size} (truncated)"
                    )));
                }
                // An S3 ETag of a single-part upload is the content's MD5.
                if let Some(tag) = meta.e_tag.as_deref().map(|t| t.trim_matches('"')) {
                    let is_md5 = tag.len() == 32 && tag.chars().all(|c| c.is_ascii_hexdigit());
                    if s3 && is_md5 && !tag.eq_ignore_ascii_case(&hex(&md5.finalize())) {
                        return Err(StoreError::Corrupt(format!(
                            "{what_f}: the content does not match its ETag (MD5 {tag}): damaged in transit or at rest"
                        )));
                    }
                }
                out.sync_all().map_err(|e| io(&path, e))?;
                Ok(RecordedFile {
                    name,
                    size,
                    e_tag: meta.e_tag.clone(),
                    sha256: hex(&sha.finalize()),
                })
            })?;
            files.push(rec);
        }
        Ok(files)
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A version's id: a hash of each present object's name, size and ETag.
fn version_id(heads: &[Option<ObjectMeta>]) -> String {
    let mut h = Sha256::new();
    for ((f, _), m) in FILES.iter().zip(heads) {
        if let Some(m) = m {
            h.update(format!(
                "{f}\n{}\n{}\n",
                size_of(m),
                m.e_tag.as_deref().unwrap_or("")
            ));
        }
    }
    hex(&h.finalize()[..8])
}

fn version_of_record(r: &Recorded) -> String {
    let mut h = Sha256::new();
    for f in &r.files {
        h.update(format!(
            "{}\n{}\n{}\n",
            f.name,
            f.size,
            f.e_tag.as_deref().unwrap_or("")
        ));
    }
    hex(&h.finalize()[..8])
}

/// Does the cached version in `dir` still hold exactly what was downloaded?
fn verify(dir: &Path) -> Result<()> {
    let record = dir.join(RECORD);
    let text = std::fs::read(&record).map_err(|e| io(&record, e))?;
    let rec: Recorded = serde_json::from_slice(&text)
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", record.display())))?;
    for f in &rec.files {
        let p = dir.join(&f.name);
        let len = std::fs::metadata(&p).map_err(|e| io(&p, e))?.len();
        if len != f.size {
            return Err(StoreError::Corrupt(format!(
                "{}: {len} bytes, {} recorded",
                p.display(),
                f.size
            )));
        }
        let mut h = Sha256::new();
        let mut file = std::fs::File::open(&p).map_err(|e| io(&p, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| io(&p, e))?;
        if hex(&h.finalize()) != f.sha256 {
            return Err(StoreError::Corrupt(format!(
                "{}: its sha256 differs from the one recorded at download",
                p.display()
            )));
        }
    }
    Ok(())
}

/// The most recently completed version in `slot` that still verifies.
fn newest_complete(slot: &Path) -> Option<(PathBuf, String)> {
    let mut best: Option<(std::time::SystemTime, PathBuf, String)> = None;
    for e in std::fs::read_dir(slot).ok()?.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with('.') || !e.path().join(RECORD).is_file() {
            continue;
        }
        let t = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|b| t > b.0) && verify(&e.path()).is_ok() {
            best = Some((t, e.path(), n));
        }
    }
    best.map(|(_, p, n)| (p, n))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Delete a directory so that no reader sees it half-deleted: rename it away, then remove.
fn remove_dir_atomically(dir: &Path) {
    let Some(parent) = dir.parent() else { return };
    let away = parent.join(format!(
        ".old-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::rename(dir, &away).is_ok() {
        let _ = std::fs::remove_dir_all(&away);
    }
}

/// Fetch the single adapter at `url` (the adapter's own "directory") into the cache under
/// `cache_root`; for `--adapter URL` on the command line.
pub fn fetch_url(url: &str, cache_root: &Path, max_weights: u64) -> Result<Fetched> {
    AdapterStore::open(url, cache_root, max_weights)?.fetch("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lowrank-store-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn put(dir: &Path, name: &str, weights: &[u8]) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), b"{\"r\": 4}").unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), weights).unwrap();
    }

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("s3://b/p") && is_url("file:///x") && is_url("https://h/x"));
        assert!(!is_url("adapters/sql") && !is_url("/abs/dir") && !is_url("C:\\x"));
    }

    #[test]
    fn file_store_lists_fetches_caches_and_picks_up_new_versions() {
        let root = tmp("file");
        let src = root.join("src");
        put(&src, "a", b"weights-a-v1");
        put(&src, "b", b"weights-b");
        std::fs::create_dir_all(src.join("not-an-adapter")).unwrap();
        let url = format!("file://{}", src.display());
        let s = AdapterStore::open(&url, &root.join("cache"), 1 << 20).unwrap();
        assert_eq!(s.list().unwrap(), ["a", "b"]);

        let f = s.fetch("a").unwrap();
        assert_eq!(f.downloaded, 2);
        assert_eq!(
            std::fs::read(f.dir.join("adapter_model.safetensors")).unwrap(),
            b"weights-a-v1"
        );
        // Second fetch: a hit, no download.
        let g = s.fetch("a").unwrap();
        assert_eq!((g.downloaded, &g.dir), (0, &f.dir));
        assert_eq!(s.stats.cache_hits.load(Ordering::Relaxed), 1);

        // A damaged cache is noticed and downloaded again.
        std::fs::write(f.dir.join("adapter_model.safetensors"), b"weights-a-XX").unwrap();
        let h = s.fetch("a").unwrap();
        assert_eq!(h.downloaded, 2);
        assert_eq!(
            std::fs::read(h.dir.join("adapter_model.safetensors")).unwrap(),
            b"weights-a-v1"
        );

        // A new version: a new directory; the old one is gone.
        std::thread::sleep(std::time::Duration::from_millis(20));
        put(&src, "a", b"weights-a-version-2");
        let v2 = s.fetch("a").unwrap();
        assert_eq!(v2.downloaded, 2);
        assert_ne!(v2.dir, h.dir);
        assert!(!h.dir.exists());
        assert_eq!(
            std::fs::read(v2.dir.join("adapter_model.safetensors")).unwrap(),
            b"weights-a-version-2"
        );

        // Missing adapters and oversize weights are clear errors.
        let e = s.fetch("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("no adapter there"), "{e}");
        let small = AdapterStore::open(&url, &root.join("cache2"), 4).unwrap();
        let e = small.fetch("b").unwrap_err().to_string();
        assert!(
            e.contains("adapter_model.safetensors") && e.contains("more than the 4"),
            "{e}"
        );
        let e = s.fetch("../etc").unwrap_err().to_string();
        assert!(e.contains("not allowed"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
