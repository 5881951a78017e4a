//! The durable device and twin store: one file per device, `<state_dir>/twin/<id>.json`, holding
//! the device with its attributes and twins. Same rules as the resource store: each write goes to
//! a temp file, is fsynced and renamed into place, and the folder is fsynced, so a crash leaves
//! the old device or the new one, never a mix. The caller writes before it answers: a cloud
//! message is applied before anything is published, a mapper's report before its result.
//! Device IDs come from the cloud and from MQTT topics, so they are encoded into safe names.

use super::model::Device;
use super::rules::{Devices, StoreChange};
use crate::error::{ErrorKind, Result};
use crate::logging::shown;
use crate::modules::meta_store;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Folder under the state dir that holds the devices.
pub const STORE_DIR: &str = "twin";
const FILE_SUFFIX: &str = ".json";
/// Temp files are `<prefix><n>`, `n` the change's place in its write: never ending in `.json`,
/// so never loaded; one is left behind only by a crash and is truncated when reused.
const TEMP_PREFIX: &str = ".twin-store.tmp.";
/// Short-lived threads that only fsync a write's temp files (see `meta_store::sync_files`).
const SYNC_HELPER_NAME: &str = "eh-twin-sync";
/// Linux's file-name limit.
const MAX_FILE_NAME_BYTES: usize = 255;
/// Most devices kept: a hostile cloud or mapper cannot fill the disk with devices.
pub const MAX_DEVICES: usize = 10_000;
const DIR_MODE: u32 = 0o700;

/// The store's folder; all writes go through one thread (the twin module).
#[derive(Debug)]
pub struct DeviceStore {
    dir: PathBuf,
}

impl DeviceStore {
    /// Opens (creating) `<state_dir>/twin` and loads every device. A file that does not parse is
    /// logged and skipped, never fatal: the cloud's next membership message brings it back.
    ///
    /// # Errors
    /// `Io` when the folder cannot be made or listed.
    pub fn open(state_dir: &Path) -> Result<(DeviceStore, Devices)> {
        let dir = state_dir.join(STORE_DIR);
        crate::dirs::create_durable(&dir, DIR_MODE)
            .map_err(|e| ErrorKind::Io.msg(format!("create {}", dir.display())).src(e))?;
        let entries = fs::read_dir(&dir)
            .map_err(|e| ErrorKind::Io.msg(format!("list {}", dir.display())).src(e))?;
        let mut devices = Devices::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(FILE_SUFFIX) {
                continue;
            }
            let parsed = fs::read(&path).map_err(|e| e.to_string()).and_then(|bytes| {
                serde_json::from_slice::<Device>(&bytes).map_err(|e| e.to_string())
            });
            match parsed {
                Ok(device)
                    if file_name(&device.id).as_deref()
                        == path.file_name().and_then(|n| n.to_str()) =>
                {
                    devices.insert(device.id.clone(), device);
                }
                Ok(device) => log::warn!(
                    "twin: {} holds device {:?}, which belongs in another file; skipped",
                    path.display(),
                    device.id
                ),
                Err(e) => log::warn!(
                    "twin: {} is not a valid device record ({e}); skipped",
                    path.display()
                ),
            }
        }
        log::info!("twin: loaded {} devices from {}", devices.len(), dir.display());
        Ok((DeviceStore { dir }, devices))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `changes` durable, in order, with one folder fsync at the end. `known` is the
    /// device count before the changes, to hold [`MAX_DEVICES`].
    ///
    /// # Errors
    /// `Io`, naming the file, when an ID cannot be a file name, the store is full, or a write,
    /// rename, removal or fsync fails. Changes before the failing one may be durable already.
    pub fn write(&self, changes: &[StoreChange], known: &Devices) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        // Every new record goes to its own temp file first; the temp files are fsynced together
        // (the device flushes once for many), then renamed into place in order.
        let mut count = known.len();
        let mut temps: Vec<Option<(PathBuf, PathBuf, File)>> = Vec::with_capacity(changes.len());
        for (n, change) in changes.iter().enumerate() {
            let StoreChange::Put(device) = change else {
                temps.push(None);
                continue;
            };
            let path = self.path_of(&device.id)?;
            if !known.contains_key(&device.id) {
                if count >= MAX_DEVICES {
                    return Err(ErrorKind::Full.msg(format!(
                        "twin store holds {MAX_DEVICES} devices; not adding {:?}",
                        shown(&device.id)
                    )));
                }
                count += 1;
            }
            // Cannot fail: a struct of strings and maps with string keys.
            let bytes = serde_json::to_vec(device).unwrap_or_default();
            let temp = self.dir.join(format!("{TEMP_PREFIX}{n}"));
            let file = meta_store::write_temp(&temp, &bytes)
                .map_err(|e| ErrorKind::Io.msg(format!("write {}", temp.display())).src(e))?;
            temps.push(Some((temp, path, file)));
        }
        let files: Vec<&File> = temps.iter().flatten().map(|(_, _, file)| file).collect();
        let synced = meta_store::sync_files_named(&files, SYNC_HELPER_NAME);
        let staged = temps.iter().flatten();
        for ((temp, path, _), result) in staged.zip(synced) {
            result.map_err(|e| {
                ErrorKind::Io.msg(format!("fsync {} for {}", temp.display(), path.display())).src(e)
            })?;
        }
        for (change, staged) in changes.iter().zip(&temps) {
            match (change, staged) {
                (StoreChange::Put(_), Some((temp, path, _))) => fs::rename(temp, path)
                    .map_err(|e| ErrorKind::Io.msg(format!("write {}", path.display())).src(e))?,
                (StoreChange::Remove(id), _) => {
                    let path = self.path_of(id)?;
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(ErrorKind::Io
                                .msg(format!("remove {}", path.display()))
                                .src(e))
                        }
                    }
                }
                (StoreChange::Put(_), None) => {} // cannot happen: every put was staged above
            }
        }
        meta_store::sync_dir(&self.dir)
            .map_err(|e| ErrorKind::Io.msg(format!("fsync {}", self.dir.display())).src(e))
    }

    fn path_of(&self, id: &str) -> Result<PathBuf> {
        file_name(id).map(|name| self.dir.join(name)).ok_or_else(|| {
            ErrorKind::Io.msg(format!("device id {:?} is empty or too long to store", shown(id)))
        })
    }
}

