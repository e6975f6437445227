// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: a polling virtio-vsock driver and the `vsock` workload (CPL3; the
 * MMIO gap is mapped uncached and user-accessible).
 *
 * The device is found in the DSDT like the other virtio-mmio devices (acpi.c) and driven
 * through the transport the drivers share (virtio_mmio.c). Its three
 * queues (RX, TX, event) live in this file's .bss; RX is kept full of 4 KiB buffers (header
 * and payload in one descriptor, as Linux 6.2+ does), TX sends one packet at a time. No
 * interrupts: the used rings are polled.
 *
 * The workload, in order:
 *   0. with `vsock_bad=1`: out-of-spec TX chains first (see out_of_spec());
 *   1. guest -> host: connects to host port `vsock_port`, sends `vsock_msgs` messages of
 *      `vsock_size` bytes, each waiting for its echo and checking it byte for byte;
 *      prints `VSOCK CONNECT ... msgs_per_s=N`, then shuts the connection down;
 *   2. host -> guest: prints `VSOCK LISTEN port=L` and echoes whatever arrives on
 *      connections to port `vsock_listen` (requests for any other port are reset) until
 *      `vsock_accepts` connections have been closed by the host;
 *   3. prints `VSOCK OK ...` (or `VSOCK FAIL <why>`).
 */
#include "guest.h"

/* The packet header (virtio 1.2, 5.10.6), little endian. */
struct vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

#define HDR_LEN 44
#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_BOTH 3

#define VIRTIO_ID_VSOCK 19
#define QN 16            /* entries per queue */
#define RX_DATA 4096     /* payload bytes per RX buffer */
#define RX_SLOT 8192     /* RX buffer stride */
#define BUF_ALLOC 65536  /* what the guest announces per connection */
#define TIMEOUT_MS 30000
#define MAX_DEVICES 8
#define GUEST_PORT 2000  /* the guest's port for its own connection */

/* Queue memory: three pages per queue (descriptors, avail ring, used ring). */
static u8 rings[3][VIRTQ_BYTES] __attribute__((aligned(4096)));
static u8 rx_bufs[QN][RX_SLOT] __attribute__((aligned(4096)));
static u8 tx_buf[HDR_LEN + RX_DATA + 64] __attribute__((aligned(64)));
static u8 msg[RX_DATA];

/* A stream connection's credit state. */
struct conn {
	int open;
	u32 local_port, peer_port;
	u32 peer_buf_alloc, peer_fwd_cnt; /* the device's receive window */
	u32 tx_cnt;                       /* bytes sent */
	u32 fwd_cnt;                      /* bytes consumed */
	int closed;                       /* the peer reset or shut it */
};

static struct {
	u64 mmio;
	u64 cid;
	u64 tsc_khz;
	struct virtq rx, tx, event;
	/* Phase 1: our connection and the echo it collects. */
	struct conn out;
	u32 echo_got;
	int out_answered; /* a response or reset arrived for our request */
	/* Phase 2: the listener. */
	u32 listen_port;
	struct conn in;
	u64 served_msgs, refused, accepts_done;
	u64 stray_resets; /* resets for no connection of ours (answers to bad packets) */
	int bad;
} V;

/* ------------------------------------------------------------------ device */

static int fail(const char *why)
{
	kprintf("VSOCK FAIL %s\n", why);
	V.bad = 1;
	return 1;
}

/* VERSION_1 only, three queues, RX full, DRIVER_OK. 0: ready, -1: not a vsock device. */
static int device_init(u64 mmio)
{
	const char *why = NULL;
	u32 got;
	V.mmio = mmio;
	int r = vmmio_start(mmio, VIRTIO_ID_VSOCK, 0, &got, &why);
	if (r < 0)
		return -1;
	if (!r)
		r = vmmio_queue(mmio, 0, QN, (u64)rings[0], &V.rx, &why);
	if (!r)
		r = vmmio_queue(mmio, 1, QN, (u64)rings[1], &V.tx, &why);
	if (!r)
		r = vmmio_queue(mmio, 2, QN, (u64)rings[2], &V.event, &why);
	if (r)
		return fail(why);
	/* Every RX buffer on the ring before the device starts. */
	for (u16 i = 0; i < QN; i++) {
		V.rx.desc[i].addr = (u64)rx_bufs[i];
		V.rx.desc[i].len = HDR_LEN + RX_DATA;
		V.rx.desc[i].flags = VQ_DESC_F_WRITE;
		virtq_publish(&V.rx, i);
	}
	if (vmmio_live(mmio, &why))
		return fail(why);
	V.cid = vmmio_config64(mmio, 0);
	vmmio_notify(mmio, 0);
	return 0;
}

