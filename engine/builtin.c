#include "builtin.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "class.h"
#include "config.h"
#include "model.h"
#include "safetensors.h"

#define SD15_BLOCK(dim, heads, head_dim)                                                           \
    "{\"_class_name\": \"BasicTransformerBlock\", \"dim\": " #dim ", \"num_attention_heads\": "    \
    #heads ", \"attention_head_dim\": " #head_dim ", \"cross_attention_dim\": 768, "               \
    "\"activation_fn\": \"geglu\"}"
#define DIT_XL(blocks)                                                                             \
    "{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 1152, \"num_attention_heads\": 16, "    \
    "\"attention_head_dim\": 72, \"activation_fn\": \"gelu-approximate\", "                        \
    "\"num_embeds_ada_norm\": 1000, \"attention_bias\": true, \"norm_type\": \"ada_norm_zero\", "  \
    "\"norm_elementwise_affine\": false, \"blockserve\": {\"num_blocks\": " #blocks "}}"

static const struct bs_builtin builtins[] = {
    {"sd15_down0_block", "SD-1.5 down-block-0 transformer block: dim 320, 8 heads x 40, context 77 x 768, GEGLU",
     SD15_BLOCK(320, 8, 40), 1, 4096, 77, 0, 0},
    {"sd15_mid_block", "SD-1.5 mid-block transformer block: dim 1280, 8 heads x 160, context 77 x 768",
     SD15_BLOCK(1280, 8, 160), 8, 64, 77, 0, 0},
    {"dit_xl_block", "DiT-XL/2 block: dim 1152, 16 heads x 72, ada_norm_zero, gelu-approximate",
     DIT_XL(1), 4, 256, 0, 0, 0},
    {"dit_xl_trunk", "DiT-XL/2 trunk: 28 blocks of dit_xl_block", DIT_XL(28), 1, 256, 0, 0, 0},
    {"vae_mid_attention", "VAE mid-block AttentionBlock: 512 channels, one head, 32 groups",
     "{\"_class_name\": \"AttentionBlock\", \"channels\": 512, \"num_head_channels\": null, "
     "\"norm_num_groups\": 32, \"eps\": 1e-6}",
     1, 0, 0, 32, 32},
};

int bs_builtin_count(void)
{
    return (int)BS_ARRAY_LEN(builtins);
}

const struct bs_builtin *bs_builtin_get(int i)
{
    return i >= 0 && i < bs_builtin_count() ? &builtins[i] : NULL;
}

const struct bs_builtin *bs_builtin_find(const char *name)
{
    for (int i = 0; i < bs_builtin_count(); i++)
        if (strcmp(builtins[i].name, name) == 0)
            return &builtins[i];
    return NULL;
}

/* splitmix64: a small, fast, fully deterministic generator. */
static uint64_t next_u64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [-a, a). */
static float uniform(uint64_t *s, float a)
{
    return a * (float)((double)(next_u64(s) >> 11) * 0x1.0p-52 - 1.0);
}

