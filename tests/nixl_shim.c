/*
 * Test-only fault injection for eplb-xfer, from outside the product.
 *
 * A stand-in for NIXL's libnixl_capi.so: every nixl_capi_* function the
 * product calls is forwarded to the real library (EPLBX_SHIM_REAL), and
 * EPLBX_SHIM_FAULT="<kind>:<seq>" makes this process misbehave at a chosen
 * protocol step. The product loads it only because a test points
 * EPLB_XFER_NIXL_LIB at it; the wheel contains no fault code.
 *
 * Kinds (seq = the exchange's sequence number, read from our own outgoing
 * messages, whose wire format is documented in rust/src/protocol/wire.rs):
 *   exit_before_ready  exit(17) instead of sending the first READY of seq
 *   hang_before_done   block forever instead of sending the first DONE of seq
 *   exit_mid_done      send DONE of seq to one peer only, then exit(17)
 *   corrupt_read       flip a byte of the first row a completed READ of seq
 *                      delivered (data corrupted "in flight")
 *   fail_reads         report READs of seq as failed
 *   mute               from seq on, send nothing at all (a stuck worker
 *                      whose process stays alive)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int st_t;
typedef void *h_t;

static void *real;
static char fault_kind[64];
static uint64_t fault_seq = UINT64_MAX;
static uint64_t last_ready_seq;

static void init(void) {
    if (real) return;
    const char *path = getenv("EPLBX_SHIM_REAL");
    real = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
    if (!real) {
        fprintf(stderr, "nixl_shim: cannot load EPLBX_SHIM_REAL=%s: %s\n", path ? path : "(unset)",
                dlerror());
        _exit(99);
    }
    const char *f = getenv("EPLBX_SHIM_FAULT");
    if (f) {
        const char *colon = strchr(f, ':');
        if (colon && (size_t)(colon - f) < sizeof fault_kind) {
            memcpy(fault_kind, f, (size_t)(colon - f));
            fault_seq = strtoull(colon + 1, NULL, 10);
        }
    }
}

static void *sym(const char *name) {
    init();
    void *p = dlsym(real, name);
    if (!p) {
        fprintf(stderr, "nixl_shim: missing %s\n", name);
        _exit(98);
    }
    return p;
}

#define FWD(name, params, args)                                        \
    st_t nixl_capi_##name params {                                     \
        static st_t(*f) params;                                        \
        if (!f) f = (st_t(*) params)sym("nixl_capi_" #name);           \
        return f args;                                                 \
    }

static bool is(const char *k) { return strcmp(fault_kind, k) == 0; }

/* ---- plain forwards ---- */
FWD(create_configured_agent, (const char *n, const void *c, h_t *a), (n, c, a))
FWD(destroy_agent, (h_t a), (a))
FWD(get_plugin_params, (h_t a, const char *p, h_t *m, h_t *q), (a, p, m, q))
FWD(destroy_mem_list, (h_t m), (m))
FWD(destroy_params, (h_t p), (p))
FWD(create_backend, (h_t a, const char *p, h_t q, h_t *b), (a, p, q, b))
FWD(create_opt_args, (h_t *o), (o))
FWD(destroy_opt_args, (h_t o), (o))
FWD(opt_args_add_backend, (h_t o, h_t b), (o, b))
FWD(opt_args_set_notif_msg, (h_t o, const void *m, size_t n), (o, m, n))
FWD(opt_args_set_has_notif, (h_t o, bool b), (o, b))
FWD(create_reg_dlist, (int t, h_t *d, bool s), (t, d, s))
FWD(destroy_reg_dlist, (h_t d), (d))
FWD(reg_dlist_add_desc, (h_t d, uintptr_t a, size_t l, uint64_t dev, const void *m, size_t ml),
    (d, a, l, dev, m, ml))
