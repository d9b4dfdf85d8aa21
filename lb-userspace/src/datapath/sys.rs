//! Every raw system call of the data path, each behind a safe function or
//! an RAII type, as aya's `sys/` keeps them: the memory mapping of a
//! `BPF_F_MMAPABLE` array (lookup tables, the VIP index), the batched
//! map update aya 0.14 lacks, the RCU grace period and the page size.
//! Nothing outside this module holds a raw pointer or calls `libc`.
//! Errors name the call that failed.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
};

/// A failed system call, named.
#[derive(Debug, thiserror::Error)]
#[error("{call} failed: {source}")]
pub struct SysError {
    pub call: &'static str,
    pub source: io::Error,
}

impl SysError {
    fn last_os_error(call: &'static str) -> Self {
        Self {
            call,
            source: io::Error::last_os_error(),
        }
    }
}

/// The hardware address of interface `iface` in this thread's network
/// namespace (`SIOCGIFHWADDR`; sysfs would show the namespace it was
/// mounted in, not this thread's).
pub fn interface_mac(iface: &str) -> Result<[u8; 6], SysError> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let name = iface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(SysError {
            call: "ioctl(SIOCGIFHWADDR)",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SysError::last_os_error("socket(AF_INET, SOCK_DGRAM)"));
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero bytes are a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = s.cast_signed();
    }
    // SAFETY: a valid socket and an ifreq with a NUL-terminated name (the
    // name is shorter than the zeroed array); the kernel writes the address
    // into the ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) } < 0 {
        return Err(SysError::last_os_error("ioctl(SIOCGIFHWADDR)"));
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = s.cast_unsigned();
    }
    Ok(mac)
}

/// The size of a memory page.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// How a [`Mapping`] may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// A shared memory mapping of the first bytes of a `BPF_F_MMAPABLE` array
/// map (the one mapping type of the data path); unmapped on drop. Reads and
/// writes are bounds-checked copies of plain-data values.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    access: Access,
}

impl Mapping {
    /// Maps the first `len` bytes (a whole number of pages, at most the
    /// map's size) of the map `fd`.
    pub fn new(fd: BorrowedFd<'_>, len: usize, access: Access) -> Result<Self, SysError> {
        let prot = match access {
            Access::Read => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: a new shared mapping (the kernel picks the address) of a
        // map we hold the fd of; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SysError::last_os_error("mmap"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| SysError {
            call: "mmap",
            source: io::Error::other("mapped at address 0"),
        })?;
        Ok(Self { ptr, len, access })
    }

    /// The byte range of `count` values of `T` from value index `at`, if
    /// it lies inside the mapping.
    fn range<T>(&self, at: usize, count: usize) -> Result<usize, SysError> {
        let size = size_of::<T>();
        let end = at
            .checked_add(count)
            .and_then(|n| n.checked_mul(size))
            .filter(|&end| end <= self.len);
        match end {
            Some(_) => Ok(at * size),
            None => Err(SysError {
                call: "mmap access",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{count} values of {size} bytes at index {at} exceed the {}-byte mapping",
                        self.len
                    ),
                ),
            }),
        }
    }

    /// Copies `src` into the mapping, starting at value index `at` (the
    /// mapping seen as an array of `T`).
    pub fn write<T: aya::Pod>(&mut self, at: usize, src: &[T]) -> Result<(), SysError> {
        if self.access != Access::ReadWrite {
            return Err(SysError {
                call: "mmap access",
                source: io::Error::new(io::ErrorKind::PermissionDenied, "read-only mapping"),
            });
        }
        let offset = self.range::<T>(at, src.len())?;
        // SAFETY: the destination lies inside the mapping (checked above)
        // and is aligned for T (the mapping is page-aligned and `offset`
        // a multiple of size_of::<T>(), itself a multiple of its
        // alignment); the source is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.ptr.as_ptr().add(offset).cast::<T>(),
                src.len(),
            );
        }
        Ok(())
    }

    /// Copies values starting at value index `at` into `dst`.
    pub fn read<T: aya::Pod>(&self, at: usize, dst: &mut [T]) -> Result<(), SysError> {
        let offset = self.range::<T>(at, dst.len())?;
        // SAFETY: the source lies inside the mapping and is aligned (as in
        // `write`); every bit pattern is a valid T (Pod); the destination
        // is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset).cast::<T>(),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `struct bpf_attr` for the batch commands: in_batch, out_batch, keys,
/// values, count, map_fd, elem_flags, flags.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_UPDATE_BATCH` of `u32` keys and `u32` values (map fds, for a
/// map of maps) into the map `map`. Returns how many elements the kernel
/// updated (all of them on success; it may stop part-way).
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: &[u32],
) -> Result<usize, SysError> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let count = keys.len().min(values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the
    // size passed; keys/values hold `count` elements and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            std::ptr::from_mut(&mut attr),
            size_of::<BatchAttr>(),
        )
    };
    if rc != 0 {
        return Err(SysError::last_os_error("bpf(BPF_MAP_UPDATE_BATCH)"));
    }
    Ok(attr.count as usize)
}

/// Waits for an RCU grace period: XDP programs run inside RCU read-side
/// sections, so when this returns no program that started before it is
/// still running. `membarrier(MEMBARRIER_CMD_GLOBAL)` is implemented with
/// `synchronize_rcu()`; where it is unavailable (nohz_full), sleep well past
/// any XDP program's run time instead.
pub fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integer arguments and touches no memory.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    /// A page-sized temporary file: `mmap` treats it as it treats an
    /// mmap-able array map, without root.
    fn page_file(name: &str) -> (std::fs::File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("lbd-sys-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temporary file");
        file.set_len(page_size() as u64).expect("size");
        (file, path)
    }

    #[test]
    fn a_mapping_copies_within_bounds_and_names_what_it_refuses() {
        let (file, path) = page_file("rw");
        let len = page_size();
        let mut rw = Mapping::new(file.as_fd(), len, Access::ReadWrite).expect("mmap");
        rw.write(3, &[7u16, 8, 9]).expect("in bounds");
        let ro = Mapping::new(file.as_fd(), len, Access::Read).expect("mmap");
        let mut back = [0u16; 5];
        ro.read(2, &mut back).expect("in bounds");
        assert_eq!(back, [0, 7, 8, 9, 0], "both mappings share the pages");
        let mut last = [0u64; 1];
        ro.read(len / 8 - 1, &mut last)
            .expect("the last value fits");
        let err = ro.read(len / 8, &mut last).unwrap_err();
        assert_eq!(err.call, "mmap access");
        assert!(err.to_string().contains("exceed"), "{err}");
        let err = rw.write(usize::MAX, &[1u8]).unwrap_err();
        assert_eq!(err.call, "mmap access", "no overflow: {err}");
        let mut ro = ro;
        let err = ro.write(0, &[1u8]).unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        drop((rw, ro));
        std::fs::remove_file(path).expect("cleanup");
    }

    #[test]
    fn a_failed_mmap_names_the_call() {
        let (file, path) = page_file("fail");
        // A zero-length mapping is EINVAL.
        let err = Mapping::new(file.as_fd(), 0, Access::Read)
            .err()
            .expect("refused");
        assert_eq!(err.call, "mmap");
        assert!(err.to_string().starts_with("mmap failed: "), "{err}");
        std::fs::remove_file(path).expect("cleanup");
    }
}
