//! The local backend: volumes are sparse files under `<data dir>/volumes`,
//! and attaching one to the appliance VM makes `<device dir>/virtio-<serial>`
//! appear, as the hypervisor and udev would. Attaching to another VM only
//! records the attachment.
//!
//! State lives next to each image, so it survives a daemon crash exactly
//! like a cloud's would. `<id>.attachment` is the volume's history, one
//! line per attach or detach (`attach <volume> <vm>`); its last line is the
//! state. A change is one line written at the end of the file and flushed
//! before the call returns, so the state and its history can never
//! disagree, and a change costs the same whatever the length of the
//! history. A line cut short by a power cut (no newline at its end) is no
//! change: readers ignore it and the next change writes over it. Tests read
//! the history to prove that no side effect happened twice. A call the
//! backend refuses because it would repeat a change (attaching an attached
//! volume, detaching a detached one) is kept apart, in `<id>.refused`,
//! since a caller that repeats a change shows only there. The device link
//! is made before an attach is recorded and removed before a detach is, so
//! a crash in between is repaired by the redelivered request doing the
//! change again.
//!
//! Earlier versions kept a JSON document in `<id>.attachment`
//! (`{"vm_id": …, "history": […], "refused": […]}`, replaced by rename);
//! such a file is read as it is and rewritten in the line form, in one
//! rename, at the volume's next change.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use uuid::Uuid;

use super::{by_id_name, Backend, BackendError, Started, VolumeState};

#[derive(Debug, Clone)]
pub struct LocalBackend {
    data_dir: PathBuf,
    device_dir: PathBuf,
    appliance_vm: Uuid,
    /// Added before each change, to imitate a slow cloud in tests and
    /// benchmarks.
    latency: Duration,
}

/// A volume's state as its history file gives it.
#[derive(Debug, Default)]
struct State {
    /// The VM the volume is attached to, if any.
    vm_id: Option<Uuid>,
    /// Bytes of whole lines at the start of the file: the next change is
    /// written there, over a torn line if one follows.
    whole: u64,
    /// The file is still the earlier JSON document, with these lines.
    legacy: Option<Legacy>,
}

/// The JSON document earlier versions wrote.
#[derive(Debug, Default, Deserialize)]
struct Legacy {
    vm_id: Option<Uuid>,
    #[serde(default)]
    history: Vec<String>,
    #[serde(default)]
    refused: Vec<String>,
}

impl LocalBackend {
    pub fn new(data_dir: &Path, device_dir: &Path, appliance_vm: Uuid, latency: Duration) -> Self {
        LocalBackend {
            data_dir: data_dir.to_owned(),
            device_dir: device_dir.to_owned(),
            appliance_vm,
            latency,
        }
    }

    fn volumes_dir(data_dir: &Path) -> PathBuf {
        data_dir.join("volumes")
    }

    pub fn image_path(data_dir: &Path, id: Uuid) -> PathBuf {
        Self::volumes_dir(data_dir).join(format!("{id}.img"))
    }

    fn attachment_path(data_dir: &Path, id: Uuid) -> PathBuf {
        Self::volumes_dir(data_dir).join(format!("{id}.attachment"))
    }

    fn refused_path(data_dir: &Path, id: Uuid) -> PathBuf {
        Self::volumes_dir(data_dir).join(format!("{id}.refused"))
    }

    /// The history of every volume's changes, volume by volume.
    pub fn call_history(data_dir: &Path) -> Vec<String> {
        Self::files(data_dir, "attachment")
            .iter()
            .filter_map(|p| read_history(p).ok())
            .flat_map(|(history, _)| history)
            .collect()
    }

