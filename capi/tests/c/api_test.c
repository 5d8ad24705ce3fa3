/* The C ABI from C: create, commit, read, nested locks against a second
 * process, release and claim (a wrong key, a refusing callback, then a
 * good claim) and reclaim, handles kept the same through failed calls,
 * threads sharing a handle, and a call from a thread-exit destructor. Run
 * by capi/tests/c_program.rs, also under valgrind. Usage: api_test DIR;
 * exits 0 when every check holds. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tpmstate.h"

static int failures;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", \
                    __FILE__, __LINE__, #cond, tpmstate_last_error());     \
            failures++;                                                    \
        }                                                                  \
    } while (0)

/* The status a second process gets opening `path` with lock `mode`. */
static int open_from_another_process(const char *path, const uint8_t *key, int mode)
{
    pid_t pid = fork();
    if (pid == 0) {
        tpmstate_store *s = NULL;
        int rc = tpmstate_open(path, key, 32, mode, &s);
        tpmstate_close(s);
        _exit(rc);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

struct seen {
    int blobs;
    const char *refuse;
};

/* A claim's check: counts blobs, refuses the one named in `refuse`. */
static int validate(void *ctx, const char *name, const uint8_t *data, size_t len)
{
    struct seen *seen = ctx;
    (void)data;
    (void)len;
    seen->blobs++;
    return seen->refuse && strcmp(name, seen->refuse) == 0 ? 42 : 0;
}

static int thread_failures;
static int destructor_ran;

/* Commits 200 versions of permall. */
static void *commit_loop(void *store)
{
    for (int i = 0; i < 200; i++) {
        uint8_t v[8] = {'v', 'e', 'r', 's', 'i', 'o', 'n', (uint8_t)i};
        tpmstate_change c = {"permall", v, sizeof v, 0};
        if (tpmstate_commit(store, &c, 1, NULL) != TPMSTATE_OK)
            __atomic_add_fetch(&thread_failures, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

/* Reads permall 200 times beside the committer: always a whole version. */
static void *read_loop(void *store)
{
    for (int i = 0; i < 200; i++) {
        uint8_t *data = NULL;
        size_t len = 0;
        int rc = tpmstate_get(store, "permall", &data, &len);
        if (rc != TPMSTATE_OK || (len != 8 && len != 5 && len != sizeof "permanent state"))
            __atomic_add_fetch(&thread_failures, 1, __ATOMIC_SEQ_CST);
        tpmstate_blob_free(data, len);
    }
    return NULL;
}

static void at_thread_exit(void *value)
{
    (void)value;
    tpmstate_store *s = NULL;
    if (tpmstate_open(NULL, NULL, 0, TPMSTATE_LOCK_WRITER, &s) == TPMSTATE_E_USAGE &&
        tpmstate_last_error() != NULL)
        destructor_ran = 1;
    tpmstate_close(s);
}

static void *set_key(void *key)
{
    tpmstate_store *s = NULL;
    tpmstate_open(NULL, NULL, 0, TPMSTATE_LOCK_WRITER, &s); /* the message's storage exists */
    pthread_setspecific(*(pthread_key_t *)key, (void *)1);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/nvram.qcow2", argv[1]);
    uint8_t key[32], wrong[32];
    for (int i = 0; i < 32; i++) {
        key[i] = (uint8_t)(i * 7 + 1);
        wrong[i] = (uint8_t)(i * 5 + 3);
    }

    /* Create; a second create over it is refused. */
    CHECK(tpmstate_create(path, key, 32, 0) == TPMSTATE_OK);
    CHECK(tpmstate_create(path, key, 32, 0) == TPMSTATE_E_USAGE);
    CHECK(strstr(tpmstate_last_error(), "nvram.qcow2") != NULL);
    CHECK(tpmstate_create(path, key, 31, 0) == TPMSTATE_E_USAGE);

    /* Commit three blobs at once, read one back, delete one. */
    tpmstate_store *store = NULL;
    CHECK(tpmstate_open(path, key, 32, TPMSTATE_LOCK_WRITER, &store) == TPMSTATE_OK);
    static const uint8_t permall[] = "permanent state";
    static const uint8_t volatile_state[] = "volatile state";
    tpmstate_change changes[] = {
        {"permall", permall, sizeof permall, 0},
        {"volatilestate", volatile_state, sizeof volatile_state, 0},
        {"savestate", (const uint8_t *)"s", 1, 0},
    };
    uint64_t generation = 0;
    CHECK(tpmstate_commit(store, changes, 3, &generation) == TPMSTATE_OK);
    CHECK(generation == 2);
    uint8_t *data = NULL;
    size_t len = 0;
    CHECK(tpmstate_get(store, "permall", &data, &len) == TPMSTATE_OK);
    CHECK(len == sizeof permall && data && memcmp(data, permall, len) == 0);
    tpmstate_blob_free(data, len);
    len = 777;
    CHECK(tpmstate_get(store, "nothing", &data, &len) == TPMSTATE_E_NO_SUCH_BLOB);
    CHECK(data == NULL && len == 0);
    tpmstate_change removal = {"savestate", NULL, 0, 1};
    CHECK(tpmstate_commit(store, &removal, 1, NULL) == TPMSTATE_OK);
    CHECK(tpmstate_get(store, "savestate", &data, &len) == TPMSTATE_E_NO_SUCH_BLOB);
    tpmstate_info_t info;
    CHECK(tpmstate_info(store, &info) == TPMSTATE_OK);
    CHECK(info.generation == 3 && info.blobs == 2 && info.encrypted == 1);
    CHECK(info.lock_mode == TPMSTATE_LOCK_WRITER);

    /* Bad arguments are refused, not crashed on. */
    CHECK(tpmstate_get(NULL, "permall", &data, &len) == TPMSTATE_E_USAGE);
    CHECK(tpmstate_get(store, NULL, &data, &len) == TPMSTATE_E_USAGE);
    tpmstate_change bad = {"x", NULL, 5, 0};
    CHECK(tpmstate_commit(store, &bad, 1, NULL) == TPMSTATE_E_USAGE);
    tpmstate_store *unmade = store; /* a failed open sets its out-pointer to NULL */
    CHECK(tpmstate_open(path, key, 32, 99, &unmade) == TPMSTATE_E_USAGE && unmade == NULL);

    /* Nested locks: counted; another process meets them. */
    CHECK(open_from_another_process(path, key, TPMSTATE_LOCK_SHARED) == TPMSTATE_E_LOCKED);
    CHECK(open_from_another_process(path, key, TPMSTATE_LOCK_NONE) == TPMSTATE_OK);
    tpmstate_lock *outer = NULL, *inner = NULL;
    CHECK(tpmstate_lock_acquire(store, TPMSTATE_LOCK_EXCLUSIVE, 0, &outer) == TPMSTATE_OK);
    CHECK(tpmstate_lock_acquire(store, TPMSTATE_LOCK_EXCLUSIVE, 0, &inner) == TPMSTATE_OK);
    CHECK(open_from_another_process(path, key, TPMSTATE_LOCK_NONE) == TPMSTATE_E_LOCKED);
    CHECK(tpmstate_lock_release(inner) == TPMSTATE_OK);
    CHECK(open_from_another_process(path, key, TPMSTATE_LOCK_NONE) == TPMSTATE_E_LOCKED);
    CHECK(tpmstate_lock_release(outer) == TPMSTATE_OK);
    CHECK(open_from_another_process(path, key, TPMSTATE_LOCK_NONE) == TPMSTATE_OK);

    /* A wrong key is told apart. */
    CHECK(open_from_another_process(path, wrong, TPMSTATE_LOCK_NONE) == TPMSTATE_E_WRONG_KEY);

    /* Migration: release, then claims. */
    tpmstate_released *released = NULL;
    CHECK(tpmstate_release_outgoing(&store, &released) == TPMSTATE_OK);
    CHECK(store == NULL && released != NULL);
    tpmstate_store *target = NULL;
    const char *required[] = {"permall"};
    struct seen seen = {0, NULL};
    CHECK(tpmstate_claim(path, wrong, 32, 500, required, 1, validate, &seen, &target) ==
          TPMSTATE_E_WRONG_KEY);
    CHECK(target == NULL);
    seen.refuse = "volatilestate";
    CHECK(tpmstate_claim(path, key, 32, 500, required, 1, validate, &seen, &target) ==
          TPMSTATE_E_REFUSED);
    CHECK(strstr(tpmstate_last_error(), "volatilestate") != NULL);
    CHECK(target == NULL);
    seen.refuse = NULL;
    seen.blobs = 0;
    CHECK(tpmstate_claim(path, key, 32, 500, required, 1, validate, &seen, &target) ==
          TPMSTATE_OK);
    CHECK(seen.blobs == 2 && target != NULL);

    /* The source cannot take it back while the target holds it. */
    tpmstate_released *before = released;
    CHECK(tpmstate_reclaim(&released, 100, &store) == TPMSTATE_E_LOCKED);
    CHECK(released == before && store == NULL);
    CHECK(tpmstate_close(target) == TPMSTATE_OK);
    CHECK(tpmstate_reclaim(&released, 1000, &store) == TPMSTATE_OK);
    CHECK(released == NULL && store != NULL);
    CHECK(tpmstate_get(store, "volatilestate", &data, &len) == TPMSTATE_OK);
    tpmstate_blob_free(data, len);

    /* A release with a nested acquisition outstanding is refused, and the
     * handle stays the same live one. */
    tpmstate_lock *held = NULL;
    tpmstate_store *same = store;
    CHECK(tpmstate_lock_acquire(store, TPMSTATE_LOCK_WRITER, 0, &held) == TPMSTATE_OK);
    CHECK(tpmstate_release_outgoing(&store, &released) == TPMSTATE_E_USAGE);
    CHECK(strstr(tpmstate_last_error(), "nested") != NULL);
    CHECK(store == same && released == NULL);
    CHECK(tpmstate_info(store, &info) == TPMSTATE_OK);
    CHECK(tpmstate_lock_release(held) == TPMSTATE_OK);

    /* A reader cannot be released; it stays the same live handle. */
    CHECK(tpmstate_release_outgoing(&store, &released) == TPMSTATE_OK);
    tpmstate_store *reader = NULL;
    tpmstate_released *not_made = NULL;
    CHECK(tpmstate_open(path, key, 32, TPMSTATE_LOCK_NONE, &reader) == TPMSTATE_OK);
    tpmstate_store *reader_before = reader;
    CHECK(tpmstate_release_outgoing(&reader, &not_made) == TPMSTATE_E_USAGE);
    CHECK(reader == reader_before && not_made == NULL);
    CHECK(tpmstate_info(reader, &info) == TPMSTATE_OK);
    CHECK(tpmstate_close(reader) == TPMSTATE_OK);

    /* A target that commits: the source's reclaim finds a newer state,
     * fails, and keeps the same released handle. */
    CHECK(tpmstate_claim(path, key, 32, 1000, NULL, 0, NULL, NULL, &target) == TPMSTATE_OK);
    tpmstate_change newer = {"permall", (const uint8_t *)"newer", 5, 0};
    CHECK(tpmstate_commit(target, &newer, 1, NULL) == TPMSTATE_OK);
    CHECK(tpmstate_close(target) == TPMSTATE_OK);
    before = released;
    CHECK(tpmstate_reclaim(&released, 1000, &store) == TPMSTATE_E_CORRUPT);
    CHECK(strstr(tpmstate_last_error(), "changed while released") != NULL);
    CHECK(released == before && store == NULL);
    CHECK(tpmstate_released_close(released) == TPMSTATE_OK);
    CHECK(tpmstate_released_close(NULL) == TPMSTATE_OK);

    /* Threads share a handle: a committer and two readers. */
    CHECK(tpmstate_open(path, key, 32, TPMSTATE_LOCK_WRITER, &store) == TPMSTATE_OK);
    pthread_t committer, readers[2];
    pthread_create(&committer, NULL, commit_loop, store);
    for (int i = 0; i < 2; i++)
        pthread_create(&readers[i], NULL, read_loop, store);
    pthread_join(committer, NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(readers[i], NULL);
    CHECK(thread_failures == 0);
    CHECK(tpmstate_close(store) == TPMSTATE_OK);

    /* A call from a thread-exit destructor, when the library's own
     * thread-local storage may be gone already: no abort. */
    pthread_key_t k;
    pthread_t exiting;
    pthread_key_create(&k, at_thread_exit);
    pthread_create(&exiting, NULL, set_key, &k);
    pthread_join(exiting, NULL);
    CHECK(destructor_ran == 1);

    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
