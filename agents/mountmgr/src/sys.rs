//! The system calls mountmgr makes: mount erofs, tmpfs and overlayfs, unmount, and attach or
//! release a loop device when the kernel cannot mount an erofs image file directly.
//!
//! Errors are `std::io::Error`s so that they read like the kernel's words ("Invalid argument
//! (os error 22)"), wrapped with the operation and the path.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

/// A failed mount, unmount or loop-device operation.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// mount(2) failed.
    #[error("mount {fs_type} {}: {error}", .source_path.display())]
    Mount {
        /// The filesystem type.
        fs_type: &'static str,
        /// What was mounted (an image path, a loop device, `tmpfs`, `overlay`).
        source_path: PathBuf,
        /// Where it was to be mounted.
        target: PathBuf,
        /// The kernel's error.
        error: io::Error,
    },
    /// umount2(2) failed.
    #[error("unmount {}: {error}", .target.display())]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The kernel's error.
        error: io::Error,
    },
    /// A loop device could not be set up for an image.
    #[error("loop device for {}: {error}", .image.display())]
    Loop {
        /// The image file.
        image: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// A mount could not be cloned or attached with the new mount API (`open_tree(2)`,
    /// `move_mount(2)`).
    #[error("{action} {} at {}: {error}", .source_path.display(), .target.display())]
    Attach {
        /// `cloning`, `mounting`, `mounting beneath the top mount`.
        action: &'static str,
        /// The mount cloned.
        source_path: PathBuf,
        /// Where it was to go.
        target: PathBuf,
        /// The kernel's error.
        error: io::Error,
    },
    /// The overlay's option string does not fit in the one page mount(2) accepts.
    #[error("overlay options are {len} bytes, more than the kernel's {max}: too many or too long layer paths")]
    OptionsTooLong {
        /// Length of the option string.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// How [`unmount`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// The mount is gone.
    Clean,
    /// The mount was busy (a process has a file open in it or its cwd there): it was detached
    /// from the tree and the kernel frees it when the last user lets go.
    Lazy,
    /// Nothing was mounted there.
    NotMounted,
}

/// Set once a file-backed erofs mount has worked in this process: from then on `EINVAL` from
/// mounting an image means a bad image, not a kernel without file-backed mounts, and no loop
/// device is tried.
static FILE_BACKED_WORKS: AtomicBool = AtomicBool::new(false);

/// The largest option string mount(2) copies (one page).
pub const MAX_OPTIONS: usize = 4095;

/// Mounts the erofs image file `image` read-only at `at`. Directly if the kernel can (6.12+
/// mounts erofs from a regular file), else through a loop device, whose path is returned. The loop device
/// is set to clear itself when its last user (the mount) goes away.
pub fn mount_erofs(image: &Path, at: &Path) -> Result<Option<PathBuf>, SysError> {
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    let direct = nix::mount::mount(Some(image), at, Some("erofs"), flags, None::<&str>);
    let first = match direct {
        Ok(()) => {
            FILE_BACKED_WORKS.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        Err(errno) => errno,
    };
    let fallback = first == Errno::ENOTBLK
        || (first == Errno::EINVAL && !FILE_BACKED_WORKS.load(Ordering::Relaxed));
    let mount_error = |source_path: &Path, errno: Errno| SysError::Mount {
        fs_type: "erofs",
        source_path: source_path.to_owned(),
        target: at.to_owned(),
        error: io::Error::from(errno),
    };
    if !fallback {
        return Err(mount_error(image, first));
    }
    let device = loopdev::attach(image)?;
    match nix::mount::mount(Some(device.path()), at, Some("erofs"), flags, None::<&str>) {
        Ok(()) => {
            tracing::debug!(image = %image.display(), device = %device.path().display(), "erofs mounted through a loop device");
            Ok(Some(device.into_path()))
        }
        Err(errno) => {
            // With ENOTBLK the direct attempt says nothing about the image: the loop
            // attempt's error is the one that does. With EINVAL both say the same.
            let reported = if first == Errno::ENOTBLK {
                errno
            } else {
                first
            };
            device.release();
            Err(mount_error(image, reported))
        }
    }
}

/// Mounts a fresh tmpfs at `at` (the upper and work directories of a tmpfs-backed stack).
pub fn mount_tmpfs(at: &Path) -> Result<(), SysError> {
    nix::mount::mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(|errno| SysError::Mount {
        fs_type: "tmpfs",
        source_path: PathBuf::from("tmpfs"),
        target: at.to_owned(),
        error: io::Error::from(errno),
    })
}

/// Mounts an overlay at `at` with the option string `options` (`lowerdir=…,upperdir=…,…`).
pub fn mount_overlay(options: &str, at: &Path) -> Result<(), SysError> {
    if options.len() > MAX_OPTIONS {
        return Err(SysError::OptionsTooLong {
            len: options.len(),
            max: MAX_OPTIONS,
        });
    }
    nix::mount::mount(
        Some("overlay"),
        at,
        Some("overlay"),
        MsFlags::empty(),
        Some(options),
    )
    .map_err(|errno| SysError::Mount {
        fs_type: "overlay",
        source_path: PathBuf::from("overlay"),
        target: at.to_owned(),
        error: io::Error::from(errno),
    })
}

/// Unmounts whatever is mounted on top at `at`, without following a symlink there. A busy
/// mount is detached lazily rather than left in place: the stack it belonged to is being
/// retired, and leaving it would block the slot's next build.
pub fn unmount(at: &Path) -> Result<Unmounted, SysError> {
    let error = |errno: Errno| SysError::Unmount {
        target: at.to_owned(),
        error: io::Error::from(errno),
    };
    match nix::mount::umount2(at, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(Errno::EINVAL | Errno::ENOENT) => Ok(Unmounted::NotMounted),
        Err(Errno::EBUSY) => {
            nix::mount::umount2(at, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH)
                .map_err(error)?;
            Ok(Unmounted::Lazy)
        }
        Err(errno) => Err(error(errno)),
    }
}

// The new mount API's flags (include/uapi/linux/mount.h); kernel ABI. The libc crate carries
// the system call numbers but not every flag.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOVE_MOUNT_BENEATH: libc::c_uint = 0x200;

/// Whether the kernel can mount beneath the top mount of a path (`move_mount(2)` with
/// `MOVE_MOUNT_BENEATH`, Linux 6.5+). Asked without touching any mount: a kernel that knows
/// the flag checks the (invalid) descriptors next and answers `EBADF`; an older one refuses
/// the flag with `EINVAL`, and one without the new mount API answers `ENOSYS`.
pub fn move_beneath_supported() -> bool {
    let empty = c"";
    // SAFETY: move_mount(2) with two invalid descriptors and empty paths: the kernel reads only
    // the two NUL-terminated strings, which live for the call, and changes nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            -1,
            empty.as_ptr(),
            -1,
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH | MOVE_MOUNT_BENEATH,
        )
    };
    rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
}

