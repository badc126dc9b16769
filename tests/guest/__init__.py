"""The tiny Linux test guest of DESIGN section 8: a Debian kernel + busybox initramfs whose init
writes a sequence counter to every virtio disk (`build.guest_files`), and helpers that read the
counter back out of any image (`counter`)."""