    /// The attach and detach calls refused because the volume was already
    /// in the state asked for (or on another VM), volume by volume, in the
    /// form of [`LocalBackend::call_history`]. A caller that never repeats
    /// a change leaves this empty.
    pub fn refused_calls(data_dir: &Path) -> Vec<String> {
        let mut by_volume: std::collections::BTreeMap<PathBuf, Vec<String>> = Default::default();
        // Refusals kept by an earlier version, in its JSON document.
        for p in Self::files(data_dir, "attachment") {
            if let Ok((_, refused)) = read_history(&p) {
                by_volume
                    .entry(p.with_extension(""))
                    .or_default()
                    .extend(refused);
            }
        }
        for p in Self::files(data_dir, "refused") {
            if let Ok(lines) = read_lines(&p) {
                by_volume
                    .entry(p.with_extension(""))
                    .or_default()
                    .extend(lines);
            }
        }
        by_volume.into_values().flatten().collect()
    }

    /// The volume directory's files with this extension, sorted.
    fn files(data_dir: &Path, extension: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(Self::volumes_dir(data_dir)) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == extension))
            .collect();
        files.sort();
        files
    }

    /// Creates a sparse volume of `size` bytes and returns its id.
    pub fn create_volume(data_dir: &Path, size: u64) -> std::io::Result<Uuid> {
        std::fs::create_dir_all(Self::volumes_dir(data_dir))?;
        let id = Uuid::new_v4();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(Self::image_path(data_dir, id))?;
        f.set_len(size)?;
        f.sync_all()?;
        Ok(id)
    }

    /// Deletes a volume that is not attached.
    pub fn delete_volume(data_dir: &Path, id: Uuid) -> anyhow::Result<()> {
        let img = Self::image_path(data_dir, id);
        if !img.exists() {
            anyhow::bail!("volume {id} does not exist under {}", data_dir.display());
        }
        if let Some(vm) = read_state(&Self::attachment_path(data_dir, id))?.vm_id {
            anyhow::bail!("volume {id} is attached to VM {vm}: detach it first");
        }
        std::fs::remove_file(img)?;
        // The history goes with the volume.
        let _ = std::fs::remove_file(Self::attachment_path(data_dir, id));
        let _ = std::fs::remove_file(Self::refused_path(data_dir, id));
        Ok(())
    }

    fn link_path(&self, volume: Uuid) -> PathBuf {
        self.device_dir.join(by_id_name(volume))
    }

    /// Records a change: one history line, flushed before this returns.
    fn record(&self, volume: Uuid, state: State, what: &str, vm: Uuid) -> Result<(), BackendError> {
        let line = format!("{what} {volume} {vm}\n");
        let path = Self::attachment_path(&self.data_dir, volume);
        match state.legacy {
            None => write_line_at(&path, state.whole, &line).map_err(io),
            Some(legacy) => {
                // The earlier document becomes the line form in the same
                // rename that records the change. Its refusals move first,
                // ahead of any kept since (they are older); a crash
                // between the two renames only shows them twice.
                if !legacy.refused.is_empty() {
                    let refused = Self::refused_path(&self.data_dir, volume);
                    let mut body = String::new();
                    for r in legacy
                        .refused
                        .iter()
                        .cloned()
                        .chain(read_lines(&refused).unwrap_or_default())
                    {
                        body.push_str(&r);
                        body.push('\n');
                    }
                    let _ = write_atomic(&refused, body.as_bytes());
                }
                let mut body = String::new();
                for h in &legacy.history {
                    body.push_str(h);
                    body.push('\n');
                }
                body.push_str(&line);
                write_atomic(&path, body.as_bytes()).map_err(io)
            }
        }
    }

    /// Keeps a refused call in the volume's `.refused` file, then returns
    /// the refusal. Failing to keep it only loses the trace, not the answer.
    fn refuse(&self, volume: Uuid, what: &str, vm: Uuid, why: String) -> BackendError {
        let path = Self::refused_path(&self.data_dir, volume);
        let _ = append_line(&path, &format!("{what} {volume} {vm}"));
        BackendError::Permanent(why)
    }

    async fn pause(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    fn ensure_exists(&self, volume: Uuid) -> Result<(), BackendError> {
        if Self::image_path(&self.data_dir, volume).exists() {
            Ok(())
        } else {
            Err(BackendError::NotFound(volume))
        }
    }
}

