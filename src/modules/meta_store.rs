//! The `meta` module: a minimal durable store of the objects the cloud sends down. Each insert,
//! update or delete in group `resource`/`func` becomes one file, `<state_dir>/meta/<ns>/<type>/
//! <name>.json`, holding `{"resourceVersion", "msgId", "content"}`, and the message is ACKed only
//! once that file (or its removal) is durable: an ACK tells the cloud never to send this version
//! again (protocol §4.4–4.5). Keys come from the network, so they are checked before they become
//! paths. This file owns key checking, version comparison and the durable write; it never touches
//! the link, and batching several writes per fsync (group commit) is left for later.

use crate::error::{Error, ErrorKind};
use crate::message::{group, operation, Message, CONNECTION_RESOURCE};
use crate::modules::{ModuleContext, ModuleSpec};
use crate::router::bus_group;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::cmp::Ordering;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Folder under the state dir that holds the store.
pub const STORE_DIR: &str = "meta";
/// Longest namespace, type or name: a Kubernetes DNS subdomain name.
pub const MAX_SEGMENT_BYTES: usize = 253;
/// Longest name that still fits Linux's 255-byte file-name limit once `.json` is appended.
pub const MAX_NAME_BYTES: usize = 255 - FILE_SUFFIX.len();
const FILE_SUFFIX: &str = ".json";
/// One writer thread per store, so one temp name per folder is enough; it never ends in `.json`,
/// so it cannot collide with a stored object.
const TEMP_FILE: &str = ".meta-store.tmp";
/// Stored objects may be Secrets: only the agent's user may read them.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Longest resource text written to the log (a hostile key can be megabytes long).
const MAX_LOGGED_RESOURCE: usize = 200;

/// The `meta` module, storing under `<state_dir>/meta`.
pub fn spec(state_dir: PathBuf) -> ModuleSpec {
    let store = Store::new(state_dir.join(STORE_DIR));
    ModuleSpec::new("meta", &[bus_group::META], move |ctx| run(&store, ctx))
}

fn run(store: &Store, ctx: ModuleContext) {
    for msg in ctx.inbox.iter() {
        if msg.route.resource == CONNECTION_RESOURCE {
            log::debug!("meta: connection event {:?}", msg.content_text().unwrap_or_default());
            continue;
        }
        let outcome = store.apply(&msg);
        match &outcome {
            Outcome::Stored(path) => log::debug!("meta: stored {msg:?} in {}", path.display()),
            Outcome::Removed(path) => log::debug!("meta: removed {} for {msg:?}", path.display()),
            Outcome::Unchanged(why) => log::debug!("meta: {msg:?} changes nothing: {why}"),
            Outcome::NotStored => log::debug!("meta: not storing collection {msg:?}"),
            Outcome::Ignored(why) => log::debug!("meta: ignoring {msg:?}: {why}"),
            Outcome::Refused(why) => log::warn!(
                "meta: refusing {} {} {}: {why}",
                msg.route.group,
                msg.route.operation,
                shown(&msg.route.resource)
            ),
            // Not ACKed: the cloud sends it again, by which time the disk may have room.
            Outcome::Failed(e) => log::error!("meta: {e}; not acking {msg:?}"),
        }
        if outcome.is_applied() {
            ctx.hub.ack(&msg);
        }
    }
}

