//! Adapter registry: names → adapter directories, loaded on first use (or at start), each load
//! a new generation, resident under a byte budget with LRU eviction of idle adapters.
//!
//! Pinning is by reference count: a request keeps the `Arc<Adapter>` it resolved until it
//! finishes, so an adapter is idle exactly when the registry holds its only reference. A
//! reload or delete swaps the registry's entry; requests already running keep the version they
//! started with (its bytes stay counted, as "retired", until the last of them ends).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use lowrank_lora::Adapter;
use lowrank_model::Llama;

use crate::metrics::Metrics;

/// Why an adapter could not be served.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NotFound(String),
    /// A bad name or path in an admin request.
    #[error("{0}")]
    Invalid(String),
    /// The files are not a valid adapter for this base (corrupt, wrong shapes, wrong base).
    #[error("{0}")]
    Load(String),
    /// The byte budget cannot make room now.
    #[error("{0}")]
    Budget(String),
}

/// A loaded adapter version.
#[derive(Debug, Clone)]
pub struct Resident {
    pub adapter: Arc<Adapter>,
    pub generation: u64,
    pub bytes: u64,
}

/// One row of `list()`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    pub loaded: bool,
    pub generation: Option<u64>,
    pub bytes: Option<u64>,
    /// Requests currently holding this version.
    pub in_use: usize,
}

struct Entry {
    path: PathBuf,
    loaded: Option<Resident>,
    last_used: u64,
    /// Bumped on every (re)registration, so a lazy load racing a reload is discarded.
    epoch: u64,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    next_generation: u64,
    clock: u64,
    epoch: u64,
    /// Replaced or deleted versions still held by requests.
    retired: Vec<(Weak<Adapter>, u64)>,
}

pub struct Registry {
    model: Arc<Llama>,
    /// Canonical adapters root.
    root: Option<PathBuf>,
    /// Or an object store: entries' paths are then keys under its prefix, fetched into its
    /// verified cache when loaded.
    store: Option<Arc<lowrank_store::AdapterStore>>,
    base_id: String,
    max_bytes: u64,
    base_fingerprint: OnceLock<std::result::Result<String, String>>,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

/// Real tensor bytes of an adapter.
pub fn adapter_bytes(a: &Adapter) -> u64 {
    a.modules
        .values()
        .map(|m| {
            ((m.a.elem_count() * m.a.dtype().size_in_bytes())
                + (m.b.elem_count() * m.b.dtype().size_in_bytes())) as u64
        })
        .sum()
}

/// An admin-supplied key of an adapter in the store (relative, no `.`/`..` parts).
fn store_key(path: &str) -> std::result::Result<PathBuf, RegistryError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(RegistryError::Invalid("`path` is empty".into()));
    }
    if path.starts_with('/') || parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(RegistryError::Invalid(format!(
            "path `{path}` must be relative to the adapters location, without `.` or `..`"
        )));
    }
    Ok(PathBuf::from(parts.join("/")))
}

