#!/bin/bash
# libshare dracut module (installed as /usr/lib/dracut/modules.d/90libshare/module-setup.sh
# by 'libshare guest install' and 'libshare image prepare' when the guest builds its
# initramfs with dracut): does for dracut what the initramfs-tools hook does. It puts
# libshare-redirect, the tools it runs and the kernel modules of the library region into
# the initramfs (both lists are the script's own, BOOT_TOOLS and BOOT_MODULES), and a
# pre-pivot hook that binds the region's identical copies over the real root's
# libraries before switch-root. Tools go to /usr/lib/libshare/bin so they never replace
# the initramfs's own commands. dracut sources this file and calls the functions below.

LIBSHARE_SCRIPT=/usr/sbin/libshare-redirect

# libshare_list NAME: the script's list NAME (BOOT_TOOLS, BOOT_MODULES)
libshare_list() {
    (LIBSHARE_REDIRECT_MAIN=noop; . "${dracutsysrootdir-}$LIBSHARE_SCRIPT"; eval "echo \"\$$1\"")
}

# included in every initramfs (generic and host-only) once libshare-redirect is installed
check() {
    [ -x "${dracutsysrootdir-}$LIBSHARE_SCRIPT" ] || return 1
    return 0
}

depends() {
    return 0
}

installkernel() {
    # hostonly='': the region's modules even when the building system has not loaded them
    # shellcheck disable=SC2046
    hostonly='' instmods $(libshare_list BOOT_MODULES)
}

install() {
    inst_hook pre-pivot 50 "$moddir/libshare-pre-pivot.sh"
    inst_simple "$LIBSHARE_SCRIPT" /usr/lib/libshare/libshare-redirect
    local tool path
    for tool in $(libshare_list BOOT_TOOLS); do
        path=$(find_binary "$tool") || { dwarn "libshare: no $tool"; continue; }
        inst_binary "$path" "/usr/lib/libshare/bin/$tool" || dwarn "libshare: cannot add $tool"
    done
}
