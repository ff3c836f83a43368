//! Memory that finished streams freed, given back to the system when the server goes idle.
//!
//! The workers make each stream's blocks (1 MiB, and more for a transposed view) in their
//! own glibc arenas, and glibc keeps what is freed there for reuse: after 900 clients that
//! vanished mid-stream (a 970 MiB peak) the server stayed 90-280 MiB above its baseline,
//! with every buffer freed (fixing glibc's mmap threshold at 256 KiB brought that to 25-40
//! MiB). `malloc_trim` returns the free pages of every arena; it locks each arena in turn, so
//! it runs only once no stream has been left for a moment.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set while a trim waits or runs: idle moments closer together than that need only one.
static TRIMMING: AtomicBool = AtomicBool::new(false);

/// How long the server must stay idle before it trims: requests that follow each other at
/// once keep their memory (a trim between them cost the next one its page faults: a
/// Generate of a transposed [8192, 8192] took 0.41-0.62 s instead of 0.30-0.33 s).
const IDLE: Duration = Duration::from_millis(100);

/// Once [`IDLE`] has passed and `idle()` still holds, returns the allocator's free memory to
/// the system, on a thread of its own that ends with the trim: for when the last stream has
/// ended.
pub fn trim_when_idle(idle: impl Fn() -> bool + Send + 'static) {
    if TRIMMING.swap(true, Ordering::AcqRel) {
        return;
    }
    let trim = move || {
        std::thread::sleep(IDLE);
        // A stream that ends from now on asks again.
        TRIMMING.store(false, Ordering::Release);
        if idle() {
            release_free_pages();
        }
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
