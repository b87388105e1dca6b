#!/bin/sh
# libshare dracut pre-pivot hook (installed as
# /usr/lib/dracut/modules.d/90libshare/libshare-pre-pivot.sh; the module puts it into the
# initramfs): binds the library region's identical copies over the real root's libraries
# (mounted on $NEWROOT, /sysroot) before switch-root, so PID 1 and every service map them
# from the region. dracut SOURCES its hooks: nothing here may exit, and the work runs in
# a function whose names are removed afterwards. Never prevents boot: every failure is
# logged to the kernel log and ignored. Kernel command line 'libshare=off' skips it.
# What it did is kept in /run/libshare/boot.out (dracut keeps /run for the real system),
# as the initramfs-tools init-bottom script keeps it, for 'libshare-redirect status'.

libshare_kmsg() {
    echo "<4>libshare: $*" > /dev/kmsg 2>/dev/null || echo "libshare: $*" >&2
}

libshare_pre_pivot() {
    _ls_script=/usr/lib/libshare/libshare-redirect
    _ls_out=${LIBSHARE_RUN:-/run/libshare}/boot.out
    mkdir -p "${_ls_out%/*}" 2>/dev/null
    _ls_rel=""
    read -r _ls_rel < /proc/sys/kernel/osrelease 2>/dev/null
    { echo "via=guest"; echo "release=$_ls_rel"; echo "modules=0"; } > "$_ls_out" 2>/dev/null
    _ls_cmdline=""
    read -r _ls_cmdline < /proc/cmdline 2>/dev/null
    for _ls_arg in $_ls_cmdline; do
        case "$_ls_arg" in
            libshare=off|libshare=0)
                libshare_kmsg "disabled on the kernel command line"
                echo "refused=disabled on the kernel command line (libshare=off)" >> "$_ls_out"
                return 0 ;;
        esac
    done
    if [ ! -f "$_ls_script" ]; then
        libshare_kmsg "$_ls_script missing from the initramfs"
        echo "refused=$_ls_script missing from the initramfs" >> "$_ls_out"
        return 0
    fi
    for _ls_mod in $(LIBSHARE_REDIRECT_MAIN=noop; . "$_ls_script"; echo "$BOOT_MODULES"); do
        modprobe -q "$_ls_mod" 2>/dev/null
    done
    _ls_timeout=/usr/lib/libshare/bin/timeout
    if [ -x "$_ls_timeout" ]; then
        "$_ls_timeout" 600 /bin/sh "$_ls_script" apply --boot --root "${NEWROOT:-/sysroot}" \
            >> "$_ls_out"
    else
        /bin/sh "$_ls_script" apply --boot --root "${NEWROOT:-/sysroot}" >> "$_ls_out"
    fi
    _ls_rc=$?
    echo "rc=$_ls_rc" >> "$_ls_out"
    [ "$_ls_rc" = 0 ] || libshare_kmsg "libshare-redirect failed (exit $_ls_rc): booting without (some) redirects"
    return 0
}

libshare_pre_pivot
unset -f libshare_pre_pivot libshare_kmsg
unset _ls_script _ls_out _ls_rel _ls_cmdline _ls_arg _ls_mod _ls_timeout _ls_rc
