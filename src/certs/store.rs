//! The edge's key and certificate on disk, switched as one pair so that a crash at any moment
//! leaves the old pair or the new pair, never one of each (KubeEdge writes them as two separate
//! files, protocol §8 W19). Also the plain atomic file write used for the CA.
//!
//! Layout, for `tlsPrivateKeyFile = <dir>/edge.key` and `tlsCertFile = <cdir>/edge.crt`:
//!
//! ```text
//! <dir>/.edge.key.pairs/                 the store (0755), next to the key
//!     g-3f9c0e…/key.pem   (0600)          one generation: a key and its certificate
//!     g-3f9c0e…/cert.pem  (0644)
//!     current -> g-3f9c0e…                the one switch
//! <dir>/edge.key  -> .edge.key.pairs/current/key.pem
//! <cdir>/edge.crt -> .edge.key.pairs/current/cert.pem   (absolute target when cdir ≠ dir)
//! ```
//!
//! The configured paths are symlinks through `current`, so every reader (the link's dial included,
//! which opens the configured paths as plain files) sees whichever generation `current` names.
//! Installing a pair: build the generation under a temporary name (`g-….tmp`), write the key and
//! the certificate into it, fsync both and the directory, rename it to its final name, fsync the
//! store; then make a new symlink `current.tmp-…` and rename it over `current` (rename(2) replaces
//! atomically), fsync the store. That rename is the only commit point: before it every reader sees
//! the old generation, after it the new one. Old generations are deleted afterwards; a crash
//! before that only leaves garbage that the next install removes.
//!
//! Adoption: when the configured paths are not yet our symlinks (first install, or files an
//! operator or edgecore put there), the pair they show now is first copied into a generation and
//! committed, and only then is each path replaced by its symlink (a new symlink renamed over it).
//! Every path therefore shows the same bytes before and after each step, so even a crash between
//! the two replacements shows a consistent pair. When only one of the two files exists there is
//! no pair to keep: `current` is removed first, so a half-made path can only dangle (the pair is
//! then missing, and the agent joins again), never point at a key of another pair.
//!
//! One writer at a time: callers hold [`crate::certs::pair_lock`]; a second process writing the
//! same store concurrently (`edgehub join` while the agent rotates) is not supported.
//! [`CrashPoint`] lets tests stop an install at each step, exactly as a crash would leave it.

use crate::error::{ErrorKind, Result};
use crate::message::random_u64;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the private key file (never group- or world-readable, unlike HEAD's 0622, §8 W23).
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificate files (public material).
pub const CERT_MODE: u32 = 0o644;
/// Mode of directories created here (edgecore uses 0755).
pub const DIR_MODE: u32 = 0o755;

const STORE_SUFFIX: &str = ".pairs";
const CURRENT: &str = "current";
const KEY_NAME: &str = "key.pem";
const CERT_NAME: &str = "cert.pem";
const GENERATION_PREFIX: &str = "g-";
const TEMP_MARK: &str = ".tmp";

/// Where an install stops when a test asks it to "crash" there. The disk is left exactly as a
/// crash at that moment would leave it (nothing is cleaned up).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Adoption: the old pair was copied and committed, no path replaced yet.
    AdoptCommitted,
    /// Adoption: the certificate path is a symlink, the key path still the old file.
    AfterCertLink,
    /// Between the two file writes: the new key is on disk, its certificate not yet.
    BetweenKeyAndCert,
    /// The new generation is complete, `current` still names the old one.
    BeforeCommit,
    /// `current` names the new generation; old generations not yet removed.
    AfterCommit,
}

impl CrashPoint {
    pub const ALL: [CrashPoint; 5] = [
        CrashPoint::AdoptCommitted,
        CrashPoint::AfterCertLink,
        CrashPoint::BetweenKeyAndCert,
        CrashPoint::BeforeCommit,
        CrashPoint::AfterCommit,
    ];
}

/// The two configured paths and the store that backs them.
#[derive(Clone, Debug)]
pub struct PairPaths {
    pub key: PathBuf,
    pub cert: PathBuf,
    store: PathBuf,
    store_name: String,
}

