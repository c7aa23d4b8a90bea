/* Is the batch-1 row-sparse product gather-bound by the processor or by Numba's code?

   The loop of minidress.kernels.serving.matvec_t (one entry per pass: y[r] += vt[j][r] *
   x[ct[j][r]] over consecutive rows r), written three ways with intrinsics, on a 304-row layer
   keeping 76 of 784 columns per row (about the MNIST MLP's first layer at density 0.1):

     gather16   16-wide vgatherdps (AVX-512), as the compiled matvec_t
     gather8    8-wide vgatherdps (AVX2)
     loads16    16 scalar loads assembled into one vector, then the same vector arithmetic (what
                matvec_t_no_gather compiles to: LLVM's prefer-no-gather)

   Prints kept entries per second for each, as medians of 41 interleaved rounds of 500 calls
   after a warm-up, one thread, and the clock rate measured by a chain of dependent adds. The
   additions of every row stay in order j = 0, 1, ... in each variant (no fused multiply-add:
   -ffp-contract=off), so all three compute the numbers of the plain C loop; the program
   checks that.

   gcc -O2 -march=x86-64-v4 -ffp-contract=off -o /tmp/gather_rate benchmarks/gather_rate.c
   /tmp/gather_rate

   Needs an x86-64 processor with AVX-512F. Nothing is asserted; see README, "Gathers or not". */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROWS 304
#define K 76
#define N 784
#define ROUNDS 41
#define CALLS 500

static float vt[K][ROWS], x[N], y[ROWS], want[ROWS];
static int32_t ct[K][ROWS];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void pass_gather16(int j, int r0, int r1) {
    for (int r = r0; r < r1; r += 16) {
        __m512 g = _mm512_i32gather_ps(_mm512_loadu_si512(&ct[j][r]), x, 4);
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(&vt[j][r]), g);
        _mm512_storeu_ps(y + r, _mm512_add_ps(_mm512_loadu_ps(y + r), p));
    }
}


__attribute__((noinline)) static void gather16(void) {
    memset(y, 0, sizeof y);
    for (int j = 0; j < K; j++)
        pass_gather16(j, 0, ROWS);
}

__attribute__((noinline)) static void gather8(void) {
    memset(y, 0, sizeof y);
    for (int j = 0; j < K; j++)
        for (int r = 0; r < ROWS; r += 8) {
            __m256 g = _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)&ct[j][r]), 4);
            __m256 p = _mm256_mul_ps(_mm256_loadu_ps(&vt[j][r]), g);
            _mm256_storeu_ps(y + r, _mm256_add_ps(_mm256_loadu_ps(y + r), p));
        }
}

__attribute__((noinline)) static void loads16(void) {
    memset(y, 0, sizeof y);
    for (int j = 0; j < K; j++)
        for (int r = 0; r < ROWS; r += 16) {
            const int32_t *c = &ct[j][r];
            __m512 g = _mm512_set_ps(x[c[15]], x[c[14]], x[c[13]], x[c[12]], x[c[11]], x[c[10]],
                                     x[c[9]], x[c[8]], x[c[7]], x[c[6]], x[c[5]], x[c[4]],
                                     x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
            __m512 p = _mm512_mul_ps(_mm512_loadu_ps(&vt[j][r]), g);
            _mm512_storeu_ps(y + r, _mm512_add_ps(_mm512_loadu_ps(y + r), p));
        }
}

static void reference(void) {        /* the plain loop, for the check only */
    memset(y, 0, sizeof y);
    for (int j = 0; j < K; j++)
        for (int r = 0; r < ROWS; r++)
            y[r] += vt[j][r] * x[ct[j][r]];
}

static int cmp(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

int main(void) {
    void (*fns[])(void) = {gather16, gather8, loads16};
    const char *names[] = {"gather16", "gather8", "loads16"};
    enum { NF = sizeof fns / sizeof fns[0] };
    double t[NF][ROUNDS];
    char model[256] = "unknown";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "model name", 10)) {
                char *c = strchr(line, ':');
                if (c) snprintf(model, sizeof model, "%s", c + 2);
                model[strcspn(model, "\n")] = 0;
                break;
            }
        fclose(f);
    }
    srand(1);
    for (int i = 0; i < N; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    for (int j = 0; j < K; j++)
        for (int r = 0; r < ROWS; r++) {
            vt[j][r] = rand() / (float)RAND_MAX - 0.5f;
            ct[j][r] = rand() % N;
        }
    reference();
    memcpy(want, y, sizeof y);
    for (int i = 0; i < NF; i++) {
        fns[i]();
        if (memcmp(y, want, sizeof y)) {
            printf("%s differs from the plain loop\n", names[i]);
            return 1;
        }
    }
    uint64_t a = 1;
    double c0 = now();
    for (long i = 0; i < 200000000L; i++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(a));
    double ghz = 4 * 0.2 / (now() - c0);
    for (int round = 0; round < ROUNDS; round++)
        for (int i = 0; i < NF; i++) {
            double t0 = now();
            for (int c = 0; c < CALLS; c++) fns[i]();
            t[i][round] = (now() - t0) / CALLS;
        }
    printf("CPU: %s, AVX-512F; clock %.2f GHz (dependent adds); one thread\n", model, ghz);
    printf("layer %dx%d, %d kept per row; medians of %d interleaved rounds of %d calls\n\n",
           ROWS, N, K, ROUNDS, CALLS);
    printf("| loop | us per call | G kept entries / s | entries per cycle |\n|---|---|---|---|\n");
    for (int i = 0; i < NF; i++) {
        qsort(t[i], ROUNDS, sizeof(double), cmp);
        double med = t[i][ROUNDS / 2];
        printf("| %s | %.2f | %.2f | %.2f |\n", names[i], med * 1e6, K * ROWS / med / 1e9,
               K * ROWS / med / 1e9 / ghz);
    }
    return a == 0;      /* never: keeps the clock loop */
}
