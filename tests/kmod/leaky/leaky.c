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
 *
 * For `memleak vm`'s tests, with n=0 (nothing leaked on load):
 *   - writing N to /sys/module/leaky/parameters/leak leaks N more kzalloc(64) objects from
 *     leaky_kmalloc, while the tests run;
 *   - writing N to /sys/module/leaky/parameters/churn allocates and frees N objects in
 *     clean_alloc (no leak);
 *   - hold=N allocates N kzalloc(64) objects in leaky_hold on load, kept for the module's life
 *     (module state, not a leak while it is loaded); unloading frees them, unless
 *     forget_on_exit=1, when the exit frees only the array that pointed at them: the classic
 *     leak on unload.
 *
 * The leaked slab objects are deliberately unreferenced: no pointer to them is kept anywhere, so
 * kmemleak reports them too (cargo xtask vm-test compares the two). They are zeroed: a recycled
 * kmalloc object may still hold its previous user's pointers to its neighbours, and such stale
 * pointers chain the leaked objects to live memory, hiding all of them from kmemleak.
 * The three functions are noinline and outside .init.text, so they stay named frames in
 * stacks after the kernel discards the module's init code.
 *
 * Unloading destroys leaky_cache; with n>0 it still holds objects, which the kernel reports
 * loudly, so the tests that load it with n>0 leave it loaded.
 */
#include <linux/gfp.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/percpu.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>

static unsigned int n = 100;
module_param(n, uint, 0444);
MODULE_PARM_DESC(n, "objects per kind of allocation (default 100)");

static unsigned int hold;
module_param(hold, uint, 0444);
MODULE_PARM_DESC(hold, "objects held for the module's life (default 0)");

static bool forget_on_exit;
module_param(forget_on_exit, bool, 0444);
MODULE_PARM_DESC(forget_on_exit, "leave the held objects allocated on unload (default no)");

static void **held;

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

static noinline void **leaky_hold(unsigned int count)
{
	void **objects = kcalloc(count, sizeof(*objects), GFP_KERNEL);
	unsigned int i;

	if (!objects)
		return NULL;
	for (i = 0; i < count; i++)
		objects[i] = kzalloc(OBJECT_SIZE, GFP_KERNEL);
	return objects;
}

static int set_count(const char *value, unsigned int *count)
{
	return kstrtouint(value, 0, count);
}

static int leak_set(const char *value, const struct kernel_param *param)
{
	unsigned int count;
	int error = set_count(value, &count);

	if (error)
		return error;
	pr_info("leaky: leaked %u kmalloc objects on request\n", leaky_kmalloc(count));
	return 0;
}

static int churn_set(const char *value, const struct kernel_param *param)
{
	unsigned int count;
	int error = set_count(value, &count);

	if (error)
		return error;
	pr_info("leaky: allocated and freed %u objects on request\n", clean_alloc(count));
	return 0;
}

static const struct kernel_param_ops leak_ops = { .set = leak_set };
static const struct kernel_param_ops churn_ops = { .set = churn_set };
module_param_cb(leak, &leak_ops, NULL, 0200);
MODULE_PARM_DESC(leak, "write N: leak N kmalloc objects now");
module_param_cb(churn, &churn_ops, NULL, 0200);
MODULE_PARM_DESC(churn, "write N: allocate and free N objects now");

static int __init leaky_init(void)
{
	unsigned int leaked, cached, areas, elements, pages, clean;

	leaky_cache = kmem_cache_create("leaky_cache", OBJECT_SIZE, 0, 0, leaky_ctor);
	if (!leaky_cache)
		return -ENOMEM;
	if (hold) {
		held = leaky_hold(hold);
		if (!held) {
			kmem_cache_destroy(leaky_cache);
			return -ENOMEM;
		}
	}
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
	unsigned int i;

	if (held && !forget_on_exit)
		for (i = 0; i < hold; i++)
			kfree(held[i]);
	kfree(held);
	kmem_cache_destroy(leaky_cache);
}

module_init(leaky_init);
module_exit(leaky_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Known kernel memory leaks for memleak's VM tests");
