//! The vhost-user control protocol for one disk, on its control-plane thread.
//!
//! The `vhost` crate parses and validates messages (sizes, fd counts, REPLY_ACK); this
//! type keeps the device state — negotiated features, the guest memory table, each
//! vring's configuration — and starts a queue on its reactor once it has memory,
//! addresses, a kick descriptor and (with protocol features) an enable. Stopping a
//! queue (GET_VRING_BASE, disable, reset, disconnect) waits for its requests in flight.
//! Memory table changes stop the running queues first, so no request ever holds a
//! pointer into memory that is unmapped.

use std::fs::File;
use std::sync::Arc;

use drivers::Bdev;
use poller::ReactorHandle;
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::blk;
use super::inflight::InflightRegion;
use super::queue::{self, QueueStart};

/// The largest virtqueue we accept.
pub const MAX_QUEUE_SIZE: u16 = 1024;

#[derive(Default)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u16,
    kick: Option<File>,
    call: Option<Arc<File>>,
    enabled: bool,
    running: bool,
}

/// The guest memory table: mapped regions and the front-end's virtual addresses.
struct Memory {
    mem: Arc<GuestMemoryMmap>,
    /// (front-end virtual address, size, guest physical address).
    va: Vec<(u64, u64, u64)>,
}

/// Memory regions a front-end may add one at a time (`VHOST_USER_ADD_MEM_REG`; QEMU's
/// limit).
const MAX_MEM_SLOTS: u64 = 509;

/// Maps one front-end memory region, refusing empty and absurd sizes and a region that
/// reaches past the end of its file: touching such a mapping is a SIGBUS, which would
/// end the whole appliance (every disk), not just this front-end's connection. (A
/// front-end that shrinks its file after this check can still do that; QEMU does not.)
fn map_region(r: &VhostUserMemoryRegion, f: File) -> VuResult<GuestRegionMmap> {
    if r.memory_size == 0 || r.memory_size > 1 << 40 {
        return Err(VuError::InvalidParam);
    }
    let meta = f.metadata().map_err(|_| VuError::InvalidParam)?;
    let end = r.mmap_offset.checked_add(r.memory_size).ok_or(VuError::InvalidParam)?;
    if !meta.is_file() || meta.len() < end {
        return Err(err("memory region past the end of its file"));
    }
    GuestRegionMmap::from_range(
        GuestAddress(r.guest_phys_addr),
        r.memory_size as usize,
        Some(FileOffset::new(f, r.mmap_offset)),
    )
    .map_err(|_| VuError::InvalidParam)
}

impl Memory {
    fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.va
            .iter()
            .find(|(start, size, _)| va >= *start && va - start < *size)
            .map(|(start, _, gpa)| gpa + (va - start))
    }
}

/// One disk's vhost-user-blk device state.
pub struct VuBlk {
    id: u64,
    disk: Arc<Bdev>,
    queues: u16,
    reactors: Vec<ReactorHandle>,
    features: u64,
    protocol: u64,
    memory: Option<Memory>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightRegion>>,
    serial: [u8; blk::ID_BYTES],
    /// The front-end's channel for the back end's messages (with `BACKEND_REQ`).
    backend: Option<Backend>,
}

fn err(m: &'static str) -> VuError {
    VuError::InvalidOperation(m)
}

impl VuBlk {
    pub fn new(id: u64, disk: Arc<Bdev>, queues: u16, reactors: Vec<ReactorHandle>) -> Self {
        let mut serial = [0u8; blk::ID_BYTES];
        let name = disk.name().as_bytes();
        serial[..name.len().min(blk::ID_BYTES)]
            .copy_from_slice(&name[..name.len().min(blk::ID_BYTES)]);
        VuBlk {
            id,
            disk,
            queues,
            reactors,
            features: 0,
            protocol: 0,
            memory: None,
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            inflight: None,
            serial,
            backend: None,
        }
    }

    /// The virtio-blk configuration space, from what the disk is now (its capacity
    /// changes with `disk_resize`).
    fn config(&self) -> [u8; blk::CONFIG_BYTES] {
        let info = self.disk.info();
        let blk_size = info.min_block_size.clamp(512, 4096).next_power_of_two();
        blk::config_space(info.size, blk_size, info.preferred_block_size, self.queues)
    }

    /// The disk this device serves.
    pub fn disk(&self) -> &Arc<Bdev> {
        &self.disk
    }

    /// The channel to tell the front-end that the configuration changed, if it gave one.
    pub fn backend_channel(&self) -> Option<Backend> {
        self.backend.clone()
    }

