//! Runtime options of mimalloc, the allocator every binary of this crate
//! installs as its global allocator.
//!
//! mimalloc returns the pages of freed memory to the OS a while after
//! they fall free ("purging"; the delay is 1 s in mimalloc v3, which the
//! `mimalloc` crate builds, and 10 ms in v2). A long-lived server wants that: it keeps its
//! resident memory near its live heap. A scan of the whole log does not:
//! sled reads each leaf into a fresh buffer and frees it moments later,
//! so the pages went back to the OS and were faulted in and zeroed by the
//! kernel again, over and over (a fifth of `vault-verify`'s CPU time in a
//! profile, docs/benchmarks.md "Verification").

use libmimalloc_sys as ffi;

/// `mi_option_purge_delay`'s place in mimalloc's `mi_option_e`. The
/// bindings leave options out of their constants, but mimalloc keeps the
/// numbering stable (retired options keep their slot; v2 and v3 agree),
/// and a test checks the option's documented default through this number.
const PURGE_DELAY: ffi::mi_option_t = 15;

/// Keeps freed memory committed for the rest of the process, for a
/// process that ends with its scan (`vault-verify --data-dir`). Its
/// resident size stays what the scan's peak made it.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores the value; mimalloc reads the
    // option each time it would schedule a purge.
    unsafe { ffi::mi_option_set(PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_option_number_names_the_purge_delay() {
        // SAFETY: reading an option has no precondition.
        let delay = unsafe { ffi::mi_option_get(PURGE_DELAY) };
        // The defaults of mimalloc v3 (1000 ms) and v2 (10 ms); an
        // environment may set another value through MIMALLOC_PURGE_DELAY.
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(v) => assert_eq!(delay.to_string(), v),
            Err(_) => assert!(delay == 1000 || delay == 10, "option 15 is {delay}"),
        }
    }
}
