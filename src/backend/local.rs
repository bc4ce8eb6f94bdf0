//! The local backend: volumes are sparse files under `<data dir>/volumes`,
//! and attaching one to the appliance VM makes `<device dir>/virtio-<serial>`
//! appear, as the hypervisor and udev would. Attaching to another VM only
//! records the attachment.
//!
//! State lives next to each image (`<id>.attachment`, replaced atomically),
//! so it survives a daemon crash exactly like a cloud's would. The same file
//! keeps the history of the volume's attach and detach calls, written in
//! the same rename as the state they produced: a crash can never leave a
//! change without its history line or the reverse, so tests can read it to
//! prove that no side effect happened twice. A call the backend refuses
//! because it would repeat a change (attaching an attached volume,
//! detaching a detached one) is kept too, apart, since a caller that
//! repeats a change shows only there. The device link is made before
//! an attach is recorded and removed before a detach is, so a crash in
//! between is repaired by the redelivered request doing the change again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// The VM the volume is attached to, if any.
    vm_id: Option<Uuid>,
    /// Every change, `attach <volume> <vm>` / `detach <volume> <vm>`.
    #[serde(default)]
    history: Vec<String>,
    /// Every refused call, in the same form. Apart from `history`, whose
    /// readers count changes.
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

    /// The history of every volume's changes, volume by volume.
    pub fn call_history(data_dir: &Path) -> Vec<String> {
        Self::states(data_dir)
            .into_iter()
            .flat_map(|s| s.history)
            .collect()
    }

    /// The attach and detach calls refused because the volume was already
    /// in the state asked for (or on another VM), volume by volume, in the
    /// form of [`LocalBackend::call_history`]. A caller that never repeats
    /// a change leaves this empty.
    pub fn refused_calls(data_dir: &Path) -> Vec<String> {
        Self::states(data_dir)
            .into_iter()
            .flat_map(|s| s.refused)
            .collect()
    }

    fn states(data_dir: &Path) -> Vec<StateFile> {
        let Ok(entries) = std::fs::read_dir(Self::volumes_dir(data_dir)) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "attachment"))
            .collect();
        files.sort();
        files.iter().filter_map(|p| read_state(p).ok()).collect()
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
        Ok(())
    }

    fn link_path(&self, volume: Uuid) -> PathBuf {
        self.device_dir.join(by_id_name(volume))
    }

    /// Records the new state with its history line, in one rename.
    fn record(
        &self,
        volume: Uuid,
        mut state: StateFile,
        what: &str,
        vm: Uuid,
    ) -> Result<(), BackendError> {
        state.vm_id = (what == "attach").then_some(vm);
        state.history.push(format!("{what} {volume} {vm}"));
        let body =
            serde_json::to_vec(&state).map_err(|e| BackendError::Permanent(e.to_string()))?;
        write_atomic(&Self::attachment_path(&self.data_dir, volume), &body).map_err(io)
    }

    /// Keeps a refused call in the volume's file, then returns the
    /// refusal. Failing to keep it only loses the trace, not the answer.
    fn refuse(
        &self,
        volume: Uuid,
        mut state: StateFile,
        what: &str,
        vm: Uuid,
        why: String,
    ) -> BackendError {
        state.refused.push(format!("{what} {volume} {vm}"));
        if let Ok(body) = serde_json::to_vec(&state) {
            let _ = write_atomic(&Self::attachment_path(&self.data_dir, volume), &body);
        }
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

fn read_state(p: &Path) -> std::io::Result<StateFile> {
    match std::fs::read(p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(e),
    }
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

fn io(e: std::io::Error) -> BackendError {
    BackendError::Transient(e.to_string())
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
            return Err(self.refuse(volume, state, "attach", vm, why));
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
                return Err(self.refuse(volume, state, "detach", vm, why));
            }
            None => {
                let why = format!("volume {volume} is not attached");
                return Err(self.refuse(volume, state, "detach", vm, why));
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
}