    fn offered_features(&self) -> u64 {
        let mut f = blk::F_VERSION_1
            | blk::F_PROTOCOL_FEATURES
            | blk::F_RING_INDIRECT_DESC
            | blk::F_RING_EVENT_IDX
            | blk::F_SIZE_MAX
            | blk::F_SEG_MAX
            | blk::F_BLK_SIZE
            | blk::F_TOPOLOGY
            | blk::F_FLUSH
            | blk::F_MQ;
        if self.disk.info().read_only {
            f |= blk::F_RO;
        } else {
            f |= blk::F_DISCARD | blk::F_WRITE_ZEROES;
        }
        f
    }

    fn reactor_for(&self, index: u16) -> ReactorHandle {
        self.reactors[usize::from(index) % self.reactors.len()].clone()
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings.get_mut(index as usize).ok_or(VuError::InvalidParam)
    }

    /// Swaps the memory map: running queues stop (their workers hold the old map), and
    /// start again on the new one.
    fn replace_memory(&mut self, memory: Option<Memory>) -> VuResult<()> {
        let running: Vec<u16> =
            (0..self.queues).filter(|&i| self.vrings[usize::from(i)].running).collect();
        for &i in &running {
            self.stop(i);
        }
        self.memory = memory;
        for i in running {
            self.maybe_start(i)?;
        }
        Ok(())
    }

    /// Starts `index` if it has everything it needs.
    fn maybe_start(&mut self, index: u16) -> VuResult<()> {
        let protocol_features = self.features & blk::F_PROTOCOL_FEATURES != 0;
        let Some(mem) = &self.memory else { return Ok(()) };
        let v = &self.vrings[usize::from(index)];
        if v.running
            || !v.addr_set
            || v.size == 0
            || v.kick.is_none()
            || (protocol_features && !v.enabled)
        {
            return Ok(());
        }
        let (Some(desc), Some(avail), Some(used)) =
            (mem.va_to_gpa(v.desc), mem.va_to_gpa(v.avail), mem.va_to_gpa(v.used))
        else {
            tracing::warn!(queue = index, "vring addresses outside the memory table");
            return Err(VuError::InvalidParam);
        };
        let start = QueueStart {
            device: self.id,
            index,
            size: v.size,
            desc,
            avail,
            used,
            next_avail: v.base,
            mem: mem.mem.clone(),
            kick: v.kick.as_ref().and_then(|k| k.try_clone().ok()),
            call: v.call.clone(),
            event_idx: self.features & blk::F_RING_EVENT_IDX != 0,
            indirect: self.features & blk::F_RING_INDIRECT_DESC != 0,
            bdev: self.disk.clone(),
            inflight: self.inflight.clone(),
            serial: self.serial,
        };
        let r = self.reactor_for(index);
        match r.call(move || queue::start(start)) {
            Ok(()) => {
                self.vrings[usize::from(index)].running = true;
                tracing::debug!(disk = self.disk.name(), queue = index, "virtqueue started");
                Ok(())
            }
            Err(m) => {
                tracing::warn!(
                    disk = self.disk.name(),
                    queue = index,
                    "cannot start virtqueue: {m}"
                );
                Err(VuError::InvalidParam)
            }
        }
    }

    /// Stops `index` (draining it); returns its next available index.
    fn stop(&mut self, index: u16) -> u16 {
        let v = &self.vrings[usize::from(index)];
        if !v.running {
            return v.base;
        }
        let (id, r) = (self.id, self.reactor_for(index));
        let next = r.block_on(move || queue::stop(id, index)).unwrap_or(v.base);
        let v = &mut self.vrings[usize::from(index)];
        v.running = false;
        v.base = next;
        next
    }

    /// Stops every queue and flushes the disk (disconnect, reset).
    pub fn stop_all(&mut self) {
        for i in 0..self.queues {
            self.stop(i);
        }
        let d = self.disk.clone();
        let r = self.reactors[0].clone();
        let res = r.block_on(move || async move {
            match d.channel() {
                Ok(ch) => ch.flush().await,
                Err(e) => Err(e),
            }
        });
        if let Err(e) = res {
            tracing::error!(disk = self.disk.name(), "flush after the front-end left failed: {e}");
        }
    }

    /// Forgets everything the front-end set up (a new connection starts clean, except
    /// the inflight region, which only a new GET/SET_INFLIGHT_FD replaces).
    pub fn reset(&mut self) {
        self.stop_all();
        self.features = 0;
        self.protocol = 0;
        self.memory = None;
        self.vrings = (0..self.queues).map(|_| Vring::default()).collect();
        self.backend = None;
    }
}

