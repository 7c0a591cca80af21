//! [`CallCancel`]: cancels the isolated calls of one query at once.
//!
//! A query's plan captures the session's configuration when it is planned, and every
//! [`ScalarUDFImpl::invoke_with_args`](datafusion::logical_expr::ScalarUDFImpl) call of that plan
//! sees it. A runner that wants to cancel a query (the REPL on Ctrl-C, the service at its time
//! limit) installs a fresh token in the session's configuration before planning it, and cancels
//! the token: every isolated call of that query waiting on a worker stops, the worker is killed,
//! and the call fails with "cancelled". (An in-process plugin call cannot be interrupted.)

use std::any::Any;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::common::config::{ConfigEntry, ConfigExtension, ExtensionOptions};
use datafusion::common::{Result, plan_err};
use datafusion::prelude::SessionConfig;
use rustix::event::{EventfdFlags, eventfd};

/// A cancellation token for the isolated plugin calls of one query. Cheap to clone; clones share
/// the token.
#[derive(Debug, Clone)]
pub struct CallCancel(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    cancelled: AtomicBool,
    /// Readable once cancelled: waiting calls poll it with their worker's channel.
    event: Option<OwnedFd>,
    notify: tokio::sync::Notify,
}

impl Default for CallCancel {
    fn default() -> Self {
        Self::new()
    }
}

impl CallCancel {
    /// A token that is not cancelled.
    pub fn new() -> CallCancel {
        let event = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).ok();
        CallCancel(Arc::new(Inner {
            cancelled: AtomicBool::new(false),
            event,
            notify: tokio::sync::Notify::new(),
        }))
    }

    /// Cancels: isolated calls waiting now or later on this token stop at once.
    pub fn cancel(&self) {
        if self.0.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(fd) = &self.0.event {
            // Level-triggered: the counter stays non-zero, so every poll sees it.
            let written = rustix::io::write(fd, &1u64.to_ne_bytes());
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot signal the cancellation event");
            }
        }
        self.0.notify.notify_waiters();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Completes when the token is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// The descriptor that becomes readable when the token is cancelled.
    pub(crate) fn event(&self) -> Option<BorrowedFd<'_>> {
        self.0.event.as_ref().map(|fd| fd.as_fd())
    }

    /// Installs this token in `config`: queries planned with it are cancelled by it.
    pub fn install(&self, config: &mut SessionConfig) {
        config.options_mut().extensions.insert(self.clone());
    }

    /// The token installed in a query's configuration, if any.
    pub fn of(config: &datafusion::config::ConfigOptions) -> Option<&CallCancel> {
        config.extensions.get::<CallCancel>()
    }
}

impl ConfigExtension for CallCancel {
    const PREFIX: &'static str = "udfsql_call_cancel";
}

impl ExtensionOptions for CallCancel {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    /// Shares the token: a plan cloned from a configuration is cancelled with it (this is the
    /// point of the token, unlike settings).
    fn cloned(&self) -> Box<dyn ExtensionOptions> {
        Box::new(self.clone())
    }

    fn set(&mut self, key: &str, _value: &str) -> Result<()> {
        plan_err!("{} has no setting {key}", Self::PREFIX)
    }

    fn entries(&self) -> Vec<ConfigEntry> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_makes_the_event_readable_and_wakes_waiters() {
        let token = CallCancel::new();
        let clone = token.clone();
        let mut buf = [0u8; 8];
        assert!(rustix::io::read(token.event().unwrap(), &mut buf).is_err());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let waiter = std::thread::spawn(move || {
            runtime.block_on(clone.cancelled());
            clone.is_cancelled()
        });
        token.cancel();
        assert!(waiter.join().unwrap());
        assert_eq!(
            rustix::io::read(token.event().unwrap(), &mut buf).unwrap(),
            8
        );
    }
}
