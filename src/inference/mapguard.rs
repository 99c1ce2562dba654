//! A SIGBUS guard for the model file mappings.
//!
//! A model is read in place from a shared read-only mapping of its file. If
//! the file shrinks while mapped (the store's object files are 0444, but root
//! ignores that), touching a page past the new end of file raises SIGBUS,
//! whose default action kills the whole node. [`GuardedMap`] registers its
//! range in a fixed-size, lock-free table; a process-wide SIGBUS handler
//! (installed once, on first use) looks the faulting address up there and,
//! when it lies inside a registered mapping, maps an anonymous zero page over
//! the faulting page, marks that mapping damaged and returns, so the faulting
//! load is retried and reads zeros. Callers must check
//! [`GuardedMap::damaged`] after reading and throw away anything computed
//! since (the engine fails the request: "model file changed on disk").
//! Faults outside registered mappings go to the handler that was installed
//! before ours (Rust's own stack-overflow handler, or the default action).
//!
//! The handler is async-signal-safe: it reads atomics, calls `mmap` (a plain
//! system call) and at most `sigaction`; it takes no lock and allocates
//! nothing.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings that can be guarded at once (one per loaded model).
pub const SLOTS: usize = 256;

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const ACTIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    end: AtomicUsize,
    damaged: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    damaged: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS disposition before ours, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Faults outside our mappings: hand them to whoever handled SIGBUS before.
///
/// # Safety
/// Called only from the signal handler with the kernel's arguments.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get();
    let action = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // Restore the default action and return: the faulting instruction
        // runs again and the kernel kills the process with SIGBUS, as it
        // would have without us (a hardware fault cannot be ignored).
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid disposition;
        // sigaction is async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
        return;
    }
    let Some(p) = prev else { return };
    if p.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the previous handler has this signature;
        // we pass the kernel's own arguments on.
        unsafe {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(action);
            f(sig, info, ctx);
        }
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal number.
        unsafe {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(action);
            f(sig);
        }
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for slot in &TABLE {
        if slot.state.load(Ordering::Acquire) != ACTIVE {
            continue;
        }
        let (start, end) = (
            slot.start.load(Ordering::Relaxed),
            slot.end.load(Ordering::Relaxed),
        );
        if addr < start || addr >= end {
            continue;
        }
        let base = addr & !(page - 1);
        // SAFETY: `base..base + page` lies inside a live mapping we own
        // (registered ranges are unregistered before they are unmapped), so
        // replacing that page with an anonymous zero page touches no other
        // memory. mmap is a plain system call, safe in a signal handler.
        let r = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            slot.damaged.store(true, Ordering::SeqCst);
            return;
        }
        break;
    }
    // SAFETY: forwarding the kernel's arguments from within the handler.
    unsafe { chain(sig, info, ctx) };
}

fn install() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            PAGE.store(p as usize, Ordering::Relaxed);
        }
        // SAFETY: plain sigaction calls with valid, initialised structs; the
        // previous disposition is stored before our handler can run (it is
        // read only for faults, which need a registered mapping, which
        // needs this function to have returned).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            let _ = PREVIOUS.set(old);
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
    INSTALLED.load(Ordering::Acquire)
}

/// A read-only shared mapping of a file whose pages past a shrunken end of
/// file read as zeros instead of killing the process (see the module docs).
/// Dereferences to the mapped bytes.
pub struct GuardedMap {
    // Declared before `map`: unregistered before the pages are unmapped.
    slot: SlotGuard,
    map: memmap2::Mmap,
}

struct SlotGuard(usize);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        TABLE[self.0].state.store(FREE, Ordering::Release);
    }
}

impl std::fmt::Debug for GuardedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedMap")
            .field("len", &self.map.len())
            .field("damaged", &self.damaged())
            .finish()
    }
}

impl GuardedMap {
    /// Maps `file` read-only and registers the mapping with the guard
    /// (installing the SIGBUS handler on first use). Fails if the handler
    /// cannot be installed or [`SLOTS`] mappings are already guarded.
    pub fn map(file: &File) -> std::io::Result<GuardedMap> {
        if !install() {
            return Err(std::io::Error::other(
                "could not install the SIGBUS handler guarding model mappings",
            ));
        }
        // SAFETY: a read-only mapping; the file changing under it is exactly
        // what the guard handles: pages cut off by truncation read as zeros
        // and mark the mapping damaged, which readers check.
        let map = unsafe { memmap2::Mmap::map(file)? };
        let start = map.as_ptr() as usize;
        let end = start + map.len();
        for (i, slot) in TABLE.iter().enumerate() {
            if slot
                .state
                .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                slot.start.store(start, Ordering::Relaxed);
                slot.end.store(end, Ordering::Relaxed);
                slot.damaged.store(false, Ordering::Relaxed);
                slot.state.store(ACTIVE, Ordering::Release);
                return Ok(GuardedMap {
                    slot: SlotGuard(i),
                    map,
                });
            }
        }
        Err(std::io::Error::other(format!(
            "too many mapped models (the SIGBUS guard holds {SLOTS})"
        )))
    }

    /// True once a page of the mapping was found cut off from its file (the
    /// file shrank): reads since may have returned zeros.
    pub fn damaged(&self) -> bool {
        TABLE[self.slot.0].damaged.load(Ordering::SeqCst)
    }
}

impl std::ops::Deref for GuardedMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Truncating a mapped file under a guarded map turns the lost pages
    /// into zeros and sets the flag, instead of SIGBUS.
    #[test]
    fn truncated_pages_read_as_zeros_and_mark_the_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut f = File::create(&path).expect("create");
        f.write_all(&vec![7u8; 1 << 20]).expect("write");
        drop(f);
        let f = File::open(&path).expect("open");
        let m = GuardedMap::map(&f).expect("map");
        let other = GuardedMap::map(&f).expect("map");
        assert_eq!(m[(1 << 20) - 1], 7);
        assert!(!m.damaged());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open rw")
            .set_len(4096)
            .expect("truncate");
        assert_eq!(m[100], 7, "pages still in the file are intact");
        assert!(!m.damaged());
        // SAFETY: a volatile read of a byte of the live mapping, so the
        // compiler cannot elide the access that faults.
        let b = unsafe { std::ptr::read_volatile(m.as_ptr().add((1 << 20) - 1)) };
        assert_eq!(b, 0);
        assert!(m.damaged());
        assert!(!other.damaged(), "only the faulting mapping is marked");
    }
}
