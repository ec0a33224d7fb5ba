// SPDX-License-Identifier: GPL-2.0
/*
 * leaky: a kernel module whose leaks are known in advance, for memleak's VM tests.
 *
 * On load it makes these allocations, n of each (module parameter, default 100):
 *   - leaky_kmalloc:     kzalloc(64) objects that are never freed;
 *   - leaky_cache_alloc: objects from its own kmem_cache "leaky_cache" that are never freed;
 *   - leaky_vmalloc:     vzalloc(64) areas that are never freed;
 *   - leaky_percpu:      alloc_percpu(u64) elements that are never freed;
 *   - leaky_pages:       single unmovable pages that are never freed;
 *   - clean_alloc:       kmalloc(64) objects that are freed right away (not a leak).
 *
 * The leaked slab objects are deliberately unreferenced: no pointer to them is kept anywhere, so
 * kmemleak reports them too (cargo xtask vm-test compares the two). They are zeroed: a recycled
 * kmalloc object may still hold its previous user's pointers to its neighbours, and such stale
 * pointers chain the leaked objects to live memory, hiding all of them from kmemleak.
 * The three functions are noinline and outside .init.text, so they stay named frames in
 * stacks after the kernel discards the module's init code.
 *
 * Unloading destroys leaky_cache while it still holds objects, which the kernel reports
 * loudly; the tests leave the module loaded.
 */
#include <linux/gfp.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>

static unsigned int n = 100;
module_param(n, uint, 0444);
MODULE_PARM_DESC(n, "objects per kind of allocation (default 100)");

#define OBJECT_SIZE 64

static struct kmem_cache *leaky_cache;

/* A constructor keeps SLUB from merging leaky_cache into another cache of the same size, so
 * memleak reports its objects under the name "leaky_cache". */
static void leaky_ctor(void *object)
{
	memset(object, 0, OBJECT_SIZE);
}

static noinline unsigned int leaky_kmalloc(unsigned int count)
{
	unsigned int i, done = 0;

	for (i = 0; i < count; i++)
		if (kzalloc(OBJECT_SIZE, GFP_KERNEL))
			done++;
	return done;
}

static noinline unsigned int leaky_cache_alloc(unsigned int count)
{
	unsigned int i, done = 0;

	for (i = 0; i < count; i++)
		if (kmem_cache_alloc(leaky_cache, GFP_KERNEL))
			done++;
	return done;
}

static noinline unsigned int leaky_vmalloc(unsigned int count)
{
	unsigned int i, done = 0;

	for (i = 0; i < count; i++)
		if (vzalloc(OBJECT_SIZE))
			done++;
	return done;
}

static noinline unsigned int leaky_percpu(unsigned int count)
{
	unsigned int i, done = 0;

	for (i = 0; i < count; i++)
		if (alloc_percpu(u64))
			done++;
	return done;
}

static noinline unsigned int leaky_pages(unsigned int count)
{
	unsigned int i, done = 0;

	for (i = 0; i < count; i++)
		if (alloc_page(GFP_KERNEL))
			done++;
	return done;
}

static noinline unsigned int clean_alloc(unsigned int count)
{
	unsigned int i, done = 0;

	for (i = 0; i < count; i++) {
		void *object = kmalloc(OBJECT_SIZE, GFP_KERNEL);

		if (object) {
			done++;
			kfree(object);
		}
	}
	return done;
}

static int __init leaky_init(void)
{
	unsigned int leaked, cached, areas, elements, pages, clean;

	leaky_cache = kmem_cache_create("leaky_cache", OBJECT_SIZE, 0, 0, leaky_ctor);
	if (!leaky_cache)
		return -ENOMEM;
	leaked = leaky_kmalloc(n);
	cached = leaky_cache_alloc(n);
	areas = leaky_vmalloc(n);
	elements = leaky_percpu(n);
	pages = leaky_pages(n);
	clean = clean_alloc(n);
	pr_info("leaky: leaked %u kmalloc and %u leaky_cache objects, %u vmalloc areas, %u percpu elements and %u pages; freed %u\n",
		leaked, cached, areas, elements, pages, clean);
	return 0;
}

static void __exit leaky_exit(void)
{
	kmem_cache_destroy(leaky_cache);
}

module_init(leaky_init);
module_exit(leaky_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Known kernel memory leaks for memleak's VM tests");
