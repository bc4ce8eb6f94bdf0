//! The nbd-server engine, shaped by how nbd-server 3.24 behaves:
//!
//! - SIGHUP only adds exports: a removed section keeps being served until a
//!   restart. So an export is withdrawn by emptying its authfile (read on
//!   every connection; an existing empty authfile refuses everyone), and the
//!   authfile is kept, empty, until a restart has dropped the stale section:
//!   a missing authfile would let everyone in.
//! - SIGHUPs that add exports crash it now and then, so the manager batches
//!   reloads and recovers from the crash; this engine only reports whether a
//!   change needs one.
//! - It refuses to start without any export: the base configuration keeps a
//!   placeholder export whose authfile is empty.
//!
//! Layout, beside the base configuration file `C`: `conf.d/<name>.conf`
//! (one section per export, the `includedir`), `volumed-auth/<name>.allow`
//! (authfiles), `volumed-placeholder.img` and its empty authfile.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use tracing::warn;

use super::{remove_if_present, sync_dir, write_atomic, Engine, ExportName, ExportSpec};
use crate::config::{NbdConfig, NbdEngineKind};

pub const PLACEHOLDER: &str = "volumed-placeholder";

pub struct NbdServer {
    config: PathBuf,
    include_dir: PathBuf,
    auth_dir: PathBuf,
    port: u16,
    listen: String,
    allow: Vec<String>,
    /// Sections the running server holds (read at its start, plus what
    /// reloads added).
    loaded: Mutex<BTreeSet<String>>,
}

impl NbdServer {
    pub fn new(cfg: &NbdConfig) -> Self {
        let base = cfg
            .config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        NbdServer {
            config: cfg.config.clone(),
            include_dir: base.join("conf.d"),
            auth_dir: base.join("volumed-auth"),
            port: cfg.port,
            listen: cfg.listen.clone(),
            allow: cfg.allow.clone(),
            loaded: Mutex::default(),
        }
    }

    pub fn include_dir(&self) -> &Path {
        &self.include_dir
    }

    fn section_file(&self, name: &ExportName) -> PathBuf {
        self.include_dir.join(format!("{name}.conf"))
    }

    pub fn authfile(&self, name: &str) -> PathBuf {
        self.auth_dir.join(format!("{name}.allow"))
    }

    fn placeholder_image(&self) -> PathBuf {
        self.base_dir().join(format!("{PLACEHOLDER}.img"))
    }

    fn base_dir(&self) -> &Path {
        self.config.parent().unwrap_or(Path::new("/"))
    }

    /// What the base configuration must contain.
    fn required(&self) -> Vec<(&'static str, &'static str, String)> {
        vec![
            ("generic", "port", self.port.to_string()),
            ("generic", "listenaddr", self.listen.clone()),
            (
                "generic",
                "includedir",
                self.include_dir.display().to_string(),
            ),
            ("generic", "allowlist", "true".into()),
            (
                PLACEHOLDER,
                "exportname",
                self.placeholder_image().display().to_string(),
            ),
            (
                PLACEHOLDER,
                "authfile",
                self.authfile(PLACEHOLDER).display().to_string(),
            ),
            (PLACEHOLDER, "readonly", "true".into()),
        ]
    }

    /// The names of the configured exports (none when unreadable).
    fn configured_names(&self) -> BTreeSet<String> {
        self.configured()
            .unwrap_or_default()
            .into_iter()
            .map(|(n, _)| n.as_str().to_owned())
            .collect()
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // The set is rebuilt from the files at every server start, so a
        // poisoned lock loses nothing that matters.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A parsed INI file: sections in order, each with its `key = value` lines.
/// Comments and blank lines are kept with the section they follow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ini {
    pub preamble: Vec<String>,
    pub sections: Vec<(String, Vec<String>)>,
}

impl Ini {
    pub fn parse(text: &str) -> Ini {
        let mut ini = Ini::default();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('[') && t.ends_with(']') && t.len() >= 2 {
                ini.sections
                    .push((t[1..t.len() - 1].trim().to_owned(), Vec::new()));
            } else if let Some((_, lines)) = ini.sections.last_mut() {
                lines.push(line.to_owned());
            } else {
                ini.preamble.push(line.to_owned());
            }
        }
        ini
    }

