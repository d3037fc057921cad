//! A bound on TLS handshakes in progress on the agent endpoints (TCP and QUIC together).
//!
//! Session admission (`hub::Admission`) bounds the work after a handshake; the handshakes
//! themselves cost the most CPU of a reconnect storm (both sides' signatures), so a fleet coming
//! back at once must not start them all at once either. The accept loops take a permit *before*
//! they accept the next connection: the excess waits in the kernel's listen backlog (TCP) or
//! quinn's incoming queue (QUIC) instead of competing for the CPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct HandshakeLimit {
    limit: usize,
    permits: Arc<Semaphore>,
    in_progress: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// Held while one handshake runs; counted in the peak independently of the semaphore, so the
/// metric shows whether the bound held.
pub struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    in_progress: Arc<AtomicUsize>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HandshakeLimit {
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            limit,
            permits: Arc::new(Semaphore::new(limit)),
            in_progress: Arc::default(),
            peak: Arc::default(),
        }
    }

    /// Waits for a free slot. `None` only if the limit was closed (never, in practice).
    pub async fn slot(&self) -> Option<HandshakeSlot> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let now = self.in_progress.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
        Some(HandshakeSlot {
            _permit: permit,
            in_progress: self.in_progress.clone(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Most handshakes in progress at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_is_given_only_when_one_is_free_and_the_peak_stays_at_the_limit() {
        let limit = HandshakeLimit::new(2);
        let a = limit.slot().await.expect("first");
        let _b = limit.slot().await.expect("second");
        let third = limit.slot();
        tokio::pin!(third);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            std::future::Future::poll(third.as_mut(), &mut cx).is_pending(),
            "a third handshake waits"
        );
        drop(a);
        let _c = third.await.expect("freed slot");
        assert_eq!(limit.peak(), 2);
        assert_eq!(limit.limit(), 2);
    }
}
