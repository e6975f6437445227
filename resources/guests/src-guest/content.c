// SPDX-License-Identifier: Apache-2.0
/*
 * tinyvmm test guest: page classes and page contents.
 *
 * These functions are the contract with host-side tools (README.md, "Content
 * functions"; src/lib.rs has a Rust copy tested against the same definitions).
 */
#include "guest.h"

#define CLASS_TAG 0xc1a55c1a55c1a55cULL

enum page_class page_class(u64 seed, u64 index, u32 shared_pct, u32 zero_pct)
{
	u64 r = mix64(mix64(seed ^ CLASS_TAG) ^ index) % 100;
	if (r < shared_pct)
		return CLASS_SHARED;
	if (r < (u64)shared_pct + zero_pct)
		return CLASS_ZERO;
	return CLASS_UNIQUE;
}

/*
 * The key of (class, index, version): the shared seed for shared pages and for
 * rewritten (version > 0) zero pages, the guest's own seed for unique pages.
 * Version 0 of a zero page is all zero bytes (its key is unused).
 */
u64 page_key(u64 seed, u64 guest_seed, enum page_class cls, u64 index, u32 version)
{
	u64 k = cls == CLASS_UNIQUE ? guest_seed : seed;
	return mix64(mix64(mix64(k) ^ index) ^ version);
}

u64 page_write(volatile u64 *page, enum page_class cls, u32 version, u64 key)
{
	u64 *p = (u64 *)page;
	if (cls == CLASS_ZERO && version == 0) {
		for (u32 j = 0; j < WORDS_PER_PAGE; j++)
			p[j] = 0;
		return 0;
	}
	u64 sum = 0;
	for (u32 j = 0; j < WORDS_PER_PAGE; j++) {
		u64 w = page_word(key, j);
		p[j] = w;
		sum += w;
	}
	return sum;
}

#define PERM_TAG 0x7065726d75746531ULL

/*
 * A keyed bijection on [0, n): a 4-round Feistel network on the smallest even power of
 * two >= n, cycle-walked until the result falls inside [0, n) (at most 4n values, so a few
 * rounds on average).
 */
static u64 permute(u64 key, u64 n, u64 x)
{
	if (n <= 1)
		return x;
	u32 bits = 64 - __builtin_clzll(n - 1);
	if (bits & 1)
		bits++;
	u32 half = bits / 2;
	u64 mask = (1ULL << half) - 1;
	do {
		u64 l = x >> half, r = x & mask;
		for (u64 round = 0; round < 4; round++) {
			u64 f = mix64(key ^ (round << 56) ^ r) & mask;
			u64 t = l ^ f;
			l = r;
			r = t;
		}
		x = (l << half) | r;
	} while (x >= n);
	return x;
}

u64 layout_logical(const struct layout *l, u64 i)
{
	switch (l->kind) {
	case LAYOUT_SHUFFLED:
		return permute(l->key ^ PERM_TAG, l->npages, i);
	case LAYOUT_CLUSTERED: {
		/* Whole blocks are permuted; a partial last block stays in place. */
		u64 blocks = l->npages / l->run;
		u64 b = i / l->run;
		if (b >= blocks)
			return i;
		return permute(l->key ^ PERM_TAG, blocks, b) * l->run + i % l->run;
	}
	case LAYOUT_SAME:
	default:
		return i;
	}
}

enum page_class layout_class(const struct layout *l, u64 seed, u64 lp, u32 shared_pct, u32 zero_pct)
{
	return page_class(seed, l->kind == LAYOUT_CLUSTERED ? lp / l->run : lp, shared_pct, zero_pct);
}