/// What the store did with one message. Only an applied message is ACKed.
#[derive(Debug)]
pub enum Outcome {
    /// The object was written durably to this file.
    Stored(PathBuf),
    /// This file was removed durably (or was already gone).
    Removed(PathBuf),
    /// Already applied, or older than what is stored: nothing was written.
    Unchanged(&'static str),
    /// A valid `<ns>/<type>` key (a list, such as podstatus): there is no one object to keep.
    NotStored,
    /// Nothing to apply (a response without a resourceversion).
    Ignored(&'static str),
    /// An unsafe key, or an operation or group the store does not handle.
    Refused(String),
    /// The write or removal failed; the error names the file.
    Failed(Error),
}

impl Outcome {
    /// True when the message is in effect on disk, so the cloud may stop sending it.
    pub fn is_applied(&self) -> bool {
        matches!(
            self,
            Outcome::Stored(_) | Outcome::Removed(_) | Outcome::Unchanged(_) | Outcome::NotStored
        )
    }
}

/// A resource key whose segments are all safe to use as path components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Object { namespace: &'a str, kind: &'a str, name: &'a str },
    Collection { namespace: &'a str, kind: &'a str },
}

/// Checks a wire resource `<ns>/<type>[/<name>]` (protocol §1.4). Each segment is 1 to 253 bytes
/// of `[A-Za-z0-9._-]` and not `.` or `..`, so no key can name a path outside its folder.
pub fn parse_key(resource: &str) -> Result<Key<'_>, String> {
    // At most four pieces: a fourth one only says "too many", however long the text is.
    let segments: Vec<&str> = resource.splitn(4, '/').collect();
    match segments[..] {
        [namespace, kind] => {
            check_segment(namespace)?;
            check_segment(kind)?;
            Ok(Key::Collection { namespace, kind })
        }
        [namespace, kind, name] => {
            check_segment(namespace)?;
            check_segment(kind)?;
            check_segment(name)?;
            if name.len() > MAX_NAME_BYTES {
                return Err(format!(
                    "name of {} bytes does not fit a file name ({MAX_NAME_BYTES} at most)",
                    name.len()
                ));
            }
            Ok(Key::Object { namespace, kind, name })
        }
        _ => Err("expected <namespace>/<type>/<name> or <namespace>/<type>".to_owned()),
    }
}

fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() || segment.len() > MAX_SEGMENT_BYTES {
        return Err(format!("segment of {} bytes (1 to {MAX_SEGMENT_BYTES})", segment.len()));
    }
    if segment == "." || segment == ".." {
        return Err(format!("segment {segment:?} names a directory"));
    }
    match segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(format!("character {c:?} is not allowed")),
        None => Ok(()),
    }
}

/// Orders two resourceversions as the decimal u64s Kubernetes writes; `None` when either is not
/// one (then the caller cannot tell which is newer).
pub fn compare_versions(incoming: &str, stored: &str) -> Option<Ordering> {
    Some(incoming.parse::<u64>().ok()?.cmp(&stored.parse::<u64>().ok()?))
}

/// What is written for each object.
#[derive(Serialize)]
struct Record<'a> {
    #[serde(rename = "resourceVersion")]
    resource_version: &'a str,
    #[serde(rename = "msgId")]
    msg_id: &'a str,
    content: &'a RawValue,
}

/// The part of a stored record that decides whether a message is new (`content` is skipped).
#[derive(Deserialize)]
struct Stamp {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
    #[serde(rename = "msgId", default)]
    msg_id: String,
}

