//! Finding the block device of an attached volume.
//!
//! The kernel's `/dev/vdX` names are recycled after a detach, so a device is
//! identified by its by-id link (`virtio-<serial>`), which names one volume
//! only. The link is polled rather than watched with inotify: udev creates it
//! by rename from a temporary name and some hypervisors add the disk before
//! the guest sees it, and a 20 ms poll over at most the device timeout costs
//! nothing that matters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::contract::DeviceInfo;

const POLL: Duration = Duration::from_millis(20);

/// Waits until `link` exists and resolves; returns the resolved device and
/// the link itself as the stable path. `None` when the deadline passes.
pub async fn wait_for_device(link: &Path, timeout: Duration) -> Option<DeviceInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(resolved) = tokio::fs::canonicalize(link).await {
            return Some(DeviceInfo {
                path: resolved.display().to_string(),
                stable_path: link.display().to_string(),
            });
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `link` is gone; false when the deadline passes first.
pub async fn wait_gone(link: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::fs::symlink_metadata(link).await.is_err() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

pub fn link_for(device_dir: &Path, volume: uuid::Uuid) -> PathBuf {
    device_dir.join(crate::backend::by_id_name(volume))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_a_late_link_and_times_out_on_a_missing_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("disk");
        std::fs::write(&target, b"x").expect("write");
        let link = dir.path().join("virtio-abc");
        let l2 = link.clone();
        let t2 = target.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(60)).await;
            std::os::unix::fs::symlink(&t2, &l2).expect("symlink");
        });
        let d = wait_for_device(&link, Duration::from_secs(5))
            .await
            .expect("appears");
        assert_eq!(
            PathBuf::from(&d.path),
            std::fs::canonicalize(&target).expect("c")
        );
        assert_eq!(d.stable_path, link.display().to_string());
        assert!(
            wait_for_device(&dir.path().join("nope"), Duration::from_millis(50))
                .await
                .is_none()
        );
        assert!(!wait_gone(&link, Duration::from_millis(50)).await);
        std::fs::remove_file(&link).expect("rm");
        assert!(wait_gone(&link, Duration::from_millis(50)).await);
    }
}