static uint64_t hash_name(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Parameters collected through bs_model_params. */
struct params {
    char **names;
    struct bs_tensor *t;
    int n, cap;
    int rc;
};

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Fill like a trained network's scale: linears ~ U(+-1/sqrt(fan_in)), norm
 * gains near 1, biases small, embeddings ~ unit scale; seeded by the key, so
 * every run (and the file and in-memory paths) give the same values. */
static void generate(void *arg, const char *key, int n_dims, const int64_t *ne, float *p)
{
    uint64_t s = hash_name(key);
    int64_t n = n_dims == 2 ? ne[0] * ne[1] : ne[0];
    bool norm_gain = n_dims == 1 && ends_with(key, ".weight");
    bool table = strstr(key, "emb") != NULL && n_dims == 2 && !strstr(key, "linear");
    float a = n_dims == 2 ? 1.0f / sqrtf((float)ne[1]) : 0.05f;
    (void)arg;
    for (int64_t i = 0; i < n; i++)
        p[i] = norm_gain ? 1.0f + uniform(&s, 0.1f) : table ? uniform(&s, 1.7f) : uniform(&s, a);
}

static void collect(void *arg, const char *key, int n_dims, const int64_t *ne)
{
    struct params *ps = arg;
    if (ps->rc != 0)
        return;
    if (ps->n == ps->cap) {
        int cap = ps->cap ? 2 * ps->cap : 64;
        char **names = realloc(ps->names, (size_t)cap * sizeof(*names));
        struct bs_tensor *t = names ? realloc(ps->t, (size_t)cap * sizeof(*t)) : NULL;
        if (names)
            ps->names = names;
        if (t == NULL) {
            ps->rc = BS_ENOMEM;
            return;
        }
        ps->t = t;
        ps->cap = cap;
    }
    struct bs_tensor t = bs_tensor_make(BS_TYPE_F32, n_dims, ne, NULL);
    t.data = malloc(bs_tensor_nbytes(&t));
    ps->names[ps->n] = strdup(key);
    if (t.data == NULL || ps->names[ps->n] == NULL) {
        free(t.data);
        free(ps->names[ps->n]);
        ps->rc = BS_ENOMEM;
        return;
    }
    generate(NULL, key, n_dims, ne, t.data);
    ps->t[ps->n++] = t;
}

static void params_free(struct params *ps)
{
    for (int i = 0; i < ps->n; i++) {
        free(ps->names[i]);
        free(ps->t[i].data);
    }
    free(ps->names);
    free(ps->t);
}

static int write_text(const char *path, const char *text, struct bs_err *err)
{
    FILE *f = fopen(path, "w");
    if (f == NULL || fputs(text, f) < 0 || fputc('\n', f) < 0) {
        int e = errno;
        if (f)
            fclose(f);
        return bs_err_set(err, BS_EIO, "%s: %s", path, strerror(e));
    }
    if (fclose(f) != 0)
        return bs_err_set(err, BS_EIO, "%s: %s", path, strerror(errno));
    return 0;
}

/* Example inputs: unit-scale hidden and encoder states, timesteps spread over
 * [0, 1000), labels over the classes. */
static int write_inputs(const struct bs_builtin *b, const struct bs_model_config *c,
                        const char *path, struct bs_err *err)
{
    const char *names[4];
    struct bs_tensor t[4];
    int n = 0, rc;
    uint64_t s = 42;
    if (c->cls == &bs_class_attention_block) {
        names[n] = "hidden_states";
        t[n++] = bs_tensor_make(BS_TYPE_F32, 4,
                                (int64_t[]){b->batch, c->attention_block.channels, b->height,
                                            b->width}, NULL);
    } else { /* BasicTransformerBlock */
        const struct bs_btb_config *btb = &c->btb;
        names[n] = "hidden_states";
        t[n++] = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){b->batch, b->tokens, btb->dim}, NULL);
        if (b->enc_tokens) {
            names[n] = "encoder_hidden_states";
            t[n++] = bs_tensor_make(BS_TYPE_F32, 3,
                                    (int64_t[]){b->batch, b->enc_tokens, btb->cross_attention_dim},
                                    NULL);
        }
        if (btb->norm_type == BS_NORM_ADA_NORM_ZERO) {
            names[n] = "timestep";
            t[n++] = bs_tensor_make(BS_TYPE_I64, 1, (int64_t[]){b->batch}, NULL);
            names[n] = "class_labels";
            t[n++] = bs_tensor_make(BS_TYPE_I64, 1, (int64_t[]){b->batch}, NULL);
        }
    }
    for (int i = 0; i < n; i++) {
        t[i].data = malloc(bs_tensor_nbytes(&t[i]));
        if (t[i].data == NULL) {
            n = i;
            rc = bs_err_set(err, BS_ENOMEM, "out of memory");
            goto done;
        }
        for (int64_t j = 0; j < bs_tensor_nelements(&t[i]); j++) {
            if (t[i].type == BS_TYPE_F32)
                ((float *)t[i].data)[j] = uniform(&s, 1.7f);
            else
                ((int64_t *)t[i].data)[j] = (int64_t)(next_u64(&s) % (strcmp(names[i], "timestep") == 0
                                                                       ? 1000
                                                                       : (uint64_t)c->btb.num_embeds_ada_norm));
        }
    }
    rc = bs_st_write(path, names, t, n, err);
done:
    for (int i = 0; i < n; i++)
        free(t[i].data);
    return rc;
}

/* mkdir -p */
static int make_dirs(const char *dir, struct bs_err *err)
{
    char path[4096];
    if (snprintf(path, sizeof(path), "%s", dir) >= (int)sizeof(path))
        return bs_err_set(err, BS_EINVAL, "path too long");
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST)
            return bs_err_set(err, BS_EIO, "%s: %s", path, strerror(errno));
        *p = '/';
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        return bs_err_set(err, BS_EIO, "%s: %s", path, strerror(errno));
    return 0;
}

int bs_builtin_write(const struct bs_builtin *b, const char *dir, struct bs_err *err)
{
    struct bs_model_config cfg;
    struct params ps = {0};
    char path[4096];
    int rc;
    if ((rc = make_dirs(dir, err)) != 0)
        return rc;
    if ((rc = bs_config_parse(&cfg, b->config, strlen(b->config), b->name, err)) != 0)
        return rc;
    snprintf(path, sizeof(path), "%s/config.json", dir);
    if ((rc = write_text(path, b->config, err)) != 0)
        return rc;
    if (bs_model_params(&cfg, collect, &ps) != 0)
        ps.rc = BS_ENOMEM;
    if (ps.rc != 0)
        rc = bs_err_set(err, ps.rc, "out of memory generating weights for %s", b->name);
    snprintf(path, sizeof(path), "%s/diffusion_pytorch_model.safetensors", dir);
    if (rc == 0)
        rc = bs_st_write(path, (const char *const *)ps.names, ps.t, ps.n, err);
    params_free(&ps);
    snprintf(path, sizeof(path), "%s/inputs.safetensors", dir);
    if (rc == 0)
        rc = write_inputs(b, &cfg, path, err);
    return rc;
}

int bs_builtin_load(const struct bs_builtin *b, struct bs_backend *be, bs_model_t **model,
                    struct bs_err *err)
{
    struct bs_model_config cfg;
    struct bs_weight_gen gen = {generate, NULL};
    int rc = bs_config_parse(&cfg, b->config, strlen(b->config), b->name, err);
    if (rc != 0)
        return rc;
    return bs_model_load_generated(model, &cfg, &gen, be, err);
}
