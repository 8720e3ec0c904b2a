/* The metrics registry and its Prometheus text rendering: exact output for
 * known counters (requests by priority level among them), label escaping,
 * the histogram's cumulative buckets, device memory through a backend's
 * memory_info hook (a fake GPU backend), and its absence on the CPU backend;
 * the launch graph counters. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "graph.h"
#include "modules.h"
#include "metrics.h"

static char *render(bs_metrics_t *m)
{
    char *text;
    size_t len;
    struct bs_err err = {0};
    assert_int_equal(bs_metrics_render(m, &text, &len, &err), 0);
    assert_int_equal(strlen(text), len);
    return text;
}

/* Does text hold line as a whole line? */
static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return true;
    return false;
}

#define assert_line(text, line)                                                                    \
    do {                                                                                           \
        if (!has_line(text, line))                                                                 \
            fail_msg("missing line: %s\n--- in ---\n%s", line, text);                              \
    } while (0)

static void test_counters_and_histogram(void **state)
{
    bs_metrics_t *m;
    struct bs_err err = {0};
    assert_int_equal(bs_metrics_init(&m, NULL, &err), 0);
    bs_metrics_model_t *a = bs_metrics_model_add(m, "alpha", "1", 0);
    bs_metrics_model_t *b = bs_metrics_model_add(m, "beta", "1", 3); /* 3 priority levels */
    assert_non_null(a);
    assert_non_null(b);
    struct bs_metrics_request r1 = {10000, 2000, 1000, 5000, 1500, 3};
    struct bs_metrics_request r2 = {20999, 3999, 0, 5000, 999, 5};
    bs_metrics_success(a, &r1);
    bs_metrics_success(a, &r2);
    bs_metrics_failure(a, BS_METRICS_REJECTED);
    bs_metrics_failure(a, BS_METRICS_REJECTED);
    bs_metrics_failure(a, BS_METRICS_CANCELED);
    bs_metrics_failure(b, BS_METRICS_OTHER);
    bs_metrics_failure(b, BS_METRICS_REASON_COUNT); /* out of range: ignored */
    bs_metrics_execution(a, 1);
    bs_metrics_execution(a, 3);
    bs_metrics_execution(a, 4);
    bs_metrics_execution(a, 2000); /* above every bound: only +Inf */
    bs_metrics_pending(a, 5);
    bs_metrics_pending(a, 2);
    bs_metrics_priority(a, 0); /* no levels: level 0 */
    bs_metrics_priority(a, 0);
    bs_metrics_priority(a, 1); /* not a level of alpha: ignored */
    bs_metrics_priority(b, 1);
    bs_metrics_priority(b, 3);
    bs_metrics_priority(b, 3);
    bs_metrics_priority(b, 0); /* beta has levels: ignored, like 4 */
    bs_metrics_priority(b, 4);
    bs_metrics_success(NULL, &r1); /* no metrics: no-ops */
    bs_metrics_failure(NULL, BS_METRICS_OTHER);
    bs_metrics_execution(NULL, 1);
    bs_metrics_pending(NULL, 1);
    bs_metrics_priority(NULL, 0);
    bs_metrics_unrouted(m, BS_METRICS_CANCELED);
    bs_metrics_unrouted(m, BS_METRICS_OTHER);
    bs_metrics_unrouted(m, BS_METRICS_OTHER);
    bs_metrics_unrouted(NULL, BS_METRICS_OTHER);

    char *t = render(m);
    assert_line(t, "# HELP nv_inference_request_success Number of successful inference requests, "
                   "all batch sizes");
    assert_line(t, "# TYPE nv_inference_request_success counter");
    assert_line(t, "nv_inference_request_success{model=\"alpha\",version=\"1\"} 2");
    assert_line(t, "nv_inference_request_success{model=\"beta\",version=\"1\"} 0");
    assert_line(
        t, "nv_inference_request_failure{model=\"alpha\",version=\"1\",reason=\"REJECTED\"} 2");
    assert_line(
        t, "nv_inference_request_failure{model=\"alpha\",version=\"1\",reason=\"CANCELED\"} 1");
    assert_line(t,
                "nv_inference_request_failure{model=\"alpha\",version=\"1\",reason=\"BACKEND\"} 0");
    assert_line(t, "nv_inference_request_failure{model=\"beta\",version=\"1\",reason=\"OTHER\"} 1");
    /* successful requests' samples, not the samples executed (Triton) */
    assert_line(t, "nv_inference_count{model=\"alpha\",version=\"1\"} 8");
    assert_line(t, "nv_inference_exec_count{model=\"alpha\",version=\"1\"} 4");
    assert_line(t, "# TYPE nv_inference_pending_request_count gauge");
    assert_line(t, "nv_inference_pending_request_count{model=\"alpha\",version=\"1\"} 2");
    /* ns sums, then truncated to us: 30999 ns -> 30 us */
    assert_line(t, "nv_inference_request_duration_us{model=\"alpha\",version=\"1\"} 30");
    assert_line(t, "nv_inference_queue_duration_us{model=\"alpha\",version=\"1\"} 5");
    assert_line(t, "nv_inference_compute_input_duration_us{model=\"alpha\",version=\"1\"} 1");
    assert_line(t, "nv_inference_compute_infer_duration_us{model=\"alpha\",version=\"1\"} 10");
    assert_line(t, "nv_inference_compute_output_duration_us{model=\"alpha\",version=\"1\"} 2");
    assert_line(t, "# TYPE blockserve_batch_size histogram");
    assert_line(t, "blockserve_batch_size_bucket{model=\"alpha\",version=\"1\",le=\"1\"} 1");
    assert_line(t, "blockserve_batch_size_bucket{model=\"alpha\",version=\"1\",le=\"2\"} 1");
    assert_line(t, "blockserve_batch_size_bucket{model=\"alpha\",version=\"1\",le=\"4\"} 3");
    assert_line(t, "blockserve_batch_size_bucket{model=\"alpha\",version=\"1\",le=\"1024\"} 3");
    assert_line(t, "blockserve_batch_size_bucket{model=\"alpha\",version=\"1\",le=\"+Inf\"} 4");
    assert_line(t, "blockserve_batch_size_sum{model=\"alpha\",version=\"1\"} 2008");
    assert_line(t, "blockserve_batch_size_count{model=\"alpha\",version=\"1\"} 4");
    assert_line(t, "blockserve_batch_size_bucket{model=\"beta\",version=\"1\",le=\"+Inf\"} 0");
    assert_line(t, "# TYPE blockserve_inference_requests_total counter");
    assert_line(
        t, "blockserve_inference_requests_total{model=\"alpha\",version=\"1\",priority=\"0\"} 2");
    assert_null(strstr(t, "model=\"alpha\",version=\"1\",priority=\"1\""));
    assert_line(
        t, "blockserve_inference_requests_total{model=\"beta\",version=\"1\",priority=\"1\"} 1");
    assert_line(
        t, "blockserve_inference_requests_total{model=\"beta\",version=\"1\",priority=\"2\"} 0");
    assert_line(
        t, "blockserve_inference_requests_total{model=\"beta\",version=\"1\",priority=\"3\"} 2");
    assert_null(strstr(t, "model=\"beta\",version=\"1\",priority=\"0\""));
    assert_null(strstr(t, "priority=\"4\""));
    assert_line(t, "blockserve_unrouted_request_failure_total{reason=\"OTHER\"} 2");
    assert_line(t, "blockserve_unrouted_request_failure_total{reason=\"CANCELED\"} 1");
    assert_line(t, "blockserve_unrouted_request_failure_total{reason=\"REJECTED\"} 0");
    assert_null(strstr(t, "nv_gpu_memory")); /* no backend: no device memory */
    /* every sample line belongs to a family announced before it */
    for (char *line = t, *end; *line; line = end + 1) {
        end = strchr(line, '\n');
        assert_non_null(end);
        if (line[0] == '#')
            continue;
        char family[128];
        size_t n = strcspn(line, "{ ");
        snprintf(family, sizeof(family), "# TYPE %.*s", (int)n, line);
        char *suffix = strstr(family, "_bucket");
        if (suffix == NULL)
            suffix = strstr(family, "_sum");
        if (suffix == NULL && strstr(family, "blockserve_batch_size_count") != NULL)
            suffix = strstr(family, "_count");
        if (suffix != NULL)
            *suffix = '\0';
        char *at = strstr(t, family);
        assert_non_null(at);
        assert_true(at < line);
    }
    free(t);
    bs_metrics_free(m);
}