fn invalid(p: &Path, why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {why}", p.display()),
    )
}

/// Whether the file is the earlier JSON document.
fn is_legacy(f: &std::fs::File) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    Ok(f.read_at(&mut first, 0)? == 1 && first[0] == b'{')
}

fn read_legacy(p: &Path) -> std::io::Result<Legacy> {
    serde_json::from_slice(&std::fs::read(p)?).map_err(|e| invalid(p, e))
}

/// The state a history line leaves.
fn state_after(p: &Path, line: &str) -> std::io::Result<Option<Uuid>> {
    let mut words = line.split(' ');
    let (what, vm) = match (words.next(), words.next(), words.next(), words.next()) {
        (Some(what), Some(_volume), Some(vm), None) => (what, vm),
        _ => return Err(invalid(p, format!("not a history line: {line:?}"))),
    };
    let vm = crate::contract::parse_uuid(vm)
        .ok_or_else(|| invalid(p, format!("not a VM id in {line:?}")))?;
    match what {
        "attach" => Ok(Some(vm)),
        "detach" => Ok(None),
        _ => Err(invalid(p, format!("not a history line: {line:?}"))),
    }
}

/// The volume's state: the last whole line of its history, read from the
/// end of the file, so its cost does not grow with the history.
fn read_state(p: &Path) -> std::io::Result<State> {
    let f = match std::fs::File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(e),
    };
    if is_legacy(&f)? {
        let legacy = read_legacy(p)?;
        return Ok(State {
            vm_id: legacy.vm_id,
            whole: 0,
            legacy: Some(legacy),
        });
    }
    let len = f.metadata()?.len();
    // A line is about 80 bytes; the window doubles until it holds the last
    // whole line and the newline before it (or the file's start).
    let mut window: u64 = 512;
    loop {
        let from = len.saturating_sub(window);
        let mut buf = vec![0u8; (len - from) as usize];
        f.read_exact_at(&mut buf, from)?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            if from == 0 {
                // Nothing but a torn first line: no change yet.
                return Ok(State::default());
            }
            window *= 2;
            continue;
        };
        let start = match buf[..end].iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if from == 0 => 0,
            None => {
                window *= 2;
                continue;
            }
        };
        let line = std::str::from_utf8(&buf[start..end]).map_err(|e| invalid(p, e))?;
        return Ok(State {
            vm_id: state_after(p, line)?,
            whole: from + end as u64 + 1,
            legacy: None,
        });
    }
}

/// The whole lines of a line file (a torn last line left out); none when
/// the file does not exist.
fn read_lines(p: &Path) -> std::io::Result<Vec<String>> {
    let bytes = match std::fs::read(p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..whole]).map_err(|e| invalid(p, e))?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// A history file's changes, and the refusals an earlier version kept in it.
fn read_history(p: &Path) -> std::io::Result<(Vec<String>, Vec<String>)> {
    let f = std::fs::File::open(p)?;
    if is_legacy(&f)? {
        let legacy = read_legacy(p)?;
        return Ok((legacy.history, legacy.refused));
    }
    Ok((read_lines(p)?, Vec::new()))
}

/// Writes `line` at offset `at` (the end of the file's whole lines, so a
/// torn line after them is overwritten and cut off), then flushes it.
fn write_line_at(p: &Path, at: u64, line: &str) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)?;
    f.write_all_at(line.as_bytes(), at)?;
    let end = at + line.len() as u64;
    if f.metadata()?.len() > end {
        f.set_len(end)?;
    }
    f.sync_data()
}

