//! NIXL, loaded at run time: the C API binding ([`ffi`]), a safe agent
//! ([`agent`]), node detection and per-pair choices ([`topology`]), and the
//! transport that drives the protocol state machine over NIXL ([`transport`]).

pub mod agent;
pub mod ffi;
pub mod topology;
pub mod transport;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::layout::LayoutError;

/// Everything that can go wrong talking to NIXL or to peers.
#[derive(Debug, Clone, PartialEq)]
pub enum NixlError {
    /// The C API library could not be loaded or lacks symbols.
    Load { path: String, reason: String },
    /// A C API call returned an error status.
    Call { what: &'static str, status: i32 },
    /// A name contained a NUL byte.
    InvalidName { what: &'static str, name: String },
    /// A peer sent something we cannot use, or the caller broke a protocol rule.
    Protocol(String),
    /// A layout (ours or a peer's) is unusable.
    Layout(LayoutError),
    /// Invalid caller input, detected before anything moved.
    Input(String),
    /// A peer did not finish its part of `layer` before the deadline.
    Timeout {
        peer: u32,
        layer: usize,
        waited_s: f64,
        waiting_for: &'static str,
    },
    /// A transfer or notification involving `peer` failed.
    PeerFailed {
        peer: u32,
        layer: usize,
        reason: String,
    },
}

impl fmt::Display for NixlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NixlError::Load { path, reason } => write!(f, "cannot load NIXL C API library {path}: {reason}"),
            NixlError::Call { what, status } => write!(f, "NIXL call {what} failed with status {status}"),
            NixlError::InvalidName { what, name } => write!(f, "{what} {name:?} contains a NUL byte"),
            NixlError::Protocol(m) => write!(f, "protocol error: {m}"),
            NixlError::Layout(e) => write!(f, "{e}"),
            NixlError::Input(m) => write!(f, "{m}"),
            NixlError::Timeout { peer, layer, waited_s, waiting_for } => write!(
                f,
                "layer {layer}: rank {peer} did not finish within {waited_s:.1}s (waiting for {waiting_for})"
            ),
            NixlError::PeerFailed { peer, layer, reason } => write!(f, "layer {layer}: transfer with rank {peer} failed: {reason}"),
        }
    }
}

impl std::error::Error for NixlError {}

impl From<LayoutError> for NixlError {
    fn from(e: LayoutError) -> Self {
        NixlError::Layout(e)
    }
}

/// Loads (once per path, for the life of the process) NIXL's C API library.
pub fn load_api(path: &Path) -> Result<Arc<ffi::Api>, NixlError> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<ffi::Api>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(api) = map.get(path) {
        return Ok(api.clone());
    }
    let api = Arc::new(ffi::Api::load(path)?);
    map.insert(path.to_path_buf(), api.clone());
    Ok(api)
}
