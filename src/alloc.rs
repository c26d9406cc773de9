//! The process's allocator: the system's (glibc's malloc, as std uses), with large blocks
//! marked for transparent huge pages.
//!
//! Why: a training step allocates and frees buffers of 10–50 MB (the LM head's logits for a
//! chunk of rows, the packed products' outputs). glibc maps each of them fresh from the
//! kernel and unmaps it on free, so every step faulted them in again 4 KiB at a time: on a
//! 2-core EPYC, `perf` put page faults, page clearing and `munmap` at 4–5 % of an int8
//! `bench train` step, 276 k faults a run. On machines whose transparent huge pages are
//! "madvise" (the common default), marking such blocks with `MADV_HUGEPAGE` makes the kernel
//! fault them 2 MiB at a time: 13 k faults for the same run, the same peak RSS (the blocks
//! are written whole). Small blocks are left alone: they come from malloc's reused heap.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes are advised (they hold at least one whole 2 MiB page).
const HUGE_MIN: usize = 4 << 20;
/// The x86-64 and 4 KiB-page ARM64 huge page size: the advised range is the block's whole
/// 2 MiB-aligned pages, so no neighbouring block's pages are touched by the advice.
const HUGE_PAGE: usize = 2 << 20;

/// See the module documentation.
pub struct HugeBlocks;

/// The 2 MiB-aligned part [start, end) of the block at `p` of `n` bytes, if any.
fn huge_range(p: usize, n: usize) -> Option<(usize, usize)> {
    let start = p.checked_next_multiple_of(HUGE_PAGE)?;
    let end = p.checked_add(n)? / HUGE_PAGE * HUGE_PAGE;
    (end > start).then_some((start, end))
}

/// Advises huge pages for the block at `p` of `n` bytes (when it is large). The advice only
/// changes how the kernel backs the pages, never their contents; a kernel that refuses it
/// (no transparent huge pages) leaves the block as it was, so its result is not needed.
fn advise(p: *mut u8, n: usize) {
    if p.is_null() || n < HUGE_MIN {
        return;
    }
    if let Some((start, end)) = huge_range(p as usize, n) {
        // SAFETY: [start, end) lies inside the block just allocated to us (it is page-aligned
        // and mapped); MADV_HUGEPAGE does not change memory contents or mappings' validity.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every request goes to `System` unchanged (the same layouts, pointers and sizes);
// the advice after it does not change what the returned block holds or where it lives.
unsafe impl GlobalAlloc for HugeBlocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_range_is_the_blocks_whole_aligned_pages() {
        let m = HUGE_PAGE;
        assert_eq!(huge_range(m, 2 * m), Some((m, 3 * m)));
        assert_eq!(huge_range(m + 16, 4 * m), Some((2 * m, 5 * m)));
        assert_eq!(huge_range(m + 16, 2 * m - 32), None);
        assert_eq!(huge_range(m + 16, 2 * m - 16), Some((2 * m, 3 * m)));
        assert_eq!(huge_range(16, m), None);
        assert_eq!(huge_range(usize::MAX - 16, 64), None);
    }

    /// A large block from the process's allocator carries the huge-page advice: its mapping
    /// in /proc/self/smaps has the `hg` flag (what MADV_HUGEPAGE sets).
    #[test]
    fn large_blocks_are_advised() {
        let v: Vec<u8> = vec![1u8; 16 << 20];
        let (start, _) = huge_range(v.as_ptr() as usize, v.len()).expect("a 16 MB block");
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut flags = None;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= start && start < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.to_string());
                }
            }
        }
        let flags = flags.expect("the block's mapping in /proc/self/smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "VmFlags:{flags}"
        );
        drop(v);
    }
}
