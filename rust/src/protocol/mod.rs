//! The per-exchange protocol between ranks, as a state machine without I/O
//! and without a clock (in the manner of quinn-proto and h11).
//!
//! A [`Session`] is one rank's side. The driver (the NIXL transport, or a
//! simulation in tests) feeds it the time, peer messages and transfer
//! completions (`handle_*`), gives it commands (`begin`, `done`, `abort`,
//! `close`), and collects what to do (`poll_output`: messages to send,
//! transfers to post or cancel), what happened (`poll_event`) and when to
//! wake it next (`next_timeout`).
//!
//! One exchange moves one layer. Every rank begins the same exchanges in the
//! same order; each is numbered by a sequence number all ranks advance
//! together. Per exchange:
//! 1. READY to every peer, carrying the placement fingerprint, the rows this
//!    rank wants from that peer and an optional payload (checksums);
//! 2. once READY arrived from every peer and all agree, transfers start:
//!    receivers READ from sources, or sources WRITE into receivers (fixed per
//!    pair at set-up), in schedule rounds;
//! 3. when this rank's incoming data has landed (and the caller verified it,
//!    if asked), DONE to every peer;
//! 4. with DONE from every peer (or proof that some rank had them all: any
//!    message of a later exchange), the exchange commits.
//!
//! A rank never touches a peer's memory before that peer's READY, and
//! overwrites its own rows only after every peer's DONE. When an exchange
//! fails (deadline, failed transfer, a verdict, a peer's agreement message),
//! the survivors run the [`agreement`] and all derive the same [`Verdict`]:
//! commit or not, and which rank to name.

mod agreement;
pub mod knowledge;
pub mod ranks;
mod session;
pub mod wire;

pub use knowledge::{AbortCode, Blame, Knowledge, Report, Verdict, Waiting};
pub use ranks::RankSet;
pub use session::{
    Config, ConfigError, Direction, Event, ExchangeSpec, Failure, Op, Output, Session, Transfer,
    UsageError,
};

/// Nanoseconds on the driver's monotonic clock (origin arbitrary).
pub type Time = u64;
