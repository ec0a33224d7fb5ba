/* The shared library of leaky_user.c: a leak outside the main program. */
#include <stdlib.h>

/* Volatile, so that the compiler neither elides the allocations nor the stores. */
static void *volatile kept[16];

__attribute__((noinline)) void library_leak(int count) {
    for (int i = 0; i < count; i++)
        kept[i % 16] = malloc(72);
    for (int i = 0; i < 16; i++)
        kept[i] = NULL;
}
