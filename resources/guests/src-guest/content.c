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
