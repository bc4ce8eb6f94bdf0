//! NBD exports: one interface over two engines (nbdkit, nbd-server), a
//! manager that serialises and batches changes under a per-host lock, live
//! checks through the NBD protocol, and supervision of the server process.
//!
//! Invariants kept here: an export name is derived from its volume id (so it
//! can never name another volume), and an export always points at the
//! volume's stable by-id path, never at a recyclable `/dev/vdX` name. Both
//! are checked before anything is written.

pub mod manager;
pub mod nbd_server;
pub mod nbdkit;
pub mod process;
pub mod proto;

use std::path::{Component, Path, PathBuf};

use uuid::Uuid;

use crate::backend::by_id_name;

/// A validated export name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExportName(String);

impl ExportName {
    /// The export name of a volume: `vol-<uuid>`.
    pub fn for_volume(volume: Uuid) -> ExportName {
        ExportName(format!("vol-{volume}"))
    }

    /// Validates a name read from elsewhere (a file, the database).
    pub fn parse(s: &str) -> Result<ExportName, InvalidExport> {
        validate_name(s)?;
        Ok(ExportName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The volume a `vol-<uuid>` name belongs to.
    pub fn volume(&self) -> Option<Uuid> {
        self.0
            .strip_prefix("vol-")
            .and_then(crate::contract::parse_uuid)
    }
}

impl std::fmt::Display for ExportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid export: {0}")]
pub struct InvalidExport(pub String);

/// Export names go into nbd-server section headers and file names: only
/// `[a-z0-9._-]`, starting with a letter or digit, at most 64 bytes.
pub fn validate_name(s: &str) -> Result<(), InvalidExport> {
    let bad = |why: &str| Err(InvalidExport(format!("export name {s:?} {why}")));
    if s.is_empty() || s.len() > 64 {
        return bad("must be 1 to 64 characters long");
    }
    if !s.is_ascii() {
        return bad("contains non-ASCII characters");
    }
    if s.contains("..") {
        return bad("contains `..`");
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return bad(&format!("contains the character {c:?}"));
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("must start with a letter or a digit");
    }
    Ok(())
}

/// Paths go into nbd-server configuration lines: refuse anything that could
/// end the line, open a section, start a key or a comment, or climb the tree.
pub fn validate_path(p: &Path) -> Result<(), InvalidExport> {
    let s = p
        .to_str()
        .ok_or_else(|| InvalidExport(format!("path {p:?} is not UTF-8")))?;
    let bad = |why: &str| Err(InvalidExport(format!("path {s:?} {why}")));
    if !p.is_absolute() {
        return bad("is not absolute");
    }
    if !s.is_ascii() {
        return bad("contains non-ASCII characters");
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_ascii_control() || matches!(c, '[' | ']' | '=' | '#' | ';' | '\\'))
    {
        return bad(&format!("contains the character {c:?}"));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return bad("contains `..` or `.` components");
    }
    Ok(())
}

/// One export to serve: a volume's stable device path under its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: ExportName,
    pub volume: Uuid,
    pub path: PathBuf,
}

impl ExportSpec {
    /// The export of `volume`, whose device link lives in `device_dir`.
    /// Refused when the path is not exactly the volume's by-id link.
    pub fn new(volume: Uuid, path: &Path, device_dir: &Path) -> Result<ExportSpec, InvalidExport> {
        validate_path(path)?;
        validate_path(device_dir)?;
        let expected = device_dir.join(by_id_name(volume));
        if path != expected {
            return Err(InvalidExport(format!(
                "path {} is not the stable by-id path {} of volume {volume}",
                path.display(),
                expected.display()
            )));
        }
        Ok(ExportSpec {
            name: ExportName::for_volume(volume),
            volume,
            path: path.to_owned(),
        })
    }

