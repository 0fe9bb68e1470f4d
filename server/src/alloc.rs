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
//!
//! `vaultd` serves with the delay at [`SERVER_PURGE_DELAY_MS`] (100 ms,
//! [`return_freed_memory`]). With the default, the memory a burst of
//! commit groups frees (sled's write buffers, leaf copies, the group's
//! chunks) once stayed resident between bursts, and a server grown to
//! 10^7 entries held 324-352 MiB where it needed about 220; it served with
//! the delay at 0 from then on. Purging at once has a price, though: each
//! page freed is given back and faulted in again, by the committer among
//! others. Since the server's memory shrank (83 MiB at 10^7 entries
//! purging at once, 98-105 MiB with 100 ms, 111 MiB with 1 s), 100 ms
//! keeps it far below its goal of 256 MB for 4-5% more appends and a
//! fifth less system time (docs/benchmarks.md "Freed memory kept 100
//! ms"). Its open, a verification of the whole log, runs inside
//! [`scanning`]: freed memory is kept during the scan and given back once
//! at its end (docs/benchmarks.md "Cost growth").
//!
//! The server also turns transparent huge pages off for its process
//! ([`without_huge_pages`]), as Redis asks of its hosts: mimalloc asks
//! the kernel for huge pages (`MADV_HUGEPAGE`), and with freed memory
//! returned at once each region faulted in again was a 2 MiB page zeroed
//! whole, stalls that set the tails of every workload (authorizations at
//! 10,000/s: p99 7.3-11.4 ms with them, 2.3-2.8 ms without in most runs;
//! docs/benchmarks.md "Without transparent huge pages").

use std::os::raw::c_long;

use libmimalloc_sys as ffi;

/// `mi_option_purge_delay`'s place in mimalloc's `mi_option_e`. The
/// bindings leave options out of their constants, but mimalloc keeps the
/// numbering stable (retired options keep their slot; v2 and v3 agree),
/// and a test checks the option's documented default through this number.
const PURGE_DELAY: ffi::mi_option_t = 15;

/// The purge delay in force, in milliseconds (-1: never).
#[allow(unsafe_code)]
fn purge_delay() -> c_long {
    // SAFETY: reading an option has no precondition. mimalloc's options
    // are plain words read and written without synchronisation (the
    // bindings call these functions not thread safe): a read racing a
    // write gets the old or the new value of an aligned `long`, which at
    // worst delays a purge.
    unsafe { ffi::mi_option_get(PURGE_DELAY) }
}

/// Sets the purge delay; mimalloc reads it each time it would schedule a
/// purge, so it takes effect for memory freed from then on.
#[allow(unsafe_code)]
fn set_purge_delay(ms: c_long) {
    // SAFETY: `mi_option_set` only stores the value, a plain word that
    // the allocator's threads read without synchronisation (formally a
    // race in C, as the bindings say; every option is initialised as the
    // process starts, so a thread reads the old or the new delay, and a
    // stale one at worst delays or hastens one purge).
    unsafe { ffi::mi_option_set(PURGE_DELAY, ms) }
}

/// Gives back, on the calling thread, the memory it freed, and runs the
/// purges scheduled in every arena (a forced `mi_collect`).
#[allow(unsafe_code)]
fn collect_this_thread() {
    // SAFETY: `mi_collect` may be called on any thread at any time; it
    // frees only what no live allocation uses.
    unsafe { ffi::mi_collect(true) }
}

/// Keeps freed memory committed for the rest of the process, for a
/// process that ends with its scan (`vault-verify --data-dir`). Its
/// resident size stays what the scan's peak made it.
pub fn keep_freed_memory() {
    set_purge_delay(-1);
}

/// The environment variable through which an operator sets the delay
/// (mimalloc's own name); when present, it wins over the program's choice.
pub const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// How long a server's freed memory waits before it goes back to the OS:
/// long enough that the pages a commit group or a connection frees are
/// taken again by the next rather than faulted in afresh, short enough
/// that the resident size follows the live heap.
pub const SERVER_PURGE_DELAY_MS: c_long = 100;

/// Returns freed memory to the OS after [`SERVER_PURGE_DELAY_MS`], for a
/// long-lived server whose resident size should follow its live heap,
/// unless the operator set [`PURGE_DELAY_ENV`]. Returns the delay now in
/// force, in milliseconds.
pub fn return_freed_memory() -> c_long {
    if std::env::var_os(PURGE_DELAY_ENV).is_none() {
        set_purge_delay(SERVER_PURGE_DELAY_MS);
    }
    purge_delay()
}