/// Adds a line at the end of a line file, after its whole lines.
fn append_line(p: &Path, line: &str) -> std::io::Result<()> {
    let at = match std::fs::read(p) {
        Ok(bytes) => bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) as u64,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    write_line_at(p, at, &format!("{line}\n"))
}

/// Replaces `dest` atomically: write a temporary file, fsync, rename.
fn write_atomic(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dest.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dest)
}

/// A file that does not parse stays broken however often it is read, so
/// it fails the request; other I/O errors may pass, so they are retried.
fn io(e: std::io::Error) -> BackendError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        BackendError::Permanent(e.to_string())
    } else {
        BackendError::Transient(e.to_string())
    }
}

#[async_trait]
impl Backend for LocalBackend {
    async fn volume(&self, id: Uuid) -> Result<VolumeState, BackendError> {
        self.ensure_exists(id)?;
        let state = read_state(&Self::attachment_path(&self.data_dir, id)).map_err(io)?;
        Ok(VolumeState {
            id,
            attached_to: state.vm_id,
            device_id: None,
        })
    }

    async fn check(&self) -> Result<(), BackendError> {
        std::fs::create_dir_all(Self::volumes_dir(&self.data_dir)).map_err(io)
    }

    async fn start_attach(&self, volume: Uuid, vm: Uuid) -> Result<Started, BackendError> {
        if crate::failpoint::fails("local_backend_unavailable") {
            return Err(BackendError::Transient(
                "injected failure (test hook)".into(),
            ));
        }
        self.attach(volume, vm).await.map(|()| Started::Done)
    }

    async fn start_detach(&self, volume: Uuid, vm: Uuid) -> Result<Started, BackendError> {
        self.detach(volume, vm).await.map(|()| Started::Done)
    }