static void test_label_escaping(void **state)
{
    bs_metrics_t *m;
    struct bs_err err = {0};
    assert_int_equal(bs_metrics_init(&m, NULL, &err), 0);
    assert_non_null(bs_metrics_model_add(m, "we\"ird\\name\nx", "1", 0));
    char *t = render(m);
    assert_line(t, "nv_inference_request_success{model=\"we\\\"ird\\\\name\\nx\",version=\"1\"} 0");
    free(t);
    bs_metrics_free(m);
    bs_metrics_free(NULL);
}

/* A fake GPU backend: only memory_info. */
static int fake_memory_info(void *ctx, struct bs_backend_memory *mem, struct bs_err *err)
{
    snprintf(mem->device, sizeof(mem->device), "GPU-1234\"x");
    mem->used_bytes = 1000;
    mem->total_bytes = 8000;
    return 0;
}

static void test_device_memory(void **state)
{
    static const struct bs_backend_i fake = {.name = "fake", .memory_info = fake_memory_info};
    struct bs_backend be = {.iface = &fake};
    bs_metrics_t *m;
    struct bs_err err = {0};
    assert_int_equal(bs_metrics_init(&m, &be, &err), 0);
    char *t = render(m);
    assert_line(t, "# TYPE nv_gpu_memory_total_bytes gauge");
    assert_line(t, "nv_gpu_memory_total_bytes{gpu_uuid=\"GPU-1234\\\"x\"} 8000");
    assert_line(t, "# TYPE nv_gpu_memory_used_bytes gauge");
    assert_line(t, "nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-1234\\\"x\"} 1000");
    free(t);
    bs_metrics_free(m);

    /* the CPU backend reports none */
    struct bs_backend cpu;
    struct bs_backend_memory mem;
    assert_int_equal(bs_backend_cpu_init(&cpu, 1, &err), 0);
    assert_int_equal(bs_backend_memory_info(&cpu, &mem, &err), BS_EUNSUPP);
    assert_int_equal(bs_metrics_init(&m, &cpu, &err), 0);
    t = render(m);
    assert_null(strstr(t, "nv_gpu_memory"));
    free(t);
    bs_metrics_free(m);
    bs_backend_free(&cpu);
}

