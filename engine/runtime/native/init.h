/*
 * Declarations shared by the parts of engine-init: setup.c, its entry point,
 * which namespaces.c, root.c and mounts.c serve while it sets a sandbox up,
 * and init.c, which serves the Engine as the sandbox's PID 1.
 */
#ifndef ENGINE_INIT_H
#define ENGINE_INIT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Every message of engine-init starts with this header; protocol.py decodes
 * the same layout. */
#define MAGIC 0xE1
#define OP_EXEC 1
#define OP_KILL 2
#define OP_TERMINATE 3
#define OP_START 4
#define OP_READY 0x81
#define OP_STARTED 0x82
#define OP_FAILED 0x83
#define OP_EXIT 0x84
#define OP_KILLED 0x85
#define OP_FORKED 0x86
#define OP_INVALID 0x87

#define MAX_ERROR_BYTES 1024

struct header {
	uint8_t magic;
	uint8_t op;
	uint16_t zero;
	uint32_t id;
};

/* The SOCK_SEQPACKET socket to the Engine. */
extern int control;

void send_message(const void *data, size_t length);
void send_header(uint8_t op, uint32_t id, const void *body, size_t length);
/* Send FAILED or INVALID: {i32 errno} and the formatted message. */
void send_error(uint8_t op, uint32_t id, int error, const char *format,
		va_list arguments) __attribute__((format(printf, 4, 0)));
void send_failed(uint32_t id, int error, const char *format, ...)
	__attribute__((format(printf, 3, 4)));

/* Report a failed setup step to the Engine, with errno's text, and exit. */
void setup_failed(const char *format, ...) __attribute__((noreturn, format(printf, 1, 2)));

/* The maximum number of binds, and of volumes, in one START message. The
 * Engine allows 32 volumes and 8 bucket mounts. */
#define MAX_MOUNTS 64

struct mount_pair {
	const char *source;
	const char *target;
	int read_only;
};

/* A sandbox's root, from the Engine's START message; all paths outside the
 * sandbox are host paths. A size or inode count of 0 is the kernel's
 * default. */
struct root_spec {
	const char *hostname;
	const char *root, *lower, *upper, *work;
	const char *workdir;
	const char *address;
	const char *resolv_conf;
	unsigned long long tmp_size, tmp_inodes, shm_size, shm_inodes;
	struct mount_pair binds[MAX_MOUNTS];
	struct mount_pair volumes[MAX_MOUNTS];
	int bind_count, volume_count;
};

/* namespaces.c */
int enter_namespaces(const int *cgroup_fds, int cgroup_count, int notify_fd,
		     int wait_fd, long long owner_uid);

/* root.c: mount the root and pivot into it; return where the host's root
 * went, in static storage. */
const char *build_root(const struct root_spec *spec);

/* mounts.c */
unsigned long current_flags(const char *path);
void remount_bind(const char *target, unsigned long flags);
void bind_mount(const char *source, const char *target, unsigned long flags);
void bind_mount_at(const char *source, int target, const char *name,
		   uint64_t attributes);
void remount_read_only(const char *target);
int is_mount_point(const char *path);
void mount_tmpfs(const char *target, unsigned int mode, unsigned long long size,
		 unsigned long long inodes, unsigned long flags);

/* setup.c: the entry point of engine-init; never returns. */
void setup_main(char *program_name) __attribute__((noreturn));

/* init.c: serve the Engine as PID 1 once isolation is complete; never
 * returns. */
void serve_as_pid1(int supervisor_pidfd, int zygote_pidfd) __attribute__((noreturn));

#endif