/// mimalloc's environment variable for transparent huge pages; when an
/// operator sets it, mimalloc applies it as the process starts and
/// [`without_huge_pages`] leaves the choice alone.
pub const ALLOW_THP_ENV: &str = "MIMALLOC_ALLOW_THP";

/// Whether transparent huge pages are off for this process.
#[allow(unsafe_code)]
pub fn huge_pages_off() -> bool {
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_GET_THP_DISABLE reads a flag of the calling process and
    // takes no pointer; the C library reads the variadic arguments as
    // `unsigned long`, which they are.
    unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, zero, zero, zero, zero) == 1 }
}

/// Turns transparent huge pages off for this process (the kernel's
/// `PR_SET_THP_DISABLE`, which covers the memory already mapped too),
/// unless the operator set [`ALLOW_THP_ENV`]. Returns whether they are
/// off.
#[allow(unsafe_code)]
pub fn without_huge_pages() -> bool {
    if std::env::var_os(ALLOW_THP_ENV).is_none() {
        let (one, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
        // SAFETY: PR_SET_THP_DISABLE sets a flag of the calling process
        // and takes no pointer; the variadic arguments are `unsigned long`,
        // as the C library reads them. A kernel without it fails the call,
        // and nothing changes.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, one, zero, zero, zero);
        }
    }
    huge_pages_off()
}

/// How long [`scanning`] lets freed memory wait before it may be purged:
/// longer than any open takes, and unlike "never" (-1) it schedules the
/// purge, which the forced collection after the scan then runs at once.
const SCAN_PURGE_DELAY_MS: c_long = 3_600_000;

/// Runs `scan` (a walk of the whole log) with freed memory kept committed,
/// then gives the memory back and restores the purge delay that was in
/// force: a forced `mi_collect` on each of rayon's threads (a
/// verification's readers, idle afterwards, would otherwise hold what they
/// freed) and on this one purges what the scan freed. When the delay in
/// force is "never" (-1, an operator's choice), nothing is purged.
/// `vaultd`'s open on 10^7 entries took 13-14 s purging at once and 10-11 s
/// this way, and left 103-118 MB resident instead of 351-357.
pub fn scanning<T>(scan: impl FnOnce() -> T) -> T {
    let before = purge_delay();
    set_purge_delay(SCAN_PURGE_DELAY_MS);
    let out = scan();
    if before >= 0 {
        // The forced collections run while the long delay still holds:
        // with a delay of 0, mimalloc purges only as memory is freed and
        // skips the scheduled purges.
        rayon::broadcast(|_| collect_this_thread());
        collect_this_thread();
    }
    set_purge_delay(before);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for both checks: they read and set the same process-wide
    /// option, which tests running in parallel would race on.
    #[test]
    fn the_option_number_names_the_purge_delay_and_a_server_sets_its_own() {
        let delay = purge_delay();
        // The defaults of mimalloc v3 (1000 ms) and v2 (10 ms); an
        // environment may set another value through MIMALLOC_PURGE_DELAY.
        let env = std::env::var(PURGE_DELAY_ENV);
        match &env {
            Ok(v) => assert_eq!(&delay.to_string(), v),
            Err(_) => assert!(delay == 1000 || delay == 10, "option 15 is {delay}"),
        }
        let now = return_freed_memory();
        match &env {
            Ok(v) => assert_eq!(&now.to_string(), v, "the operator's value wins"),
            Err(_) => assert_eq!(now, SERVER_PURGE_DELAY_MS),
        }
        // A scan keeps freed memory, then leaves the delay as it found it.
        let inside = scanning(purge_delay);
        assert_eq!(inside, SCAN_PURGE_DELAY_MS);
        assert_eq!(purge_delay(), now);
        // The process's other tests see the default again.
        set_purge_delay(delay);
    }

    #[test]
    fn a_server_turns_huge_pages_off_unless_the_operator_chose() {
        let off = without_huge_pages();
        match std::env::var(ALLOW_THP_ENV).as_deref() {
            Ok("0") => assert!(off),
            Ok(_) => {}
            Err(_) => assert!(off, "PR_SET_THP_DISABLE did not hold"),
        }
        assert_eq!(huge_pages_off(), off);
    }
}
