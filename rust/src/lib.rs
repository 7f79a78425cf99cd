//! eplb-xfer core: plan, layout and descriptor code in plain Rust, NIXL loaded
//! at run time, and (feature `python`) the PyO3 bindings in `python.rs`.

pub mod checksum;
pub mod descriptors;
pub mod host_copy;
pub mod layout;
pub mod nixl;
pub mod plan;
pub mod plan_check;
pub mod policy;
#[cfg(feature = "python")]
mod python;
