//! The files and folders the daemon makes, and the folders it keeps them in, are guarded from the
//! other users of the machine: folders are made owner-only, files get the mode asked for (owner
//! only unless `database_mode` says otherwise) whatever the umask, no symbolic link is followed
//! where a file is made, and a folder that other users can write to (who could replace, lock or
//! squat the files in it) is refused, unless it is sticky and the files in it are the daemon's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Write bits for the group and for others.
const WRITABLE_BY_OTHERS: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Creates `folder` and the folders above it that are missing, owner-only whatever the umask
/// (which another thread may have narrowed for a moment, see `with_private_umask`).
pub fn create_private_folder(folder: &Path) -> io::Result<()> {
    if folder.is_dir() {
        return Ok(());
    }
    if let Some(parent) = folder.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_folder(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(folder) {
        Ok(()) => std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700)),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists && folder.is_dir() => Ok(()),
        Err(err) => Err(err),
    }
}

/// Refuses `folder` (which holds `what`) if another user could replace or take the files in
/// it: it is writable by its group or by others and not sticky, or it is sticky but `files`
/// there belong to someone else. With `owned`, the folder must also be this user's (or root's).
pub fn check_folder(folder: &Path, what: &str, files: &[&Path], owned: bool) -> Result<(), String> {
    let meta = std::fs::metadata(folder).map_err(|err| {
        format!(
            "cannot check the folder of {what}, {}: {err}",
            folder.display()
        )
    })?;
    let me = rustix::process::geteuid().as_raw();
    let owner = meta.uid();
    if owned && owner != me && owner != 0 {
        return Err(format!(
            "the folder of {what}, {}, belongs to another user (uid {owner}): put it in a folder of this user's",
            folder.display()
        ));
    }
    let mode = meta.mode();
    if mode & WRITABLE_BY_OTHERS == 0 {
        return Ok(());
    }
    let ours = |file: &&Path| std::fs::symlink_metadata(file).map_or(true, |m| m.uid() == me);
    if mode & STICKY != 0 && !owned && files.iter().all(ours) {
        return Ok(());
    }
    Err(format!(
        "the folder of {what}, {}, can be written by other users (mode {:04o}): another user could replace or lock its files; use a folder only its owner can write to",
        folder.display(),
        mode & 0o7777
    ))
}

/// Opens `path` for writing, creating it with `mode` if it does not exist (the mode exactly,
/// whatever the umask); never through a symbolic link.
pub fn open_private(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|err| {
            if err.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                io::Error::other(format!(
                    "{} is a symbolic link: refusing to follow it",
                    path.display()
                ))
            } else {
                err
            }
        })?;
    let meta = file.metadata()?;
    // Made just now (empty, ours): the umask may have taken bits away that the mode asks for.
    if meta.len() == 0 && meta.mode() & 0o777 != mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(file)
}

/// Runs `make` with a umask that leaves what it creates owner-only, then restores the umask:
/// for a socket, which `bind` creates with the umask's leftovers.
pub fn with_private_umask<T>(make: impl FnOnce() -> T) -> T {
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let made = make();
    rustix::process::umask(previous);
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_get_their_mode_whatever_the_umask_and_links_are_not_followed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("data/db");
        create_private_folder(file.parent().unwrap_or(dir.path()))?;
        let folder_mode = std::fs::metadata(dir.path().join("data"))?.mode() & 0o777;
        assert_eq!(folder_mode, 0o700);
        drop(with_private_umask(|| open_private(&file, 0o640))?);
        assert_eq!(std::fs::metadata(&file)?.mode() & 0o777, 0o640);

        let target = dir.path().join("someone-elses");
        std::fs::write(&target, "keep")?;
        let link = dir.path().join("data/db.lock");
        std::os::unix::fs::symlink(&target, &link)?;
        let err = open_private(&link, 0o600).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("symbolic link")));
        assert_eq!(std::fs::read_to_string(&target)?, "keep");
        Ok(())
    }

    #[test]
    fn a_folder_others_can_write_to_is_refused_unless_sticky_with_our_files() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let open = dir.path().join("open");
        std::fs::create_dir(&open)?;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777))?;
        let file = open.join("db");
        let err = check_folder(&open, "the database", &[&file], false).err();
        assert!(err.is_some_and(|e| e.contains("can be written by other users (mode 0777)")));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777))?;
        assert!(check_folder(&open, "the database", &[&file], false).is_ok());
        // A socket's folder must also be owned: sticky is not enough.
        assert!(check_folder(&open, "the control socket", &[], true).is_err());
        assert!(check_folder(dir.path(), "the control socket", &[], true).is_ok());
        Ok(())
    }
}
