//! The config file as serde sees it: every table rejects unknown keys, and the values an
//! error may point at keep their span so validation can report line and column.

use serde::Deserialize;
use toml::Spanned;

use crate::ByteSize;
use crate::security::{RawDiskEncryption, RawDiskNbd, RawId, RawPerms, RawTls};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub appliance: Option<RawAppliance>,
    pub nbd: Option<RawNbd>,
    pub metrics: Option<RawMetrics>,
    pub control: Option<RawControl>,
    #[serde(default)]
    pub disk: Vec<RawDisk>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAppliance {
    pub cores: Option<Spanned<Vec<usize>>>,
    pub idle: Option<Spanned<String>>,
    pub hugepages: Option<Spanned<RawHugepages>>,
    pub buffer_pool: Option<Spanned<ByteSize>>,
    pub state_dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawHugepages {
    Bool(bool),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControl {
    pub socket: Spanned<String>,
    pub owner: Option<Spanned<RawId>>,
    pub group: Option<Spanned<RawId>>,
    pub mode: Option<Spanned<i64>>,
    pub allowed_target_dirs: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQos {
    pub iops: Option<Spanned<u64>>,
    pub bandwidth: Option<Spanned<String>>,
    pub burst: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNbd {
    pub listen: Vec<Spanned<String>>,
    pub max_connections: Option<Spanned<u64>>,
    pub idle_timeout: Option<Spanned<f64>>,
    pub stall_timeout: Option<Spanned<f64>>,
    pub socket_io: Option<Spanned<String>>,
    pub zero_copy_send: Option<Spanned<String>>,
    pub multishot_receive: Option<Spanned<String>>,
    pub socket_owner: Option<Spanned<RawId>>,
    pub socket_group: Option<Spanned<RawId>>,
    pub socket_mode: Option<Spanned<i64>>,
    pub tls: Option<RawTls>,
    pub client_tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDisk {
    pub name: Spanned<String>,
    pub path: Option<Spanned<String>>,
    pub format: Option<Spanned<String>>,
    pub driver: Option<Spanned<String>>,
    pub direct: Option<Spanned<bool>>,
    pub read_only: Option<bool>,
    pub size: Option<Spanned<ByteSize>>,
    pub allowed_backing_dirs: Option<Vec<Spanned<String>>>,
    pub l2_cache: Option<Spanned<ByteSize>>,
    pub refcount_cache: Option<Spanned<ByteSize>>,
    pub shards: Option<Spanned<i64>>,
    pub vhost_user_blk: Option<Spanned<RawVhostUserBlk>>,
    pub qos: Option<Spanned<RawQos>>,
    pub nbd: Option<RawDiskNbd>,
    pub encryption: Option<RawDiskEncryption>,
    pub rbd: Option<Spanned<crate::rbd::RawDiskRbd>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVhostUserBlk {
    pub socket: Spanned<String>,
    pub queues: Option<Spanned<u16>>,
    pub owner: Option<Spanned<RawId>>,
    pub group: Option<Spanned<RawId>>,
    pub mode: Option<Spanned<i64>>,
}

impl RawControl {
    pub(crate) fn perms(&mut self) -> RawPerms {
        RawPerms { owner: self.owner.take(), group: self.group.take(), mode: self.mode.take() }
    }
}

impl RawVhostUserBlk {
    pub(crate) fn perms(&mut self) -> RawPerms {
        RawPerms { owner: self.owner.take(), group: self.group.take(), mode: self.mode.take() }
    }
}

impl RawNbd {
    pub(crate) fn perms(&mut self) -> RawPerms {
        RawPerms {
            owner: self.socket_owner.take(),
            group: self.socket_group.take(),
            mode: self.socket_mode.take(),
        }
    }
}
