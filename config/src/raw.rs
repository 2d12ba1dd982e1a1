//! The config file as serde sees it: every table rejects unknown keys, and the values an
//! error may point at keep their span so validation can report line and column.

use serde::Deserialize;
use toml::Spanned;

use crate::ByteSize;

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDisk {
    pub name: Spanned<String>,
    pub path: Option<Spanned<String>>,
    pub format: Option<Spanned<String>>,
    pub driver: Option<Spanned<String>>,
    pub direct: Option<bool>,
    pub read_only: Option<bool>,
    pub size: Option<Spanned<ByteSize>>,
    pub allowed_backing_dirs: Option<Vec<Spanned<String>>>,
    pub l2_cache: Option<Spanned<ByteSize>>,
    pub refcount_cache: Option<Spanned<ByteSize>>,
    pub shards: Option<Spanned<i64>>,
    pub vhost_user_blk: Option<Spanned<RawVhostUserBlk>>,
    pub qos: Option<Spanned<RawQos>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVhostUserBlk {
    pub socket: Spanned<String>,
    pub queues: Option<Spanned<u16>>,
}
