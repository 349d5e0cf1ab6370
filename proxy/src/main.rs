//! The `space` binary.
use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
    process::ExitCode,
};

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// mimalloc, called through its plain entry points when the alignment is one every block
/// already has (as std's System allocator does): `mimalloc::MiMalloc` always takes the
/// aligned entry points, which cost about twice as many instructions per call.
struct SpaceAlloc;

/// mimalloc's MI_MAX_ALIGN_SIZE: a block of at least `align <= 16` bytes from `mi_malloc` is
/// aligned to `align` (the rule of its own `mi_malloc_is_naturally_aligned`, which its aligned
/// entry points apply before taking the same plain path).
const MIN_ALIGN: usize = 16;

#[inline]
fn plain(layout: &Layout) -> bool {
    layout.align() <= MIN_ALIGN && layout.align() <= layout.size()
}

// SAFETY: forwards to mimalloc, which returns blocks of at least the requested size and
// alignment (the plain calls only when their natural alignment covers `layout`).
unsafe impl GlobalAlloc for SpaceAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            mi_malloc(layout.size()) as *mut u8
        } else {
            mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            mi_zalloc(layout.size()) as *mut u8
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi_free(ptr as *mut c_void);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MIN_ALIGN && layout.align() <= new_size {
            mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

#[global_allocator]
static GLOBAL: SpaceAlloc = SpaceAlloc;

/// mimalloc's `mi_option_purge_delay` (v2 `mimalloc.h`, not exported by libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for a second before returning it to the OS. mimalloc's default (10 ms)
/// returns it almost at once, so every route-table rebuild faulted its pages back in
/// (zeroed by the kernel): a 100,000-instance build took 170-270 ms instead of 55-70 ms.
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide mimalloc option before any thread is started.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    }
}

fn main() -> ExitCode {
    tune_allocator();
    space_proxy::cli::main()
}
