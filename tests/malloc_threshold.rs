//! `daemon::alloc`: after [`fix_mmap_threshold`], a large block is still mapped on its own after a block of
//! the same size was freed. With glibc's dynamic threshold the first free raises the threshold past that
//! size and the second block comes from the malloc arenas — where the daemon's per-round pool matrices
//! piled up as retained memory (see the module doc). Its own test binary: the threshold is process-wide.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn large_blocks_stay_on_mmap_after_a_free() {
    use armd::daemon::alloc::{fix_mmap_threshold, malloc_stats, MMAP_THRESHOLD_ENV};

    /// Blocks currently mapped on their own.
    fn mapped_blocks() -> usize {
        malloc_stats().expect("glibc malloc").mapped_blocks
    }

    if std::env::var_os(MMAP_THRESHOLD_ENV).is_some() {
        eprintln!("{MMAP_THRESHOLD_ENV} is set; skipping");
        return;
    }
    assert!(fix_mmap_threshold());
    // The pool matrix at d = 768 with a full pool (768 × 4096 f64), as in every selection round.
    let bytes = 768 * 4096 * 8;
    for round in 0..3 {
        let before = mapped_blocks();
        let block = std::hint::black_box(vec![0u8; bytes]);
        assert_eq!(
            mapped_blocks(),
            before + 1,
            "round {round}: the block did not get its own mapping"
        );
        drop(block);
        assert_eq!(
            mapped_blocks(),
            before,
            "round {round}: the block was not unmapped"
        );
    }
}