/* ------------------------------------------------------------------ packets */

static u64 now_ms(void) { return rdtsc() / V.tsc_khz; }

/* Sends one packet on `c` (NULL: a reset for ports given in `h`), waiting for TX. */
static int send(struct conn *c, u16 op, u32 flags, const u8 *data, u32 len, u32 src, u32 dst)
{
	volatile struct vsock_hdr *h = (volatile struct vsock_hdr *)tx_buf;
	h->src_cid = V.cid;
	h->dst_cid = HOST_CID;
	h->src_port = c ? c->local_port : src;
	h->dst_port = c ? c->peer_port : dst;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = BUF_ALLOC;
	h->fwd_cnt = c ? c->fwd_cnt : 0;
	for (u32 i = 0; i < len; i++)
		tx_buf[HDR_LEN + i] = data[i];
	if (c)
		c->tx_cnt += len;
	struct virtq *q = &V.tx;
	q->desc[0].addr = (u64)tx_buf;
	q->desc[0].len = HDR_LEN + len;
	q->desc[0].flags = 0;
	virtq_publish(q, 0);
	vmmio_notify(V.mmio, 1);
	u64 deadline = now_ms() + TIMEOUT_MS;
	while (q->used[1] != q->avail_idx) {
		if (now_ms() > deadline)
			return fail("TX not completed");
		cpu_relax();
	}
	return 0;
}

/* Bytes the device can still take on `c`. */
static u32 credit(const struct conn *c) { return c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt); }

/* One received packet. */
static void handle(const struct vsock_hdr *h, const u8 *data)
{
	if (h->dst_cid != V.cid || h->src_cid != HOST_CID || h->type != TYPE_STREAM) {
		fail("packet with a bad address");
		return;
	}
	struct conn *c = NULL;
	if (V.out.open && h->dst_port == V.out.local_port && h->src_port == V.out.peer_port)
		c = &V.out;
	else if (V.in.open && h->dst_port == V.in.local_port && h->src_port == V.in.peer_port)
		c = &V.in;
	if (!c) {
		if (h->op == OP_REQUEST && h->dst_port == V.listen_port && !V.in.open) {
			V.in = (struct conn){ .open = 1, .local_port = h->dst_port, .peer_port = h->src_port };
			V.in.peer_buf_alloc = h->buf_alloc;
			V.in.peer_fwd_cnt = h->fwd_cnt;
			send(&V.in, OP_RESPONSE, 0, NULL, 0, 0, 0);
		} else if (h->op != OP_RST) {
			if (h->op == OP_REQUEST)
				V.refused++;
			send(NULL, OP_RST, 0, NULL, 0, h->dst_port, h->src_port);
		} else {
			V.stray_resets++;
		}
		return;
	}
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case OP_RESPONSE:
		V.out_answered = 1;
		break;
	case OP_RW:
		c->fwd_cnt += h->len;
		if (c == &V.in) {
			/* Echo (a host that keeps reading never runs out the device's credit). */
			if (credit(c) < h->len) {
				fail("no credit for the echo");
				return;
			}
			send(c, OP_RW, 0, data, h->len, 0, 0);
			V.served_msgs++;
		} else {
			for (u32 i = 0; i < h->len; i++) {
				if (V.echo_got + i >= RX_DATA || data[i] != msg[V.echo_got + i]) {
					fail("echo differs from what was sent");
					break;
				}
			}
			V.echo_got += h->len;
		}
		break;
	case OP_CREDIT_REQUEST:
		send(c, OP_CREDIT_UPDATE, 0, NULL, 0, 0, 0);
		break;
	case OP_CREDIT_UPDATE:
		break;
	case OP_SHUTDOWN:
		/* The host side closed: finish with a reset. */
		send(c, OP_RST, 0, NULL, 0, 0, 0);
		c->open = 0;
		c->closed = 1;
		if (c == &V.in)
			V.accepts_done++;
		break;
	case OP_RST:
		V.out_answered = 1;
		c->open = 0;
		c->closed = 1;
		if (c == &V.in)
			V.accepts_done++;
		break;
	default:
		fail("unknown op from the device");
	}
}

