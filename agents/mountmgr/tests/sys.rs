//! The system-call layer against the real kernel: file-backed erofs, the loop-device
//! fallback, unmounting. Needs root.

mod common;

use std::time::Duration;

use common::*;
use mountmgr::sys::{self, loopdev, Unmounted};
use nix::mount::MsFlags;
use powernode_pubsub::testing::require;

#[test]
fn erofs_mounts_directly_and_garbage_is_refused() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let image = sandbox.image("x", &[("f", "direct")]);
    let at = sandbox.root.join("mnt");
    std::fs::create_dir(&at).unwrap();
    let device = sys::mount_erofs(&image, &at).unwrap();
    assert_eq!(device, None, "this kernel mounts erofs files directly");
    assert_eq!(std::fs::read_to_string(at.join("f")).unwrap(), "direct");
    assert_eq!(sys::unmount(&at).unwrap(), Unmounted::Clean);
    assert_eq!(sys::unmount(&at).unwrap(), Unmounted::NotMounted);

    let junk = sandbox.garbage_image("junk");
    let err = sys::mount_erofs(&junk, &at).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "mount erofs {}: Invalid argument (os error 22)",
            junk.display()
        )
    );
    assert!(sandbox.mounts_under(&sandbox.root).is_empty());
}

#[test]
fn a_busy_mount_is_detached_lazily() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let image = sandbox.image("x", &[("f", "busy")]);
    let at = sandbox.root.join("mnt");
    std::fs::create_dir(&at).unwrap();
    sys::mount_erofs(&image, &at).unwrap();
    let open = std::fs::File::open(at.join("f")).unwrap();
    assert_eq!(sys::unmount(&at).unwrap(), Unmounted::Lazy);
    assert!(sandbox.mounts_under(&sandbox.root).is_empty());
    drop(open);
}

#[test]
fn loop_devices_mount_and_are_released() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let image = sandbox.image("x", &[("f", "via loop")]);
    let other = sandbox.image("y", &[("g", "other")]);
    let at = sandbox.root.join("mnt");
    std::fs::create_dir(&at).unwrap();

    let device = loopdev::attach(&image).unwrap();
    assert_eq!(
        loopdev::backing_file(device.path()).as_deref(),
        Some(image.as_path())
    );
    nix::mount::mount(
        Some(device.path()),
        &at,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let path = device.into_path();
    assert_eq!(std::fs::read_to_string(at.join("f")).unwrap(), "via loop");
    assert_eq!(sys::unmount(&at).unwrap(), Unmounted::Clean);
    // Autoclear: the device frees itself once the mount and our descriptor are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while loopdev::backing_file(&path).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} not released",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A recorded device is released only if still bound to the recorded image.
    let device = loopdev::attach(&image).unwrap();
    let path = device.path().to_owned();
    assert!(!loopdev::release_if_bound_to(&path, &other).unwrap());
    assert!(loopdev::backing_file(&path).is_some());
    assert!(loopdev::release_if_bound_to(&path, &image).unwrap());
    drop(device);
    assert_eq!(loopdev::backing_file(&path), None);
}