/// The store: one file per object under `root`. Used by one thread at a time.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root }
    }

    /// Applies one cloud message to disk and says what happened. Never panics.
    pub fn apply(&self, msg: &Message) -> Outcome {
        let route = &msg.route;
        if route.group != group::RESOURCE && route.group != group::FUNC {
            return Outcome::Refused(format!("group {:?} is not stored", route.group));
        }
        let is_delete = match route.operation.as_str() {
            operation::INSERT | operation::UPDATE => false,
            // A query answer nobody asked for still carries an object version worth keeping.
            operation::RESPONSE if !msg.header.resource_version.is_empty() => false,
            operation::RESPONSE => return Outcome::Ignored("response without a resourceversion"),
            operation::DELETE => true,
            other => return Outcome::Refused(format!("operation {other:?} is not handled")),
        };
        let (namespace, kind, name) = match parse_key(&route.resource) {
            Ok(Key::Object { namespace, kind, name }) => (namespace, kind, name),
            Ok(Key::Collection { .. }) => return Outcome::NotStored,
            Err(why) => return Outcome::Refused(why),
        };
        let rv = msg.header.resource_version.as_str();
        if !rv.is_empty() && rv.parse::<u64>().is_err() {
            log::warn!("meta: resourceversion {rv:?} is not a number; treating {msg:?} as newest");
        }
        let dir = self.root.join(namespace).join(kind);
        let path = dir.join(format!("{name}{FILE_SUFFIX}"));
        let stamp = match read_stamp(&path) {
            Ok(stamp) => stamp,
            Err(e) => return Outcome::Failed(e),
        };
        if is_delete {
            let Some(stamp) = stamp else { return Outcome::Removed(path) };
            // A delete of the same version as the stored object came after it: versions only grow.
            if compare_versions(rv, &stamp.resource_version) == Some(Ordering::Less) {
                return Outcome::Unchanged("delete is older than the stored object");
            }
            return match remove_durably(&dir, &path) {
                Ok(()) => Outcome::Removed(path),
                Err(e) => Outcome::Failed(e),
            };
        }
        if let Some(stamp) = stamp {
            if stamp.msg_id == msg.header.id {
                return Outcome::Unchanged("this message is already stored");
            }
            if matches!(
                compare_versions(rv, &stamp.resource_version),
                Some(Ordering::Less | Ordering::Equal)
            ) {
                return Outcome::Unchanged("the stored version is the same or newer");
            }
        }
        let record = Record { resource_version: rv, msg_id: &msg.header.id, content: &msg.content };
        let bytes = match serde_json::to_vec(&record) {
            Ok(bytes) => bytes,
            Err(e) => {
                return Outcome::Failed(
                    ErrorKind::Io.msg(format!("encode {}", path.display())).src(e),
                )
            }
        };
        let written =
            self.make_dirs(namespace, kind).and_then(|()| write_durably(&dir, &path, &bytes));
        match written {
            Ok(()) => Outcome::Stored(path),
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Creates `root/<ns>/<type>`, making each new folder's entry in its parent durable too.
    fn make_dirs(&self, namespace: &str, kind: &str) -> Result<(), Error> {
        if !self.root.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&self.root)
                .map_err(|e| io_error("create", &self.root, e))?;
            if let Some(parent) = self.root.parent() {
                sync_dir(parent)?;
            }
        }
        let ns_dir = self.root.join(namespace);
        let kind_dir = ns_dir.join(kind);
        for (dir, parent) in [(&ns_dir, &self.root), (&kind_dir, &ns_dir)] {
            match DirBuilder::new().mode(DIR_MODE).create(dir) {
                Ok(()) => sync_dir(parent)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("create", dir, e)),
            }
        }
        Ok(())
    }
}

/// The stamp of the stored object, `None` when there is none. An unreadable record (cut short by
/// a crash before this store wrote atomically, or edited by hand) counts as none: it is replaced.
fn read_stamp(path: &Path) -> Result<Option<Stamp>, Error> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open", path, e)),
    };
    match serde_json::from_reader(BufReader::new(file)) {
        Ok(stamp) => Ok(Some(stamp)),
        Err(e) => {
            log::warn!("meta: {} is not a valid record ({e}); replacing it", path.display());
            Ok(None)
        }
    }
}

/// Temp file in the same folder, write, fsync, rename over `path`, fsync the folder: after a crash
/// the file holds either the old record or the new one, never a mix.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let temp = dir.join(TEMP_FILE);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(|e| io_error("write", &temp, e))
        .and_then(|()| fs::rename(&temp, path).map_err(|e| io_error("rename into", path, e)));
    if written.is_err() {
        // Best effort: a leftover temp file is harmless (the next write truncates it).
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(dir)
}

fn remove_durably(dir: &Path, path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path, e)),
    }
}

/// Makes the folder's entries (a rename, a new file or folder, a removal) durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("fsync folder", dir, e))
}

fn io_error(doing: &str, path: &Path, e: io::Error) -> Error {
    ErrorKind::Io.msg(format!("{doing} {}", path.display())).src(e)
}