/* Handles every packet on the RX used ring and gives the buffers back. */
static void poll_rx(void)
{
	struct virtq *q = &V.rx;
	int any = 0;
	while (q->used[1] != q->used_seen) {
		barrier();
		volatile u32 *elem = (volatile u32 *)(q->used + 2) + 2 * (q->used_seen % QN);
		u32 id = elem[0], len = elem[1];
		q->used_seen++;
		if (id >= QN || len < HDR_LEN) {
			fail("bad RX used element");
			continue;
		}
		const struct vsock_hdr *h = (const struct vsock_hdr *)rx_bufs[id];
		if (len != HDR_LEN + h->len || h->len > RX_DATA)
			fail("RX length differs from the header");
		else
			handle(h, rx_bufs[id] + HDR_LEN);
		virtq_publish(q, (u16)id);
		any = 1;
	}
	if (any)
		vmmio_notify(V.mmio, 0);
}

/* Polls until `*flag` is set (or the timeout). */
static int wait_for(volatile int *flag, const char *what)
{
	u64 deadline = now_ms() + TIMEOUT_MS;
	while (!*flag && !V.bad) {
		if (now_ms() > deadline)
			return fail(what);
		poll_rx();
		cpu_relax();
	}
	return V.bad;
}

/* ------------------------------------------------------------ out of spec */

/* Puts `n` raw descriptors (header at tx_buf saying `op`, `len`) on TX, waits for them. */
static int tx_raw(u16 op, u32 len, const struct vq_desc *d, u16 n)
{
	volatile struct vsock_hdr *h = (volatile struct vsock_hdr *)tx_buf;
	h->src_cid = V.cid;
	h->dst_cid = HOST_CID;
	h->src_port = 7777;
	h->dst_port = 7;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = 0;
	h->buf_alloc = BUF_ALLOC;
	h->fwd_cnt = 0;
	for (u16 i = 0; i < n; i++) {
		V.tx.desc[i].addr = d[i].addr;
		V.tx.desc[i].len = d[i].len;
		V.tx.desc[i].flags = d[i].flags;
		V.tx.desc[i].next = d[i].next;
	}
	virtq_publish(&V.tx, 0);
	vmmio_notify(V.mmio, 1);
	u64 deadline = now_ms() + TIMEOUT_MS;
	while (V.tx.used[1] != V.tx.avail_idx) {
		if (now_ms() > deadline)
			return fail("a bad TX chain was not returned");
		cpu_relax();
	}
	return 0;
}

/*
 * A driver out of spec on the live device: a header in the MMIO gap, a payload longer than
 * its buffer, a payload outside RAM, a descriptor loop, an unknown operation. The device
 * drops or resets each (the last two are answered with resets) and keeps working.
 */
static int out_of_spec(void)
{
	u64 buf = (u64)tx_buf;
	const struct vq_desc gap[] = { { 0xd0000000ULL, HDR_LEN, 0, 0 } };
	const struct vq_desc short_data[] = { { buf, HDR_LEN, VQ_DESC_F_NEXT, 1 }, { buf + HDR_LEN, 10, 0, 0 } };
	const struct vq_desc outside[] = { { buf, HDR_LEN, VQ_DESC_F_NEXT, 1 }, { 1ULL << 46, 100, 0, 0 } };
	const struct vq_desc loop[] = { { buf, HDR_LEN, VQ_DESC_F_NEXT, 0 } };
	const struct vq_desc plain[] = { { buf, HDR_LEN, 0, 0 } };
	if (tx_raw(OP_RW, 10, gap, 1) || tx_raw(OP_RW, 60000, short_data, 2) ||
	    tx_raw(OP_RW, 100, outside, 2) || tx_raw(OP_RW, 10, loop, 1) || tx_raw(99, 0, plain, 1))
		return 1;
	u64 deadline = now_ms() + TIMEOUT_MS;
	while (V.stray_resets < 2 && !V.bad) {
		if (now_ms() > deadline)
			return fail("no resets for the bad packets");
		poll_rx();
	}
	kprintf("VSOCK BAD chains=5 resets=%llu\n", V.stray_resets);
	return V.bad;
}

