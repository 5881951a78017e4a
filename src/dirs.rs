//! Creating the agent's own directories (`stateDir`, its spool and store, the certificate store)
//! so that they are private and survive a power cut: every missing component gets exactly the
//! mode asked for, whatever the umask, and each new directory's entry is made durable by an
//! fsync of its parent before anything written inside it is trusted to be on disk.

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` and any missing parents with `mode` (exactly: the umask is undone with a
/// chmod), fsyncing the parent of each one created. Existing components are left as they are.
/// Returns the directories created, outermost first.
///
/// # Errors
/// The first creation, chmod or fsync that fails.
pub fn create_durable(dir: &Path, mode: u32) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.as_os_str().is_empty() && !at.is_dir() {
        missing.push(at.to_owned());
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    let mut created = Vec::new();
    for new in missing.into_iter().rev() {
        match DirBuilder::new().mode(mode).create(&new) {
            Ok(()) => {}
            // Made meanwhile by someone else: theirs to make durable.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && new.is_dir() => continue,
            Err(e) => return Err(e),
        }
        fs::set_permissions(&new, fs::Permissions::from_mode(mode))?;
        sync_parent(&new)?;
        created.push(new);
    }
    Ok(created)
}

/// Sets `path`'s mode to `mode` if it has other permission bits (say, a directory an older
/// version created with the umask's 0755). Returns whether it changed anything.
///
/// # Errors
/// Reading the metadata or the chmod failed.
pub fn restrict(path: &Path, mode: u32) -> io::Result<bool> {
    let current = fs::metadata(path)?.permissions().mode() & 0o7777;
    if current == mode {
        return Ok(false);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// fsyncs the directory holding `path`, which makes `path`'s entry in it durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edgehub-dirs-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_every_missing_component_with_the_exact_mode_and_reports_them() {
        let root = scratch("create");
        let state = root.join("state");
        let spool = state.join("spool");
        let created = create_durable(&spool, 0o700).unwrap();
        assert_eq!(created, vec![state.clone(), spool.clone()]);
        assert_eq!((mode(&state), mode(&spool)), (0o700, 0o700));
        // The parent that existed is left alone; a second call creates nothing.
        assert_eq!(mode(&root) & 0o700, 0o700);
        assert!(create_durable(&spool, 0o700).unwrap().is_empty());
        // A mode the umask would cut (group write) is set exactly too.
        let shared = root.join("shared");
        create_durable(&shared, 0o770).unwrap();
        assert_eq!(mode(&shared), 0o770);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn restrict_tightens_a_looser_mode_once() {
        let root = scratch("restrict");
        let dir = root.join("old");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(restrict(&dir, 0o700).unwrap());
        assert_eq!(mode(&dir), 0o700);
        assert!(!restrict(&dir, 0o700).unwrap());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_path_under_a_file_is_an_error() {
        let root = scratch("file");
        let file = root.join("f");
        fs::write(&file, b"x").unwrap();
        assert!(create_durable(&file.join("sub"), 0o700).is_err());
        let _ = fs::remove_dir_all(&root);
    }
}
