//! Graceful shutdown: one signal, observed by every task, so each can finish what it is writing
//! and stop taking new work. The operating system's signals (SIGINT, SIGTERM) are the bus's
//! [`rhinobus::endpoint::wait_for_signal`].

use tokio::sync::watch;

/// Sends the shutdown signal.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Observes the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected trigger and observer.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every observer to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Whether shutdown was signalled.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is signalled (or the trigger is gone).
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_observer_sees_the_signal() {
        let (trigger, mut a) = channel();
        let mut b = a.clone();
        assert!(!a.is_shutdown());
        trigger.trigger();
        a.recv().await;
        b.recv().await;
        assert!(b.is_shutdown());
    }
}
