//! Keeps a read of a memory-mapped index file from killing the process when another program
//! truncates the file underneath it (Linux).
//!
//! Reading a mapped page past the end of a file that was truncated after it was mapped raises
//! SIGBUS, whose default action kills the process. `Index` checks the file's size and mtime
//! before and after every read of its mapped vectors (`Index::check_file`), but the file can
//! still be truncated *during* a search. For that window, the first mapped load installs a
//! SIGBUS handler: a fault inside a registered map has its page replaced by a page of zeros
//! (so the read completes with zeros instead of crashing) and the map is marked poisoned; the
//! check after the read then turns the whole call into `Error::File`. A fault anywhere else
//! is passed on to the handler that was installed before (or the default action: the process
//! dies as it would have).
//!
//! The handler only reads a fixed table of atomics and calls `mmap`, a plain system call.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many maps can be guarded at once; a load beyond that reads the vectors into memory.
const SLOTS: usize = 256;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// A registered map: unregistered on drop (drop it before unmapping).
pub(crate) struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers `[start, start + len)`; `None` if the handler is unavailable or every slot
    /// is taken (the caller must then not rely on a map that can fault).
    pub(crate) fn register(start: *const u8, len: usize) -> Option<Guard> {
        if len == 0 || !install() {
            return None;
        }
        for (i, s) in TABLE.iter().enumerate() {
            // Claim a free slot by its length (0 = free), then publish the start.
            if s.len
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                s.poisoned.store(false, Ordering::Relaxed);
                s.start.store(start as usize, Ordering::Release);
                s.len.store(len, Ordering::Release);
                return Some(Guard { slot: i });
            }
        }
        None
    }

    /// Whether a read of this map faulted (its file was truncated while it was read).
    pub(crate) fn poisoned(&self) -> bool {
        TABLE[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.len.store(usize::MAX, Ordering::Release);
        s.start.store(0, Ordering::Release);
        s.len.store(0, Ordering::Release);
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use super::{Ordering, TABLE};
    use std::sync::OnceLock;

    static PAGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4096);
    /// The SIGBUS action in place before ours (set once, before ours is installed).
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

    pub(super) fn install() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        *INSTALLED.get_or_init(|| {
            // SAFETY: sysconf and sigaction are called with valid arguments; PREVIOUS is set
            // before the handler that reads it is installed.
            unsafe {
                let page = libc::sysconf(libc::_SC_PAGESIZE);
                if page > 0 {
                    PAGE.store(page as usize, Ordering::Relaxed);
                }
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                    return false;
                }
                let _ = PREVIOUS.set(previous);
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = handler as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0
            }
        })
    }

    extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t; si_addr is meaningful for a fault
        // (si_code > 0, not a signal sent by a process).
        let (fault, addr) = unsafe { ((*info).si_code > 0, (*info).si_addr() as usize) };
        if fault {
            for s in TABLE.iter() {
                let len = s.len.load(Ordering::Acquire);
                let start = s.start.load(Ordering::Acquire);
                if len != 0 && len != usize::MAX && addr >= start && addr - start < len {
                    let page = PAGE.load(Ordering::Relaxed);
                    let at = addr & !(page - 1);
                    // SAFETY: [at, at + page) lies inside a live map of ours (registered maps
                    // are unregistered before they are unmapped, and a fault on it means one of
                    // our reads is using it). Replacing the page with private zeros changes what
                    // the read sees, never memory anyone else owns.
                    let p = unsafe {
                        libc::mmap(
                            at as *mut libc::c_void,
                            page,
                            libc::PROT_READ,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                            -1,
                            0,
                        )
                    };
                    if p != libc::MAP_FAILED {
                        s.poisoned.store(true, Ordering::Release);
                        return; // the read is retried and sees zeros
                    }
                }
            }
        }
        // Not ours: hand it to the previous action, or die as the default action would.
        let Some(previous) = PREVIOUS.get() else {
            return;
        };
        // SAFETY: `previous` is the action the process had; calling it as it was declared
        // (with or without SA_SIGINFO) is what the kernel would have done.
        unsafe {
            let h = previous.sa_sigaction;
            if h == libc::SIG_IGN && !fault {
                // a SIGBUS sent by a process, which the process ignored before us
            } else if h == libc::SIG_DFL || h == libc::SIG_IGN {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
                if !fault {
                    libc::raise(sig);
                }
                // a fault re-executes the instruction and now gets the default action
            } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(h);
                f(sig, info, ctx);
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
                f(sig);
            }
        }
    }
}

#[cfg(target_os = "linux")]
use imp::install;

#[cfg(not(target_os = "linux"))]
fn install() -> bool {
    false
}