FWD(register_mem, (h_t a, h_t d, h_t o), (a, d, o))
FWD(deregister_mem, (h_t a, h_t d, h_t o), (a, d, o))
FWD(get_local_md, (h_t a, void **d, size_t *l), (a, d, l))
FWD(load_remote_md, (h_t a, const void *d, size_t l, char **n), (a, d, l, n))
FWD(invalidate_remote_md, (h_t a, const char *n), (a, n))
FWD(destroy_xfer_dlist, (h_t d), (d))
FWD(release_xfer_req, (h_t a, h_t r), (a, r))
FWD(destroy_xfer_req, (h_t r), (r))
FWD(create_notif_map, (h_t *m), (m))
FWD(destroy_notif_map, (h_t m), (m))
FWD(get_notifs, (h_t a, h_t m, h_t o), (a, m, o))
FWD(notif_map_size, (h_t m, size_t *n), (m, n))
FWD(notif_map_get_agent_at, (h_t m, size_t i, const char **n), (m, i, n))
FWD(notif_map_get_notifs_size, (h_t m, const char *n, size_t *s), (m, n, s))
FWD(notif_map_get_notif, (h_t m, const char *n, size_t i, const void **d, size_t *l),
    (m, n, i, d, l))
FWD(notif_map_clear, (h_t m), (m))

/* ---- descriptor lists: remember local addresses (for corrupt_read) ---- */
#define MAXL 64
#define MAXP 256
#define MAXD 4096
struct dl { h_t list; int n; uintptr_t addr[MAXD]; };
static struct dl dls[MAXL];   /* lists being built */
static struct dl preps[MAXP]; /* prepared local lists: handle -> addresses */

static st_t (*r_create_xfer_dlist)(int, h_t *, bool);
st_t nixl_capi_create_xfer_dlist(int t, h_t *d, bool s) {
    if (!r_create_xfer_dlist) r_create_xfer_dlist = sym("nixl_capi_create_xfer_dlist");
    st_t st = r_create_xfer_dlist(t, d, s);
    for (int i = 0; st == 0 && i < MAXL; i++)
        if (!dls[i].list) { dls[i].list = *d; dls[i].n = 0; break; }
    return st;
}

static st_t (*r_xfer_dlist_add_desc)(h_t, uintptr_t, size_t, uint64_t);
st_t nixl_capi_xfer_dlist_add_desc(h_t d, uintptr_t a, size_t l, uint64_t dev) {
    if (!r_xfer_dlist_add_desc) r_xfer_dlist_add_desc = sym("nixl_capi_xfer_dlist_add_desc");
    for (int i = 0; i < MAXL; i++)
        if (dls[i].list == d && dls[i].n < MAXD) { dls[i].addr[dls[i].n++] = a; break; }
    return r_xfer_dlist_add_desc(d, a, l, dev);
}

static st_t (*r_prep)(h_t, const char *, h_t, h_t *, h_t);
st_t nixl_capi_prep_xfer_dlist(h_t a, const char *name, h_t d, h_t *h, h_t o) {
    if (!r_prep) r_prep = sym("nixl_capi_prep_xfer_dlist");
    st_t st = r_prep(a, name, d, h, o);
    if (st == 0 && name && !name[0]) { /* a local list: keep its addresses */
        for (int i = 0; i < MAXL; i++)
            if (dls[i].list == d)
                for (int j = 0; j < MAXP; j++)
                    if (!preps[j].list) { preps[j] = dls[i]; preps[j].list = *h; break; }
    }
    for (int i = 0; i < MAXL; i++)
        if (dls[i].list == d) dls[i].list = NULL; /* the list itself is destroyed next */
    return st;
}

static st_t (*r_release_list)(h_t, h_t);
st_t nixl_capi_release_xfer_dlist_handle(h_t a, h_t h) {
    if (!r_release_list) r_release_list = sym("nixl_capi_release_xfer_dlist_handle");
    for (int j = 0; j < MAXP; j++)
        if (preps[j].list == h) preps[j].list = NULL;
    return r_release_list(a, h);
}

