/* vsocktool: guest-side helper for katapy's virtio-vsock acceptance tests.
 *
 *   vsocktool serve PORT          accept loop; each connection reads one command line:
 *       "echo\n"                  echo bytes back until EOF, then close
 *       "sink\n"                  read to EOF, reply "<count> <crc32 hex>\n" (zlib CRC-32)
 *       "crc N SEED\n"            reply "<N> <crc32 hex>\n" of the "source N SEED" stream
 *       "source N SEED\n"         send N pattern bytes (xorshift from SEED), then close
 *       "stall\n"                 never read; close after 60 s
 *       "sh CMD...\n"             run CMD with /bin/sh -c, stdout+stderr to the socket
 *       "connect PORT N SEED\n"   connect to host cid 2 PORT, send N pattern bytes, shut down
 *                                 writing, copy the host's reply back to this connection
 * Each connection is served by a forked child.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* zlib-compatible CRC-32: crc = crc32(crc, p, n), starting from 0 */
static uint32_t crc32(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static void fill(unsigned char *buf, size_t n, uint64_t *state) {
    for (size_t i = 0; i < n; i++) {
        uint64_t x = *state;
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        *state = x;
        buf[i] = (unsigned char)x;
    }
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        c += w; n -= (size_t)w;
    }
    return 0;
}

static int read_line(int fd, char *buf, size_t max) {
    size_t n = 0;
    while (n + 1 < max) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0) return -1;
        if (buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    return (int)n;
}

static unsigned char big[65536];

static void do_sink(int fd) {
    uint32_t h = 0;
    uint64_t total = 0;
    ssize_t r;
    while ((r = read(fd, big, sizeof big)) > 0) { h = crc32(h, big, (size_t)r); total += (uint64_t)r; }
    char out[64];
    int n = snprintf(out, sizeof out, "%llu %08x\n", (unsigned long long)total, h);
    write_all(fd, out, (size_t)n);
}

static void do_source(int fd, uint64_t n, uint64_t seed) {
    uint64_t st = seed ? seed : 1;
    while (n) {
        size_t chunk = n < sizeof big ? (size_t)n : sizeof big;
        fill(big, chunk, &st);
        if (write_all(fd, big, chunk)) return;
        n -= chunk;
    }
}

static void do_crc(int fd, uint64_t n, uint64_t seed) {
    uint64_t st = seed ? seed : 1, total = n;
    uint32_t h = 0;
    while (n) {
        size_t chunk = n < sizeof big ? (size_t)n : sizeof big;
        fill(big, chunk, &st);
        h = crc32(h, big, chunk);
        n -= chunk;
    }
    dprintf(fd, "%llu %08x\n", (unsigned long long)total, h);
}

static void do_connect(int fd, unsigned port, uint64_t n, uint64_t seed) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = port};
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        dprintf(fd, "connect failed: %s\n", strerror(errno));
        return;
    }
    do_source(s, n, seed);
    shutdown(s, SHUT_WR);
    ssize_t r;
    while ((r = read(s, big, sizeof big)) > 0) write_all(fd, big, (size_t)r);
    close(s);
}

static void serve_one(int fd) {
    char line[512];
    if (read_line(fd, line, sizeof line) < 0) return;
    if (!strcmp(line, "echo")) {
        ssize_t r;
        while ((r = read(fd, big, sizeof big)) > 0) if (write_all(fd, big, (size_t)r)) break;
    } else if (!strcmp(line, "sink")) {
        do_sink(fd);
    } else if (!strncmp(line, "source ", 7)) {
        unsigned long long n = 0, seed = 0;
        sscanf(line + 7, "%llu %llu", &n, &seed);
        do_source(fd, n, seed);
    } else if (!strncmp(line, "crc ", 4)) {
        unsigned long long n = 0, seed = 0;
        sscanf(line + 4, "%llu %llu", &n, &seed);
        do_crc(fd, n, seed);
    } else if (!strcmp(line, "stall")) {
        sleep(60);
    } else if (!strncmp(line, "sh ", 3)) {
        dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
        execl("/bin/sh", "sh", "-c", line + 3, (char *)NULL);
    } else if (!strncmp(line, "connect ", 8)) {
        unsigned port = 0; unsigned long long n = 0, seed = 0;
        sscanf(line + 8, "%u %llu %llu", &port, &n, &seed);
        do_connect(fd, port, n, seed);
    } else {
        dprintf(fd, "unknown command\n");
    }
}

int main(int argc, char **argv) {
    if (argc != 3 || strcmp(argv[1], "serve")) { fprintf(stderr, "usage: vsocktool serve PORT\n"); return 2; }
    crc_init();
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = (unsigned)atoi(argv[2])};
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 64) < 0) { perror("vsock listen"); return 1; }
    printf("vsocktool: listening on %s\n", argv[2]);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) { if (errno == EINTR) continue; perror("accept"); return 1; }
        if (fork() == 0) { close(s); serve_one(c); shutdown(c, SHUT_WR); close(c); _exit(0); }
        close(c);
    }
}
