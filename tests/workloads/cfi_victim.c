/* libcfi_victim.so: functions of the usual frame shapes (leaf, omit-fp with pushes, rbp frame
 * with a VLA, an epilogue in the middle: remember/restore_state), for test_cfi_malformed, which
 * corrupts this object's .eh_frame_hdr and .eh_frame in memory and looks up its code. */
#include <string.h>

#define EXPORT __attribute__((visibility("default"), noinline))

EXPORT int victim_leaf(int x)
{
    return x * 3 + 1;
}

EXPORT __attribute__((optimize("omit-frame-pointer"))) int victim_pushes(int n, int *v)
{
    int a = 0, b = 1, c = 2, d = 3;
    for (int i = 0; i < n; i++) {
        a += v[i] * b;
        b ^= c + v[(i + 1) % n];
        c += d * a;
        d -= victim_leaf(a ^ b);
    }
    return a + b + c + d;
}

EXPORT __attribute__((optimize("no-omit-frame-pointer"))) int victim_vla(int n)
{
    char buf[n];
    memset(buf, n, sizeof buf);
    return victim_pushes(n / 4 + 1, (int *)buf) + buf[n - 1];
}

EXPORT int victim_early_out(int n, int *v)
{
    if (n < 3)
        return victim_leaf(n); /* an epilogue before the end of the function */
    int s = 0;
    for (int i = 0; i < n; i++)
        s += victim_vla(v[i] & 63 ? v[i] & 63 : 1);
    return s;
}
