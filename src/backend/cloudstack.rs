//! The CloudStack backend: volume operations as CloudStack API calls.
//! Attach and detach are asynchronous jobs; the worker journals the job id
//! the start call returns before it waits, so a restarted daemon polls the
//! same job instead of issuing a second call.

use async_trait::async_trait;
use uuid::Uuid;

use super::{Backend, BackendError, Started, VolumeState};
use crate::cloudstack::client::{Client, CsError, ErrorClass};
use crate::config::CloudStackConfig;

pub struct CloudStackBackend {
    client: Client,
    appliance_vm: Uuid,
}

impl CloudStackBackend {
    pub fn new(cfg: &CloudStackConfig, appliance_vm: Uuid) -> Result<Self, BackendError> {
        Ok(CloudStackBackend {
            client: Client::new(cfg).map_err(to_backend)?,
            appliance_vm,
        })
    }
}

fn to_backend(e: CsError) -> BackendError {
    match e.class() {
        ErrorClass::Config => BackendError::Config(e.to_string()),
        ErrorClass::Permanent => BackendError::Permanent(e.to_string()),
        ErrorClass::Transient => BackendError::Transient(e.to_string()),
    }
}

#[async_trait]
impl Backend for CloudStackBackend {
    async fn check(&self) -> Result<(), BackendError> {
        match self.client.vm_exists(self.appliance_vm).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(BackendError::Config(format!(
                "CloudStack does not know the appliance VM {} (VOLUMED_APPLIANCE_VM_ID)",
                self.appliance_vm
            ))),
            Err(e) => Err(to_backend(e)),
        }
    }

    async fn volume(&self, id: Uuid) -> Result<VolumeState, BackendError> {
        match self.client.volume(id).await.map_err(to_backend)? {
            Some(v) => Ok(VolumeState {
                id,
                attached_to: v.vm,
                device_id: v.device_id,
            }),
            None => Err(BackendError::NotFound(id)),
        }
    }

    async fn start_attach(&self, volume: Uuid, vm: Uuid) -> Result<Started, BackendError> {
        self.client
            .attach(volume, vm)
            .await
            .map(Started::Job)
            .map_err(to_backend)
    }

    async fn start_detach(&self, volume: Uuid, _vm: Uuid) -> Result<Started, BackendError> {
        self.client
            .detach(volume)
            .await
            .map(Started::Job)
            .map_err(to_backend)
    }

    async fn volumes_on(&self, vm: Uuid) -> Result<Vec<VolumeState>, BackendError> {
        let vols = self.client.volumes_on(vm).await.map_err(to_backend)?;
        Ok(vols
            .into_iter()
            .map(|v| VolumeState {
                id: v.id,
                attached_to: v.vm,
                device_id: v.device_id,
            })
            .collect())
    }

    async fn wait_job(&self, job: &str) -> Result<(), BackendError> {
        self.client.wait(job).await.map(|_| ()).map_err(to_backend)
    }
}
