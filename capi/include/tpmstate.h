/* tpmstate's C ABI: libtpmstate_c.so / libtpmstate_c.a.
 * Generated from capi/src by cbindgen (capi/tests/header.rs checks it);
 * do not edit. docs/c-api.md is the guide. */

#ifndef TPMSTATE_H
#define TPMSTATE_H

#include <stddef.h>
#include <stdint.h>

/*
 Success.
 */
#define TPMSTATE_OK 0

/*
 A bad argument: a NULL pointer, a bad length, an unknown lock mode, a
 call the handle's kind does not allow.
 */
#define TPMSTATE_E_USAGE 1

/*
 Not a qcow2 image, or no tpmstate store in it.
 */
#define TPMSTATE_E_NOT_A_STORE 2

/*
 The image or the store is damaged.
 */
#define TPMSTATE_E_CORRUPT 3

/*
 The store is encrypted and no key was given.
 */
#define TPMSTATE_E_KEY_MISSING 4

/*
 The key does not open the store (or a key was given for a plaintext one).
 */
#define TPMSTATE_E_WRONG_KEY 5

/*
 Another process (or handle) holds a conflicting lock.
 */
#define TPMSTATE_E_LOCKED 6

/*
 The image uses a feature tpmstate does not write.
 */
#define TPMSTATE_E_UNSUPPORTED 7

/*
 An operating-system I/O error.
 */
#define TPMSTATE_E_IO 8

/*
 The store has no room for the commit.
 */
#define TPMSTATE_E_NO_SPACE 9

/*
 A bug in tpmstate (a panic is reported so); nothing was written.
 */
#define TPMSTATE_E_INTERNAL 10

/*
 An older store, or another one, than the caller expects.
 */
#define TPMSTATE_E_ROLLBACK 11

/*
 No blob of that name.
 */
#define TPMSTATE_E_NO_SUCH_BLOB 12

/*
 A claim's validation callback refused a blob.
 */
#define TPMSTATE_E_REFUSED 13

/*
 tpmstate_reclaim took the lock back, but the state on disk was damaged
 while released: *out is a writer that must commit every blob again.
 */
#define TPMSTATE_E_DAMAGED 14

/*
 Lock mode: no lock at all, QEMU's force-share read (`qemu-img -U`): a
 read-only handle for diagnostics while a writer holds the image.
 */
#define TPMSTATE_LOCK_NONE 0

/*
 Lock mode: others may read, nobody may write (a read-only handle).
 */
#define TPMSTATE_LOCK_SHARED 1

/*
 Lock mode: read and write; others may only force-share read.
 */
#define TPMSTATE_LOCK_WRITER 2

/*
 Lock mode: nobody else at all.
 */
#define TPMSTATE_LOCK_EXCLUSIVE 3

/*
 A counted lock acquisition, held until tpmstate_lock_release().
 */
typedef struct tpmstate_lock tpmstate_lock;

/*
 A released store: it reads, it cannot write; tpmstate_reclaim() takes
 the writer lock back.
 */
typedef struct tpmstate_released tpmstate_released;

/*
 An open store: a writer (or exclusive) handle, or a read-only one.
 */
typedef struct tpmstate_store tpmstate_store;

/*
 A claim's check of one blob: name and its decrypted data/len (data is
 NULL for an empty blob); returns 0 to accept, anything else to refuse
 the whole claim. ctx is the pointer given to tpmstate_claim(). It must
 return normally: no longjmp() out of it, no C++ exception through it.
 */
typedef int (*tpmstate_validate_fn)(void *ctx, const char *name, const uint8_t *data, size_t len);

/*
 One change of a commit: data/len stored as blob name, or the blob
 deleted when remove is not 0 (data is then ignored). If a commit names
 a blob twice, the later change wins.
 */
typedef struct tpmstate_change {
  /*
   The blob's name (UTF-8, NUL-terminated).
   */
  const char *name;
  /*
   Its new content (NULL only with len 0).
   */
  const uint8_t *data;
  /*
   The content's length.
   */
  size_t len;
  /*
   Not 0: delete the blob.
   */
  int remove;
} tpmstate_change;

/*
 What tpmstate_info() reports.
 */
typedef struct tpmstate_info_t {
  /*
   The generation the handle serves.
   */
  uint64_t generation;
  /*
   How many blobs it holds.
   */
  uint64_t blobs;
  /*
   Their plaintext bytes in all.
   */
  uint64_t bytes;
  /*
   1 if the store is encrypted.
   */
  int encrypted;
  /*
   The handle's lock mode (TPMSTATE_LOCK_*).
   */
  int lock_mode;
} tpmstate_info_t;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/*
 The message of the calling thread's last failure, in plain words ("" if
 none yet). Successful calls leave it; the string stays valid until the
 thread's next failing call. Never NULL.
 */
const char *tpmstate_last_error(void);

/*
 Releases a writer for a migration's target: settles the image, drops
 the lock and sets *out to a read-only released handle; the store is
 freed and *store becomes NULL. On failure *store is the same live
 handle as before. A handle with nested acquisitions outstanding is
 refused.

 # Safety
 store points to a live writer handle's pointer; out is valid
 for a write.
 */
int tpmstate_release_outgoing(struct tpmstate_store **store, struct tpmstate_released **out);

