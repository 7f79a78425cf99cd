//! Safe wrapper over one NIXL agent with a UCX backend.
//!
//! Owns every handle it creates (backend, registrations, prepared lists, the
//! notification map) and releases them in reverse order on drop.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::ffi::{self, Api};
use super::NixlError;

/// Where registered memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemKind {
    /// Host memory (CPU tensors).
    Dram,
    /// Device memory (CUDA tensors); `dev_id` is the CUDA ordinal.
    Vram,
}

impl MemKind {
    fn raw(self) -> c_int {
        match self {
            MemKind::Dram => ffi::MEM_DRAM,
            MemKind::Vram => ffi::MEM_VRAM,
        }
    }
}

/// A prepared descriptor list owned by its [`Agent`]; an index into its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedList {
    slot: usize,
    len: usize,
}

/// A posted (or postable) transfer request.
#[derive(Debug)]
pub struct XferReq {
    raw: ffi::XferReq,
}

// SAFETY: a request handle is only used through its owning Agent, which is
// used from one thread at a time (it sits behind a Mutex).
unsafe impl Send for XferReq {}

/// Direction of a transfer request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XferOp {
    Read,
    Write,
}

/// State of a transfer request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XferState {
    Done,
    InProgress,
}

pub struct Agent {
    api: Arc<Api>,
    raw: ffi::Agent,
    backend: ffi::Backend,
    name: String,
    mem: MemKind,
    dev_id: u64,
    notif_map: ffi::NotifMap,
    registrations: Vec<ffi::RegDlist>,
    prepared: Vec<ffi::DlistHandle>,
    /// Peers whose metadata is loaded (forgotten before teardown).
    remotes: Vec<String>,
    /// The process that created the agent: a forked child never tears it
    /// down (the UCX state it would free belongs to the parent).
    owner_pid: u32,
    requests_created: Cell<u64>,
    requests_released: Cell<u64>,
    notifications_sent: Cell<u64>,
    notifications_received: Cell<u64>,
}

/// Handle and message counts of one agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentCounters {
    pub prepared_lists_live: u64,
    pub requests_created: u64,
    pub requests_released: u64,
    pub notifications_sent: u64,
    pub notifications_received: u64,
}

static LIVE_AGENTS: AtomicU64 = AtomicU64::new(0);

