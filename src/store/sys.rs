//! Every OS call of the store that needs `unsafe`, in one place: file locks
//! (`flock`), page-cache advice (`posix_fadvise`), block sharing (`FICLONE`)
//! and read-only memory maps. The rest of the store calls these safe
//! wrappers and holds no `unsafe` block of its own.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Takes an exclusive lock on `file` without waiting (`flock(LOCK_EX |
/// LOCK_NB)`). The lock is held until the file is closed. An error with
/// `raw_os_error() == Some(EWOULDBLOCK)` means another open file holds it.
pub(super) fn lock_exclusive_now(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor that `file` owns and keeps open for the
    // duration of the call; no memory is passed. The lock goes with the file.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes a shared lock on `file`, waiting for an exclusive holder to let go
/// (`flock(LOCK_SH)`). The lock is held until the file is closed.
pub(super) fn lock_shared(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor that `file` owns and keeps open for the
    // duration of the call; no memory is passed. The lock goes with the file.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to drop the clean pages of `len` bytes of `file` from
/// `offset` (`posix_fadvise(POSIX_FADV_DONTNEED)`). Advisory: the error is
/// the errno the call returned.
pub(super) fn advise_dont_need(file: &File, offset: u64, len: u64) -> Result<(), i32> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: plain syscall on a descriptor `file` owns and keeps open; no
    // memory is passed.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(r);
    }
    Ok(())
}

/// Tries to clone `src` into `dst` sharing blocks (FICLONE). False when unsupported.
pub(super) fn try_reflink(src: &File, dst: &File) -> bool {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE
    // takes the source fd as its argument and touches no user memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    rc == 0
}

/// Maps `file` read-only.
///
/// # Safety
///
/// The caller must make sure nothing truncates or writes the mapped range
/// while the map lives (a truncation turns reads into `SIGBUS`, a write
/// changes bytes already checked). In the store this holds because objects
/// are read-only and never modified in place, partial files are written only
/// by the store (whose lock is held) and only in chunks not yet verified, and
/// sources being added are hashed from the map and verified again later.
pub(super) unsafe fn map_readonly(file: &File) -> io::Result<memmap2::Mmap> {
    // SAFETY: the caller upholds the contract above (see `# Safety`).
    unsafe { memmap2::Mmap::map(file) }
}
