//! glibc malloc tuning for the daemon's allocation pattern.
//!
//! Every selection round allocates the pool matrix and its whitened copy (`d × 4096` f64: 24 MiB each at
//! d = 768) and frees them when the round ends; refits and checkpoints allocate blocks of similar sizes.
//! glibc serves blocks above its mmap threshold with `mmap` and unmaps them on `free`, but the threshold is
//! dynamic: freeing such a block raises the threshold to that block's size (up to 32 MiB), so from then on
//! the same blocks come from the malloc arenas instead. There the freed blocks were not reused and not given
//! back to the system: in soak runs RSS grew by about one pool matrix per round (46 MB/s, to 6.5 GB) while
//! the heap in use stayed small (`examples/memchurn.rs` reproduces it in seconds: 80 MB in use, 6.4 GB free
//! but held by the arenas). A fixed threshold (setting it also turns the dynamic adjustment off) keeps every
//! large block on `mmap`, so freeing it returns the memory.

/// Allocations of at least this many bytes always get their own mapping.
pub const MMAP_THRESHOLD_BYTES: usize = 1 << 20;

/// The environment variable with which glibc users set the threshold themselves (it wins over ours).
pub const MMAP_THRESHOLD_ENV: &str = "MALLOC_MMAP_THRESHOLD_";

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD_BYTES`] (see the module doc). Returns whether it was
/// set: false when `MALLOC_MMAP_THRESHOLD_` is set in the environment or the allocator is not glibc's.
/// Call it once at start-up, before the worker threads start.
pub fn fix_mmap_threshold() -> bool {
    if std::env::var_os(MMAP_THRESHOLD_ENV).is_some() {
        return false;
    }
    set_mmap_threshold(MMAP_THRESHOLD_BYTES)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mmap_threshold(bytes: usize) -> bool {
    use std::ffi::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    /// `M_MMAP_THRESHOLD` in glibc's `<malloc.h>`.
    const M_MMAP_THRESHOLD: c_int = -3;
    let Ok(value) = c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: mallopt only changes allocator parameters (under the allocator's own lock); it returns 1 on
    // success and 0 for a value out of range.
    unsafe { mallopt(M_MMAP_THRESHOLD, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold(_bytes: usize) -> bool {
    false
}

/// glibc's own accounting of the heap (`mallinfo2`), for tests and memory experiments.
#[derive(Clone, Copy, Debug)]
pub struct MallocStats {
    /// Bytes in use (`uordblks`).
    pub in_use: usize,
    /// Bytes free but held by the arenas (`fordblks`).
    pub free_retained: usize,
    /// Blocks mapped on their own (`hblks`) and their bytes (`hblkhd`).
    pub mapped_blocks: usize,
    pub mapped_bytes: usize,
}

/// The allocator's statistics; `None` when the allocator is not glibc's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn malloc_stats() -> Option<MallocStats> {
    #[repr(C)]
    struct Mallinfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    extern "C" {
        fn mallinfo2() -> Mallinfo2;
    }
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let mi = unsafe { mallinfo2() };
    Some(MallocStats {
        in_use: mi.uordblks,
        free_retained: mi.fordblks,
        mapped_blocks: mi.hblks,
        mapped_bytes: mi.hblkhd,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn malloc_stats() -> Option<MallocStats> {
    None
}