    /// Checks a spec that did not come from [`ExportSpec::new`].
    pub fn validate(&self) -> Result<(), InvalidExport> {
        validate_name(self.name.as_str())?;
        validate_path(&self.path)?;
        if self.name != ExportName::for_volume(self.volume) {
            return Err(InvalidExport(format!(
                "export name {} does not belong to volume {}",
                self.name, self.volume
            )));
        }
        let file = self.path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if file != by_id_name(self.volume) {
            return Err(InvalidExport(format!(
                "path {} is not the by-id link of volume {}",
                self.path.display(),
                self.volume
            )));
        }
        Ok(())
    }
}

/// The engine a configuration names.
pub fn engine_for(cfg: &crate::config::NbdConfig) -> std::sync::Arc<dyn Engine> {
    match cfg.engine {
        crate::config::NbdEngineKind::Nbdkit => std::sync::Arc::new(nbdkit::Nbdkit::new(cfg)),
        crate::config::NbdEngineKind::NbdServer => {
            std::sync::Arc::new(nbd_server::NbdServer::new(cfg))
        }
    }
}

/// An export engine: how exports are written, withdrawn and made visible to
/// one kind of NBD server. Methods that touch files are called by the
/// manager with the per-host lock held; they are small synchronous file
/// operations (a few hundred bytes each), done in place.
pub trait Engine: Send + Sync + 'static {
    fn kind(&self) -> crate::config::NbdEngineKind;
    /// The server's executable name.
    fn program(&self) -> &'static str;
    /// The lock file beside the configuration, shared by every process
    /// that changes it.
    fn lock_path(&self) -> PathBuf;
    /// Creates what the engine needs and repairs a damaged configuration.
    fn prepare(&self) -> anyhow::Result<()>;
    /// The command that starts the server in the background, writing
    /// `pidfile`.
    fn server_command(&self, pidfile: &Path) -> tokio::process::Command;
    /// Writes `spec`; true when the running server must reload to see it.
    fn write(&self, spec: &ExportSpec) -> std::io::Result<bool>;
    /// Refuses new connections to `name` at once and removes it from the
    /// configuration. Withdrawing an absent export does nothing.
    fn withdraw(&self, name: &ExportName) -> std::io::Result<()>;
    /// Like [`Engine::write`], leaving the directory sync to a later
    /// [`Engine::sync`], so a batch of changes costs one directory fsync.
    /// The change is visible to the server at once either way.
    fn write_unsynced(&self, spec: &ExportSpec) -> std::io::Result<bool> {
        self.write(spec)
    }
    /// Like [`Engine::withdraw`], leaving the directory sync to
    /// [`Engine::sync`].
    fn withdraw_unsynced(&self, name: &ExportName) -> std::io::Result<()> {
        self.withdraw(name)
    }
    /// Makes the changes made by the `_unsynced` calls durable.
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// The exports in the configuration, with the path each serves.
    fn configured(&self) -> std::io::Result<Vec<(ExportName, PathBuf)>>;
    /// Makes the running server read added exports; `None` when the engine
    /// needs no reload.
    fn reload(&self, pid: nix::unistd::Pid) -> Option<std::io::Result<()>>;
    /// The server (re)started or was adopted; `serving` is what it lists.
    fn started(&self, serving: &[String]);
    /// Exports the running server still holds although they were removed
    /// from the configuration (nbd-server keeps them until a restart).
    fn stale(&self) -> Vec<String>;
}

/// Replaces `dest` atomically and durably: temporary file, fsync, rename,
/// fsync of the directory.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no parent", dest.display())))?;
    let file = dest
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", dest.display())))?;
    let tmp = dir.join(format!(".{file}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dest)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes a file; an absent file is not an error.
pub fn remove_if_present(p: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_strict() {
        let vol = Uuid::new_v4();
        assert!(validate_name(ExportName::for_volume(vol).as_str()).is_ok());
        assert_eq!(ExportName::for_volume(vol).volume(), Some(vol));
        for bad in [
            "",
            "a\nb",
            "[generic]",
            "a=b",
            "a/b",
            "..",
            "a..b",
            "ünï",
            "-lead",
            "UPPER",
            "sp ace",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn paths_are_strict_and_must_be_the_volume_link() {
        let vol = Uuid::new_v4();
        let dir = Path::new("/dev/disk/by-id");
        let good = dir.join(by_id_name(vol));
        assert!(ExportSpec::new(vol, &good, dir).is_ok());
        for bad in [
            "/dev/vdc".to_string(),
            format!("/dev/disk/by-id/{}\n[x]", by_id_name(vol)),
            format!("/dev/disk/by-id/../by-id/{}", by_id_name(vol)),
            format!("/dev/disk/by-id/{}=1", by_id_name(vol)),
            format!("/dev/disk/by-îd/{}", by_id_name(vol)),
            format!("dev/disk/by-id/{}", by_id_name(vol)),
            format!("/dev/disk/by-id/{}", by_id_name(Uuid::new_v4())),
        ] {
            assert!(
                ExportSpec::new(vol, Path::new(&bad), dir).is_err(),
                "{bad:?} accepted"
            );
        }
        let mut spec = ExportSpec::new(vol, &good, dir).expect("valid");
        spec.volume = Uuid::new_v4();
        assert!(
            spec.validate().is_err(),
            "a name never serves another volume"
        );
    }
}