/// NIXL agents alive in this process (created and not yet dropped).
pub fn live_agents() -> u64 {
    LIVE_AGENTS.load(Ordering::Relaxed)
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

// SAFETY: NIXL agents are thread-safe under their default sync mode, and this
// wrapper is only ever used from one thread at a time (it sits behind a Mutex).
unsafe impl Send for Agent {}

fn check(status: ffi::Status, what: &'static str) -> Result<(), NixlError> {
    if status == ffi::SUCCESS {
        Ok(())
    } else {
        Err(NixlError::Call { what, status })
    }
}

fn cstring(s: &str, what: &'static str) -> Result<CString, NixlError> {
    CString::new(s).map_err(|_| NixlError::InvalidName {
        what,
        name: s.to_string(),
    })
}

impl Agent {
    /// Creates an agent named `name` with a UCX backend. NIXL's progress
    /// thread is off: the transport's worker thread drives UCX, so a
    /// notification is seen as soon as it lands and no thread competes for
    /// the core.
    pub fn new(api: Arc<Api>, name: &str, mem: MemKind, dev_id: u64) -> Result<Agent, NixlError> {
        let cname = cstring(name, "agent name")?;
        let mut raw: ffi::Agent = ptr::null_mut();
        let cfg = ffi::AgentConfig {
            enable_prog_thread: false,
            enable_listen_thread: false,
            listen_port: 0,
            thread_sync: 0,
            pthr_delay_us: 0,
            lthr_delay_us: 0,
            capture_telemetry: false,
        };
        // SAFETY: valid C string, config and out-pointer.
        let status = unsafe { (api.create_configured_agent)(cname.as_ptr(), &cfg, &mut raw) };
        check(status, "create_agent")?;
        let mut agent = Agent {
            api,
            raw,
            backend: ptr::null_mut(),
            name: name.to_string(),
            mem,
            dev_id,
            notif_map: ptr::null_mut(),
            registrations: Vec::new(),
            prepared: Vec::new(),
            remotes: Vec::new(),
            owner_pid: std::process::id(),
            requests_created: Cell::new(0),
            requests_released: Cell::new(0),
            notifications_sent: Cell::new(0),
            notifications_received: Cell::new(0),
        };
        LIVE_AGENTS.fetch_add(1, Ordering::Relaxed);
        agent.init_backend()?;
        let mut map: ffi::NotifMap = ptr::null_mut();
        // SAFETY: out-pointer.
        check(
            unsafe { (agent.api.create_notif_map)(&mut map) },
            "create_notif_map",
        )?;
        agent.notif_map = map;
        Ok(agent)
    }

    fn init_backend(&mut self) -> Result<(), NixlError> {
        // (a byte literal, not c"UCX": C-string literals need Rust 1.77 > MSRV)
        let plugin = CStr::from_bytes_with_nul(b"UCX\0").map_err(|_| NixlError::InvalidName {
            what: "plugin name",
            name: "UCX".into(),
        })?;
        let mut mems: ffi::MemList = ptr::null_mut();
        let mut params: ffi::Params = ptr::null_mut();
        // SAFETY: agent is live; out-pointers are valid.
        check(
            unsafe {
                (self.api.get_plugin_params)(self.raw, plugin.as_ptr(), &mut mems, &mut params)
            },
            "get_plugin_params(UCX)",
        )?;
        let mut backend: ffi::Backend = ptr::null_mut();
        // SAFETY: params came from get_plugin_params.
        let status =
            unsafe { (self.api.create_backend)(self.raw, plugin.as_ptr(), params, &mut backend) };
        // SAFETY: both were allocated by get_plugin_params and are not used again.
        unsafe {
            (self.api.destroy_mem_list)(mems);
            (self.api.destroy_params)(params);
        }
        check(status, "create_backend(UCX)")?;
        self.backend = backend;
        Ok(())
    }

    /// The agent's unique name.
    /// Handle and message counts (for leak checks).
    pub fn counters(&self) -> AgentCounters {
        AgentCounters {
            prepared_lists_live: self.prepared.iter().filter(|h| !h.is_null()).count() as u64,
            requests_created: self.requests_created.get(),
            requests_released: self.requests_released.get(),
            notifications_sent: self.notifications_sent.get(),
            notifications_received: self.notifications_received.get(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Registers `(addr, len)` regions of this agent's memory kind and device.
    pub fn register(&mut self, regions: &[(u64, u64)]) -> Result<(), NixlError> {
        if regions.is_empty() {
            return Ok(());
        }
        let mut dlist: ffi::RegDlist = ptr::null_mut();
        // SAFETY: out-pointer.
        check(
            unsafe { (self.api.create_reg_dlist)(self.mem.raw(), &mut dlist, false) },
            "create_reg_dlist",
        )?;
        for &(addr, len) in regions {
            // SAFETY: dlist is live; no per-descriptor metadata.
            let st = unsafe {
                (self.api.reg_dlist_add_desc)(
                    dlist,
                    addr as usize,
                    len as usize,
                    self.dev_id,
                    ptr::null(),
                    0,
                )
            };
            if st != ffi::SUCCESS {
                // SAFETY: dlist is live and not registered.
                unsafe { (self.api.destroy_reg_dlist)(dlist) };
                return Err(NixlError::Call {
                    what: "reg_dlist_add_desc",
                    status: st,
                });
            }
        }
        let opt = self.backend_opt_args()?;
        // SAFETY: all handles are live.
        let st = unsafe { (self.api.register_mem)(self.raw, dlist, opt) };
        // SAFETY: opt_args were created above.
        unsafe { (self.api.destroy_opt_args)(opt) };
        if st != ffi::SUCCESS {
            // SAFETY: registration failed, so the list is ours to destroy.
            unsafe { (self.api.destroy_reg_dlist)(dlist) };
            return Err(NixlError::Call {
                what: "register_mem",
                status: st,
            });
        }
        self.registrations.push(dlist);
        Ok(())
    }

    fn backend_opt_args(&self) -> Result<ffi::OptArgs, NixlError> {
        let mut opt: ffi::OptArgs = ptr::null_mut();
        // SAFETY: out-pointer.
        check(
            unsafe { (self.api.create_opt_args)(&mut opt) },
            "create_opt_args",
        )?;
        // SAFETY: both live.
        let st = unsafe { (self.api.opt_args_add_backend)(opt, self.backend) };
        if st != ffi::SUCCESS {
            // SAFETY: created above.
            unsafe { (self.api.destroy_opt_args)(opt) };
            return Err(NixlError::Call {
                what: "opt_args_add_backend",
                status: st,
            });
        }
        Ok(opt)
    }

    /// This agent's metadata blob, to be loaded by its peers.
    pub fn local_metadata(&self) -> Result<Vec<u8>, NixlError> {
        let mut data: *mut c_void = ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: out-pointers.
        check(
            unsafe { (self.api.get_local_md)(self.raw, &mut data, &mut len) },
            "get_local_md",
        )?;
        // SAFETY: the C API malloc'ed `len` bytes at `data`.
        let out = unsafe { std::slice::from_raw_parts(data as *const u8, len) }.to_vec();
        // SAFETY: malloc'ed by the C API, not used after this.
        unsafe { ffi::free_c(data) };
        Ok(out)
    }

    /// Loads a peer's metadata; returns the peer's agent name.
    pub fn load_remote(&mut self, md: &[u8]) -> Result<String, NixlError> {
        if md.is_empty() {
            return Err(NixlError::Protocol("empty peer metadata".into()));
        }
        let mut name: *mut c_char = ptr::null_mut();
        // SAFETY: md is a valid slice; out-pointer.
        check(
            unsafe {
                (self.api.load_remote_md)(
                    self.raw,
                    md.as_ptr() as *const c_void,
                    md.len(),
                    &mut name,
                )
            },
            "load_remote_md",
        )?;
        // SAFETY: strdup'ed NUL-terminated string.
        let s = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: strdup'ed by the C API.
        unsafe { ffi::free_c(name as *mut c_void) };
        if !self.remotes.contains(&s) {
            self.remotes.push(s.clone());
        }
        Ok(s)
    }

    /// Forgets a peer's metadata and closes its connection (best effort).
    pub fn invalidate_remote(&mut self, peer: &str) {
        if let Ok(c) = CString::new(peer) {
            // SAFETY: live agent, valid C string.
            let _ = unsafe { (self.api.invalidate_remote_md)(self.raw, c.as_ptr()) };
        }
        self.remotes.retain(|r| r != peer);
    }

    /// Prepares a descriptor list on `owner` (`None` = this agent's memory).
    /// `descs` are `(addr, len)` in the owner's address space.
    pub fn prepare(
        &mut self,
        owner: Option<&str>,
        descs: &[(u64, u64)],
        dev_id: u64,
    ) -> Result<PreparedList, NixlError> {
        let owner_c = cstring(owner.unwrap_or(""), "peer agent name")?;
        let mut dlist: ffi::XferDlist = ptr::null_mut();
        // SAFETY: out-pointer.
        check(
            unsafe { (self.api.create_xfer_dlist)(self.mem.raw(), &mut dlist, false) },
            "create_xfer_dlist",
        )?;
        for &(addr, len) in descs {
            // SAFETY: live list.
            let st = unsafe {
                (self.api.xfer_dlist_add_desc)(dlist, addr as usize, len as usize, dev_id)
            };
            if st != ffi::SUCCESS {
                // SAFETY: created above.
                unsafe { (self.api.destroy_xfer_dlist)(dlist) };
                return Err(NixlError::Call {
                    what: "xfer_dlist_add_desc",
                    status: st,
                });
            }
        }
        let opt = self.backend_opt_args()?;
        let mut handle: ffi::DlistHandle = ptr::null_mut();
        // SAFETY: live handles.
        let st = unsafe {
            (self.api.prep_xfer_dlist)(self.raw, owner_c.as_ptr(), dlist, &mut handle, opt)
        };
        // SAFETY: prepared lists copy their descriptors; both are ours.
        unsafe {
            (self.api.destroy_opt_args)(opt);
            (self.api.destroy_xfer_dlist)(dlist);
        }
        check(st, "prep_xfer_dlist")?;
        self.prepared.push(handle);
        Ok(PreparedList {
            slot: self.prepared.len() - 1,
            len: descs.len(),
        })
    }

    fn handle(&self, list: PreparedList) -> Result<ffi::DlistHandle, NixlError> {
        self.prepared
            .get(list.slot)
            .copied()
            .filter(|h| !h.is_null())
            .ok_or_else(|| NixlError::Protocol(format!("unknown prepared list {}", list.slot)))
    }

    /// Builds and posts one request: READ `remote[remote_idx]` into
    /// `local[local_idx]`, or WRITE `local[local_idx]` into
    /// `remote[remote_idx]`, with an optional notification that NIXL delivers
    /// to the remote agent once the data landed. Returns the request and
    /// whether it already completed.
    pub fn post(
        &self,
        op: XferOp,
        local: PreparedList,
        local_idx: &[c_int],
        remote: PreparedList,
        remote_idx: &[c_int],
        notify: Option<&[u8]>,
    ) -> Result<(XferReq, XferState), NixlError> {
        if local_idx.len() != remote_idx.len() {
            return Err(NixlError::Protocol(format!(
                "descriptor count mismatch: {} local vs {} remote",
                local_idx.len(),
                remote_idx.len()
            )));
        }
        let sides = [
            (local_idx, local.len, "local"),
            (remote_idx, remote.len, "remote"),
        ];
        for (&i, lim, side) in sides
            .iter()
            .flat_map(|&(idx, lim, side)| idx.iter().map(move |i| (i, lim, side)))
        {
            if i < 0 || i as usize >= lim {
                return Err(NixlError::Protocol(format!(
                    "{side} descriptor index {i} out of range 0..{lim}"
                )));
            }
        }
        let (lh, rh) = (self.handle(local)?, self.handle(remote)?);
        let opt = self.backend_opt_args()?;
        if let Some(msg) = notify {
            // SAFETY: live opt args; the message is copied by NIXL.
            let st = unsafe {
                let a = (self.api.opt_args_set_notif_msg)(
                    opt,
                    msg.as_ptr() as *const c_void,
                    msg.len(),
                );
                if a == ffi::SUCCESS {
                    (self.api.opt_args_set_has_notif)(opt, true)
                } else {
                    a
                }
            };
            if st != ffi::SUCCESS {
                // SAFETY: created above.
                unsafe { (self.api.destroy_opt_args)(opt) };
                return Err(NixlError::Call {
                    what: "opt_args_set_notif_msg",
                    status: st,
                });
            }
        }
        let mut raw: ffi::XferReq = ptr::null_mut();
        let op_raw = match op {
            XferOp::Read => ffi::OP_READ,
            XferOp::Write => ffi::OP_WRITE,
        };
        // SAFETY: handles are live prepared lists; indices validated above.
        let st = unsafe {
            (self.api.make_xfer_req)(
                self.raw,
                op_raw,
                lh,
                local_idx.as_ptr(),
                local_idx.len(),
                rh,
                remote_idx.as_ptr(),
                remote_idx.len(),
                &mut raw,
                opt,
            )
        };
        if st != ffi::SUCCESS {
            // SAFETY: created above.
            unsafe { (self.api.destroy_opt_args)(opt) };
            return Err(NixlError::Call {
                what: "make_xfer_req",
                status: st,
            });
        }
        let req = XferReq { raw };
        bump(&self.requests_created, 1);
        // SAFETY: live request.
        let st = unsafe { (self.api.post_xfer_req)(self.raw, req.raw, opt) };
        // SAFETY: created above.
        unsafe { (self.api.destroy_opt_args)(opt) };
        match st {
            ffi::SUCCESS => Ok((req, XferState::Done)),
            ffi::IN_PROG => Ok((req, XferState::InProgress)),
            s => {
                self.release(req);
                Err(NixlError::Call {
                    what: "post_xfer_req",
                    status: s,
                })
            }
        }
    }

    /// Releases a prepared list built with [`Agent::prepare`] (e.g. a set-up
    /// probe); its slot is never reused.
    pub fn release_list(&mut self, list: PreparedList) {
        if let Some(h) = self.prepared.get_mut(list.slot) {
            if !h.is_null() {
                // SAFETY: a live handle of this agent, released once.
                unsafe { (self.api.release_xfer_dlist_handle)(self.raw, *h) };
                *h = ptr::null_mut();
            }
        }
    }

    /// Polls a posted request.
    pub fn status(&self, req: &XferReq) -> Result<XferState, NixlError> {
        // SAFETY: live request.
        match unsafe { (self.api.get_xfer_status)(self.raw, req.raw) } {
            ffi::SUCCESS => Ok(XferState::Done),
            ffi::IN_PROG => Ok(XferState::InProgress),
            s => Err(NixlError::Call {
                what: "get_xfer_status",
                status: s,
            }),
        }
    }

    /// Releases a request (aborting it if still in flight).
    pub fn release(&self, req: XferReq) {
        bump(&self.requests_released, 1);
        // SAFETY: live request, consumed here.
        unsafe {
            if (self.api.release_xfer_req)(self.raw, req.raw) == ffi::SUCCESS {
                (self.api.destroy_xfer_req)(req.raw);
            }
        }
    }

    /// Sends a standalone notification to a peer whose metadata is loaded.
    pub fn notify(&self, peer: &str, msg: &[u8]) -> Result<(), NixlError> {
        let c = cstring(peer, "peer agent name")?;
        let opt = self.backend_opt_args()?;
        // SAFETY: live agent, valid buffers.
        let st = unsafe {
            (self.api.gen_notif)(
                self.raw,
                c.as_ptr(),
                msg.as_ptr() as *const c_void,
                msg.len(),
                opt,
            )
        };
        // SAFETY: created above.
        unsafe { (self.api.destroy_opt_args)(opt) };
        check(st, "gen_notif")?;
        bump(&self.notifications_sent, 1);
        Ok(())
    }

    /// Drains received notifications into `out` as `(sender agent, message)`.
    pub fn drain_notifs(&self, out: &mut Vec<(String, Vec<u8>)>) -> Result<(), NixlError> {
        let map = self.notif_map;
        // SAFETY: live map.
        unsafe { (self.api.notif_map_clear)(map) };
        // SAFETY: live agent and map.
        check(
            unsafe { (self.api.get_notifs)(self.raw, map, ptr::null_mut()) },
            "get_notifs",
        )?;
        let mut n_agents = 0usize;
        // SAFETY: live map.
        check(
            unsafe { (self.api.notif_map_size)(map, &mut n_agents) },
            "notif_map_size",
        )?;
        for i in 0..n_agents {
            let mut name: *const c_char = ptr::null();
            // SAFETY: i < size.
            check(
                unsafe { (self.api.notif_map_get_agent_at)(map, i, &mut name) },
                "notif_map_get_agent_at",
            )?;
            // SAFETY: NUL-terminated string owned by the map, valid until clear.
            let sender = unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            let mut n = 0usize;
            // SAFETY: name is a key of the map.
            check(
                unsafe { (self.api.notif_map_get_notifs_size)(map, name, &mut n) },
                "notif_map_get_notifs_size",
            )?;
            for j in 0..n {
                let mut data: *const c_void = ptr::null();
                let mut len = 0usize;
                // SAFETY: j < n.
                check(
                    unsafe { (self.api.notif_map_get_notif)(map, name, j, &mut data, &mut len) },
                    "notif_map_get_notif",
                )?;
                let msg = if len == 0 {
                    Vec::new()
                } else {
                    // SAFETY: the map owns `len` bytes at `data` until clear.
                    unsafe { std::slice::from_raw_parts(data as *const u8, len) }.to_vec()
                };
                out.push((sender.clone(), msg));
                bump(&self.notifications_received, 1);
            }
        }
        // SAFETY: live map.
        unsafe { (self.api.notif_map_clear)(map) };
        Ok(())
    }
}

impl Drop for Agent {
    /// Teardown in the order UCX needs: prepared lists go first, then every
    /// peer connection is closed and the worker progressed (requests still
    /// queued on a dead endpoint are purged while the memory they reference
    /// is still registered), then memory is deregistered, then the agent goes.
    fn drop(&mut self) {
        if std::process::id() != self.owner_pid {
            // A forked child: leave the parent's agent alone (leak our copy).
            self.prepared.clear();
            self.registrations.clear();
            return;
        }
        // SAFETY: every handle below was created by this agent and is released once.
        unsafe {
            for h in self.prepared.drain(..) {
                if !h.is_null() {
                    (self.api.release_xfer_dlist_handle)(self.raw, h);
                }
            }
        }
        for peer in std::mem::take(&mut self.remotes) {
            if let Ok(c) = CString::new(peer) {
                // SAFETY: live agent, valid C string.
                let _ = unsafe { (self.api.invalidate_remote_md)(self.raw, c.as_ptr()) };
            }
        }
        let mut sink = Vec::new();
        for _ in 0..8 {
            if self.drain_notifs(&mut sink).is_err() {
                break;
            }
            sink.clear();
        }
        // SAFETY: as above.
        unsafe {
            for d in std::mem::take(&mut self.registrations) {
                let opt = self.backend_opt_args().unwrap_or(ptr::null_mut());
                (self.api.deregister_mem)(self.raw, d, opt);
                if !opt.is_null() {
                    (self.api.destroy_opt_args)(opt);
                }
                (self.api.destroy_reg_dlist)(d);
            }
            if !self.notif_map.is_null() {
                (self.api.destroy_notif_map)(self.notif_map);
            }
            (self.api.destroy_agent)(self.raw);
        }
        LIVE_AGENTS.fetch_sub(1, Ordering::Relaxed);
    }
}
