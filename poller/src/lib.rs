//! Reactors for the appliance, in the manner of SPDK's: one thread pinned to each
//! configured core, polling its work sources in a bounded tick and never blocking.
//!
//! What lives here:
//! - [`reactor`]: start-up, the tick loop, the idle policy (`busy` or `adaptive`), the
//!   poller registry that I/O drivers and exports plug into, and [`ReactorHandle`] for
//!   the control plane;
//! - [`executor`]: a per-reactor executor for `!Send` tasks, with fixed task pools so a
//!   request costs no allocation;
//! - [`mailbox`]: typed bounded rings for messages between reactors;
//! - [`timer`]: sleeps and timeouts;
//! - [`fd`]: socket readiness through one edge-triggered epoll set per reactor;
//! - [`dma`]: per-reactor pools of aligned I/O buffers, hugepage-backed when possible.
//!
//! Everything a task touches is reactor-local (`Rc`, `RefCell`, `Cell`); the only
//! shared state is in lock-free rings and relaxed counters.

pub mod dma;
pub mod executor;
pub mod fd;
pub mod inline;
pub mod mailbox;
pub mod reactor;
pub mod timer;

pub use dma::{DmaBuf, HugepageMode};
pub use executor::{LocalOneshot, TaskPool, WaitList, spawn, yield_now};
pub use fd::Async;
pub use inline::InlineFuture;
pub use mailbox::{MailSender, Mailbox, mailbox};
pub use reactor::{
    ForeignWait, IdlePolicy, Phase, PollerId, ReactorHandle, ReactorOptions, Reactors,
    StatsSnapshot, current, current_index, on_reactor, peers, register_poller,
    register_poller_with_pending, register_wakeup_fd, unregister_poller, unregister_wakeup_fd,
};
pub use timer::{Elapsed, sleep, sleep_until, timeout};

#[cfg(test)]
mod tests;
