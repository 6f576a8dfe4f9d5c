/* Hardware ceiling of the coordinator's fold on this machine, without Python or torch in the way.
 *
 * Built and run by bench/fold_ceiling.py (cc -O3 -march=native -fopenmp). K buffers of P float32, like
 * K received updates; every probe uses all cores (OpenMP), the probes are interleaved and each keeps its best
 * time over R rounds:
 *   sum_one   pure read of one contiguous K*P buffer (the read-bandwidth limit)
 *   sum_k     pure read of the K separate buffers
 *   fold1     acc <- acc + w_k x_k, one update per pass (what a per-update fold can do at best)
 *   fold2     acc <- acc + w_k x_k + w_j x_j, two updates per pass (a fused kernel; half the acc traffic)
 * Each thread folds its share of the updates into its own acc (the partial sums are added at the end).
 * Output: one JSON line of GB/s figures.
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void fold1(float *restrict acc, const float *restrict x, float w, long n) {
    for (long i = 0; i < n; i++) acc[i] += w * x[i];
}

static void fold2(float *restrict acc, const float *restrict x, float w, const float *restrict y, float v, long n) {
    for (long i = 0; i < n; i++) acc[i] += w * x[i] + v * y[i];
}

static float sum(const float *restrict x, long n) {
    float s[16] = {0};
    for (long i = 0; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) s[j] += x[i + j];
    float t = 0;
    for (int j = 0; j < 16; j++) t += s[j];
    return t;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s K P ROUNDS\n", argv[0]);
        return 2;
    }
    const long K = atol(argv[1]), P = atol(argv[2]), R = atol(argv[3]);
    const int T = omp_get_max_threads();
    float **xs = malloc(K * sizeof *xs), **acc = malloc(T * sizeof *acc);
    for (long k = 0; k < K; k++) {
        xs[k] = aligned_alloc(64, (P * 4 + 63) / 64 * 64);
        for (long i = 0; i < P; i++) xs[k][i] = 1e-3f * (float)((i + k) % 7);
    }
    for (int t = 0; t < T; t++) acc[t] = aligned_alloc(64, (P * 4 + 63) / 64 * 64);
    float *one = aligned_alloc(64, K * P * 4);
    for (long i = 0; i < K * P; i++) one[i] = 1.0f;
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    volatile float sink = 0;
    for (long r = 0; r < R; r++) {
        for (int t = 0; t < T; t++)
            for (long i = 0; i < P; i++) acc[t][i] = 0;
        double t0 = now(), s = 0;
#pragma omp parallel for reduction(+ : s)
        for (long c = 0; c < K; c++) s += sum(one + c * P, P);
        double t1 = now();
#pragma omp parallel for reduction(+ : s)
        for (long k = 0; k < K; k++) s += sum(xs[k], P);
        double t2 = now();
#pragma omp parallel for schedule(static, 1)
        for (long k = 0; k < K; k++) fold1(acc[omp_get_thread_num()], xs[k], 1.5f, P);
        double t3 = now();
#pragma omp parallel for schedule(static, 1)
        for (long k = 0; k < K / 2; k++) fold2(acc[omp_get_thread_num()], xs[2 * k], 1.5f, xs[2 * k + 1], 0.5f, P);
        double t4 = now();
        sink += (float)s + acc[0][P / 2];
        double d[4] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3};
        for (int j = 0; j < 4; j++) best[j] = d[j] < best[j] ? d[j] : best[j];
    }
    double gb = K * P * 4 / 1e9;
    printf("{\"threads\": %d, \"sum_one_gb_per_s\": %.2f, \"sum_k_gb_per_s\": %.2f, \"fold1_gb_per_s\": %.2f, "
           "\"fold2_gb_per_s\": %.2f}\n", T, gb / best[0], gb / best[1], gb / best[2], gb / best[3]);
    return 0;
}