static struct { h_t req; uintptr_t addr; uint64_t seq; int op; } reqs[256];

static st_t (*r_make)(h_t, int, h_t, const int *, size_t, h_t, const int *, size_t, h_t *, h_t);
st_t nixl_capi_make_xfer_req(h_t a, int op, h_t lh, const int *li, size_t ln, h_t rh,
                             const int *ri, size_t rn, h_t *req, h_t o) {
    if (!r_make) r_make = sym("nixl_capi_make_xfer_req");
    st_t st = r_make(a, op, lh, li, ln, rh, ri, rn, req, o);
    if (st == 0 && ln > 0) {
        uintptr_t addr = 0;
        for (int j = 0; j < MAXP; j++)
            if (preps[j].list == lh && li[0] >= 0 && li[0] < preps[j].n)
                addr = preps[j].addr[li[0]];
        for (int i = 0; i < 256; i++)
            if (!reqs[i].req) {
                reqs[i].req = *req; reqs[i].addr = addr; reqs[i].seq = last_ready_seq;
                reqs[i].op = op;
                break;
            }
    }
    return st;
}

/* A completed READ of the fault's exchange: corrupt or fail it. */
static st_t on_done(h_t req, st_t st) {
    for (int i = 0; i < 256; i++) {
        if (reqs[i].req != req) continue;
        if (reqs[i].op == 0 && reqs[i].seq == fault_seq) {
            if (is("fail_reads")) st = -1;
            if (st == 0 && is("corrupt_read") && reqs[i].addr) {
                *(volatile unsigned char *)reqs[i].addr ^= 0xFF;
                fault_seq = UINT64_MAX; /* once */
            }
        }
        if (st != 1) reqs[i].req = NULL;
        break;
    }
    return st;
}

static st_t (*r_post)(h_t, h_t, h_t);
st_t nixl_capi_post_xfer_req(h_t a, h_t req, h_t o) {
    if (!r_post) r_post = sym("nixl_capi_post_xfer_req");
    st_t st = r_post(a, req, o);
    return st == 1 ? st : on_done(req, st);
}

static st_t (*r_status)(h_t, h_t);
st_t nixl_capi_get_xfer_status(h_t a, h_t req) {
    if (!r_status) r_status = sym("nixl_capi_get_xfer_status");
    st_t st = r_status(a, req);
    return st == 1 ? st : on_done(req, st);
}

/* ---- messages ---- */
static st_t (*r_gen)(h_t, const char *, const void *, size_t, h_t);
st_t nixl_capi_gen_notif(h_t a, const char *peer, const void *msg, size_t len, h_t o) {
    if (!r_gen) r_gen = sym("nixl_capi_gen_notif");
    const unsigned char *m = msg;
    if (len >= 13 && memcmp(m, "EPX", 3) == 0) {
        char kind = (char)m[4];
        uint64_t seq;
        memcpy(&seq, m + 5, 8);
        if (kind == 'R') last_ready_seq = seq;
        if (is("mute") && seq >= fault_seq) return 0;
        if (seq == fault_seq && kind == 'R' && is("exit_before_ready")) _exit(17);
        if (seq == fault_seq && kind == 'D' && is("hang_before_done"))
            for (;;) sleep(3600);
        if (seq == fault_seq && kind == 'D' && is("exit_mid_done")) {
            st_t st = r_gen(a, peer, msg, len, o);
            /* flush it out: progress the worker a little, then die */
            static st_t (*r_notifs)(h_t, h_t, h_t);
            static st_t (*r_map)(h_t *);
            if (!r_notifs) r_notifs = sym("nixl_capi_get_notifs");
            if (!r_map) r_map = sym("nixl_capi_create_notif_map");
            h_t map = NULL;
            r_map(&map);
            for (int i = 0; i < 300; i++) { r_notifs(a, map, NULL); usleep(1000); }
            (void)st;
            _exit(17);
        }
    }
    return r_gen(a, peer, msg, len, o);
}
