/* The reference for benchmarks/vmm_boot.py: the smallest possible KVM run loop in C.
 * Usage: kvm_exit_loop GUEST.bin LOAD_ADDR
 * Creates a VM with 4 MiB of RAM, loads the flat guest at LOAD_ADDR, enters it in 32-bit protected
 * mode with flat segments (what PVH gives), and serves its exits: port 0x3f8 writes are timestamped,
 * MMIO reads return 0.  Prints "first_ns=<open(/dev/kvm) to the first exit> exits=<n> loop_ns=<S..D>". */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(1); }

static void flat(struct kvm_segment *s, unsigned type, unsigned sel) {
    memset(s, 0, sizeof *s);
    s->base = 0; s->limit = 0xffffffff; s->selector = sel; s->type = type;
    s->present = 1; s->s = 1; s->db = 1; s->g = 1;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s GUEST.bin LOAD_ADDR\n", argv[0]); return 2; }
    uint64_t t0 = now_ns();
    unsigned long load = strtoul(argv[2], 0, 0);
    size_t mem_size = 4 << 20;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(0, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    FILE *f = fopen(argv[1], "rb");
    if (!f) die(argv[1]);
    size_t n = fread(mem + load, 1, mem_size - load, f);
    fclose(f);
    if (!n) die("empty guest");
    struct kvm_userspace_memory_region region = {.slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
                                                 .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    flat(&sregs.cs, 11, 8);
    flat(&sregs.ds, 3, 16);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 |= 1;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = load, .rflags = 2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
    uint64_t first = 0, s_at = 0, d_at = 0, exits = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        if (!first) first = now_ns();
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0x3f8 && run->io.direction == KVM_EXIT_IO_OUT) {
            char c = *((char *)run + run->io.data_offset);
            if (c == 'S') s_at = now_ns();
            if (c == 'D') { d_at = now_ns(); break; }
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write) memset(run->mmio.data, 0, sizeof run->mmio.data);
        } else {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
    printf("first_ns=%llu exits=%llu loop_ns=%llu\n", (unsigned long long)(first - t0),
           (unsigned long long)exits, (unsigned long long)(d_at - s_at));
    return 0;
}
