#define _GNU_SOURCE /* mremap */
/* A user-space program whose leaks are known by construction (tests/tests/user.rs):
 *   leak_malloc        10 blocks of 100 bytes, malloc
 *   leak_calloc         7 blocks of 12 x 8 bytes, calloc
 *   leak_realloc        5 blocks grown by realloc from 16 to 4000 bytes (a malloc'ed block
 *                       that realloc moves: the leak is the realloc's)
 *   leak_aligned        3 blocks of 256 bytes, posix_memalign
 *   leak_in_thread      4 blocks of 48 bytes, malloc in a second thread
 *   library_leak        6 blocks of 72 bytes, malloc in libleaky_user_lib.so
 *   leak_mapping        2 anonymous mappings of 64 KiB, mmap (valgrind does not follow
 *                       mmap: the construction is the oracle)
 * and everything else it allocates (churn_and_free, churn_mappings) freed before it exits.
 * Not blocks, and so never reported: a file mapping kept to the end, a thread's stack. Built with frame pointers so that both memleak and valgrind can walk it.
 *
 * With `fork` as its argument, it first keeps a block of 88 bytes (leak_shared_before_fork),
 * then forks two children that each free their copy of it, leak 3 blocks of 40 bytes
 * (leak_in_child), churn and exit, and a third that leaks 2 blocks (leak_before_exec) and
 * execs /bin/true, which frees them with the program.
 *
 * With `wait` as its argument, it first leaks 9 blocks of 200 bytes (leak_before_wait),
 * churns, and then reads a line from stdin, so that a tracer can attach to it running: a
 * trace by pid must not report the blocks allocated before it attached. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

void library_leak(int count);

/* Volatile, so that the compiler neither elides the allocations nor the stores. */
static void *volatile sink[64];
static int sunk;

static void keep(void *block) { sink[sunk++ % 64] = block; }

__attribute__((noinline)) void leak_malloc(void) {
    for (int i = 0; i < 10; i++)
        keep(malloc(100));
}

__attribute__((noinline)) void leak_calloc(void) {
    for (int i = 0; i < 7; i++)
        keep(calloc(12, 8));
}

__attribute__((noinline)) void leak_realloc(void) {
    for (int i = 0; i < 5; i++) {
        char *block = malloc(16);
        block[0] = 1;
        keep(realloc(block, 4000));
    }
}

__attribute__((noinline)) void leak_aligned(void) {
    for (int i = 0; i < 3; i++) {
        void *block;
        if (posix_memalign(&block, 64, 256) == 0)
            keep(block);
    }
}

static void *thread_main(void *unused) {
    (void)unused;
    for (int i = 0; i < 4; i++)
        keep(malloc(48));
    return NULL;
}

__attribute__((noinline)) void leak_in_thread(void) {
    pthread_t thread;
    pthread_create(&thread, NULL, thread_main, NULL);
    pthread_join(thread, NULL);
}

__attribute__((noinline)) void leak_before_wait(void) {
    for (int i = 0; i < 9; i++)
        keep(malloc(200));
}

__attribute__((noinline)) void churn_and_free(void) {
    for (int i = 0; i < 1000; i++) {
        void *block = malloc(32 + i % 200);
        block = realloc(block, 300);
        free(block);
        /* Through a volatile: gcc drops a free(calloc()) pair it can see. */
        void *volatile zeroed = calloc(4, 16);
        free(zeroed);
    }
}

__attribute__((noinline)) void leak_mapping(void) {
    for (int i = 0; i < 2; i++) {
        char *mapping = mmap(NULL, 64 << 10, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
        if (mapping == MAP_FAILED)
            abort();
        mapping[0] = 1;
        keep(mapping);
    }
}

/* Mappings made and unmapped, one moved by mremap before it is unmapped, and a file mapping
 * kept to the end: none of them is a leak. */
__attribute__((noinline)) void churn_mappings(void) {
    for (int i = 0; i < 50; i++) {
        void *mapping = mmap(NULL, 8192 << (i % 4), PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mapping == MAP_FAILED)
            abort();
        munmap(mapping, 8192 << (i % 4));
    }
    void *moved = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    moved = mremap(moved, 4096, 1 << 20, MREMAP_MAYMOVE);
    if (moved == MAP_FAILED)
        abort();
    munmap(moved, 1 << 20);
    int file = open("/proc/self/exe", O_RDONLY);
    if (file < 0 || mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, file, 0) == MAP_FAILED)
        abort();
    close(file);
}

__attribute__((noinline)) void *leak_shared_before_fork(void) {
    void *block = malloc(88);
    keep(block);
    return block;
}

__attribute__((noinline)) void leak_in_child(void) {
    for (int i = 0; i < 3; i++)
        keep(malloc(40));
}

__attribute__((noinline)) void leak_before_exec(void) {
    for (int i = 0; i < 2; i++)
        keep(malloc(24));
}

static void fork_children(void) {
    void *shared = leak_shared_before_fork();
    for (int i = 0; i < 2; i++) {
        pid_t child = fork();
        if (child == 0) {
            /* The child's copy: the parent's block stays allocated. */
            free(shared);
            leak_in_child();
            churn_and_free();
            exit(0);
        }
        waitpid(child, NULL, 0);
    }
    pid_t child = fork();
    if (child == 0) {
        leak_before_exec();
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    waitpid(child, NULL, 0);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "wait") == 0) {
        char line[16];
        leak_before_wait();
        churn_and_free();
        puts("waiting");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    if (argc > 1 && strcmp(argv[1], "fork") == 0)
        fork_children();
    churn_and_free();
    churn_mappings();
    leak_malloc();
    leak_calloc();
    leak_realloc();
    leak_aligned();
    leak_in_thread();
    library_leak(6);
    leak_mapping();
    /* The sink is cleared so that valgrind finds the blocks unreachable ("definitely
     * lost"), as a real leak would be. */
    for (int i = 0; i < 64; i++)
        sink[i] = NULL;
    return 0;
}
