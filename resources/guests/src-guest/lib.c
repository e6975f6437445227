// SPDX-License-Identifier: Apache-2.0
/* tinyvmm test guest: freestanding helpers, serial output, a tiny printf. */
#include "guest.h"

void *memset(void *d, int c, usize n)
{
	void *p = d;
	__asm__ volatile("rep stosb" : "+D"(p), "+c"(n) : "a"(c) : "memory");
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	void *p = d;
	__asm__ volatile("rep movsb" : "+D"(p), "+S"(s), "+c"(n) : : "memory");
	return d;
}

void *memmove(void *d, const void *s, usize n)
{
	u8 *p = d;
	const u8 *q = s;
	if (p < q) {
		while (n--)
			*p++ = *q++;
	} else {
		while (n--)
			p[n] = q[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

void serial_putc(char c)
{
	/*
	 * No LSR (THR empty) polling: an emulated 16550 takes every byte at once, and
	 * each port access is a VM exit (~30 us on kvm_pvm), so polling would double
	 * the cost of every character.
	 */
	outb(COM1, (u8)c);
}

void serial_write(const char *s, usize n)
{
	for (usize i = 0; i < n; i++)
		serial_putc(s[i]);
}

void serial_puts(const char *s) { serial_write(s, strlen(s)); }

void debug_exit(u8 v)
{
	outb(DEBUG_EXIT_PORT, v);
	for (;;)
		cpu_relax();
}

/* kprintf: %s %c %d %u %x %llu %lld %llx %lu %lx %%, optional zero pad width (%016llx). */
struct outbuf {
	char buf[256];
	usize n;
};

static void ob_putc(struct outbuf *o, char c)
{
	if (o->n == sizeof(o->buf)) {
		serial_write(o->buf, o->n);
		o->n = 0;
	}
	o->buf[o->n++] = c;
}

static void ob_num(struct outbuf *o, u64 v, unsigned base, int neg, int width, char pad)
{
	char tmp[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		tmp[n++] = '-';
	while (width-- > n)
		ob_putc(o, pad);
	while (n)
		ob_putc(o, tmp[--n]);
}

void kprintf(const char *fmt, ...)
{
	struct outbuf o;
	o.n = 0;
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	for (const char *p = fmt; *p; p++) {
		if (*p != '%') {
			ob_putc(&o, *p);
			continue;
		}
		p++;
		char pad = ' ';
		int width = 0, longs = 0;
		if (*p == '0') {
			pad = '0';
			p++;
		}
		while (*p >= '0' && *p <= '9')
			width = width * 10 + (*p++ - '0');
		while (*p == 'l') {
			longs++;
			p++;
		}
		switch (*p) {
		case 's': {
			const char *s = __builtin_va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			while (*s)
				ob_putc(&o, *s++);
			break;
		}
		case 'c':
			ob_putc(&o, (char)__builtin_va_arg(ap, int));
			break;
		case 'd': {
			i64 v = longs ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
			ob_num(&o, v < 0 ? (u64)-v : (u64)v, 10, v < 0, width, pad);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned);
			ob_num(&o, v, *p == 'u' ? 10 : 16, 0, width, pad);
			break;
		}
		case '%':
			ob_putc(&o, '%');
			break;
		default:
			ob_putc(&o, '%');
			if (*p)
				ob_putc(&o, *p);
			else
				p--;
			break;
		}
	}
	__builtin_va_end(ap);
	serial_write(o.buf, o.n);
}