/* A part with no ops, through graphs: a warm-up, a capture, a launch. */
static int empty_part(struct bs__fwd *f, void *arg)
{
    (void)f;
    (void)arg;
    return 0;
}

/* The launch graph counters, only where graphs are on, with the engine's
 * process-wide counts. */
static void test_graphs(void **state)
{
    struct bs_backend cpu;
    struct bs_err err = {0};
    bs_metrics_t *m;
    assert_int_equal(bs_backend_cpu_init(&cpu, 1, &err), 0);
    assert_int_equal(bs_metrics_init(&m, &cpu, &err), 0);
    char *t = render(m);
    assert_null(strstr(t, "blockserve_graph")); /* off on the CPU */
    free(t);

    cpu.graphs = BS_GRAPHS_EMULATE;
    struct bs__fwd f = {.be = &cpu, .err = &err};
    const char key[] = "test_metrics part";
    for (int i = 0; i < 4; i++)
        assert_int_equal(bs__graph_run(&f, key, sizeof(key), empty_part, NULL), 0);
    struct bs_graph_stats s;
    bs_graph_stats(&s);
    assert_int_equal(s.launched, 2);
    t = render(m);
    assert_line(t, "# TYPE blockserve_graph_block_runs_total counter");
    assert_line(t, "blockserve_graph_block_runs_total{how=\"eager\"} 1");
    assert_line(t, "blockserve_graph_block_runs_total{how=\"captured\"} 1");
    assert_line(t, "blockserve_graph_block_runs_total{how=\"launched\"} 2");
    assert_line(t, "blockserve_graph_block_runs_total{how=\"reran\"} 0");
    assert_line(t, "# TYPE blockserve_graphs_freed_total counter");
    assert_line(t, "blockserve_graphs_freed_total 0");
    free(t);
    bs_metrics_free(m);
    bs_backend_free(&cpu);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counters_and_histogram),
        cmocka_unit_test(test_label_escaping),
        cmocka_unit_test(test_device_memory),
        cmocka_unit_test(test_graphs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
