/* plant: a guest program that plants a BTF blob in its own memory and keeps it there.
 *
 * usage: plant BLOB MIB|auto READY_FILE
 *
 * Maps MIB MiB of anonymous memory (auto: MemAvailable less 48 MiB), writes into every
 * 4 KiB page a banner-like "Linux version 9.9.9-planted" at offset 0 (so 2 MiB-aligned
 * pages look like the head of a kernel's .rodata to a host scanning guest RAM) and the
 * bytes of the file BLOB at offset 64, locks it all in RAM, then reports on stdout where
 * the pages are (through /proc/self/pagemap and /proc/iomem, as root):
 *
 *   PLANTED pages=N aligned=A below=B rodata=0xADDR
 *
 * (A: pages at a 2 MiB-aligned guest-physical address; B: those of them below the
 * kernel's rodata), creates READY_FILE and sleeps for ever. Built static on the host.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* one line without its newline: like the kernel's banner, but not complete */
#define PLANTED_BANNER "Linux version 9.9.9-planted (not the kernel)"

static unsigned long meminfo(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    unsigned long kb = 0;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':')
            kb = strtoul(line + n + 1, NULL, 10);
    if (f)
        fclose(f);
    return kb;
}

static unsigned long rodata_start(void) {
    FILE *f = fopen("/proc/iomem", "r");
    char line[256];
    unsigned long start = 0;
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, "Kernel rodata"))
            start = strtoul(line + strspn(line, " "), NULL, 16);
    if (f)
        fclose(f);
    return start;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: plant BLOB MIB|auto READY_FILE\n");
        return 2;
    }
    static unsigned char blob[4096 - 64];
    int fd = open(argv[1], O_RDONLY);
    ssize_t blen = fd < 0 ? -1 : read(fd, blob, sizeof blob);
    if (blen <= 0) {
        perror("plant: blob");
        return 1;
    }
    close(fd);
    size_t len;
    if (!strcmp(argv[2], "auto")) {
        unsigned long avail = meminfo("MemAvailable") >> 10;
        len = (avail > 96 ? avail - 48 : 48) << 20;
    } else {
        len = strtoul(argv[2], NULL, 10) << 20;
    }
    unsigned char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("plant: mmap");
        return 1;
    }
    for (size_t off = 0; off < len; off += 4096) {
        memcpy(buf + off, PLANTED_BANNER, sizeof PLANTED_BANNER);
        memcpy(buf + off + 64, blob, (size_t)blen);
    }
    if (mlock(buf, len))
        perror("plant: mlock");
    unsigned long rodata = rodata_start();
    size_t pages = 0, aligned = 0, below = 0;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    for (size_t off = 0; pm >= 0 && off < len; off += 4096) {
        uint64_t e;
        if (pread(pm, &e, 8, (off_t)(((uintptr_t)buf + off) / 4096 * 8)) != 8)
            break;
        if (!(e >> 63))
            continue;
        uint64_t pfn = e & ((1ULL << 55) - 1);
        pages++;
        if (pfn % 512 == 0) {
            aligned++;
            if (pfn * 4096 < rodata)
                below++;
        }
    }
    printf("PLANTED pages=%zu aligned=%zu below=%zu rodata=%#lx blob=%zd\n", pages, aligned,
           below, rodata, blen);
    fflush(stdout);
    int ready = open(argv[3], O_WRONLY | O_CREAT, 0644);
    if (ready >= 0)
        close(ready);
    for (;;)
        pause();
}
