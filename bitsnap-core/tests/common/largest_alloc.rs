//! A global allocator for tests that bound allocation sizes: the system allocator,
//! recording the largest single request. A test binary installs it with
//! `#[global_allocator] static ALLOCATOR: Largest = Largest;` and reads [`largest`];
//! one that simulates a machine without enough memory calls [`refuse_from`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, recording the largest single request.
pub struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// The largest single allocation requested so far in this process.
#[allow(dead_code)] // not every test binary reads it
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

static REFUSE_FROM: AtomicUsize = AtomicUsize::new(usize::MAX);

/// From now on, every request of `bytes` or more fails (returns null), as on a machine
/// without that much memory.
#[allow(dead_code)] // not every test binary refuses
pub fn refuse_from(bytes: usize) {
    REFUSE_FROM.store(bytes, Ordering::Relaxed);
}

fn refused(size: usize) -> bool {
    LARGEST.fetch_max(size, Ordering::Relaxed);
    size >= REFUSE_FROM.load(Ordering::Relaxed)
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged, or
// returns null, which `GlobalAlloc` allows for any request (allocation failure); the
// only additions are atomics, which neither allocate nor touch the memory.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refused(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refused(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refused(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}
