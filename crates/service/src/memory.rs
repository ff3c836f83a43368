//! Memory that finished streams freed, given back to the system when the server goes idle.
//!
//! The workers make each stream's blocks (1 MiB, and more for a transposed view) in their
//! own glibc arenas, and glibc keeps what is freed there for reuse: after 900 clients that
//! vanished mid-stream (a 970 MiB peak) the server stayed 100-220 MiB above its baseline,
//! with every buffer freed (fixing glibc's mmap threshold at 256 KiB brought that to 25-40
//! MiB). `malloc_trim` returns the free pages of every arena; it locks each arena in turn, so
//! it runs only when no stream is left to stall.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set while a trim runs: idle moments closer together than one trim need only one.
static TRIMMING: AtomicBool = AtomicBool::new(false);

/// Returns the allocator's free memory to the system, on a thread of its own that ends with
/// the trim (a few milliseconds): for when the last stream has ended.
pub fn trim_when_idle() {
    if TRIMMING.swap(true, Ordering::AcqRel) {
        return;
    }
    let trim = || {
        release_free_pages();
        TRIMMING.store(false, Ordering::Release);
    };
    if std::thread::Builder::new()
        .name("weightinit-trim".into())
        .spawn(trim)
        .is_err()
    {
        // No thread to spare: the next idle moment tries again.
        TRIMMING.store(false, Ordering::Release);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_pages() {
    // SAFETY: malloc_trim takes no pointers; glibc locks each arena while it trims it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl's, and those of other systems) have no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() {}