impl VhostUserBackendReqHandlerMut for VuBlk {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered_features() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() || ctx.is_empty() {
            return Err(VuError::InvalidParam);
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut va = Vec::with_capacity(ctx.len());
        for (r, f) in ctx.iter().zip(files) {
            regions.push(map_region(r, f)?);
            va.push((r.user_addr, r.memory_size, r.guest_phys_addr));
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|_| VuError::InvalidParam)?;
        self.replace_memory(Some(Memory { mem: Arc::new(mem), va }))?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        let v = self.vring(index)?;
        if v.running {
            return Err(err("vring is running"));
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let v = self.vring(index)?;
        if v.running {
            return Err(err("vring is running"));
        }
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        v.addr_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        if v.running {
            return Err(err("vring is running"));
        }
        v.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        if index >= u32::from(self.queues) {
            return Err(VuError::InvalidParam);
        }
        let next = self.stop(index as u16);
        let v = &mut self.vrings[index as usize];
        v.kick = None;
        v.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(u32::from(index))?;
        // Without a descriptor the front-end asks for polling; an eventfd that is never
        // written serves, since reactors poll the ring anyway.
        let fd = match fd {
            Some(f) => f,
            // SAFETY: eventfd has no memory-safety preconditions.
            None => match unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) } {
                fd if fd >= 0 => {
                    // SAFETY: a fresh descriptor we own.
                    unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                }
                _ => return Err(err("eventfd")),
            },
        };
        let running = v.running;
        v.kick = Some(fd);
        if running {
            self.stop(u16::from(index));
        }
        self.maybe_start(u16::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let id = self.id;
        let call = fd.map(Arc::new);
        let v = self.vring(u32::from(index))?;
        v.call = call.clone();
        if v.running {
            let r = self.reactor_for(u16::from(index));
            r.call(move || queue::set_call(id, u16::from(index), call));
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // The back-end channel, for configuration-change messages (`disk_resize`).
            // QEMU accepts BACKEND_REQ only with BACKEND_SEND_FD (and REPLY_ACK) too;
            // no message of ours carries a descriptor.
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::BACKEND_SEND_FD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.get_protocol_features()?.bits();
        if features & !offered != 0 {
            return Err(VuError::InvalidParam);
        }
        self.protocol = features;
        tracing::debug!(disk = self.disk.name(), "vhost-user protocol features {features:#x}");
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let v = self.vring(index)?;
        v.enabled = enable;
        if enable {
            self.maybe_start(index as u16)
        } else {
            self.stop(index as u16);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let (o, s) = (offset as usize, size as usize);
        if o > blk::CONFIG_BYTES || s > 4096 {
            return Err(VuError::InvalidParam);
        }
        // Bytes past our structure read as zeros (newer fields we do not offer).
        let mut out = vec![0u8; s];
        let have = blk::CONFIG_BYTES.saturating_sub(o).min(s);
        out[..have].copy_from_slice(&self.config()[o..o + have]);
        Ok(out)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Nothing in the virtio-blk config space is writable here (no CONFIG_WCE).
        Err(err("config space is read-only"))
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        // With REPLY_ACK the front-end acknowledges each message; the sender waits.
        let ack = self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        backend.set_reply_ack_flag(ack);
        self.backend = Some(backend);
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(err("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(err("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        if inflight.num_queues == 0
            || inflight.num_queues > self.queues
            || inflight.queue_size == 0
            || inflight.queue_size > MAX_QUEUE_SIZE
        {
            return Err(VuError::InvalidParam);
        }
        tracing::debug!(
            disk = self.disk.name(),
            queues = inflight.num_queues,
            size = inflight.queue_size,
            "inflight region requested"
        );
        let (region, file, size) = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(|_| VuError::MemFdCreateError)?;
        self.inflight = Some(Arc::new(region));
        Ok((
            VhostUserInflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: inflight.num_queues,
                queue_size: inflight.queue_size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if inflight.num_queues > self.queues || inflight.queue_size > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        let region = InflightRegion::open(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|_| VuError::InvalidParam)?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let mapped = Arc::new(map_region(region, fd)?);
        let (mem, mut va) = match &self.memory {
            Some(m) if m.va.len() >= MAX_MEM_SLOTS as usize => {
                return Err(err("every memory slot is in use"));
            }
            Some(m) => (m.mem.insert_region(mapped), m.va.clone()),
            None => (GuestMemoryMmap::from_arc_regions(vec![mapped]), Vec::new()),
        };
        // Overlapping regions are refused here (vm-memory checks the new map).
        let mem = mem.map_err(|_| VuError::InvalidParam)?;
        va.push((region.user_addr, size, gpa));
        self.replace_memory(Some(Memory { mem: Arc::new(mem), va }))?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let Some(m) = &self.memory else { return Err(VuError::InvalidParam) };
        let (mem, _) =
            m.mem.remove_region(GuestAddress(gpa), size).map_err(|_| VuError::InvalidParam)?;
        let mut va = m.va.clone();
        va.retain(|&(_, s, g)| (g, s) != (gpa, size));
        let next = (!va.is_empty()).then(|| Memory { mem: Arc::new(mem), va });
        self.replace_memory(next)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(err("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(err("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(err("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(err("dirty logging is not supported"))
    }
}
