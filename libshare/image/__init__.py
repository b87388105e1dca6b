"""Guest disk images prepared offline (``libshare image prepare|status|unprepare``).

``disk`` opens a qcow2 or raw image on the host without booting it (the in-use checks,
a qemu-storage-daemon FUSE export, loop devices at the partition offsets, mounts, the
work overlay committed at the end); ``tree`` knows the guest root tree once it is
mounted (its distribution, kernels and free space, files written inside it without ever
leaving it, its own programs run in a chroot); ``prepare`` puts libshare's guest side
into an image, tells what an image holds, and takes it out again.
"""