    async fn volumes_on(&self, vm: Uuid) -> Result<Vec<VolumeState>, BackendError> {
        let dir = Self::volumes_dir(&self.data_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io)?;
            let name = e.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".attachment"))
                .and_then(crate::contract::parse_uuid)
            else {
                continue;
            };
            if let Some(on) = read_state(&e.path()).map_err(io)?.vm_id {
                if on == vm {
                    out.push(VolumeState {
                        id,
                        attached_to: Some(vm),
                        device_id: None,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn wait_job(&self, job: &str) -> Result<(), BackendError> {
        Err(BackendError::Permanent(format!(
            "the local backend runs no jobs, yet job {job} was recorded"
        )))
    }
}

impl LocalBackend {
    async fn attach(&self, volume: Uuid, vm: Uuid) -> Result<(), BackendError> {
        self.pause().await;
        self.ensure_exists(volume)?;
        let state = read_state(&Self::attachment_path(&self.data_dir, volume)).map_err(io)?;
        if let Some(on) = state.vm_id {
            let why = format!("volume {volume} is already attached to VM {on}");
            return Err(self.refuse(volume, "attach", vm, why));
        }
        if vm == self.appliance_vm {
            // The link first, under a temporary name and renamed so a
            // reader never sees a half-made link; the attach counts once
            // it is recorded.
            std::fs::create_dir_all(&self.device_dir).map_err(io)?;
            let target =
                std::fs::canonicalize(Self::image_path(&self.data_dir, volume)).map_err(io)?;
            let link = self.link_path(volume);
            let tmp = link.with_extension("new");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp).map_err(io)?;
            std::fs::rename(&tmp, &link).map_err(io)?;
        }
        self.record(volume, state, "attach", vm)
    }

    async fn detach(&self, volume: Uuid, vm: Uuid) -> Result<(), BackendError> {
        self.pause().await;
        self.ensure_exists(volume)?;
        let state = read_state(&Self::attachment_path(&self.data_dir, volume)).map_err(io)?;
        match state.vm_id {
            Some(on) if on == vm => {}
            Some(on) => {
                let why = format!("volume {volume} is attached to VM {on}, not {vm}");
                return Err(self.refuse(volume, "detach", vm, why));
            }
            None => {
                let why = format!("volume {volume} is not attached");
                return Err(self.refuse(volume, "detach", vm, why));
            }
        }
        // The device goes first; the detach counts once it is recorded.
        match std::fs::remove_file(self.link_path(volume)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        self.record(volume, state, "detach", vm)
    }
}

/// Parses sizes such as `64MiB`, `1GiB`, `512k`, `1048576`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("size {s:?} must start with a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => anyhow::bail!("unknown size unit {other:?} in {s:?}: use KiB, MiB, GiB or TiB"),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("size {s:?} is too large"))?;
    if bytes == 0 {
        anyhow::bail!("size must be larger than zero");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").expect("ok"), 64 << 20);
        assert_eq!(parse_size("1g").expect("ok"), 1 << 30);
        assert_eq!(parse_size("4096").expect("ok"), 4096);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[tokio::test]
    async fn attach_makes_the_link_and_detach_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let dev = dir.path().join("by-id");
        let me = Uuid::new_v4();
        let other = Uuid::new_v4();
        let b = LocalBackend::new(&data, &dev, me, Duration::ZERO);
        let vol = LocalBackend::create_volume(&data, 1 << 20).expect("create");
        assert_eq!(b.volume(vol).await.expect("state").attached_to, None);

        b.attach(vol, me).await.expect("attach");
        let link = dev.join(by_id_name(vol));
        assert_eq!(
            std::fs::canonicalize(&link).expect("link resolves"),
            std::fs::canonicalize(LocalBackend::image_path(&data, vol)).expect("image")
        );
        assert_eq!(b.volume(vol).await.expect("state").attached_to, Some(me));
        assert!(matches!(
            b.attach(vol, other).await,
            Err(BackendError::Permanent(_))
        ));
        assert!(LocalBackend::delete_volume(&data, vol).is_err());

        b.detach(vol, me).await.expect("detach");
        assert!(!link.exists());

        b.attach(vol, other).await.expect("failover attach");
        assert!(!link.exists(), "no local device for another VM");
        b.detach(vol, other).await.expect("detach");
        let history = LocalBackend::call_history(&data);
        assert_eq!(history.len(), 4, "{history:?}");
        assert!(b.detach(vol, other).await.is_err(), "not attached");
        assert_eq!(LocalBackend::call_history(&data).len(), 4, "no change");
        assert_eq!(
            LocalBackend::refused_calls(&data),
            [
                format!("attach {vol} {other}"),
                format!("detach {vol} {other}")
            ]
        );
        LocalBackend::delete_volume(&data, vol).expect("delete");
        assert!(matches!(
            b.volume(vol).await,
            Err(BackendError::NotFound(_))
        ));

        assert!(
            LocalBackend::call_history(&data).is_empty(),
            "history goes with the volume"
        );
    }

    fn setup() -> (tempfile::TempDir, PathBuf, LocalBackend, Uuid, Uuid) {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let me = Uuid::new_v4();
        let b = LocalBackend::new(&data, &dir.path().join("by-id"), me, Duration::ZERO);
        let vol = LocalBackend::create_volume(&data, 1 << 20).expect("create");
        (dir, data, b, vol, me)
    }

    #[tokio::test]
    async fn a_change_is_one_line_and_the_state_is_the_last_one_however_long_the_history() {
        let (_dir, data, b, vol, me) = setup();
        for _ in 0..300 {
            b.attach(vol, me).await.expect("attach");
            b.detach(vol, me).await.expect("detach");
        }
        b.attach(vol, me).await.expect("attach");
        let path = LocalBackend::attachment_path(&data, vol);
        let text = std::fs::read_to_string(&path).expect("history");
        assert_eq!(text.lines().count(), 601);
        assert_eq!(
            text.lines().last(),
            Some(format!("attach {vol} {me}").as_str())
        );
        assert_eq!(b.volume(vol).await.expect("state").attached_to, Some(me));
        assert_eq!(LocalBackend::call_history(&data).len(), 601);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_no_change_and_the_next_change_writes_over_it() {
        let (_dir, data, b, vol, me) = setup();
        b.attach(vol, me).await.expect("attach");
        let path = LocalBackend::attachment_path(&data, vol);
        let whole = std::fs::read(&path).expect("history");
        // A detach line cut short, as a power cut can leave it, then the
        // zeros a file system may show past it: more than the first
        // window the state is read through.
        let mut torn = whole.clone();
        torn.extend_from_slice(format!("detach {vol} {me}").as_bytes()[..30].as_ref());
        torn.extend(std::iter::repeat_n(0u8, 5000));
        std::fs::write(&path, &torn).expect("tear");

        assert_eq!(b.volume(vol).await.expect("state").attached_to, Some(me));
        assert_eq!(
            LocalBackend::call_history(&data),
            [format!("attach {vol} {me}")]
        );
        b.detach(vol, me).await.expect("detach");
        assert_eq!(
            std::fs::read_to_string(&path).expect("history"),
            format!("attach {vol} {me}\ndetach {vol} {me}\n"),
            "the torn line and the zeros are gone"
        );
        assert_eq!(b.volume(vol).await.expect("state").attached_to, None);

        // A file holding nothing but a torn first line: never attached.
        std::fs::write(&path, b"attach 12").expect("tear");
        assert_eq!(b.volume(vol).await.expect("state").attached_to, None);
        b.attach(vol, me).await.expect("attach");
        assert_eq!(
            std::fs::read_to_string(&path).expect("history"),
            format!("attach {vol} {me}\n")
        );
    }

    #[tokio::test]
    async fn a_history_line_that_does_not_parse_is_an_error_naming_the_file() {
        let (_dir, data, b, vol, me) = setup();
        let path = LocalBackend::attachment_path(&data, vol);
        std::fs::write(&path, format!("attach {vol} not-a-vm\n")).expect("write");
        let Err(BackendError::Permanent(why)) = b.volume(vol).await else {
            panic!("a bad line must fail the request, not be retried");
        };
        assert!(why.contains(&path.display().to_string()), "{why}");
        assert!(why.contains("not a VM id"), "{why}");
        assert!(
            b.attach(vol, me).await.is_err(),
            "no change on top of a bad line"
        );
    }

    #[tokio::test]
    async fn a_json_state_file_of_an_earlier_version_is_read_then_rewritten_at_the_next_change() {
        let (_dir, data, b, vol, me) = setup();
        let other = Uuid::new_v4();
        let path = LocalBackend::attachment_path(&data, vol);
        let old = serde_json::json!({
            "vm_id": me,
            "history": [format!("attach {vol} {me}")],
            "refused": [format!("attach {vol} {other}")],
        });
        std::fs::write(&path, serde_json::to_vec(&old).expect("json")).expect("write");

        assert_eq!(b.volume(vol).await.expect("state").attached_to, Some(me));
        assert_eq!(b.volumes_on(me).await.expect("on").len(), 1);
        assert_eq!(
            LocalBackend::call_history(&data),
            [format!("attach {vol} {me}")]
        );
        // A refusal before the conversion goes after the old ones.
        assert!(b.attach(vol, other).await.is_err());
        let refused = [
            format!("attach {vol} {other}"),
            format!("attach {vol} {other}"),
        ];
        assert_eq!(LocalBackend::refused_calls(&data), refused);

        b.detach(vol, me).await.expect("detach");
        assert_eq!(
            std::fs::read_to_string(&path).expect("history"),
            format!("attach {vol} {me}\ndetach {vol} {me}\n"),
            "rewritten in the line form"
        );
        assert_eq!(
            LocalBackend::refused_calls(&data),
            refused,
            "no refusal lost"
        );
        assert_eq!(b.volume(vol).await.expect("state").attached_to, None);
    }
}