/// Names usable in the API: letters, digits, `.`, `_`, `-`; not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Registry {
    /// Scan `root` or list `store` (if any) for adapters; nothing is loaded yet.
    pub fn new(
        model: Arc<Llama>,
        root: Option<&Path>,
        store: Option<Arc<lowrank_store::AdapterStore>>,
        base_id: &str,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> crate::Result<Self> {
        let root = match root {
            None => None,
            Some(r) => Some(r.canonicalize().map_err(|e| {
                crate::ServeError::Invalid(format!("adapters directory {}: {e}", r.display()))
            })?),
        };
        let reg = Registry {
            model,
            root,
            store,
            base_id: base_id.to_string(),
            max_bytes,
            base_fingerprint: OnceLock::new(),
            metrics,
            inner: Mutex::new(Inner {
                next_generation: 1,
                ..Default::default()
            }),
        };
        reg.scan()?;
        Ok(reg)
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The object store adapters come from, if any.
    pub fn store(&self) -> Option<&lowrank_store::AdapterStore> {
        self.store.as_deref()
    }

    fn scan(&self) -> crate::Result<()> {
        if let Some(store) = &self.store {
            let names = store.list().map_err(|e| {
                crate::ServeError::Invalid(format!(
                    "{e} (a store that cannot list, such as a plain HTTP server, can still serve \
                     adapters added with POST /v1/adapters; start with no --adapters then)"
                ))
            })?;
            let mut inner = self.lock();
            for name in names {
                if !valid_name(&name) || name == self.base_id {
                    continue;
                }
                inner.epoch += 1;
                let epoch = inner.epoch;
                inner.entries.insert(
                    name.clone(),
                    Entry {
                        path: PathBuf::from(name),
                        loaded: None,
                        last_used: 0,
                        epoch,
                    },
                );
            }
            return Ok(());
        }
        let Some(root) = &self.root else {
            return Ok(());
        };
        let rd = std::fs::read_dir(root)
            .map_err(|e| crate::ServeError::Invalid(format!("{}: {e}", root.display())))?;
        let mut inner = self.lock();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !valid_name(&name) || name == self.base_id {
                continue;
            }
            let Ok(p) = e.path().canonicalize() else {
                continue;
            };
            if !p.starts_with(root) || !p.join(lowrank_lora::peft::CONFIG_FILE).is_file() {
                continue;
            }
            inner.epoch += 1;
            let epoch = inner.epoch;
            inner.entries.insert(
                name,
                Entry {
                    path: p,
                    loaded: None,
                    last_used: 0,
                    epoch,
                },
            );
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().entries.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().entries.keys().cloned().collect()
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        let root = self.root.clone().unwrap_or_default();
        self.lock()
            .entries
            .iter()
            .map(|(n, e)| AdapterInfo {
                name: n.clone(),
                path: e
                    .path
                    .strip_prefix(&root)
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|_| e.path.clone()),
                loaded: e.loaded.is_some(),
                generation: e.loaded.as_ref().map(|r| r.generation),
                bytes: e.loaded.as_ref().map(|r| r.bytes),
                in_use: e
                    .loaded
                    .as_ref()
                    .map(|r| Arc::strong_count(&r.adapter) - 1)
                    .unwrap_or(0),
            })
            .collect()
    }

    /// Bytes of every resident version (current and retired-but-pinned).
    pub fn resident_bytes(&self) -> u64 {
        let mut inner = self.lock();
        Self::used(&mut inner)
    }

    fn used(inner: &mut Inner) -> u64 {
        inner.retired.retain(|(w, _)| w.strong_count() > 0);
        let cur: u64 = inner
            .entries
            .values()
            .filter_map(|e| e.loaded.as_ref())
            .map(|r| r.bytes)
            .sum();
        cur + inner.retired.iter().map(|(_, b)| b).sum::<u64>()
    }

    fn publish(&self, inner: &mut Inner) {
        let bytes = Self::used(inner);
        let n = inner
            .entries
            .values()
            .filter(|e| e.loaded.is_some())
            .count()
            + inner.retired.len();
        self.metrics
            .resident_adapters
            .store(n as u64, Ordering::Relaxed);
        self.metrics
            .resident_adapter_bytes
            .store(bytes, Ordering::Relaxed);
    }

    fn fingerprint(&self) -> std::result::Result<&str, String> {
        self.base_fingerprint
            .get_or_init(|| {
                self.model
                    .fingerprint()
                    .map_err(|e| format!("cannot fingerprint the base model: {e}"))
            })
            .as_deref()
            .map_err(|e| e.clone())
    }

    /// Load and validate an adapter (shapes, finiteness, base fingerprint) from its directory,
    /// or, with a store, from its key fetched into the cache; also returns the local directory.
    fn load_dir(
        &self,
        name: &str,
        dir: &Path,
    ) -> std::result::Result<(Adapter, PathBuf), RegistryError> {
        let fail =
            |m: String| RegistryError::Load(format!("adapter `{name}` cannot be loaded: {m}"));
        let local = match &self.store {
            None => dir.to_path_buf(),
            Some(st) => {
                let f = st.fetch(&dir.to_string_lossy()).map_err(|e| match e {
                    lowrank_store::StoreError::NotFound(m) => {
                        RegistryError::NotFound(format!("adapter `{name}`: {m}"))
                    }
                    e => fail(e.to_string()),
                })?;
                if f.downloaded > 0 {
                    self.metrics
                        .adapter_downloads
                        .fetch_add(1, Ordering::Relaxed);
                }
                f.dir
            }
        };
        let a =
            lowrank_lora::peft::load_peft(&local, &self.model.base_shapes(), self.model.device())
                .map_err(|e| fail(e.to_string()))?;
        if a.provenance.base_fingerprint.is_some() {
            let fp = self.fingerprint().map_err(fail)?;
            a.check_fingerprint(fp, false)
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok((a, local))
    }

    /// Evict idle adapters (least recently used first) until `need` more bytes fit.
    fn make_room(
        &self,
        inner: &mut Inner,
        need: u64,
        keep: &str,
    ) -> std::result::Result<(), RegistryError> {
        if need > self.max_bytes {
            return Err(RegistryError::Budget(format!(
                "adapter `{keep}` needs {need} bytes, more than the server's adapter budget of {} bytes",
                self.max_bytes
            )));
        }
        while Self::used(inner) + need > self.max_bytes {
            let victim = inner
                .entries
                .iter()
                .filter(|(n, e)| {
                    n.as_str() != keep
                        && e.loaded
                            .as_ref()
                            .is_some_and(|r| Arc::strong_count(&r.adapter) == 1)
                })
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            match victim {
                Some(v) => inner.entries.get_mut(&v).expect("victim exists").loaded = None,
                None => {
                    return Err(RegistryError::Budget(format!(
                        "no room for adapter `{keep}`: the adapter budget of {} bytes is held by adapters in use; retry later",
                        self.max_bytes
                    )))
                }
            }
        }
        Ok(())
    }

    /// The adapter under `name` for inspection (its card), with its directory and whether it
    /// is resident: the resident version, or a fresh load that is not kept, so that looking
    /// at a card neither evicts adapters serving requests nor counts as a use.
    pub fn inspect(
        &self,
        name: &str,
    ) -> std::result::Result<(Arc<Adapter>, PathBuf, bool), RegistryError> {
        let path = {
            let inner = self.lock();
            let e = inner.entries.get(name).ok_or_else(|| {
                RegistryError::NotFound(format!("adapter `{name}` does not exist"))
            })?;
            if let Some(r) = &e.loaded {
                return Ok((r.adapter.clone(), e.path.clone(), true));
            }
            e.path.clone()
        };
        let (a, _) = self.load_dir(name, &path)?;
        Ok((Arc::new(a), path, false))
    }

    /// Where `path` (an entry's) lies on disk: itself, or its cached copy from the store.
    pub fn local_dir(&self, path: &Path) -> std::result::Result<PathBuf, RegistryError> {
        match &self.store {
            None => Ok(path.to_path_buf()),
            Some(st) => st
                .fetch(&path.to_string_lossy())
                .map(|f| f.dir)
                .map_err(|e| RegistryError::Load(e.to_string())),
        }
    }

    /// The current version of `name`, loading it if needed (blocking: file I/O).
    pub fn get(&self, name: &str) -> std::result::Result<Resident, RegistryError> {
        let (path, epoch) = {
            let mut inner = self.lock();
            inner.clock += 1;
            let clock = inner.clock;
            let e = inner.entries.get_mut(name).ok_or_else(|| {
                RegistryError::NotFound(format!("adapter `{name}` does not exist"))
            })?;
            e.last_used = clock;
            if let Some(r) = &e.loaded {
                return Ok(r.clone());
            }
            (e.path.clone(), e.epoch)
        };
        let (adapter, _) = self.load_dir(name, &path)?;
        let mut inner = self.lock();
        match inner.entries.get(name) {
            None => {
                return Err(RegistryError::NotFound(format!(
                    "adapter `{name}` was removed"
                )))
            }
            Some(e) if e.epoch != epoch => {
                // Re-registered meanwhile: serve whatever is current now.
                if let Some(r) = &e.loaded {
                    return Ok(r.clone());
                }
            }
            Some(e) => {
                if let Some(r) = &e.loaded {
                    return Ok(r.clone()); // a concurrent load won
                }
            }
        }
        let r = self.install(&mut inner, name, adapter)?;
        Ok(r)
    }

    fn install(
        &self,
        inner: &mut Inner,
        name: &str,
        adapter: Adapter,
    ) -> std::result::Result<Resident, RegistryError> {
        let bytes = adapter_bytes(&adapter);
        // The version being replaced stops counting as current; if in use it is retired.
        if let Some(old) = inner.entries.get_mut(name).and_then(|e| e.loaded.take()) {
            if Arc::strong_count(&old.adapter) > 1 {
                inner
                    .retired
                    .push((Arc::downgrade(&old.adapter), old.bytes));
            }
        }
        self.make_room(inner, bytes, name)?;
        let generation = inner.next_generation;
        inner.next_generation += 1;
        inner.clock += 1;
        let clock = inner.clock;
        let r = Resident {
            adapter: Arc::new(adapter),
            generation,
            bytes,
        };
        let e = inner.entries.get_mut(name).expect("entry exists");
        e.loaded = Some(r.clone());
        e.last_used = clock;
        self.publish(inner);
        Ok(r)
    }

    /// Confine an admin-supplied path to the adapters root: no `..`, and after resolving
    /// symlinks it must still lie inside the root.
    pub fn confine(&self, path: &str) -> std::result::Result<PathBuf, RegistryError> {
        let root = self.root.as_ref().ok_or_else(|| {
            RegistryError::Invalid(
                "the server has no adapters directory; adapters can only be loaded from inside it"
                    .into(),
            )
        })?;
        let p = Path::new(path);
        if path.is_empty() {
            return Err(RegistryError::Invalid("`path` is empty".into()));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(RegistryError::Invalid(format!(
                "path `{path}` must not contain `..`"
            )));
        }
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        let canon = full.canonicalize().map_err(|e| {
            RegistryError::Invalid(format!(
                "path `{path}` cannot be opened inside the adapters directory: {e}"
            ))
        })?;
        if !canon.starts_with(root) {
            return Err(RegistryError::Invalid(format!(
                "path `{path}` is outside the adapters directory"
            )));
        }
        if !canon.is_dir() {
            return Err(RegistryError::Invalid(format!(
                "path `{path}` is not a directory"
            )));
        }
        Ok(canon)
    }

    /// Register (or re-register) `name` from `path` (relative to the adapters root) and load it
    /// now; a new generation even when the name and files are the same. In-flight requests
    /// keep the version they hold. Blocking.
    pub fn register(&self, name: &str, path: &str) -> std::result::Result<Resident, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::Invalid(format!(
                "invalid adapter name `{name}`: use letters, digits, `.`, `_` and `-` (not starting with `.`)"
            )));
        }
        if name == self.base_id {
            return Err(RegistryError::Invalid(format!(
                "`{name}` is the base model's id"
            )));
        }
        let dir = match &self.store {
            Some(_) => store_key(path)?,
            None => self.confine(path)?,
        };
        let (adapter, _) = self.load_dir(name, &dir)?;
        let mut inner = self.lock();
        inner.epoch += 1;
        let epoch = inner.epoch;
        match inner.entries.get_mut(name) {
            Some(e) => {
                e.path = dir;
                e.epoch = epoch;
            }
            None => {
                inner.entries.insert(
                    name.to_string(),
                    Entry {
                        path: dir,
                        loaded: None,
                        last_used: 0,
                        epoch,
                    },
                );
            }
        }
        self.install(&mut inner, name, adapter)
    }

    /// Stop serving `name`; requests using it finish with the version they hold.
    pub fn remove(&self, name: &str) -> std::result::Result<(), RegistryError> {
        let mut inner = self.lock();
        let e = inner
            .entries
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(format!("adapter `{name}` does not exist")))?;
        if let Some(r) = e.loaded {
            if Arc::strong_count(&r.adapter) > 1 {
                inner.retired.push((Arc::downgrade(&r.adapter), r.bytes));
            }
        }
        self.publish(&mut inner);
        Ok(())
    }

    /// Load every registered adapter; returns the failures (which stay registered and fail
    /// again, clearly, when requested).
    pub fn preload(&self) -> Vec<(String, RegistryError)> {
        self.names()
            .into_iter()
            .filter_map(|n| self.get(&n).err().map(|e| (n, e)))
            .collect()
    }
}
