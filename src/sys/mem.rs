//! Giving freed heap memory back to the kernel.

/// Returns the heap memory freed so far to the kernel. glibc keeps freed memory in its (per
/// thread) arenas for reuse; after a layer's spans leave the memory cache that is hundreds of
/// MiB the daemon no longer needs.
pub fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