impl PairPaths {
    /// # Errors
    /// `Config` when the key path has no file name or both keys name the same file.
    pub fn new(key: &Path, cert: &Path) -> Result<PairPaths> {
        let Some(key_name) = key.file_name().and_then(|n| n.to_str()) else {
            return Err(
                ErrorKind::Config.msg(format!("tlsPrivateKeyFile {}: no file name", key.display()))
            );
        };
        if cert.file_name().is_none() {
            return Err(
                ErrorKind::Config.msg(format!("tlsCertFile {}: no file name", cert.display()))
            );
        }
        if key == cert {
            return Err(ErrorKind::Config.msg(format!(
                "tlsCertFile and tlsPrivateKeyFile are the same file {}",
                key.display()
            )));
        }
        let store_name = format!(".{key_name}{STORE_SUFFIX}");
        let store = parent_of(key).join(&store_name);
        Ok(PairPaths { key: key.to_owned(), cert: cert.to_owned(), store, store_name })
    }

    /// The store directory (for tests and diagnostics).
    pub fn store(&self) -> &Path {
        &self.store
    }

    fn key_target(&self) -> PathBuf {
        Path::new(&self.store_name).join(CURRENT).join(KEY_NAME)
    }

    fn cert_target(&self) -> Result<PathBuf> {
        let relative = Path::new(&self.store_name).join(CURRENT).join(CERT_NAME);
        let key_dir = parent_of(&self.key);
        let cert_dir = parent_of(&self.cert);
        if key_dir == cert_dir {
            return Ok(relative);
        }
        let key_dir = fs::canonicalize(key_dir).map_err(|e| {
            ErrorKind::Io.msg(format!("resolve directory {}", key_dir.display())).src(e)
        })?;
        Ok(key_dir.join(relative))
    }
}

/// A path's directory, `.` for a bare file name.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Installs a new key and certificate as one pair (see the file doc). Callers hold the pair lock.
///
/// # Errors
/// `Io` naming the file or directory that could not be written; the old pair is then still in
/// place (or, during a first adoption, a consistent copy of it).
pub fn install(paths: &PairPaths, key_pem: &[u8], cert_pem: &[u8]) -> Result<()> {
    install_crashing(paths, key_pem, cert_pem, None)
}

/// [`install`], stopping dead at `crash` as a crash would (test hook).
///
/// # Errors
/// As [`install`], and `Stopped` ("simulated crash") when it stopped at `crash`.
#[doc(hidden)]
pub fn install_crashing(
    paths: &PairPaths,
    key_pem: &[u8],
    cert_pem: &[u8],
    crash: Option<CrashPoint>,
) -> Result<()> {
    let stop_at = |point: CrashPoint| {
        if crash == Some(point) {
            Err(ErrorKind::Stopped.msg(format!("simulated crash at {point:?}")))
        } else {
            Ok(())
        }
    };
    create_dirs(parent_of(&paths.key))?;
    create_dirs(parent_of(&paths.cert))?;
    create_dirs(&paths.store)?;
    let key_target = paths.key_target();
    let cert_target = paths.cert_target()?;
    let linked = is_link_to(&paths.key, &key_target) && is_link_to(&paths.cert, &cert_target);
    if !linked {
        // Adoption: keep showing what the paths show now while they become symlinks.
        match (fs::read(&paths.key), fs::read(&paths.cert)) {
            (Ok(old_key), Ok(old_cert)) => {
                let generation = write_generation(paths, &old_key, &old_cert, None)?;
                commit(paths, &generation)?;
                stop_at(CrashPoint::AdoptCommitted)?;
            }
            _ => remove_current(paths)?,
        }
        replace_with_symlink(&paths.cert, &cert_target)?;
        stop_at(CrashPoint::AfterCertLink)?;
        replace_with_symlink(&paths.key, &key_target)?;
    }
    let generation = write_generation(paths, key_pem, cert_pem, crash)?;
    stop_at(CrashPoint::BeforeCommit)?;
    commit(paths, &generation)?;
    stop_at(CrashPoint::AfterCommit)?;
    clean_up(paths, &generation);
    Ok(())
}

/// Writes `<store>/g-<random>` with both files, under a temporary name until complete.
fn write_generation(
    paths: &PairPaths,
    key_pem: &[u8],
    cert_pem: &[u8],
    crash: Option<CrashPoint>,
) -> Result<String> {
    let name = format!("{GENERATION_PREFIX}{:016x}", random_u64());
    let temp = paths.store.join(format!("{name}{TEMP_MARK}"));
    let dir_err = |e| ErrorKind::Io.msg(format!("create directory {}", temp.display())).src(e);
    DirBuilder::new().mode(DIR_MODE).create(&temp).map_err(dir_err)?;
    set_mode(&temp, DIR_MODE)?;
    write_new_file(&temp.join(KEY_NAME), key_pem, KEY_MODE)?;
    if crash == Some(CrashPoint::BetweenKeyAndCert) {
        return Err(ErrorKind::Stopped.msg("simulated crash at BetweenKeyAndCert"));
    }
    write_new_file(&temp.join(CERT_NAME), cert_pem, CERT_MODE)?;
    sync_dir(&temp)?;
    let done = paths.store.join(&name);
    fs::rename(&temp, &done).map_err(|e| {
        ErrorKind::Io.msg(format!("rename {} to {}", temp.display(), done.display())).src(e)
    })?;
    sync_dir(&paths.store)?;
    Ok(name)
}