/* ------------------------------------------------------------------ workload */

/* Phase 1: connect to the host's `port`, ping-pong `n` messages of `size` bytes. */
static int connect_and_echo(u32 port, u64 n, u32 size)
{
	V.out = (struct conn){ .open = 1, .local_port = GUEST_PORT, .peer_port = port };
	V.out_answered = 0;
	if (send(&V.out, OP_REQUEST, 0, NULL, 0, 0, 0) || wait_for(&V.out_answered, "no response to the request"))
		return 1;
	if (!V.out.open)
		return fail("the host refused the connection");
	u64 t0 = rdtsc();
	for (u64 m = 0; m < n; m++) {
		for (u32 i = 0; i < size; i++)
			msg[i] = (u8)mix64(m * size + i);
		u64 deadline = now_ms() + TIMEOUT_MS;
		while (credit(&V.out) < size) {
			if (now_ms() > deadline)
				return fail("no credit from the device");
			poll_rx();
		}
		V.echo_got = 0;
		if (send(&V.out, OP_RW, 0, msg, size, 0, 0))
			return 1;
		while (V.echo_got < size && !V.bad) {
			if (now_ms() > deadline || !V.out.open)
				return fail("no echo");
			poll_rx();
		}
		if (V.bad)
			return 1;
	}
	u64 cycles = rdtsc() - t0;
	u64 per_s = cycles ? n * V.tsc_khz * 1000 / cycles : 0;
	kprintf("VSOCK CONNECT port=%u msgs=%llu size=%u msgs_per_s=%llu\n", port, n, size, per_s);
	/* Close: the device resets once the host side took everything. */
	V.out_answered = 0;
	if (send(&V.out, OP_SHUTDOWN, SHUTDOWN_BOTH, NULL, 0, 0, 0))
		return 1;
	if (wait_for(&V.out.closed, "no reset after the shutdown"))
		return 1;
	return 0;
}

/* Phase 2: echo on `port` until `accepts` connections were closed by the host. */
static int listen_and_echo(u32 port, u64 accepts, u64 timeout_ms)
{
	V.listen_port = port;
	kprintf("VSOCK LISTEN port=%u\n", port);
	u64 deadline = now_ms() + timeout_ms;
	while (V.accepts_done < accepts && !V.bad) {
		if (now_ms() > deadline)
			return fail("the host did not connect in time");
		poll_rx();
		cpu_relax();
	}
	kprintf("VSOCK SERVED conns=%llu msgs=%llu refused=%llu\n", V.accepts_done, V.served_msgs,
		V.refused);
	return V.bad;
}

int vsock_workload(u64 bp, const struct vsock_params *p)
{
	V.tsc_khz = p->tsc_khz;
	u64 bases[MAX_DEVICES];
	u32 gsis[MAX_DEVICES];
	u32 n = acpi_virtio_mmio(bp, bases, gsis, MAX_DEVICES);
	int found = 0;
	for (u32 i = 0; i < n && !found; i++) {
		int r = device_init(bases[i]);
		if (r > 0)
			return 1;
		found = r == 0;
	}
	if (!found)
		return fail("no virtio-vsock device in the DSDT");
	kprintf("VSOCK dev mmio=0x%llx cid=%llu\n", V.mmio, V.cid);
	if (p->cid && p->cid != V.cid)
		return fail("the device's CID is not vsock_cid");
	if (p->size == 0 || p->size > RX_DATA)
		return fail("vsock_size must be 1 to 4096");
	if (p->bad && out_of_spec())
		return 1;
	u64 t0 = rdtsc();
	if (p->port && connect_and_echo((u32)p->port, p->msgs, (u32)p->size))
		return 1;
	u64 guest_cycles = rdtsc() - t0;
	if (p->listen && listen_and_echo((u32)p->listen, p->accepts, p->timeout_ms))
		return 1;
	vmmio_reset(V.mmio);
	kprintf("VSOCK OK cid=%llu guest_to_host_msgs=%llu guest_ms=%llu host_to_guest_msgs=%llu\n",
		V.cid, p->port ? p->msgs : 0, guest_cycles / V.tsc_khz, V.served_msgs);
	return 0;
}
