//! `burn::store::ModuleStore` over a bitsnap store: `module.save_into(&mut store)` and
//! `module.load_from(&mut store)` for models outside training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bitsnap_core::{Policy, Store};
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{ApplyResult, ModuleSnapshot, ModuleStore};

use crate::Error;
use crate::bridge::{self, RecordKind};

/// Series of module snapshots in the store.
pub const MODULE_SERIES: &str = "module";

/// A [`ModuleStore`] saving each `save_into` as the next snapshot of a bitsnap store (a
/// delta on the previous one) and loading a named snapshot, or the latest, on `load_from`.
///
/// ```no_run
/// # use bitsnap_burn::BitSnapModuleStore;
/// # use burn::store::ModuleSnapshot;
/// # fn demo<M: burn::module::Module>(mut model: M) -> Result<(), bitsnap_burn::Error> {
/// let mut store = BitSnapModuleStore::open("models/run1")?.with_name("after-finetune");
/// model.save_into(&mut store)?;
/// let result = model.load_from(&mut store)?; // applied, missing, unused, ...
/// # Ok(()) }
/// ```
pub struct BitSnapModuleStore {
    store: Store,
    dir: PathBuf,
    name: Option<String>,
    allow_partial: bool,
    cache: Option<BTreeMap<String, PackTensor>>,
}

impl std::fmt::Debug for BitSnapModuleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitSnapModuleStore")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .finish()
    }
}

impl BitSnapModuleStore {
    /// Opens (or creates) the store in `dir` with the default (lossless) policy.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let store = Store::open_or_create(dir.as_ref(), Policy::default())?;
        Ok(BitSnapModuleStore {
            store,
            dir: dir.as_ref().to_path_buf(),
            name: None,
            allow_partial: false,
            cache: None,
        })
    }

    /// The snapshot name `save_into` writes and `load_from` reads (default: saves are
    /// named `module-<id>`, loads take the latest).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self.cache = None;
        self
    }

    /// Sets the encoding policy of later saves (default lossless).
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.store.set_policy(policy);
        self
    }

    /// Whether `load_from` accepts a snapshot that lacks some of the module's tensors
    /// (default `false`: missing tensors are an error).
    pub fn allow_partial(mut self, allow: bool) -> Self {
        self.allow_partial = allow;
        self
    }

    fn ensure_cache(&mut self) -> Result<&BTreeMap<String, PackTensor>, Error> {
        if self.cache.is_none() {
            let info = match &self.name {
                Some(n) => self.store.find(MODULE_SERIES, n),
                None => self.store.latest_in(MODULE_SERIES),
            }
            .ok_or_else(|| Error::Incomplete {
                store: self.dir.clone(),
                reason: format!(
                    "no module snapshot {}",
                    self.name.as_deref().unwrap_or("(none saved)")
                ),
            })?;
            let snap = self.store.load(info.id)?;
            let pack =
                bridge::to_pack_tensors(&snap.tensors, &snap.metadata, RecordKind::Module, "")?;
            self.cache = Some(pack.into_iter().map(|t| (t.name.clone(), t)).collect());
        }
        self.cache.as_ref().ok_or_else(|| Error::Incomplete {
            store: self.dir.clone(),
            reason: "module snapshot cache".into(),
        })
    }
}

impl ModuleStore for BitSnapModuleStore {
    type Error = Error;

    fn collect_from<M: ModuleSnapshot>(&mut self, module: &M) -> Result<(), Error> {
        self.cache = None;
        let (tensors, metadata) =
            bridge::from_pack_tensors(module.collect(None, None, false), RecordKind::Module, "")?;
        // Ids only grow, so `module-<latest id + 1>` never names a snapshot that exists.
        let n = self.store.latest().map_or(1, |s| s.id + 1);
        let name = self.name.clone().unwrap_or_else(|| format!("module-{n}"));
        let previous = self.store.find(MODULE_SERIES, &name).map(|s| s.id);
        self.store
            .save_in(MODULE_SERIES, &name, tensors, metadata)?;
        if let Some(old) = previous {
            self.store.delete(old)?;
        }
        Ok(())
    }

    fn apply_to<M: ModuleSnapshot>(&mut self, module: &mut M) -> Result<ApplyResult, Error> {
        let tensors: Vec<PackTensor> = self.ensure_cache()?.values().cloned().collect();
        let result = module.apply(tensors, None, None, false);
        if !result.errors.is_empty() {
            let list: Vec<String> = result.errors.iter().map(|e| format!("{e:?}")).collect();
            return Err(Error::Incomplete {
                store: self.dir.clone(),
                reason: format!("could not apply: {}", list.join("; ")),
            });
        }
        if !self.allow_partial && !result.missing.is_empty() {
            let list: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
            return Err(Error::Incomplete {
                store: self.dir.clone(),
                reason: format!("the snapshot lacks {}", list.join(", ")),
            });
        }
        Ok(result)
    }

    fn get_tensor(&mut self, name: &str) -> Result<Option<&PackTensor>, Error> {
        Ok(self.ensure_cache()?.get(name))
    }

    fn get_all_tensors(&mut self) -> Result<&BTreeMap<String, PackTensor>, Error> {
        self.ensure_cache()
    }

    fn keys(&mut self) -> Result<Vec<String>, Error> {
        Ok(self.ensure_cache()?.keys().cloned().collect())
    }
}