/// Points `current` at `generation`: the commit.
fn commit(paths: &PairPaths, generation: &str) -> Result<()> {
    let temp = paths.store.join(format!("{CURRENT}{TEMP_MARK}-{:016x}", random_u64()));
    symlink(generation, &temp)
        .map_err(|e| ErrorKind::Io.msg(format!("create symlink {}", temp.display())).src(e))?;
    let current = paths.store.join(CURRENT);
    fs::rename(&temp, &current).map_err(|e| {
        ErrorKind::Io.msg(format!("rename {} to {}", temp.display(), current.display())).src(e)
    })?;
    sync_dir(&paths.store)
}

fn remove_current(paths: &PairPaths) -> Result<()> {
    let current = paths.store.join(CURRENT);
    match fs::remove_file(&current) {
        Ok(()) => sync_dir(&paths.store),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ErrorKind::Io.msg(format!("remove {}", current.display())).src(e)),
    }
}

fn is_link_to(path: &Path, target: &Path) -> bool {
    fs::read_link(path).is_ok_and(|t| t == target)
}

/// Replaces whatever is at `path` by a symlink to `target`, atomically.
fn replace_with_symlink(path: &Path, target: &Path) -> Result<()> {
    let temp = sibling_temp(path);
    symlink(target, &temp)
        .map_err(|e| ErrorKind::Io.msg(format!("create symlink {}", temp.display())).src(e))?;
    fs::rename(&temp, path).map_err(|e| {
        let _ = fs::remove_file(&temp);
        ErrorKind::Io.msg(format!("replace {} by a symlink", path.display())).src(e)
    })?;
    sync_dir(parent_of(path))
}

/// `<dir>/.<name>.tmp-<random>`: a hidden temporary name next to `path`.
fn sibling_temp(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}{TEMP_MARK}-{:016x}", random_u64()))
}

/// Removes every generation but `keep`, and temporaries a crash left behind. Failures only cost
/// disk space, so they are logged, not returned.
fn clean_up(paths: &PairPaths, keep: &str) {
    if let Ok(entries) = fs::read_dir(&paths.store) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_generation = name.starts_with(GENERATION_PREFIX) && name != keep;
            let stale_temp = name.starts_with(&format!("{CURRENT}{TEMP_MARK}"));
            let path = entry.path();
            let removed = if stale_generation {
                fs::remove_dir_all(&path)
            } else if stale_temp {
                fs::remove_file(&path)
            } else {
                continue;
            };
            if let Err(e) = removed {
                log::warn!("cannot remove old certificate files {}: {e}", path.display());
            }
        }
    }
    for path in [&paths.key, &paths.cert] {
        let prefix = format!(
            ".{}{TEMP_MARK}-",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        );
        let Ok(entries) = fs::read_dir(parent_of(path)) else { continue };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Writes `contents` to `path` through a temporary file in the same directory: create with
/// `mode`, write, fsync, rename over `path`, fsync the directory. A reader sees the old file or
/// the new one, whole.
///
/// # Errors
/// `Io` naming the file.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    create_dirs(parent_of(path))?;
    let temp = sibling_temp(path);
    if let Err(e) = write_new_file(&temp, contents, mode) {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    fs::rename(&temp, path).map_err(|e| {
        let _ = fs::remove_file(&temp);
        ErrorKind::Io.msg(format!("rename {} to {}", temp.display(), path.display())).src(e)
    })?;
    sync_dir(parent_of(path))
}

/// Creates a file that must not exist yet, with exactly `mode` (whatever the umask), and fsyncs it.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let context = || format!("write {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| ErrorKind::Io.msg(context()).src(e))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all())
        .map_err(|e| ErrorKind::Io.msg(context()).src(e))
}

