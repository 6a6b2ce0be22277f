//! Waiting for a signal every connection waits for (shutdown, a reload) without taking the signal's lock
//! each time a connection's task wakes.
//!
//! tokio's `Notified` (inside a `CancellationToken`'s `cancelled()` too) takes its `Notify`'s lock every
//! time it is polled while it waits, to store the waker it is given; and a task polls every branch of its
//! `select!` each time it wakes. A connection task waiting for its next request and for shutdown would
//! lock the one mutex every connection on every worker shares, on every request. `Quiet` polls the future
//! it wraps only when that future woke the task (and on the first poll): the future is given a waker of
//! `Quiet`'s own, which notes the wakeup and passes it on to the task's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// A future polled only when it has woken its task.
pub struct Quiet<F> {
    inner: Pin<Box<F>>,
    wake: Arc<Woken>,
    /// The waker handed to `inner`, made on the first poll.
    waker: Option<Waker>,
}

/// What `inner` wakes: a note that it did, and the task.
#[derive(Default)]
struct Woken {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Quiet<F> {
    pub fn new(inner: F) -> Quiet<F> {
        Quiet {
            inner: Box::pin(inner),
            wake: Arc::default(),
            waker: None,
        }
    }
}

impl<F: Future> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // The task to wake is noted before the note of a wakeup is read: a wakeup in between is seen
        // here or reaches this task.
        this.wake.task.register(cx.waker());
        let waker = match &this.waker {
            Some(waker) => {
                if !this.wake.woken.swap(false, Ordering::AcqRel) {
                    return Poll::Pending;
                }
                waker
            }
            None => this.waker.insert(Waker::from(Arc::clone(&this.wake))),
        };
        this.inner.as_mut().poll(&mut Context::from_waker(waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, waking the waker it was last given when `fire` is
    /// called.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Probe {
        fn fire(&self) {
            self.ready.store(true, Ordering::Release);
            if let Some(waker) = self.waker.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    struct Polled(Arc<Probe>);

    impl Future for Polled {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::Relaxed);
            if self.0.ready.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A waker that counts its wakeups.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_when_it_woke_the_task() {
        let probe = Arc::new(Probe::default());
        let mut quiet = Quiet::new(Polled(Arc::clone(&probe)));
        let task = Arc::new(Task::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        // The task woken by something else: the inner future is left alone.
        for _ in 0..10 {
            assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        }
        assert_eq!(probe.polls.load(Ordering::Relaxed), 1);
        // Its own wakeup reaches the task, and the next poll reaches it.
        probe.fire();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_ready());
        assert_eq!(probe.polls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_wakeup_reaches_the_task_polling_now() {
        let probe = Arc::new(Probe::default());
        let mut quiet = Quiet::new(Polled(Arc::clone(&probe)));
        let first = Arc::new(Task::default());
        let second = Arc::new(Task::default());
        let waker = Waker::from(Arc::clone(&first));
        assert!(
            Pin::new(&mut quiet)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        // Polled from another task since: that one is woken.
        let waker = Waker::from(Arc::clone(&second));
        assert!(
            Pin::new(&mut quiet)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        probe.fire();
        assert_eq!(first.0.load(Ordering::Relaxed), 0);
        assert_eq!(second.0.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_cancellation_is_seen() {
        let token = tokio_util::sync::CancellationToken::new();
        let quiet = Quiet::new(token.clone().cancelled_owned());
        let waiting = tokio::spawn(quiet);
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the wait ends")
            .expect("the task");
    }
}
