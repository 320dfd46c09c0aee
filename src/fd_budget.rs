//! The process's budget of open descriptors, shared by connections and kernel pipes.
//!
//! `RLIMIT_NOFILE` is one number for the whole process. A connection holds two descriptors (its
//! client and upstream sockets); so does a kernel pipe (a spliced direction's pipe, a tap's tee
//! pipe). Counting both against one cap, in pairs of descriptors, keeps them from taking each
//! other's: the event loops stop accepting while the budget is spent (clients wait in the listen
//! backlog, as at `max_connections`), and a direction that would need a pipe the budget cannot
//! give copies through user space instead. So `accept(2)`, `socket(2)` and `pipe2(2)` do not run
//! out of descriptors, and no client is reset for lack of one.
//!
//! The budget is process-wide, like the limit it models: every worker and every tap share it.
//! It is unlimited until [`set_cap`] is called (the event loop does, from the open-file limit);
//! a slot is released when its [`Slot`] or [`PipeSlot`] is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Pairs of descriptors that connections and pipes may hold at once.
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Pairs of descriptors held now.
static USED: AtomicUsize = AtomicUsize::new(0);
/// Kernel pipes among them.
static PIPES: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of descriptor pairs that connections and pipes may hold at once.
pub fn set_cap(pairs: usize) {
    CAP.store(pairs, Ordering::Relaxed);
}

/// Pairs of descriptors that connections and pipes may hold at once (`usize::MAX`: no budget).
pub fn cap() -> usize {
    CAP.load(Ordering::Relaxed)
}

/// Whether one more pair of descriptors fits. Workers check and take separately, so `N` workers
/// may overshoot by at most `N - 1` connections (the reserve outside the budget covers them).
pub fn has_room() -> bool {
    USED.load(Ordering::Relaxed) < CAP.load(Ordering::Relaxed)
}

/// Pairs of descriptors held now.
pub fn used() -> usize {
    USED.load(Ordering::Relaxed)
}

/// Kernel pipes counted in the budget now.
pub fn pipes() -> usize {
    PIPES.load(Ordering::Relaxed)
}

/// A connection's two sockets counted in the budget, released on drop. Zero-sized.
#[derive(Debug)]
#[must_use = "dropping a slot releases it at once"]
pub struct Slot(());

impl Slot {
    /// Counts a connection's two sockets, unconditionally: whether it may be accepted was decided
    /// before (see [`has_room`]).
    pub fn connection() -> Slot {
        USED.fetch_add(1, Ordering::Relaxed);
        Slot(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        USED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A kernel pipe's two descriptors counted in the budget, released on drop. Zero-sized.
#[derive(Debug)]
#[must_use = "dropping a slot releases it at once"]
pub struct PipeSlot(());

impl PipeSlot {
    /// A slot for a kernel pipe, if the budget has room; `None` leaves the descriptors to
    /// connections (the caller copies instead of splicing, or the tap drops the bytes).
    pub fn take() -> Option<PipeSlot> {
        if !take_if_room(&USED, CAP.load(Ordering::Relaxed)) {
            return None;
        }
        PIPES.fetch_add(1, Ordering::Relaxed);
        Some(PipeSlot(()))
    }
}

impl Drop for PipeSlot {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::Relaxed);
        USED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Adds one to `used` if it is below `cap`; whether it did.
fn take_if_room(used: &AtomicUsize, cap: usize) -> bool {
    used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        (n < cap).then_some(n + 1)
    })
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_take_only_what_the_cap_leaves() {
        let used = AtomicUsize::new(0);
        assert!(take_if_room(&used, 2));
        assert!(take_if_room(&used, 2));
        assert!(!take_if_room(&used, 2), "cap reached");
        assert_eq!(used.load(Ordering::Relaxed), 2);
        used.fetch_sub(1, Ordering::Relaxed);
        assert!(take_if_room(&used, 2), "a released slot is free again");
        // Connections may have taken the budget past the cap: pipes still get nothing.
        used.store(5, Ordering::Relaxed);
        assert!(!take_if_room(&used, 2));
        assert_eq!(used.load(Ordering::Relaxed), 5);
        assert_eq!(std::mem::size_of::<Slot>(), 0);
        assert_eq!(std::mem::size_of::<PipeSlot>(), 0);
    }
}
