//! Run-time binding to NIXL's C API (`libnixl_capi.so`).
//!
//! The library is `dlopen`ed from the path Python hands us (the installed
//! `nixl-cuXX` wheel), never linked at build time, so the crate builds and its
//! planner tests run with no NIXL present. Every symbol we call is resolved up
//! front; a missing one is a clear error, not an abort at first use.
//!
//! Declarations follow NIXL's public `src/bindings/rust/wrapper.h` (1.3 - 1.5).
//! Two functions lost a trailing `bool sorted` argument between versions
//! (`create_xfer_dlist`, `create_reg_dlist`); we always pass it as `false`: on
//! the x86-64 and aarch64 C ABIs an extra trailing integer argument is ignored
//! by a callee that does not declare it, so one declaration serves both.

use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

use libloading::Library;

use super::NixlError;

pub type Status = c_int;
pub const SUCCESS: Status = 0;
pub const IN_PROG: Status = 1;

pub type Agent = *mut c_void;
pub type Params = *mut c_void;
pub type MemList = *mut c_void;
pub type Backend = *mut c_void;
pub type OptArgs = *mut c_void;
pub type XferDlist = *mut c_void;
pub type DlistHandle = *mut c_void;
pub type RegDlist = *mut c_void;
pub type XferReq = *mut c_void;
pub type NotifMap = *mut c_void;

pub const MEM_DRAM: c_int = 0;
pub const MEM_VRAM: c_int = 1;
pub const OP_READ: c_int = 0;
pub const OP_WRITE: c_int = 1;

macro_rules! capi {
    ($( $field:ident : fn($($arg:ty),*) ; )*) => {
        /// Resolved NIXL C API entry points. The `Library` is kept alive for as
        /// long as any function pointer may be called.
        pub struct Api {
            $( pub $field: unsafe extern "C" fn($($arg),*) -> Status, )*
            _lib: Library,
        }

        impl Api {
            /// Loads `path` and resolves every function we use.
            pub fn load(path: &Path) -> Result<Api, NixlError> {
                // SAFETY: loading a shared library runs its initialisers; the
                // path is NIXL's own C API library from its wheel.
                let lib = unsafe { Library::new(path) }.map_err(|e| NixlError::Load {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let mut missing: Vec<&'static str> = Vec::new();
                $(
                    let $field = {
                        let name = concat!("nixl_capi_", stringify!($field));
                        // SAFETY: the signature is the one declared by wrapper.h.
                        match unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> Status>(name.as_bytes()) } {
                            Ok(sym) => Some(*sym),
                            Err(_) => { missing.push(name); None }
                        }
                    };
                )*
                match ($($field,)*) {
                    ($(Some($field),)*) => Ok(Api { $($field,)* _lib: lib }),
                    _ => Err(NixlError::Load {
                        path: path.display().to_string(),
                        reason: format!("missing C API symbols: {}", missing.join(", ")),
                    }),
                }
            }
        }
    };
}

/// `nixl_capi_agent_config_t` as laid out by the pinned NIXL 1.5.1 C API
/// (checked against the wheel's `nixl_capi_create_configured_agent`, which
/// reads the port at offset 4, thread sync at 8, delays at 16/24 and the
/// telemetry flag at 32).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AgentConfig {
    pub enable_prog_thread: bool,
    pub enable_listen_thread: bool,
    pub listen_port: i32,
    pub thread_sync: c_int,
    pub pthr_delay_us: u64,
    pub lthr_delay_us: u64,
    pub capture_telemetry: bool,
}

capi! {
    create_configured_agent: fn(*const c_char, *const AgentConfig, *mut Agent);
    destroy_agent: fn(Agent);
    get_plugin_params: fn(Agent, *const c_char, *mut MemList, *mut Params);
    destroy_mem_list: fn(MemList);
    destroy_params: fn(Params);
    create_backend: fn(Agent, *const c_char, Params, *mut Backend);
    create_opt_args: fn(*mut OptArgs);
    destroy_opt_args: fn(OptArgs);
    opt_args_add_backend: fn(OptArgs, Backend);
    opt_args_set_notif_msg: fn(OptArgs, *const c_void, usize);
    opt_args_set_has_notif: fn(OptArgs, bool);
    create_reg_dlist: fn(c_int, *mut RegDlist, bool);
    destroy_reg_dlist: fn(RegDlist);
    reg_dlist_add_desc: fn(RegDlist, usize, usize, u64, *const c_void, usize);
    register_mem: fn(Agent, RegDlist, OptArgs);
    deregister_mem: fn(Agent, RegDlist, OptArgs);
    get_local_md: fn(Agent, *mut *mut c_void, *mut usize);
    load_remote_md: fn(Agent, *const c_void, usize, *mut *mut c_char);
    invalidate_remote_md: fn(Agent, *const c_char);
    create_xfer_dlist: fn(c_int, *mut XferDlist, bool);
    destroy_xfer_dlist: fn(XferDlist);
    xfer_dlist_add_desc: fn(XferDlist, usize, usize, u64);
    prep_xfer_dlist: fn(Agent, *const c_char, XferDlist, *mut DlistHandle, OptArgs);
    release_xfer_dlist_handle: fn(Agent, DlistHandle);
    make_xfer_req: fn(Agent, c_int, DlistHandle, *const c_int, usize, DlistHandle, *const c_int, usize, *mut XferReq, OptArgs);
    post_xfer_req: fn(Agent, XferReq, OptArgs);
    get_xfer_status: fn(Agent, XferReq);
    release_xfer_req: fn(Agent, XferReq);
    destroy_xfer_req: fn(XferReq);
    create_notif_map: fn(*mut NotifMap);
    destroy_notif_map: fn(NotifMap);
    get_notifs: fn(Agent, NotifMap, OptArgs);
    notif_map_size: fn(NotifMap, *mut usize);
    notif_map_get_agent_at: fn(NotifMap, usize, *mut *const c_char);
    notif_map_get_notifs_size: fn(NotifMap, *const c_char, *mut usize);
    notif_map_get_notif: fn(NotifMap, *const c_char, usize, *mut *const c_void, *mut usize);
    notif_map_clear: fn(NotifMap);
    gen_notif: fn(Agent, *const c_char, *const c_void, usize, OptArgs);
}

extern "C" {
    fn free(ptr: *mut c_void);
}

/// Frees memory the C API allocated with `malloc` (metadata blobs, names).
///
/// # Safety
/// `ptr` must come from the C API's malloc/strdup and not be used afterwards.
pub unsafe fn free_c(ptr: *mut c_void) {
    if !ptr.is_null() {
        free(ptr);
    }
}
