/* io_uring through raw syscalls (liburing is not needed), for the capture tests.
 *
 * Usage: io_uring OUTDIR
 *
 * Sets up a ring and submits, one at a time, 4 IORING_OP_WRITE to OUTDIR/uring.bin,
 * 2 IORING_OP_READ back from it and 1 IORING_OP_NOP, waiting for each completion.
 * Writes OUTDIR/ok with "7 6" (requests submitted, of which move bytes) when every
 * request completed as expected.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static struct io_uring_params p;
static unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;
static int ring;

static int submit(unsigned char op, int fd, void *buf, unsigned len, unsigned long long off) {
    unsigned tail = *sq_tail, idx = tail & *sq_mask;
    struct io_uring_sqe *sqe = &sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = op;
    sqe->fd = fd;
    sqe->addr = (unsigned long)buf;
    sqe->len = len;
    sqe->off = off;
    sq_array[idx] = idx;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) != 1) {
        perror("io_uring_enter");
        return -1000000;
    }
    unsigned head = __atomic_load_n(cq_head, __ATOMIC_ACQUIRE);
    if (head == __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE)) {
        fprintf(stderr, "no completion\n");
        return -1000000;
    }
    int res = cqes[head & *cq_mask].res;
    __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
    return res;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: io_uring OUTDIR\n");
        return 2;
    }
    ring = syscall(__NR_io_uring_setup, 8, &p);
    if (ring < 0) {
        perror("io_uring_setup");
        return 1;
    }
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(0, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
                    IORING_OFF_SQ_RING);
    char *cq = mmap(0, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
                    IORING_OFF_CQ_RING);
    sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    sq_tail = (unsigned *)(sq + p.sq_off.tail);
    sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    sq_array = (unsigned *)(sq + p.sq_off.array);
    cq_head = (unsigned *)(cq + p.cq_off.head);
    cq_tail = (unsigned *)(cq + p.cq_off.tail);
    cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);

    char path[4096];
    snprintf(path, sizeof path, "%s/uring.bin", argv[1]);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    char block[100], back[100];
    for (int i = 0; i < 4; i++) {
        memset(block, 'a' + i, sizeof block);
        if (submit(IORING_OP_WRITE, fd, block, sizeof block, i * sizeof block) != sizeof block)
            return 1;
    }
    for (int i = 0; i < 2; i++) {
        if (submit(IORING_OP_READ, fd, back, sizeof back, i * sizeof back) != sizeof back ||
            back[0] != 'a' + i)
            return 1;
    }
    if (submit(IORING_OP_NOP, -1, NULL, 0, 0) != 0)
        return 1;
    snprintf(path, sizeof path, "%s/ok", argv[1]);
    FILE *ok = fopen(path, "w");
    if (!ok)
        return 1;
    fprintf(ok, "7 6\n");
    return fclose(ok);
}