/*
 Takes the writer lock back after a failed migration, waiting up to
 timeout_ms, and checks the image still holds this handle's state.
 On success *out is the writer, the released handle is freed and
 *released becomes NULL. TPMSTATE_E_DAMAGED: the lock is back but the
 state on disk was damaged meanwhile; *out is a writer that must commit
 every blob again, and *released is NULL. Any other failure (the lock
 is busy, or a target committed a newer state: TPMSTATE_E_CORRUPT)
 leaves *released the same live handle and *out NULL.

 # Safety
 released points to a live released handle's pointer; out is
 valid for a write.
 */
int tpmstate_reclaim(struct tpmstate_released **released,
                     uint32_t timeout_ms,
                     struct tpmstate_store **out);

/*
 Closes a released handle (NULL: nothing).

 # Safety
 released comes from tpmstate_release_outgoing() and is closed
 once, with no other call on it in progress.
 */
int tpmstate_released_close(struct tpmstate_released *released);

/*
 A migration target's claim of the image at path: waits up to
 timeout_ms (0: 3 s) for the source to let go, takes the exclusive lock,
 verifies and decrypts every blob under the 32-byte key (NULL and 0: a
 plaintext store), checks that the required_count names in required are
 present (a missing one: TPMSTATE_E_CORRUPT), and passes every blob to
 validate (if not NULL; a refusal: TPMSTATE_E_REFUSED). Only then *out
 is a writer. On any failure nothing was written, every lock is
 released and *out is NULL.

 # Safety
 path is a NUL-terminated string; key NULL or key_len bytes;
 required NULL (with 0) or required_count string pointers; validate NULL
 or a function safe to call with ctx; out valid for a write.
 */
int tpmstate_claim(const char *path,
                   const uint8_t *key,
                   size_t key_len,
                   uint32_t timeout_ms,
                   const char *const *required,
                   size_t required_count,
                   tpmstate_validate_fn validate,
                   void *ctx,
                   struct tpmstate_store **out);

/*
 Creates a new qcow2 image at path (mode 0600) of size bytes (0: 4 MiB)
 holding an empty store, encrypted under the 32-byte key (NULL and 0: a
 plaintext store). An existing file is refused.

 # Safety
 path is a NUL-terminated string; key is NULL or key_len bytes.
 */
int tpmstate_create(const char *path, const uint8_t *key, size_t key_len, uint64_t size);

/*
 Opens the store in the image at path with lock mode (TPMSTATE_LOCK_WRITER
 or _EXCLUSIVE: a writer; _SHARED or _NONE: read-only), under the 32-byte
 key (NULL and 0 for a plaintext store). *out receives the handle, to be
 closed with tpmstate_close(); it is NULL after a failure.

 # Safety
 path is a NUL-terminated string; key is NULL or key_len bytes;
 out is valid for a write.
 */
int tpmstate_open(const char *path,
                  const uint8_t *key,
                  size_t key_len,
                  int mode,
                  struct tpmstate_store **out);

/*
 Reads blob name: *data receives a copy of its content and *len its
 length, to be freed with tpmstate_blob_free() (an empty blob gives a
 NULL *data and 0, as does a failure). A missing blob is
 TPMSTATE_E_NO_SUCH_BLOB.

 # Safety
 store is a live handle; name a NUL-terminated string; data and
 len valid for writes.
 */
int tpmstate_get(const struct tpmstate_store *store, const char *name, uint8_t **data, size_t *len);

/*
 Wipes and frees a blob copy tpmstate_get() gave (data NULL: nothing).

 # Safety
 data and len are exactly what one tpmstate_get() call
 returned, freed once.
 */
void tpmstate_blob_free(uint8_t *data, size_t len);

/*
 Commits count changes in one atomic, durable commit; *generation (if
 not NULL) receives the new generation. Nothing is written if any
 change is refused. Needs a writer handle.

 # Safety
 store is a live handle; changes points to count changes whose
 names and data are valid; generation is NULL or valid for a write.
 */
int tpmstate_commit(struct tpmstate_store *store,
                    const struct tpmstate_change *changes,
                    size_t count,
                    uint64_t *generation);

/*
 A counted acquisition of lock mode on the store's image, on top of the
 handle's own: the real lock changes only when the strongest mode held
 changes, and the last release steps back. Waits up to timeout_ms for a
 conflicting holder (0: try once). *out receives the acquisition, to be
 released with tpmstate_lock_release(); it keeps its lock even after the
 handle is closed, and a handle with acquisitions outstanding cannot be
 released for a migration.

 # Safety
 store is a live writer handle; out valid for a write.
 */
int tpmstate_lock_acquire(const struct tpmstate_store *store,
                          int mode,
                          uint32_t timeout_ms,
                          struct tpmstate_lock **out);

/*
 Releases one acquisition (NULL: nothing).

 # Safety
 lock comes from tpmstate_lock_acquire() and is released once.
 */
int tpmstate_lock_release(struct tpmstate_lock *lock);

/*
 Fills *info with the handle's generation, blob count, bytes,
 encryption and lock mode.

 # Safety
 store is a live handle; info valid for a write.
 */
int tpmstate_info(const struct tpmstate_store *store, struct tpmstate_info_t *info);

/*
 Closes a handle, releasing its lock and wiping its key (NULL: nothing).
 Nested acquisitions still outstanding keep their lock until released.

 # Safety
 store comes from this library and is closed once, with no other
 call on it in progress.
 */
int tpmstate_close(struct tpmstate_store *store);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* TPMSTATE_H */
