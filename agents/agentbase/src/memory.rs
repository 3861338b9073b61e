//! How an agent's process uses memory.
//!
//! glibc gives each thread that allocates its own malloc arena (up to eight per core), and
//! memory freed into one arena is not reused by another: a tokio runtime's workers and its
//! blocking pool each end up holding a few hundred KiB of freed buffers. An agent makes few
//! allocations on its threads at once, so one arena costs it no measurable contention
//! (glibc's per-thread cache serves the small ones without the lock) and saves it that
//! memory: 0.7 MiB of eventd's 6.8 MiB under the events benchmark (docs/performance.md).

/// The arenas an agent's allocator may use; `MALLOC_ARENA_MAX` in the environment overrides it.
pub const MALLOC_ARENAS: i32 = 1;

/// Limits the process's malloc arenas to [`MALLOC_ARENAS`], unless the environment already
/// sets `MALLOC_ARENA_MAX` (glibc reads that itself). Call before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before the runtime's threads
        // exist, so no allocation races with the change.
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
        if ok != 1 {
            tracing::debug!("mallopt(M_ARENA_MAX) refused; arenas left at glibc's default");
        }
    }
}

/// Gives the free memory of the process's heap back to the kernel (`malloc_trim`), not only
/// what is free at its top as `free` does by itself. For an agent whose work comes in large
/// rounds of small allocations (netmgr reading and publishing a thousand peers every few
/// seconds): without it the holes the last round left between live allocations stay
/// resident, and the next round's peak adds to them.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel; it takes the arenas' locks
    // itself and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
