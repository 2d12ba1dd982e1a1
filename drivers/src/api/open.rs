//! From a config entry to a driver: the one place that knows which drivers exist.

use std::path::Path;
use std::sync::Arc;

use poller::ReactorHandle;

use crate::driver::BlockDriver;
use crate::error::OpenError;
use crate::format::qcow2::{OpenOptions, Qcow2Driver};
use crate::format::raw::RawDriver;
use crate::io::{EngineKind, Storage, nvme};

use super::Bdev;
use super::qos::QosLimits;

fn qos_of(disk: &config::Disk) -> QosLimits {
    disk.qos.map_or_else(QosLimits::default, |q| QosLimits {
        iops: q.iops,
        bandwidth: q.bandwidth,
        burst: q.burst,
    })
}

fn engine_of(disk: &config::Disk) -> EngineKind {
    if disk.driver == config::Driver::Aio { EngineKind::Aio } else { EngineKind::IoUring }
}

/// Opens `disk`. `reactors` are those that may serve it, the first leading: a qcow2
/// image gets a shard on each of the first `shards` of them (default: all).
pub fn open(disk: &config::Disk, reactors: &[ReactorHandle]) -> Result<Arc<Bdev>, OpenError> {
    open_with(disk, reactors, true)
}

/// [`open`] for a block job writing into an image this process already holds (a
/// commit's base, open read-only in a disk's backing chain): without taking its image
/// locks, which that read-only open would refuse; the job takes them
/// ([`crate::driver::BlockDriver::lock_images`]) once the base serves the disk alone.
pub fn open_unlocked(
    disk: &config::Disk,
    reactors: &[ReactorHandle],
) -> Result<Arc<Bdev>, OpenError> {
    open_with(disk, reactors, false)
}

fn open_with(
    disk: &config::Disk,
    reactors: &[ReactorHandle],
    locking: bool,
) -> Result<Arc<Bdev>, OpenError> {
    let path = disk.path.as_deref().unwrap_or(Path::new(""));
    let driver: Arc<dyn BlockDriver> = match disk.format {
        config::Format::Qcow2 => {
            let encryption_key = match &disk.encryption_key_file {
                None => None,
                Some(f) => {
                    let key = std::fs::read(f).map_err(|e| {
                        OpenError::invalid(
                            path,
                            format!("encryption key_file {}: {e}", f.display()),
                        )
                    })?;
                    Some(crate::format::qcow2::luks::Secret(key.into()))
                }
            };
            let storage = match disk.driver {
                config::Driver::NvmeUring => Some(nvme::passthru::open(path, disk.read_only)?),
                config::Driver::Nvme => {
                    Some(nvme::user::open(&path.to_string_lossy(), disk.read_only)?)
                }
                config::Driver::Rbd => Some(open_rbd(disk, path)?),
                _ => None,
            };
            let opts = OpenOptions {
                encryption_key,
                engine: engine_of(disk),
                direct: disk.direct,
                read_only: disk.read_only,
                allowed_backing_dirs: disk.allowed_backing_dirs.clone(),
                l2_cache_bytes: disk.l2_cache_bytes,
                refcount_cache_bytes: disk.refcount_cache_bytes,
                storage,
                data_storage: None,
                zero_hop: true,
                locking,
            };
            if reactors.is_empty() {
                return Err(OpenError::invalid(path, "no reactor"));
            }
            let n = disk.shards.map_or(reactors.len(), |n| n.clamp(1, reactors.len()));
            let n = n.min(crate::format::qcow2::MAX_SHARDS);
            Arc::new(Qcow2Driver::open(path, opts, &reactors[..n])?)
        }
        config::Format::Raw => {
            if disk.encryption_key_file.is_some() {
                return Err(OpenError::invalid(
                    path,
                    "[disk.encryption] applies to LUKS-encrypted qcow2 images; a raw disk \
                     is served as it is",
                ));
            }
            let storage = match disk.driver {
                config::Driver::Null => Storage::null(disk.size.unwrap_or(0)),
                config::Driver::Mem => Storage::mem(disk.size.unwrap_or(0))?,
                config::Driver::Nbd => {
                    let owner =
                        reactors.first().ok_or_else(|| OpenError::invalid(path, "no reactor"))?;
                    crate::io::nbd::open(&path.to_string_lossy(), owner)?
                }
                config::Driver::NvmeUring => nvme::passthru::open(path, disk.read_only)?,
                config::Driver::Nvme => nvme::user::open(&path.to_string_lossy(), disk.read_only)?,
                config::Driver::Rbd => open_rbd(disk, path)?,
                config::Driver::IoUring | config::Driver::Aio if locking => {
                    Storage::open_file(path, engine_of(disk), disk.direct, disk.read_only)?
                }
                config::Driver::IoUring | config::Driver::Aio => {
                    Storage::open_file_unlocked(path, engine_of(disk), disk.direct, disk.read_only)?
                }
            };
            Arc::new(RawDriver::new(storage, disk.read_only))
        }
    };
    Ok(Bdev::new(&disk.name, driver, qos_of(disk)))
}

fn open_rbd(disk: &config::Disk, path: &Path) -> Result<Arc<Storage>, OpenError> {
    let how = disk.rbd.clone().unwrap_or_default();
    crate::io::rbd::open(&path.to_string_lossy(), &how, disk.read_only)
}
