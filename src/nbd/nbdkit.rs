//! The nbdkit engine: one `nbdkit file dir=<export dir>` serves every entry
//! of the export directory under its file name, resolved when a client
//! connects. An export is a symlink to the volume's by-id path, made by
//! rename (atomic); withdrawing it is an unlink, after which new connections
//! are refused at once. There is no reload.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{remove_if_present, sync_dir, Engine, ExportName, ExportSpec};
use crate::config::{NbdConfig, NbdEngineKind};

pub struct Nbdkit {
    dir: PathBuf,
    port: u16,
    listen: String,
    tls_psk: Option<PathBuf>,
}

impl Nbdkit {
    pub fn new(cfg: &NbdConfig) -> Self {
        Nbdkit {
            dir: cfg.config.clone(),
            port: cfg.port,
            listen: cfg.listen.clone(),
            tls_psk: cfg.tls_psk.clone(),
        }
    }

    fn link(&self, name: &ExportName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    /// nbdkit's arguments: bound to the listen address only (`-i`), since
    /// nbdkit's own default is every address, TLS when a key file is set.
    fn server_args(&self, pidfile: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--port".into(),
            self.port.to_string().into(),
            "-i".into(),
            self.listen.clone().into(),
            "--pidfile".into(),
            pidfile.into(),
        ];
        if let Some(psk) = &self.tls_psk {
            a.push("--tls=require".into());
            a.push(format!("--tls-psk={}", psk.display()).into());
        }
        a.push("file".into());
        a.push(format!("dir={}", self.dir.display()).into());
        a
    }
}

impl Engine for Nbdkit {
    fn kind(&self) -> NbdEngineKind {
        NbdEngineKind::Nbdkit
    }

    fn program(&self) -> &'static str {
        "nbdkit"
    }

    fn lock_path(&self) -> PathBuf {
        // Beside the directory, not in it: every entry in it is an export.
        let mut p = self.dir.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }

    fn prepare(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create the export directory {}", self.dir.display()))
    }

    fn server_command(&self, pidfile: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("nbdkit");
        // The server is not the service systemd supervises: keep it from
        // speaking for volumed on the notification socket.
        c.env_remove("NOTIFY_SOCKET");
        c.args(self.server_args(pidfile));
        c
    }

    fn write(&self, spec: &ExportSpec) -> std::io::Result<bool> {
        let reload = self.write_unsynced(spec)?;
        self.sync()?;
        Ok(reload)
    }

    fn withdraw(&self, name: &ExportName) -> std::io::Result<()> {
        self.withdraw_unsynced(name)?;
        self.sync()
    }

    fn sync(&self) -> std::io::Result<()> {
        sync_dir(&self.dir)
    }

    fn write_unsynced(&self, spec: &ExportSpec) -> std::io::Result<bool> {
        let link = self.link(&spec.name);
        // A new export is one symlink(2), which makes the entry with its
        // target at once: a client never sees a half-made export.
        match std::os::unix::fs::symlink(&spec.path, &link) {
            Ok(()) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if std::fs::read_link(&link).ok().as_deref() == Some(spec.path.as_path()) {
            return Ok(false);
        }
        // An export that points elsewhere is replaced by a link made under
        // a hidden temporary name, then renamed over it: a client sees the
        // old target or the new one, never no export.
        let tmp = self.dir.join(format!(".{}.tmp", spec.name));
        remove_if_present(&tmp)?;
        std::os::unix::fs::symlink(&spec.path, &tmp)?;
        std::fs::rename(&tmp, &link)?;
        Ok(false)
    }

    fn withdraw_unsynced(&self, name: &ExportName) -> std::io::Result<()> {
        remove_if_present(&self.link(name))?;
        Ok(())
    }

    fn configured(&self) -> std::io::Result<Vec<(ExportName, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Temporary links and anything not named like an export are
            // not exports volumed made.
            let Ok(name) = ExportName::parse(&name) else {
                continue;
            };
            if let Ok(target) = std::fs::read_link(entry.path()) {
                out.push((name, target));
            }
        }
        out.sort();
        Ok(out)
    }

    fn reload(&self, _pid: nix::unistd::Pid) -> Option<std::io::Result<()>> {
        None
    }

    fn started(&self, _serving: &[String]) {}

    fn stale(&self) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg(listen: &str, tls_psk: Option<PathBuf>) -> NbdConfig {
        NbdConfig {
            engine: NbdEngineKind::Nbdkit,
            config: PathBuf::from("/var/lib/volumed/exports"),
            port: 10809,
            listen: listen.into(),
            allow: Vec::new(),
            manage: true,
            pidfile: PathBuf::from("/run/nbdkit.pid"),
            tls_psk,
            batch_window: Duration::ZERO,
            check_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
        }
    }

    fn args(cfg: &NbdConfig) -> Vec<String> {
        Nbdkit::new(cfg)
            .server_args(&cfg.pidfile)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_server_listens_only_on_the_configured_address() {
        for listen in ["127.0.0.1", "::1", "10.1.2.3"] {
            let a = args(&cfg(listen, None));
            let i = a.iter().position(|x| x == "-i").expect("-i given");
            assert_eq!(a.get(i + 1).map(String::as_str), Some(listen), "{a:?}");
            assert!(!a.iter().any(|x| x.starts_with("--tls")), "{a:?}");
            // The plugin and its directory come last: nbdkit reads server
            // options only before the plugin name.
            assert_eq!(
                a[a.len() - 2..],
                [
                    "file".to_string(),
                    "dir=/var/lib/volumed/exports".to_string()
                ]
            );
        }
        let a = args(&cfg("127.0.0.1", Some(PathBuf::from("/etc/volumed/psk"))));
        let plugin = a.iter().position(|x| x == "file").expect("plugin");
        let tls = a.iter().position(|x| x == "--tls=require").expect("tls");
        assert!(tls < plugin, "{a:?}");
        assert!(
            a.contains(&"--tls-psk=/etc/volumed/psk".to_string()),
            "{a:?}"
        );
    }
}
