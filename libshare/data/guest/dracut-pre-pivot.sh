#!/bin/sh
# libshare dracut pre-pivot hook (installed as
# /usr/lib/dracut/modules.d/90libshare/libshare-pre-pivot.sh; the module puts it into the
# initramfs): binds the library region's identical copies over the real root's libraries
# (mounted on $NEWROOT, /sysroot) before switch-root, so PID 1 and every service map them
# from the region. dracut SOURCES its hooks: nothing here may exit, and the work runs in
# a function whose names are removed afterwards. Never prevents boot: every failure is
# logged to the kernel log and ignored. Kernel command line 'libshare=off' skips it.

libshare_kmsg() {
    echo "<4>libshare: $*" > /dev/kmsg 2>/dev/null || echo "libshare: $*" >&2
}

libshare_pre_pivot() {
    _ls_script=/usr/lib/libshare/libshare-redirect
    _ls_cmdline=""
    read -r _ls_cmdline < /proc/cmdline 2>/dev/null
    for _ls_arg in $_ls_cmdline; do
        case "$_ls_arg" in
            libshare=off|libshare=0) libshare_kmsg "disabled on the kernel command line"
                                     return 0 ;;
        esac
    done
    [ -f "$_ls_script" ] || { libshare_kmsg "$_ls_script missing from the initramfs"; return 0; }
    for _ls_mod in $(LIBSHARE_REDIRECT_MAIN=noop; . "$_ls_script"; echo "$BOOT_MODULES"); do
        modprobe -q "$_ls_mod" 2>/dev/null
    done
    _ls_timeout=/usr/lib/libshare/bin/timeout
    if [ -x "$_ls_timeout" ]; then
        "$_ls_timeout" 600 /bin/sh "$_ls_script" apply --boot --root "${NEWROOT:-/sysroot}" \
            > /dev/null
    else
        /bin/sh "$_ls_script" apply --boot --root "${NEWROOT:-/sysroot}" > /dev/null
    fi
    _ls_rc=$?
    [ "$_ls_rc" = 0 ] || libshare_kmsg "libshare-redirect failed (exit $_ls_rc): booting without (some) redirects"
    return 0
}

libshare_pre_pivot
unset -f libshare_pre_pivot libshare_kmsg
unset _ls_script _ls_cmdline _ls_arg _ls_mod _ls_timeout _ls_rc
