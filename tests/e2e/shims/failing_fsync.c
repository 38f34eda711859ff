/* LD_PRELOAD shim: fsync and fdatasync fail with EIO while the file named by
 * $FRESHET_FAIL_FSYNC_FLAG exists, and work again once it is removed, which is how
 * Linux behaves after a write-back error: one fsync reports it, the next one
 * succeeds although the dirty pages are gone (PostgreSQL's "fsyncgate"). Each
 * failure is counted by appending a byte to $FRESHET_FAIL_FSYNC_FLAG.count. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *flag = getenv("FRESHET_FAIL_FSYNC_FLAG");
    if (flag == NULL || access(flag, F_OK) != 0) {
        return 0;
    }
    char count[4096];
    if (snprintf(count, sizeof count, "%s.count", flag) < (int)sizeof count) {
        int fd = open(count, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            (void)write(fd, "x", 1);
            close(fd);
        }
    }
    return 1;
}

int fsync(int fd) {
    static int (*real)(int);
    if (failing()) {
        errno = EIO;
        return -1;
    }
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (failing()) {
        errno = EIO;
        return -1;
    }
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    return real(fd);
}