/// Creates `dir` and its missing parents (mode [`DIR_MODE`]), each new entry made durable in its
/// parent, so a power cut after a join cannot lose the folder that holds the new pair.
fn create_dirs(dir: &Path) -> Result<()> {
    crate::dirs::create_durable(dir, DIR_MODE)
        .map(drop)
        .map_err(|e| ErrorKind::Io.msg(format!("create directory {}", dir.display())).src(e))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| ErrorKind::Io.msg(format!("chmod {}", path.display())).src(e))
}

/// Makes a directory's entries (creations, renames) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ErrorKind::Io.msg(format!("fsync directory {}", dir.display())).src(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "edgehub-store-{tag}-{}-{:x}",
            std::process::id(),
            random_u64()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn shown(paths: &PairPaths) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        (fs::read(&paths.key).ok(), fs::read(&paths.cert).ok())
    }

    /// Every crash point, from regular files and from an installed pair: the paths show the old
    /// pair or the new one, never one of each; a later install repairs and cleans up.
    #[test]
    fn a_crash_at_any_point_leaves_one_whole_pair() {
        for start_linked in [false, true] {
            for point in CrashPoint::ALL {
                let dir = temp_dir("crash");
                let paths = PairPaths::new(&dir.join("edge.key"), &dir.join("edge.crt")).unwrap();
                if start_linked {
                    install(&paths, b"key-0", b"cert-0").unwrap();
                } else {
                    fs::write(&paths.key, b"key-0").unwrap();
                    fs::write(&paths.cert, b"cert-0").unwrap();
                }
                let e = install_crashing(&paths, b"key-1", b"cert-1", Some(point));
                let old = (Some(b"key-0".to_vec()), Some(b"cert-0".to_vec()));
                let new = (Some(b"key-1".to_vec()), Some(b"cert-1".to_vec()));
                let seen = shown(&paths);
                // Adoption steps only happen when the paths are not yet symlinks.
                let reached = !start_linked
                    || !matches!(point, CrashPoint::AdoptCommitted | CrashPoint::AfterCertLink);
                let expected = if !reached {
                    e.unwrap();
                    new
                } else {
                    assert_eq!(e.unwrap_err().kind(), ErrorKind::Stopped);
                    if point == CrashPoint::AfterCommit {
                        new
                    } else {
                        old
                    }
                };
                assert_eq!(seen, expected, "{point:?} linked={start_linked}");
                install(&paths, b"key-2", b"cert-2").unwrap();
                assert_eq!(shown(&paths), (Some(b"key-2".to_vec()), Some(b"cert-2".to_vec())));
                let left: Vec<_> = fs::read_dir(paths.store())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert_eq!(left.len(), 2, "one generation and current: {left:?}");
                let strays = fs::read_dir(&dir).unwrap().filter(|e| {
                    e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp-")
                });
                assert_eq!(strays.count(), 0);
                fs::remove_dir_all(&dir).unwrap();
            }
        }
    }

    #[test]
    fn modes_and_separate_directories() {
        let dir = temp_dir("modes");
        let paths =
            PairPaths::new(&dir.join("private/edge.key"), &dir.join("public/edge.crt")).unwrap();
        install(&paths, b"k", b"c").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&paths.key), KEY_MODE);
        assert_eq!(mode(&paths.cert), CERT_MODE);
        assert!(fs::read_link(&paths.cert).unwrap().is_absolute());
        assert_eq!(fs::read(&paths.cert).unwrap(), b"c");
        let ca = dir.join("ca/ca.crt");
        write_file_atomic(&ca, b"ca", CERT_MODE).unwrap();
        write_file_atomic(&ca, b"ca2", CERT_MODE).unwrap();
        assert_eq!(fs::read(&ca).unwrap(), b"ca2");
        assert_eq!(mode(&ca), CERT_MODE);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_one_file_present_is_never_shown_with_another_key() {
        let dir = temp_dir("half");
        let paths = PairPaths::new(&dir.join("edge.key"), &dir.join("edge.crt")).unwrap();
        install(&paths, b"key-0", b"cert-0").unwrap();
        // An operator replaces the key by a regular file and deletes the certificate.
        fs::remove_file(&paths.key).unwrap();
        fs::write(&paths.key, b"stray").unwrap();
        fs::remove_file(&paths.cert).unwrap();
        let e = install_crashing(&paths, b"key-1", b"cert-1", Some(CrashPoint::AfterCertLink));
        assert!(e.is_err());
        // The certificate path dangles (current was removed): no mixed pair is ever shown.
        assert_eq!(shown(&paths), (Some(b"stray".to_vec()), None));
        fs::remove_dir_all(&dir).unwrap();
    }
}
