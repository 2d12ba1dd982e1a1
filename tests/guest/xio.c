/*
 * xio: a tiny block I/O helper for the test guest (see tests/guest/build.sh).
 *
 * busybox already gives the guest dd (with iflag=direct/oflag=direct), md5sum,
 * sha256sum, blockdev and blkdiscard. xio covers what it lacks: deterministic
 * O_DIRECT writes and in-guest verification (so the host can check the same bytes
 * with `qemu-io -c 'read -P 0xNN OFF LEN'` or with appliance_tests::pattern), and
 * BLKZEROOUT (virtio-blk WRITE_ZEROES), which busybox blkdiscard cannot issue.
 *
 *   xio fill        DEV OFF LEN BYTE   O_DIRECT write LEN bytes of BYTE at OFF, then fdatasync
 *   xio prand       DEV OFF LEN SEED   O_DIRECT write appliance_tests::pattern(SEED, LEN) at OFF,
 *                                      then fdatasync
 *   xio check       DEV OFF LEN BYTE   O_DIRECT read; every byte must be BYTE
 *   xio check-prand DEV OFF LEN SEED   O_DIRECT read; bytes must equal pattern(SEED, LEN)
 *   xio discard     DEV OFF LEN        ioctl BLKDISCARD  (virtio-blk DISCARD)
 *   xio zeroout     DEV OFF LEN        ioctl BLKZEROOUT  (virtio-blk WRITE_ZEROES, or zero writes)
 *   xio flush       DEV                fsync             (virtio-blk FLUSH when the cache is writeback)
 *   xio bench       DEV MODE BS SECS JOBS
 *                                      MODE read|write|randread|randwrite: JOBS threads of
 *                                      O_DIRECT pread/pwrite of BS bytes (JOBS requests in
 *                                      flight) over the whole device for SECS seconds;
 *                                      prints bench_ios=, bench_secs=, bench_iops=, bench_mibps=
 *
 * Numbers accept 0x prefixes and k/m/g suffixes (binary). OFF and LEN must be multiples
 * of the logical block size (512) for O_DIRECT and the ioctls. Exit status: 0 ok,
 * 1 I/O error or mismatch (a line starting with "xio:" says which), 2 usage.
 *
 * Build: gcc -static -O2 -s -o xio xio.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)

static void die(const char *what) {
	fprintf(stderr, "xio: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t num(const char *s) {
	char *end;
	errno = 0;
	uint64_t v = strtoull(s, &end, 0);
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	}
	if (errno || end == s || *end) {
		fprintf(stderr, "xio: bad number '%s'\n", s);
		exit(2);
	}
	return v;
}

/* Same generator as appliance_tests::pattern (xorshift64, low byte). */
struct prand { uint64_t x; };
static void prand_init(struct prand *p, uint64_t seed) { p->x = (seed * 0x9E3779B97F4A7C15ull) | 1; }
static void prand_fill(struct prand *p, unsigned char *b, size_t n) {
	uint64_t x = p->x;
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		b[i] = (unsigned char)x;
	}
	p->x = x;
}

struct bench {
	int fd, write, random, id, jobs;
	uint64_t bs, blocks, ios;
	double deadline;
};

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void *bench_job(void *arg) {
	struct bench *b = arg;
	unsigned char *buf;
	if (posix_memalign((void **)&buf, 4096, b->bs)) die("alloc");
	memset(buf, 0x5a + b->id, b->bs);
	uint64_t x = 0x9E3779B97F4A7C15ull * (b->id + 1) | 1;
	/* Sequential jobs take interleaved blocks: job i does i, i+JOBS, ... */
	uint64_t next = b->id;
	while (now() < b->deadline) {
		for (int k = 0; k < 16; k++) {
			uint64_t blk;
			if (b->random) {
				x ^= x << 13; x ^= x >> 7; x ^= x << 17;
				blk = x % b->blocks;
			} else {
				blk = next % b->blocks;
				next += b->jobs;
			}
			ssize_t r = b->write ? pwrite(b->fd, buf, b->bs, (off_t)(blk * b->bs))
					     : pread(b->fd, buf, b->bs, (off_t)(blk * b->bs));
			if (r != (ssize_t)b->bs) die(b->write ? "pwrite" : "pread");
			b->ios++;
		}
	}
	return NULL;
}

