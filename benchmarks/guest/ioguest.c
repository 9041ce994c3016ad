/* ioguest: the guest half of benchmarks/virtio_io.py; prints "<seconds> <amount>\n" measured in the guest.
 *   ioguest seqread  PATH BYTES BS DIRECT(0|1)   sequential reads
 *   ioguest seqwrite PATH BYTES BS               sequential O_DIRECT writes, then fdatasync
 *   ioguest randread PATH COUNT                  4 KiB O_DIRECT reads at random 4 KiB-aligned offsets
 *   ioguest meta     DIR N                       create+fstat+close+unlink of N files
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *abuf(size_t n) {
    void *p;
    if (posix_memalign(&p, 4096, n)) { perror("posix_memalign"); exit(1); }
    memset(p, 0x5a, n);
    return p;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: see source\n"); return 2; }
    const char *mode = argv[1], *path = argv[2];
    double t0, t1;
    if (!strcmp(mode, "seqread") || !strcmp(mode, "seqwrite")) {
        int wr = mode[3] == 'w';
        uint64_t bytes = strtoull(argv[3], 0, 0), bs = argc > 4 ? strtoull(argv[4], 0, 0) : 1 << 20;
        int direct = wr || (argc > 5 && atoi(argv[5]));
        int fd = open(path, (wr ? O_WRONLY : O_RDONLY) | (direct ? O_DIRECT : 0));
        if (fd < 0) { perror(path); return 1; }
        char *b = abuf(bs);
        uint64_t done = 0;
        t0 = now();
        while (done < bytes) {
            ssize_t n = wr ? write(fd, b, bs) : read(fd, b, bs);
            if (n <= 0) break;
            done += n;
        }
        if (wr) fdatasync(fd);
        t1 = now();
        printf("%.6f %llu\n", t1 - t0, (unsigned long long)done);
    } else if (!strcmp(mode, "randread")) {
        uint64_t count = strtoull(argv[3], 0, 0);
        int fd = open(path, O_RDONLY | O_DIRECT);
        if (fd < 0) { perror(path); return 1; }
        off_t size = lseek(fd, 0, SEEK_END);
        char *b = abuf(4096);
        uint64_t x = 88172645463325252ull, ok = 0;
        t0 = now();
        for (uint64_t i = 0; i < count; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            if (pread(fd, b, 4096, (off_t)(x % (size / 4096)) * 4096) == 4096) ok++;
        }
        t1 = now();
        printf("%.6f %llu\n", t1 - t0, (unsigned long long)ok);
    } else if (!strcmp(mode, "meta")) {
        int n = atoi(argv[3]);
        char name[4096];
        struct stat st;
        int ok = 0;
        t0 = now();
        for (int i = 0; i < n; i++) {
            snprintf(name, sizeof name, "%s/f%d", path, i);
            int fd = open(name, O_CREAT | O_WRONLY | O_EXCL, 0644);
            if (fd < 0) continue;
            if (fstat(fd, &st) == 0 && stat(name, &st) == 0) ok++;
            close(fd);
            unlink(name);
        }
        t1 = now();
        printf("%.6f %d\n", t1 - t0, ok);
    } else {
        return 2;
    }
    return 0;
}
