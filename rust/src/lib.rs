//! eplb-xfer core: planner, placement policy, row layouts, descriptors and the
//! per-exchange protocol in plain Rust, NIXL loaded at run time, and (feature
//! `python`) the PyO3 bindings in `python/`.

pub mod checksum;
pub mod descriptors;
pub mod host_copy;
pub mod layout;
pub mod nixl;
pub mod plan;
pub mod policy;
pub mod protocol;
#[cfg(feature = "python")]
mod python;
