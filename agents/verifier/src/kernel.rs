//! fs-verity in the kernel, where the kernel and the file system have it: after the userspace
//! checks pass, the image is sealed (`FS_IOC_ENABLE_VERITY`, SHA-256, 4096-byte blocks, no
//! salt: the parameters the annotation's digest is computed with) and the kernel's own measure
//! of it (`FS_IOC_MEASURE_VERITY`) must equal the digest the verifier computed. From then on
//! the kernel checks every page read from the image against the tree.
//!
//! Where fs-verity is missing (this project's CI kernel has none, nor do tmpfs and overlayfs)
//! the outcome says so and the userspace digest is what stands.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FS_IOC_ENABLE_VERITY`: `_IOW('f', 133, struct fsverity_enable_arg)` (128 bytes).
const FS_IOC_ENABLE_VERITY: u32 = 0x4080_6685;
/// `FS_IOC_MEASURE_VERITY`: `_IOWR('f', 134, struct fsverity_digest)` (4-byte header).
const FS_IOC_MEASURE_VERITY: u32 = 0xC004_6686;
/// `FS_VERITY_HASH_ALG_SHA256`.
const HASH_SHA256: u32 = 1;

/// `struct fsverity_enable_arg` (linux/fsverity.h).
#[repr(C)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// `struct fsverity_digest` with room for the largest digest.
#[repr(C)]
struct Measured {
    digest_algorithm: u16,
    digest_size: u16,
    digest: [u8; 64],
}

nix::ioctl_write_ptr_bad!(
    /// `ioctl(fd, FS_IOC_ENABLE_VERITY, &arg)`.
    enable_verity,
    FS_IOC_ENABLE_VERITY,
    EnableArg
);
nix::ioctl_readwrite_bad!(
    /// `ioctl(fd, FS_IOC_MEASURE_VERITY, &mut digest)`.
    measure_verity,
    FS_IOC_MEASURE_VERITY,
    Measured
);

/// What the kernel made of the image.
#[derive(Debug, PartialEq, Eq)]
pub enum Kernel {
    /// fs-verity is on and the kernel's digest equals the computed one.
    Enforced,
    /// The kernel or the file system has no fs-verity (the reason is the errno's text).
    Unsupported(String),
}

/// Why the kernel's answer rules the image out.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel measured another digest than the one computed in userspace.
    #[error("the kernel's fs-verity digest is sha256:{kernel}, the computed one {computed}")]
    Mismatch {
        /// What the kernel measured (hex).
        kernel: String,
        /// What the verifier computed.
        computed: String,
    },
    /// Enabling or measuring failed for a reason other than missing support.
    #[error("fs-verity: {0}")]
    Failed(String),
}

/// Seals `path` with fs-verity where possible and checks the kernel's digest against
/// `computed` (the raw SHA-256 fs-verity digest).
pub fn enforce(path: &Path, computed: &[u8; 32]) -> Result<Kernel, KernelError> {
    let file = File::open(path).map_err(|e| KernelError::Failed(e.to_string()))?;
    let arg = EnableArg {
        version: 1,
        hash_algorithm: HASH_SHA256,
        block_size: 4096,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: `file` is an open descriptor for the call's duration and `arg` is a fully
    // initialised `fsverity_enable_arg` (no salt, no signature: the pointers are null with
    // zero sizes), which the kernel only reads.
    match unsafe { enable_verity(file.as_raw_fd(), &arg) } {
        Ok(_) | Err(nix::errno::Errno::EEXIST) => {}
        Err(
            e @ (nix::errno::Errno::EOPNOTSUPP
            | nix::errno::Errno::ENOTTY
            | nix::errno::Errno::EINVAL),
        ) => return Ok(Kernel::Unsupported(e.desc().to_owned())),
        Err(e) => return Err(KernelError::Failed(format!("enabling: {}", e.desc()))),
    }
    let mut measured = Measured {
        digest_algorithm: 0,
        digest_size: 64,
        digest: [0; 64],
    };
    // SAFETY: `measured` has room for `digest_size` (64) bytes after its header, as the
    // kernel requires, and lives for the call.
    unsafe { measure_verity(file.as_raw_fd(), &mut measured) }
        .map_err(|e| KernelError::Failed(format!("measuring: {}", e.desc())))?;
    let size = usize::from(measured.digest_size).min(64);
    let kernel = &measured.digest[..size];
    if u32::from(measured.digest_algorithm) != HASH_SHA256 || kernel != computed {
        return Err(KernelError::Mismatch {
            kernel: powernode_modules::digest::hex(kernel),
            computed: format!("sha256:{}", powernode_modules::digest::hex(computed)),
        });
    }
    Ok(Kernel::Enforced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_headers() {
        assert_eq!(std::mem::size_of::<EnableArg>(), 128);
        assert_eq!(std::mem::size_of::<Measured>(), 4 + 64);
    }

    /// This machine's kernel has no fs-verity, and a temp directory's file system (tmpfs or
    /// ext4 without the feature) refuses it: the outcome says unsupported, it does not fail.
    /// On a kernel and file system with fs-verity the file is sealed and measured instead.
    #[test]
    fn a_file_without_kernel_support_is_reported_not_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let digest = powernode_modules::fsverity::digest_file(&path).unwrap();
        match enforce(&path, &digest.0) {
            Ok(Kernel::Unsupported(reason)) => assert!(!reason.is_empty()),
            Ok(Kernel::Enforced) => {
                // A kernel with fs-verity: a wrong expectation must now be refused.
                assert!(enforce(&path, &[0; 32]).is_err());
            }
            Err(e) => panic!("{e}"),
        }
    }
}
