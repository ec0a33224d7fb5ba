/* A malloc-heavy loop for `cargo xtask bench-user`: OPS allocations (malloc, calloc, realloc
 * in turn, sizes 16 to 4 KiB) through a ring of 4096 live blocks, each freed when its slot
 * comes round again. Prints the loop's own rate, `ops/s: N`, so that tool start-up and
 * reporting stay out of it; frees everything before it exits. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define RING 4096

int main(int argc, char **argv) {
    long ops = argc > 1 ? atol(argv[1]) : 1000000;
    static void *ring[RING];
    unsigned seed = 12345;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < ops; i++) {
        seed = seed * 1103515245 + 12345;
        size_t size = 16 + (seed >> 16) % 4080;
        void **slot = &ring[i % RING];
        switch (i % 3) {
        case 0:
            free(*slot);
            *slot = malloc(size);
            break;
        case 1:
            free(*slot);
            *slot = calloc(1, size);
            break;
        default:
            *slot = realloc(*slot, size);
            break;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    for (int i = 0; i < RING; i++)
        free(ring[i]);
    double seconds = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    printf("ops/s: %.0f\n", ops / seconds);
    return 0;
}