static int bench(const char *dev, int argc, char **argv) {
	if (argc != 7) return 2;
	const char *mode = argv[3];
	struct bench proto = { 0 };
	proto.write = !strcmp(mode, "write") || !strcmp(mode, "randwrite");
	proto.random = !strncmp(mode, "rand", 4);
	if (!proto.write && strcmp(mode, "read") && strcmp(mode, "randread")) return 2;
	proto.bs = num(argv[4]);
	double secs = (double)num(argv[5]);
	int jobs = (int)num(argv[6]);
	if (jobs < 1 || jobs > 64 || proto.bs == 0) return 2;
	int fd = open(dev, (proto.write ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) die(dev);
	uint64_t size;
	if (ioctl(fd, BLKGETSIZE64, &size)) die("BLKGETSIZE64");
	struct bench b[64];
	pthread_t t[64];
	double start = now();
	for (int i = 0; i < jobs; i++) {
		b[i] = proto;
		b[i].fd = fd;
		b[i].id = i;
		b[i].jobs = jobs;
		b[i].blocks = size / proto.bs;
		b[i].deadline = start + secs;
		if (pthread_create(&t[i], NULL, bench_job, &b[i])) die("pthread_create");
	}
	uint64_t ios = 0;
	for (int i = 0; i < jobs; i++) {
		pthread_join(t[i], NULL);
		ios += b[i].ios;
	}
	double el = now() - start;
	printf("bench_ios=%llu\nbench_secs=%.3f\nbench_iops=%.0f\nbench_mibps=%.1f\n",
	       (unsigned long long)ios, el, ios / el, ios * (double)proto.bs / el / 1048576.0);
	return 0;
}

static int usage(void) {
	fputs("usage: xio fill|prand|check|check-prand DEV OFF LEN BYTE|SEED\n"
	      "       xio discard|zeroout DEV OFF LEN\n"
	      "       xio flush DEV\n"
	      "       xio bench DEV read|write|randread|randwrite BS SECS JOBS\n", stderr);
	return 2;
}

int main(int argc, char **argv) {
	if (argc < 3)
		return usage();
	const char *cmd = argv[1], *dev = argv[2];

	if (!strcmp(cmd, "flush")) {
		int fd = open(dev, O_RDWR);
		if (fd < 0) die(dev);
		if (fsync(fd)) die("fsync");
		return 0;
	}
	if (!strcmp(cmd, "bench"))
		return bench(dev, argc, argv) == 2 ? usage() : 0;
	if (argc < 5)
		return usage();
	uint64_t off = num(argv[3]), len = num(argv[4]);

	if (!strcmp(cmd, "discard") || !strcmp(cmd, "zeroout")) {
		if (argc != 5) return usage();
		int fd = open(dev, O_RDWR);
		if (fd < 0) die(dev);
		uint64_t range[2] = { off, len };
		if (ioctl(fd, !strcmp(cmd, "discard") ? BLKDISCARD : BLKZEROOUT, range)) die(cmd);
		return 0;
	}

	int write = !strcmp(cmd, "fill") || !strcmp(cmd, "prand");
	int prand = !strcmp(cmd, "prand") || !strcmp(cmd, "check-prand");
	if (argc != 6 || (!write && strcmp(cmd, "check") && strcmp(cmd, "check-prand")))
		return usage();
	uint64_t arg = num(argv[5]);
	if (!prand && arg > 255) {
		fprintf(stderr, "xio: byte '%s' out of range\n", argv[5]);
		return 2;
	}

	int fd = open(dev, (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) die(dev);
	unsigned char *buf, *want = malloc(CHUNK);
	if (!want || posix_memalign((void **)&buf, 4096, CHUNK)) die("alloc");
	struct prand p;
	prand_init(&p, arg);
	if (!prand) memset(want, (int)arg, CHUNK);

	for (uint64_t done = 0; done < len;) {
		size_t n = len - done < CHUNK ? (size_t)(len - done) : CHUNK;
		if (prand) prand_fill(&p, want, n);
		if (write) {
			memcpy(buf, want, n);
			ssize_t r = pwrite(fd, buf, n, (off_t)(off + done));
			if (r < 0) die("pwrite");
			if ((size_t)r != n) { fprintf(stderr, "xio: short write at %llu\n", (unsigned long long)(off + done + r)); return 1; }
		} else {
			ssize_t r = pread(fd, buf, n, (off_t)(off + done));
			if (r < 0) die("pread");
			if ((size_t)r != n) { fprintf(stderr, "xio: short read at %llu\n", (unsigned long long)(off + done + r)); return 1; }
			if (memcmp(buf, want, n)) {
				size_t i = 0;
				while (buf[i] == want[i]) i++;
				printf("xio: mismatch at byte %llu: got 0x%02x want 0x%02x\n",
				       (unsigned long long)(off + done + i), buf[i], want[i]);
				return 1;
			}
		}
		done += n;
	}
	if (write && fdatasync(fd)) die("fdatasync");
	return 0;
}