/// The resource for a log line: quoted (so NULs and newlines show) and cut short.
fn shown(resource: &str) -> String {
    let mut end = resource.len().min(MAX_LOGGED_RESOURCE);
    while !resource.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < resource.len() { "…" } else { "" };
    format!("{:?}{cut}", &resource[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{json_content, Route};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

    /// A folder removed when the test ends.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, AtomicOrdering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("edgehub-meta-store-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn store(&self) -> Store {
            Store::new(self.0.join("state").join(STORE_DIR))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn msg(op: &str, resource: &str, rv: &str, content: &str) -> Message {
        let route = Route {
            source: "edgecontroller".into(),
            group: group::RESOURCE.into(),
            operation: op.into(),
            resource: resource.into(),
            ..Route::default()
        };
        let mut m = Message::new(route, json_content(content).unwrap());
        m.header.resource_version = rv.into();
        m
    }

    fn record(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn keys_with_three_safe_segments_are_objects() {
        assert_eq!(
            parse_key("default/pod/nginx-7c5b9d"),
            Ok(Key::Object { namespace: "default", kind: "pod", name: "nginx-7c5b9d" })
        );
        assert_eq!(
            parse_key("kube-system/configmap/app.cfg_v2"),
            Ok(Key::Object { namespace: "kube-system", kind: "configmap", name: "app.cfg_v2" })
        );
        assert_eq!(
            parse_key("default/podstatus"),
            Ok(Key::Collection { namespace: "default", kind: "podstatus" })
        );
        assert!(parse_key("default/pod/...").is_ok(), "three dots is an ordinary name");
    }

    #[test]
    fn traversal_and_malformed_keys_are_refused() {
        for bad in [
            "../../etc/passwd",
            "../pod/x",
            "default/../x",
            "default/pod/..",
            "default/pod/.",
            "./pod/x",
            "/etc/passwd",
            "/etc/passwd/x",
            "default//x",
            "default/pod/",
            "default/pod/a/b",
            "default/pod/a\0b",
            "default/pod/a\\b",
            "default/pod/a b",
            "default/pod/ümlaut",
            "default",
            "",
            "/",
            "default/",
        ] {
            assert!(parse_key(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn segment_length_limits_hold_at_n_and_n_plus_one() {
        let ok = "n".repeat(MAX_SEGMENT_BYTES);
        let long = "n".repeat(MAX_SEGMENT_BYTES + 1);
        assert!(parse_key(&format!("{ok}/pod")).is_ok());
        assert!(parse_key(&format!("{long}/pod")).is_err());
        assert!(parse_key(&format!("default/{long}/x")).is_err());
        let name = "n".repeat(MAX_NAME_BYTES);
        let name_long = "n".repeat(MAX_NAME_BYTES + 1);
        assert!(parse_key(&format!("default/pod/{name}")).is_ok());
        assert!(parse_key(&format!("default/pod/{name_long}")).is_err());
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(compare_versions("10", "9"), Some(Ordering::Greater));
        assert_eq!(compare_versions("9", "10"), Some(Ordering::Less));
        assert_eq!(compare_versions("482913", "482913"), Some(Ordering::Equal));
        assert_eq!(compare_versions("18446744073709551615", "1"), Some(Ordering::Greater));
        assert_eq!(compare_versions("abc", "1"), None);
        assert_eq!(compare_versions("1", ""), None);
        assert_eq!(compare_versions("18446744073709551616", "1"), None, "beyond u64");
    }

    #[test]
    fn insert_writes_the_record_and_newer_updates_overwrite() {
        let scratch = Scratch::new();
        let store = scratch.store();
        let first = msg("insert", "default/pod/p", "10", r#"{"v":1}"#);
        let Outcome::Stored(path) = store.apply(&first) else { panic!("not stored") };
        assert_eq!(path, scratch.0.join("state/meta/default/pod/p.json"));
        let r = record(&path);
        assert_eq!(r["resourceVersion"], "10");
        assert_eq!(r["msgId"], first.header.id.as_str());
        assert_eq!(r["content"], serde_json::json!({"v": 1}));
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, FILE_MODE);
        assert!(!path.with_file_name(TEMP_FILE).exists(), "temp file renamed away");

        let newer = msg("update", "default/pod/p", "11", r#"{"v":2}"#);
        assert!(matches!(store.apply(&newer), Outcome::Stored(_)));
        assert_eq!(record(&path)["content"], serde_json::json!({"v": 2}));
    }

    #[test]
    fn redelivery_and_older_versions_change_nothing_but_count_as_applied() {
        let scratch = Scratch::new();
        let store = scratch.store();
        let current = msg("insert", "default/pod/p", "10", r#"{"v":10}"#);
        let Outcome::Stored(path) = store.apply(&current) else { panic!("not stored") };
        let inode = fs::metadata(&path).unwrap().ino();
        for again in [
            current.clone(),
            msg("update", "default/pod/p", "9", r#"{"v":9}"#),
            msg("update", "default/pod/p", "10", r#"{"v":"same rv"}"#),
        ] {
            let outcome = store.apply(&again);
            assert!(matches!(outcome, Outcome::Unchanged(_)), "{outcome:?}");
            assert!(outcome.is_applied(), "still ACKed");
        }
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "never rewritten");
        assert_eq!(record(&path)["content"], serde_json::json!({"v": 10}));
    }

    #[test]
    fn non_numeric_version_counts_as_newer() {
        let scratch = Scratch::new();
        let store = scratch.store();
        store.apply(&msg("insert", "default/pod/p", "10", "1"));
        let odd = msg("update", "default/pod/p", "not-a-number", "2");
        let Outcome::Stored(path) = store.apply(&odd) else { panic!("not stored") };
        assert_eq!(record(&path)["resourceVersion"], "not-a-number");
    }

    #[test]
    fn delete_removes_the_file_and_is_idempotent() {
        let scratch = Scratch::new();
        let store = scratch.store();
        let Outcome::Stored(path) = store.apply(&msg("insert", "default/pod/p", "10", "{}")) else {
            panic!("not stored")
        };
        let stale = msg("delete", "default/pod/p", "9", "{}");
        assert!(matches!(store.apply(&stale), Outcome::Unchanged(_)));
        assert!(path.exists(), "a delete older than the object keeps it");
        let delete = msg("delete", "default/pod/p", "10", "{}");
        assert!(matches!(store.apply(&delete), Outcome::Removed(_)));
        assert!(!path.exists());
        let again = store.apply(&delete);
        assert!(matches!(again, Outcome::Removed(_)) && again.is_applied());
    }

    #[test]
    fn refused_ignored_and_collection_outcomes() {
        let scratch = Scratch::new();
        let store = scratch.store();
        let refused = store.apply(&msg("insert", "../../escaped", "1", "{}"));
        assert!(matches!(refused, Outcome::Refused(_)) && !refused.is_applied());
        assert!(!scratch.0.join("escaped.json").exists());
        assert!(matches!(
            store.apply(&msg("query", "default/pod/p", "1", "{}")),
            Outcome::Refused(_)
        ));
        let mut twin = msg("update", "default/pod/p", "1", "{}");
        twin.route.group = group::TWIN.into();
        assert!(matches!(store.apply(&twin), Outcome::Refused(_)));
        assert!(matches!(
            store.apply(&msg("response", "default/pod/p", "", "{}")),
            Outcome::Ignored(_)
        ));
        assert!(matches!(
            store.apply(&msg("response", "default/pod/p", "3", "{}")),
            Outcome::Stored(_)
        ));
        let list = store.apply(&msg("update", "default/podstatus", "4", "[]"));
        assert!(matches!(list, Outcome::NotStored) && list.is_applied());
    }

    #[test]
    fn write_error_names_the_file_and_is_not_applied() {
        let scratch = Scratch::new();
        let store = scratch.store();
        // A file where the `pod` folder should be: fails even for root (no permission tricks).
        fs::create_dir_all(scratch.0.join("state/meta/default")).unwrap();
        fs::write(scratch.0.join("state/meta/default/pod"), "in the way").unwrap();
        let outcome = store.apply(&msg("insert", "default/pod/p", "1", "{}"));
        let Outcome::Failed(e) = &outcome else { panic!("expected failure, got {outcome:?}") };
        assert!(!outcome.is_applied());
        assert!(e.to_string().contains("default/pod"), "{e}");
    }

    #[test]
    fn corrupt_record_is_replaced() {
        let scratch = Scratch::new();
        let store = scratch.store();
        let Outcome::Stored(path) = store.apply(&msg("insert", "default/pod/p", "10", "1")) else {
            panic!("not stored")
        };
        fs::write(&path, "{\"resourceVersion\":\"10\", cut sh").unwrap();
        assert!(matches!(
            store.apply(&msg("update", "default/pod/p", "5", "2")),
            Outcome::Stored(_)
        ));
        assert_eq!(record(&path)["resourceVersion"], "5");
    }

    #[test]
    fn long_resources_are_cut_in_logs() {
        assert_eq!(shown("default/pod/p"), "\"default/pod/p\"");
        let long = "é".repeat(MAX_LOGGED_RESOURCE);
        assert!(shown(&long).ends_with('…'));
        assert!(shown(&long).len() < MAX_LOGGED_RESOURCE + 10);
    }
}
