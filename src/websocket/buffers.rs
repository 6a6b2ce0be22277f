//! Read buffers lent to tunnels only while data is moving.
//!
//! An idle tunnel owns no buffer: it waits for readiness, borrows one here, reads, forwards, and gives it
//! back. Free buffers are kept per thread (no lock on the hot path), a few of them at most. Each gateway
//! counts the buffers currently lent out, so tests and `/status` can check that idle tunnels hold none.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Size of one read: large enough that big messages move in few system calls.
pub const BUFFER_SIZE: usize = 32 * 1024;
/// Free buffers kept per thread; more are freed.
const KEEP_PER_THREAD: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Counts the buffers lent out by one gateway.
#[derive(Debug, Default, Clone)]
pub struct BufferPool {
    lent: Arc<AtomicUsize>,
}

impl BufferPool {
    pub fn take(&self) -> Buffer {
        let bytes = FREE
            .with(|free| free.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice());
        self.lent.fetch_add(1, Ordering::Relaxed);
        Buffer {
            bytes: Some(bytes),
            lent: Arc::clone(&self.lent),
        }
    }

    /// Buffers currently held by tunnels.
    pub fn lent(&self) -> usize {
        self.lent.load(Ordering::Relaxed)
    }
}

/// A borrowed read buffer; dropping it gives it back.
pub struct Buffer {
    bytes: Option<Box<[u8]>>,
    lent: Arc<AtomicUsize>,
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes.as_deref().unwrap_or_default()
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.lent.fetch_sub(1, Ordering::Relaxed);
        if let Some(bytes) = self.bytes.take() {
            // try_with: during thread teardown the free list may already be gone; then just free.
            let _ = FREE.try_with(|free| {
                let mut free = free.borrow_mut();
                if free.len() < KEEP_PER_THREAD {
                    free.push(bytes);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_count_follows_buffers() {
        let pool = BufferPool::default();
        let a = pool.take();
        let b = pool.take();
        assert_eq!(pool.lent(), 2);
        assert_eq!(a.len(), BUFFER_SIZE);
        drop(a);
        assert_eq!(pool.lent(), 1);
        drop(b);
        assert_eq!(pool.lent(), 0);
    }
}