    pub fn get(&self, section: &str, key: &str) -> Option<String> {
        let (_, lines) = self.sections.iter().find(|(n, _)| n == section)?;
        lines.iter().rev().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key && !l.trim_start().starts_with('#')).then(|| v.trim().to_owned())
        })
    }

    /// Sets `key` in `section` (created at the end when missing), replacing
    /// every existing line for that key.
    pub fn set(&mut self, section: &str, key: &str, value: &str) {
        let idx = match self.sections.iter().position(|(n, _)| n == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_owned(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let lines = &mut self.sections[idx].1;
        lines.retain(|l| {
            l.trim_start().starts_with('#')
                || l.split_once('=')
                    .map(|(k, _)| k.trim() != key)
                    .unwrap_or(true)
        });
        let at = lines
            .iter()
            .rposition(|l| !l.trim().is_empty())
            .map(|i| i + 1)
            .unwrap_or(0);
        lines.insert(at, format!("    {key} = {value}"));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.preamble {
            out.push_str(l);
            out.push('\n');
        }
        for (name, lines) in &self.sections {
            out.push_str(&format!("[{name}]\n"));
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Engine for NbdServer {
    fn kind(&self) -> NbdEngineKind {
        NbdEngineKind::NbdServer
    }

    fn program(&self) -> &'static str {
        "nbd-server"
    }

    fn lock_path(&self) -> PathBuf {
        let mut p = self.config.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }

    fn prepare(&self) -> anyhow::Result<()> {
        for d in [&self.include_dir, &self.auth_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let img = self.placeholder_image();
        if !img.exists() {
            let f = std::fs::File::create(&img)
                .with_context(|| format!("cannot create {}", img.display()))?;
            f.set_len(4096)?;
        }
        let auth = self.authfile(PLACEHOLDER);
        if !auth.exists() {
            write_atomic(&auth, b"")?;
        }
        let existing = match std::fs::read_to_string(&self.config) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.config.display()))
            }
        };
        let mut ini = existing.as_deref().map(Ini::parse).unwrap_or_default();
        let mut missing = Vec::new();
        for (section, key, value) in self.required() {
            if ini.get(section, key).as_deref() != Some(value.as_str()) {
                ini.set(section, key, &value);
                missing.push(format!("[{section}] {key}"));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if existing.is_some() {
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
            let backup = PathBuf::from(format!("{}.bak-{stamp}", self.config.display()));
            std::fs::copy(&self.config, &backup)
                .with_context(|| format!("cannot back up {}", self.config.display()))?;
            warn!(config = %self.config.display(), backup = %backup.display(), repaired = ?missing,
                  "nbd-server configuration lacked what volumed needs; repaired it");
        }
        if let Some(parent) = self.config.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_atomic(&self.config, ini.render().as_bytes())
            .with_context(|| format!("cannot write {}", self.config.display()))
    }

    fn server_command(&self, pidfile: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("nbd-server");
        // The server is not the service systemd supervises: keep it from
        // speaking for volumed on the notification socket.
        c.env_remove("NOTIFY_SOCKET");
        c.arg("-C").arg(&self.config).arg("-p").arg(pidfile);
        c
    }

    fn write(&self, spec: &ExportSpec) -> std::io::Result<bool> {
        // The authfile first: a section whose authfile is missing would be
        // open to everyone.
        let mut allow = self.allow.join("\n");
        allow.push('\n');
        write_atomic(&self.authfile(spec.name.as_str()), allow.as_bytes())?;
        let section = format!(
            "[{name}]\n    exportname = {path}\n    authfile = {auth}\n",
            name = spec.name,
            path = spec.path.display(),
            auth = self.authfile(spec.name.as_str()).display()
        );
        let file = self.section_file(&spec.name);
        if std::fs::read_to_string(&file).ok().as_deref() != Some(section.as_str()) {
            write_atomic(&file, section.as_bytes())?;
        }
        Ok(!self.loaded().contains(spec.name.as_str()))
    }

    fn withdraw(&self, name: &ExportName) -> std::io::Result<()> {
        let auth = self.authfile(name.as_str());
        let section = self.section_file(name);
        // Already withdrawn and cleaned up by a restart (a repeated detach,
        // say): an authfile written now would outlive every restart, since
        // only a stale section makes the idle restart happen.
        if !section.exists() && !auth.exists() && !self.loaded().contains(name.as_str()) {
            return Ok(());
        }
        // Emptied, not removed: the server may still hold the section, and
        // nbd-server lets everyone in when an authfile cannot be opened.
        write_atomic(&auth, b"")?;
        if remove_if_present(&self.section_file(name))? {
            sync_dir(&self.include_dir)?;
        }
        Ok(())
    }

    fn configured(&self) -> std::io::Result<Vec<(ExportName, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.include_dir)? {
            let entry = entry?;
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".conf")) else {
                continue;
            };
            let Ok(name) = ExportName::parse(stem) else {
                continue;
            };
            let text = std::fs::read_to_string(entry.path())?;
            if let Some(path) = Ini::parse(&text).get(name.as_str(), "exportname") {
                out.push((name, PathBuf::from(path)));
            }
        }
        out.sort();
        Ok(out)
    }

    fn reload(&self, pid: nix::unistd::Pid) -> Option<std::io::Result<()>> {
        let r = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)
            .map_err(std::io::Error::from);
        if r.is_ok() {
            let names = self.configured_names();
            self.loaded().extend(names);
        }
        Some(r)
    }

    fn started(&self, serving: &[String]) {
        let configured = self.configured_names();
        let names: BTreeSet<String> = serving
            .iter()
            .filter(|n| n.as_str() != PLACEHOLDER)
            .cloned()
            .collect();
        // Authfiles of exports neither configured nor held by the server
        // can go; one the server still holds must stay (empty).
        if let Ok(entries) = std::fs::read_dir(&self.auth_dir) {
            for e in entries.flatten() {
                let f = e.file_name();
                let Some(stem) = f.to_str().and_then(|f| f.strip_suffix(".allow")) else {
                    continue;
                };
                if stem != PLACEHOLDER && !names.contains(stem) && !configured.contains(stem) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        *self.loaded() = names;
    }

    fn stale(&self) -> Vec<String> {
        let configured = self.configured_names();
        self.loaded().difference(&configured).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn engine(dir: &Path) -> NbdServer {
        NbdServer::new(&NbdConfig {
            engine: NbdEngineKind::NbdServer,
            config: dir.join("config"),
            port: 10999,
            listen: "127.0.0.1".into(),
            allow: vec!["127.0.0.1".into(), "10.0.0.0/8".into()],
            manage: true,
            pidfile: dir.join("pid"),
            tls_psk: None,
            batch_window: Duration::ZERO,
            check_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn a_damaged_base_config_is_repaired_with_a_backup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config");
        std::fs::write(&cfg, "# operator notes\n[generic]\n    port = 1\n    user = nbd\n[mine]\n    exportname = /srv/x\n")
            .expect("write");
        let e = engine(dir.path());
        e.prepare().expect("repair");
        let ini = Ini::parse(&std::fs::read_to_string(&cfg).expect("read"));
        assert_eq!(ini.get("generic", "port").as_deref(), Some("10999"));
        assert_eq!(
            ini.get("generic", "user").as_deref(),
            Some("nbd"),
            "other keys kept"
        );
        assert_eq!(ini.get("generic", "allowlist").as_deref(), Some("true"));
        assert_eq!(
            ini.get("mine", "exportname").as_deref(),
            Some("/srv/x"),
            "other sections kept"
        );
        assert!(ini.get(PLACEHOLDER, "exportname").is_some());
        let backups = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter(|e| {
                e.as_ref()
                    .map(|e| e.file_name().to_string_lossy().starts_with("config.bak-"))
                    .unwrap_or(false)
            })
            .count();
        assert_eq!(backups, 1);
        // A sound config is left alone.
        let before = std::fs::read_to_string(&cfg).expect("read");
        e.prepare().expect("no-op");
        assert_eq!(std::fs::read_to_string(&cfg).expect("read"), before);
    }

    #[test]
    fn withdraw_keeps_an_empty_authfile_until_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(dir.path());
        e.prepare().expect("prepare");
        let vol = uuid::Uuid::new_v4();
        let devdir = dir.path().join("by-id");
        let spec = ExportSpec::new(vol, &devdir.join(crate::backend::by_id_name(vol)), &devdir)
            .expect("spec");
        assert!(e.write(&spec).expect("write"), "new section needs a reload");
        let auth = e.authfile(spec.name.as_str());
        assert_eq!(
            std::fs::read_to_string(&auth).expect("auth"),
            "127.0.0.1\n10.0.0.0/8\n"
        );
        assert_eq!(
            e.configured().expect("ls"),
            vec![(spec.name.clone(), spec.path.clone())]
        );
        e.started(&[spec.name.to_string()]);
        assert!(
            !e.write(&spec).expect("rewrite"),
            "already loaded: no reload"
        );

        e.withdraw(&spec.name).expect("withdraw");
        assert_eq!(
            std::fs::read_to_string(&auth).expect("auth"),
            "",
            "refuses everyone"
        );
        assert!(e.configured().expect("ls").is_empty());
        assert_eq!(e.stale(), vec![spec.name.to_string()]);
        e.started(&[spec.name.to_string()]);
        assert!(
            auth.exists(),
            "kept while the server still holds the section"
        );
        e.started(&[]);
        assert!(!auth.exists(), "dropped once the server restarted");
        assert!(e.stale().is_empty());
        e.withdraw(&spec.name).expect("withdraw again");
        assert!(
            !auth.exists(),
            "a second withdrawal after the restart leaves nothing behind"
        );
    }
}
