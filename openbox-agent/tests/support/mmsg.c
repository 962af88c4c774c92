/* sendmmsg/recvmmsg batches over a datagram socketpair, for the capture tests.
 *
 * Usage: mmsg OUTDIR
 *
 * Sends a batch of 5 messages with one sendmmsg and receives them with one recvmmsg,
 * then a batch of 20 (more than the kernel programs copy per call, MAX_MMSG = 16).
 * Writes OUTDIR/mmsg.sent (every message of both batches, in order, each ending in a
 * newline) and OUTDIR/ok when the receiver got exactly what was sent.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define MAX 20

static int batch(int tx, int rx, int n, FILE *sent) {
    static char out[MAX][64], in[MAX][64];
    struct mmsghdr msgs[MAX], recv[MAX];
    struct iovec iov[MAX][2], riov[MAX];
    memset(msgs, 0, sizeof msgs);
    memset(recv, 0, sizeof recv);
    for (int i = 0; i < n; i++) {
        int len = snprintf(out[i], sizeof out[i], "batch%d-message-%02d-%.*s\n", n, i, i % 9,
                           "xxxxxxxxx");
        /* Two iovecs per message: the head and the rest. */
        iov[i][0].iov_base = out[i];
        iov[i][0].iov_len = 6;
        iov[i][1].iov_base = out[i] + 6;
        iov[i][1].iov_len = len - 6;
        msgs[i].msg_hdr.msg_iov = iov[i];
        msgs[i].msg_hdr.msg_iovlen = 2;
        riov[i].iov_base = in[i];
        riov[i].iov_len = sizeof in[i];
        recv[i].msg_hdr.msg_iov = &riov[i];
        recv[i].msg_hdr.msg_iovlen = 1;
    }
    if (sendmmsg(tx, msgs, n, 0) != n) {
        perror("sendmmsg");
        return 1;
    }
    /* A peek first: its bytes stay queued and are received below, so the capture must
     * not see them twice. */
    if (recvmmsg(rx, recv, 1, MSG_PEEK, NULL) != 1) {
        perror("recvmmsg MSG_PEEK");
        return 1;
    }
    if (recvmmsg(rx, recv, n, MSG_WAITFORONE, NULL) != n) {
        perror("recvmmsg");
        return 1;
    }
    for (int i = 0; i < n; i++) {
        if (recv[i].msg_len != msgs[i].msg_len || memcmp(in[i], out[i], msgs[i].msg_len)) {
            fprintf(stderr, "message %d differs\n", i);
            return 1;
        }
        fwrite(out[i], 1, msgs[i].msg_len, sent);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: mmsg OUTDIR\n");
        return 2;
    }
    char path[4096];
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv)) {
        perror("socketpair");
        return 1;
    }
    snprintf(path, sizeof path, "%s/mmsg.sent", argv[1]);
    FILE *sent = fopen(path, "wb");
    if (!sent || batch(sv[0], sv[1], 5, sent) || batch(sv[0], sv[1], MAX, sent))
        return 1;
    fclose(sent);
    snprintf(path, sizeof path, "%s/ok", argv[1]);
    FILE *ok = fopen(path, "w");
    return ok ? fclose(ok) : 1;
}
