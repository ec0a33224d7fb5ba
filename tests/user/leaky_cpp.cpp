/* A C++ program whose leaks are known by construction (tests/tests/user.rs):
 *   leak_objects   4 objects of 48 bytes, new
 *   leak_arrays    2 arrays of 300 bytes, new[]
 * and 1000 objects and 1000 arrays made and deleted (sized delete, delete[]) before them.
 * jemalloc, tcmalloc and mimalloc define operator new and delete themselves, apart from
 * malloc and free: under them, only hooks on the operators see these blocks. */
#include <cstddef>

struct Widget {
    long fields[6];
};

/* Volatile, so that the compiler elides neither the allocations nor the deletes. */
static void *volatile sink[16];
static int sunk;

__attribute__((noinline)) void leak_objects() {
    for (int i = 0; i < 4; i++)
        sink[sunk++ % 16] = new Widget();
}

__attribute__((noinline)) void leak_arrays() {
    for (int i = 0; i < 2; i++)
        sink[sunk++ % 16] = new char[300];
}

__attribute__((noinline)) void churn() {
    for (int i = 0; i < 1000; i++) {
        Widget *widget = new Widget();
        sink[15] = widget;
        delete widget;
        char *array = new char[64 + i % 100];
        sink[15] = array;
        delete[] array;
    }
    sink[15] = nullptr;
}

int main() {
    churn();
    leak_objects();
    leak_arrays();
    for (int i = 0; i < 16; i++)
        sink[i] = nullptr;
    return 0;
}
