/*
 * _dl_find_object for static musl binaries whose unwinder is Debian's cross libgcc_eh.a.
 *
 * gcc 12 built against glibc >= 2.35 makes its DWARF unwinder (aarch64, x86_64, mips) look up the
 * object containing a code address with glibc's _dl_find_object, and it has no fallback when that
 * fails. musl has no such function, so scripts/cross-build.sh adds this one to the libunwind.a it
 * makes from libgcc_eh.a. It answers the same question with dl_iterate_phdr, which musl provides
 * for static binaries too. armv7 unwinds with ARM EHABI tables and never calls it.
 *
 * The struct is glibc's layout for targets without DLFO_STRUCT_HAS_EH_DBASE and
 * DLFO_STRUCT_HAS_EH_COUNT (x86_64, aarch64, mips); dlfo_eh_frame is the PT_GNU_EH_FRAME segment.
 */
#define _GNU_SOURCE
#include <link.h>
#include <stddef.h>
#include <stdint.h>

struct dl_find_object {
	unsigned long long dlfo_flags;
	void *dlfo_map_start;
	void *dlfo_map_end;
	void *dlfo_link_map;
	void *dlfo_eh_frame;
	unsigned long long dlfo_reserved[7];
};

struct lookup {
	uintptr_t pc;
	struct dl_find_object *result;
};

static int visit_object(struct dl_phdr_info *info, size_t size, void *data)
{
	struct lookup *lookup = data;
	uintptr_t lowest = UINTPTR_MAX, highest = 0;
	void *eh_frame = NULL;
	int contains_pc = 0;
	size_t i;

	(void)size;
	for (i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t start = info->dlpi_addr + ph->p_vaddr;

		if (ph->p_type == PT_LOAD) {
			uintptr_t end = start + ph->p_memsz;

			if (start < lowest)
				lowest = start;
			if (end > highest)
				highest = end;
			if (lookup->pc >= start && lookup->pc < end)
				contains_pc = 1;
		} else if (ph->p_type == PT_GNU_EH_FRAME) {
			eh_frame = (void *)start;
		}
	}
	if (!contains_pc)
		return 0;
	lookup->result->dlfo_flags = 0;
	lookup->result->dlfo_map_start = (void *)lowest;
	lookup->result->dlfo_map_end = (void *)highest;
	lookup->result->dlfo_link_map = NULL;
	lookup->result->dlfo_eh_frame = eh_frame;
	return 1;
}

int _dl_find_object(void *pc, struct dl_find_object *result)
{
	struct lookup lookup = { (uintptr_t)pc, result };

	return dl_iterate_phdr(visit_object, &lookup) ? 0 : -1;
}
