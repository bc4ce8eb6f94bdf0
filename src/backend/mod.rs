//! Volume backends: who really attaches a volume to a VM. `local` (sparse
//! files on this host, for a single host without a cloud) and `cloudstack`.
//! The worker reads a volume's state before acting, so every backend call it
//! makes is one that changes something; a change may be an asynchronous job,
//! whose id the worker journals before waiting for it.

pub mod cloudstack;
pub mod local;

use async_trait::async_trait;
use uuid::Uuid;

use crate::contract::ErrorCode;

/// What the backend says about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    pub id: Uuid,
    pub attached_to: Option<Uuid>,
    /// The device id the cloud assigned on the VM (CloudStack's `deviceid`).
    pub device_id: Option<i64>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("volume {0} does not exist")]
    NotFound(Uuid),
    /// Failed, and trying again later may work.
    #[error("backend unavailable: {0}")]
    Transient(String),
    /// Refused for good.
    #[error("backend refused: {0}")]
    Permanent(String),
    /// volumed itself is misconfigured (bad credentials): every request
    /// would fail the same way, so consumption stops instead.
    #[error("backend configuration error: {0}")]
    Config(String),
}

impl BackendError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BackendError::NotFound(_) => ErrorCode::VolumeNotFound,
            BackendError::Transient(_) | BackendError::Config(_) => ErrorCode::BackendUnavailable,
            BackendError::Permanent(_) => ErrorCode::BackendRejected,
        }
    }
}

/// A change the backend accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// Done already.
    Done,
    /// Runs as an asynchronous job with this id.
    Job(String),
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Checks that the backend is reachable and accepts volumed's
    /// credentials.
    async fn check(&self) -> Result<(), BackendError>;
    async fn volume(&self, id: Uuid) -> Result<VolumeState, BackendError>;
    /// Starts attaching a volume that is not attached anywhere.
    async fn start_attach(&self, volume: Uuid, vm: Uuid) -> Result<Started, BackendError>;
    /// Starts detaching a volume from the VM it is attached to.
    async fn start_detach(&self, volume: Uuid, vm: Uuid) -> Result<Started, BackendError>;
    /// Waits for a job to finish (bounded by the backend's job timeout).
    async fn wait_job(&self, job: &str) -> Result<(), BackendError>;
    /// The volumes attached to `vm` (for the reconciler).
    async fn volumes_on(&self, vm: Uuid) -> Result<Vec<VolumeState>, BackendError>;
}

/// Builds the configured backend.
pub fn build(
    config: &crate::config::Config,
    appliance_vm: Uuid,
) -> anyhow::Result<std::sync::Arc<dyn Backend>> {
    use anyhow::Context;
    Ok(match config.backend {
        crate::config::BackendKind::Local => {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!(
                    "cannot create VOLUMED_DATA_DIR {}",
                    config.data_dir.display()
                )
            })?;
            std::sync::Arc::new(local::LocalBackend::new(
                &config.data_dir,
                &config.device_dir,
                appliance_vm,
                config.local_latency,
            ))
        }
        crate::config::BackendKind::CloudStack => {
            let cs = config
                .cloudstack
                .as_ref()
                .context("VOLUMED_BACKEND=cloudstack without CloudStack settings")?;
            std::sync::Arc::new(
                cloudstack::CloudStackBackend::new(cs, appliance_vm)
                    .map_err(|e| anyhow::anyhow!("cannot set up the CloudStack client: {e}"))?,
            )
        }
    })
}

/// The virtio serial a KVM guest sees for a volume: its id without hyphens,
/// truncated to 20 characters (the virtio-blk serial limit).
pub fn virtio_serial(volume: Uuid) -> String {
    let simple = volume.simple().to_string();
    simple[..20].to_owned()
}

/// The by-id link name of a volume's device.
pub fn by_id_name(volume: Uuid) -> String {
    format!("virtio-{}", virtio_serial(volume))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_the_first_twenty_hex_digits() {
        let id = Uuid::parse_str("0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3").expect("uuid");
        assert_eq!(virtio_serial(id), "0a1b2c3d4e5f4a6b8c7d");
        assert_eq!(by_id_name(id), "virtio-0a1b2c3d4e5f4a6b8c7d");
    }
}