/// The file name of a device: every byte outside `[A-Za-z0-9_-]` percent-encoded (so `/`, `.`
/// and NUL cannot make a path), then `.json`. `None` for an empty ID or a name over 255 bytes.
pub fn file_name(id: &str) -> Option<String> {
    if id.is_empty() {
        return None;
    }
    let mut name = String::with_capacity(id.len() + FILE_SUFFIX.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name.push_str(FILE_SUFFIX);
    (name.len() <= MAX_FILE_NAME_BYTES).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    fn scratch(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("edgehub-twin-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    #[test]
    fn names_are_safe_and_bounded() {
        assert_eq!(file_name("thermo-1").unwrap(), "thermo-1.json");
        assert_eq!(file_name("default/thermo-1").unwrap(), "default%2Fthermo-1.json");
        assert_eq!(file_name("..").unwrap(), "%2E%2E.json");
        assert!(file_name("").is_none());
        assert!(file_name(&"a".repeat(250)).is_some() && file_name(&"a".repeat(251)).is_none());
    }

    #[test]
    fn devices_survive_a_reopen_with_actual_metadata_and_removals_stick() {
        let s = scratch("reopen");
        let (store, mut devices) = DeviceStore::open(&s.0).unwrap();
        assert!(devices.is_empty());
        let device: Device = serde_json::from_str(
            r#"{"id":"ns/d1","name":"d1","twin":{"t":{"actual":{"value":"1","metadata":{"timestamp":5}},"optional":true,"metadata":{"type":"int"},"actual_version":{"cloud":0,"edge":3}}}}"#,
        )
        .unwrap();
        let other = Device { id: "d2".into(), ..Device::default() };
        let changes = [StoreChange::Put(device.clone()), StoreChange::Put(other)];
        store.write(&changes, &devices).unwrap();
        for c in &changes {
            super::super::rules::apply(&mut devices, c);
        }
        store.write(&[StoreChange::Remove("d2".into())], &devices).unwrap();
        fs::write(store.dir().join("junk.json"), b"{not json").unwrap();
        let (_, loaded) = DeviceStore::open(&s.0).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded["ns/d1"], device, "REF lost actual.metadata on restart; we keep it");
    }

    #[test]
    fn a_failed_write_names_the_file() {
        let s = scratch("fail");
        let (store, devices) = DeviceStore::open(&s.0).unwrap();
        fs::create_dir_all(store.dir().join("d.json")).unwrap(); // a folder where the file goes
        let e = store
            .write(&[StoreChange::Put(Device { id: "d".into(), ..Device::default() })], &devices);
        assert!(e.unwrap_err().to_string().contains("d.json"));
    }
}