/// A detached copy of the mount at `from` (`open_tree(2)` with `OPEN_TREE_CLONE`): the same
/// filesystem, not yet attached anywhere. Dropping the descriptor of a copy never attached
/// frees it.
pub fn clone_mount(from: &Path) -> Result<OwnedFd, SysError> {
    let error = |error| SysError::Attach {
        action: "cloning",
        source_path: from.to_owned(),
        target: from.to_owned(),
        error,
    };
    let path = CString::new(from.as_os_str().as_bytes())
        .map_err(|e| error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: open_tree(2) reads the NUL-terminated path, which lives for the call; the
    // descriptor it returns is new and owned by nobody else.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(error(io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd).map_err(|e| error(io::Error::other(e)))?;
    // SAFETY: `fd` was just returned by the kernel and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Mounts a copy of the mount at `from` at `at`: on top of whatever is mounted there, or,
/// with `beneath`, beneath the mount on top of `at` (which must exist), so that `at` shows
/// the top mount until that is unmounted and this one from then on. The path never shows
/// anything in between.
pub fn mount_copy(from: &Path, at: &Path, beneath: bool) -> Result<(), SysError> {
    let tree = clone_mount(from)?;
    let action = if beneath {
        "mounting beneath the top mount"
    } else {
        "mounting"
    };
    let error = |error| SysError::Attach {
        action,
        source_path: from.to_owned(),
        target: at.to_owned(),
        error,
    };
    let to = CString::new(at.as_os_str().as_bytes())
        .map_err(|e| error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let empty = c"";
    let mut flags = MOVE_MOUNT_F_EMPTY_PATH;
    if beneath {
        flags |= MOVE_MOUNT_BENEATH;
    }
    // SAFETY: move_mount(2) of the detached tree `tree` (a descriptor we own) to the
    // NUL-terminated path `to`; both strings live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        return Err(error(io::Error::last_os_error()));
    }
    Ok(())
}

/// fsync(2) of a directory, so that the renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Loop devices: the fallback for kernels that cannot mount an erofs file directly.
pub mod loopdev {
    use super::*;

    // The loop driver's ioctls and flags (include/uapi/linux/loop.h); the libc crate does not
    // carry them. They are kernel ABI and never change.
    const LOOP_SET_FD: libc::c_ulong = 0x4C00;
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
    const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    const LO_FLAGS_READ_ONLY: u32 = 1;
    const LO_FLAGS_AUTOCLEAR: u32 = 4;
    const LO_NAME_SIZE: usize = 64;
    const LO_KEY_SIZE: usize = 32;
    /// Attempts at taking a free device: another process may take the one we were offered.
    const ATTEMPTS: usize = 8;

    /// `struct loop_info64`.
    #[repr(C)]
    struct LoopInfo64 {
        lo_device: u64,
        lo_inode: u64,
        lo_rdevice: u64,
        lo_offset: u64,
        lo_sizelimit: u64,
        lo_number: u32,
        lo_encrypt_type: u32,
        lo_encrypt_key_size: u32,
        lo_flags: u32,
        lo_file_name: [u8; LO_NAME_SIZE],
        lo_crypt_name: [u8; LO_NAME_SIZE],
        lo_encrypt_key: [u8; LO_KEY_SIZE],
        lo_init: [u64; 2],
    }

    /// `struct loop_config`.
    #[repr(C)]
    struct LoopConfig {
        fd: u32,
        block_size: u32,
        info: LoopInfo64,
        reserved: [u64; 8],
    }

    fn info_for(image: &Path) -> LoopInfo64 {
        let mut name = [0u8; LO_NAME_SIZE];
        let bytes = image.as_os_str().as_bytes();
        let n = bytes.len().min(LO_NAME_SIZE - 1);
        name[..n].copy_from_slice(&bytes[..n]);
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }

    fn ioctl_ptr<T>(fd: &File, request: libc::c_ulong, arg: &T) -> io::Result<()> {
        // SAFETY: `fd` is an open loop device or /dev/loop-control and `arg` points to a live,
        // properly laid out (`repr(C)`) value of the struct `request` expects; the kernel only
        // reads it.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *const T) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn ioctl_int(fd: &File, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<i32> {
        // SAFETY: the requests used with this helper take an integer argument (or none), so no
        // memory is passed to the kernel.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// A loop device bound to an image by this process. Dropping it closes the device; since
    /// it is set to clear itself, an unmounted device is released then.
    #[derive(Debug)]
    pub struct LoopDevice {
        path: PathBuf,
        file: File,
    }

    impl LoopDevice {
        /// `/dev/loopN`.
        pub fn path(&self) -> &Path {
            &self.path
        }

        /// Keeps the binding (now held by a mount) and returns the device path.
        pub fn into_path(self) -> PathBuf {
            self.path
        }

        /// Unbinds the device now.
        pub fn release(self) {
            if let Err(e) = ioctl_int(&self.file, LOOP_CLR_FD, 0) {
                tracing::debug!(device = %self.path.display(), error = %e, "loop device not cleared (autoclear will)");
            }
        }
    }

    /// Binds a free loop device to `image`, read-only and self-clearing.
    pub fn attach(image: &Path) -> Result<LoopDevice, SysError> {
        let error = |error: io::Error| SysError::Loop {
            image: image.to_owned(),
            error,
        };
        let backing = File::open(image).map_err(error)?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(error)?;
        let mut last = io::Error::other("no free loop device");
        for _ in 0..ATTEMPTS {
            let number = ioctl_int(&control, LOOP_CTL_GET_FREE, 0).map_err(error)?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let file = OpenOptions::new().read(true).open(&path).map_err(error)?;
            match configure(&file, &backing, image) {
                Ok(()) => return Ok(LoopDevice { path, file }),
                // Someone else took it between GET_FREE and now: ask again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
                Err(e) => return Err(error(e)),
            }
        }
        Err(error(last))
    }

    fn configure(device: &File, backing: &File, image: &Path) -> io::Result<()> {
        let fd = u32::try_from(backing.as_raw_fd()).map_err(io::Error::other)?;
        let config = LoopConfig {
            fd,
            block_size: 0,
            info: info_for(image),
            reserved: [0; 8],
        };
        match ioctl_ptr(device, LOOP_CONFIGURE, &config) {
            Ok(()) => Ok(()),
            // Before Linux 5.8 there is no LOOP_CONFIGURE: bind, then set the flags.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {
                ioctl_int(device, LOOP_SET_FD, libc::c_ulong::from(fd))?;
                if let Err(e) = ioctl_ptr(device, LOOP_SET_STATUS64, &info_for(image)) {
                    let _ = ioctl_int(device, LOOP_CLR_FD, 0);
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The file `device` is bound to, if it is bound (from sysfs).
    pub fn backing_file(device: &Path) -> Option<PathBuf> {
        let name = device.file_name()?.to_str()?;
        let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
        Some(PathBuf::from(text.trim_end_matches('\n')))
    }

    /// Unbinds `device` if it is still bound to `image`: a device recorded by an earlier run
    /// whose mount is gone. Another image on it means someone else owns it now; it is left.
    pub fn release_if_bound_to(device: &Path, image: &Path) -> io::Result<bool> {
        if backing_file(device).as_deref() != Some(image) {
            return Ok(false);
        }
        let file = OpenOptions::new().read(true).open(device)?;
        match ioctl_int(&file, LOOP_CLR_FD, 0) {
            Ok(_) => Ok(true),
            // Already cleared, or still in use (then autoclear frees it later).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::EBUSY)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_like_the_kernel() {
        let err = SysError::Mount {
            fs_type: "erofs",
            source_path: PathBuf::from("/store/sha256/ab"),
            target: PathBuf::from("/m"),
            error: io::Error::from(Errno::EINVAL),
        };
        assert_eq!(
            err.to_string(),
            "mount erofs /store/sha256/ab: Invalid argument (os error 22)"
        );
    }

    #[test]
    fn overlay_options_are_bounded() {
        let options = "x".repeat(MAX_OPTIONS + 1);
        let err = mount_overlay(&options, Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(err, SysError::OptionsTooLong { .. }), "{err}");
    }
}
