/*
 * engine-init's entry point: a sandbox's supervisor, which sets the sandbox
 * up and forks its PID 1.
 *
 * The zygote (zygote.py) spawns this program from its sealed memfd ahead of
 * demand, with argv ["engine-sandbox"] and descriptor numbers in these
 * environment variables:
 *
 *   CONTROL_FD    SOCK_SEQPACKET socket to the Engine
 *   NOTIFY_FD     pipe to the zygote: "u" once the user namespace exists
 *   WAIT_FD       pipe from the zygote: "g" once the id maps are written
 *   SECCOMP_FD    sealed memfd with the seccomp program (export_bpf)
 *   CGROUP_FDS    cgroup.procs files of the sandbox's cgroups, comma-separated
 *   ZYGOTE_PID    the zygote, whose death kills this process
 *   OWNER_UID     host uid that owns the user namespace, or -1 for root
 *   KEEP_CAPS     bit mask of the capabilities that sandbox processes keep
 *
 * The supervisor joins the cgroups and enters new namespaces at once
 * (namespaces.c), then waits for the Engine's START message with the
 * sandbox's spec. It builds the root (root.c), forks PID 1 into the PID
 * namespace it created, sends FORKED {i32 pid} with a pidfd of PID 1 and
 * exits. The zygote, a child subreaper, becomes PID 1's parent, so that
 * parent stays outside the sandbox's PID namespace.
 *
 * PID 1 mounts /proc, masks it, detaches the host's root, sets the hostname,
 * brings up lo, drops capabilities down to KEEP_CAPS, sets no_new_privs,
 * loads the seccomp program and serves the Engine (init.c). A failed step
 * sends FAILED with id 0, naming the step, and exits; a workdir that cannot
 * exist sends INVALID instead.
 *
 * The memfd belongs to host root and has mode 0111, so the kernel executes it
 * but marks the process non-dumpable and, once the supervisor is in its user
 * namespace, where host root has no uid, keeps its memory in the host's user
 * namespace. PID 1 inherits both at its fork, so ptrace, /proc/1/mem and
 * /proc/1/exe need CAP_SYS_PTRACE on the host, which sandbox code never has.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "init.h"

#define USAGE                                                                \
	"engine-init: the zygote starts it with CONTROL_FD, NOTIFY_FD, WAIT_FD," \
	" SECCOMP_FD, CGROUP_FDS, ZYGOTE_PID, OWNER_UID and KEEP_CAPS in its"   \
	" environment\n"
/* Linux caps a seccomp program at 4096 instructions of 8 bytes. */
#define MAX_SECCOMP_BYTES (4096 * 8)

/* /proc entries that reveal or change host kernel state. Files are covered
 * by /dev/null, directories by an empty read-only tmpfs, and the rest are
 * made read-only. */
static const char *const proc_masked_files[] = {
	"kcore",     "keys",       "key-users",    "kallsyms",      "kmsg",
	"timer_list", "sched_debug", "latency_stats", "config.gz",     "sysrq-trigger",
	"kpagecount", "kpageflags", "kpagecgroup",  "vmallocinfo",   NULL,
};
static const char *const proc_masked_dirs[] = {
	"acpi", "scsi", "asound", "firmware", "driver", NULL,
};
static const char *const proc_read_only[] = {"sys", "irq", "bus", "fs", NULL};

void setup_failed(const char *format, ...)
{
	char text[MAX_ERROR_BYTES];
	int error = errno;
	va_list arguments;

	va_start(arguments, format);
	vsnprintf(text, sizeof(text), format, arguments);
	va_end(arguments);
	send_failed(0, error, "%s: %s", text, strerror(error));
	_exit(1);
}

/* Hide or freeze the sensitive parts of the sandbox's /proc; needs /dev/null,
 * which the supervisor mounted. */
static void mask_proc(void)
{
	char path[64];
	struct stat info;

	for (const char *const *name = proc_masked_files; *name; name++) {
		snprintf(path, sizeof(path), "/proc/%s", *name);
		if (stat(path, &info) < 0)
			continue;
		bind_mount("/dev/null", path, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC);
	}
	for (const char *const *name = proc_masked_dirs; *name; name++) {
		snprintf(path, sizeof(path), "/proc/%s", *name);
		if (stat(path, &info) < 0 || !S_ISDIR(info.st_mode))
			continue;
		mount_tmpfs(path, 0555, 4096, 0, MS_RDONLY);
	}
	for (const char *const *name = proc_read_only; *name; name++) {
		snprintf(path, sizeof(path), "/proc/%s", *name);
		if (stat(path, &info) < 0)
			continue;
		remount_read_only(path);
	}
}

/* Two ioctls on a socket are cheaper than a netlink session, and loopback
 * needs no address or route: the kernel adds 127.0.0.1/8 and ::1 itself. */
static void bring_up_loopback(void)
{
	struct ifreq request = {0};
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (sock < 0)
		setup_failed("socket(AF_INET, SOCK_DGRAM)");
	strcpy(request.ifr_name, "lo");
	if (ioctl(sock, SIOCGIFFLAGS, &request) < 0)
		setup_failed("ioctl(SIOCGIFFLAGS, 'lo')");
	request.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(sock, SIOCSIFFLAGS, &request) < 0)
		setup_failed("ioctl(SIOCSIFFLAGS, 'lo' up)");
	close(sock);
}

/* Drop every capability outside `keep` from the bounding set, clear the
 * ambient and inheritable sets and limit the effective and permitted sets to
 * `keep`. An inheritable capability would come back on executing a file
 * whose inheritable file capabilities include it. */
static void restrict_capabilities(uint64_t keep)
{
	for (int number = 0; number < 64; number++) {
		if (prctl(PR_CAPBSET_READ, number) < 0 && errno == EINVAL)
			break;
		if (!(keep >> number & 1) && prctl(PR_CAPBSET_DROP, number) < 0)
			setup_failed("prctl(PR_CAPBSET_DROP, %d)", number);
	}
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
		setup_failed("prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)");

	struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	if (syscall(SYS_capget, &header, data) < 0)
		setup_failed("capget");
	for (int word = 0; word < 2; word++) {
		uint32_t allowed = (uint32_t)(keep >> (32 * word)) & data[word].permitted;
		data[word].effective = allowed;
		data[word].permitted = allowed;
		data[word].inheritable = 0;
	}
	if (syscall(SYS_capset, &header, data) < 0)
		setup_failed("capset");
}

/* no_new_privs is required to load a filter without CAP_SYS_ADMIN, and it
 * stops setuid binaries from gaining privileges. The filter is inherited by
 * every child, so exec'd processes need not load it again. */
static void load_seccomp(int program_fd)
{
	/* One instruction more than the kernel takes, so that a longer program
	 * is rejected here rather than loaded cut short. */
	static struct sock_filter program[MAX_SECCOMP_BYTES / sizeof(struct sock_filter) + 1];
	ssize_t length = pread(program_fd, program, sizeof(program), 0);

	if (length <= 0 || length > MAX_SECCOMP_BYTES ||
	    length % sizeof(struct sock_filter) != 0) {
		errno = length < 0 ? errno : EINVAL;
		setup_failed("reading the seccomp program (%zd bytes)", length);
	}
	struct sock_fprog filter = {
		.len = (unsigned short)(length / sizeof(struct sock_filter)),
		.filter = program,
	};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		setup_failed("prctl(PR_SET_NO_NEW_PRIVS)");
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &filter) < 0)
		setup_failed("prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)");
	close(program_fd);
}

/* Finish isolation in PID 1, in this order. */
static void finish_isolation(const char *hostname, const char *old_root,
			     uint64_t keep, int seccomp_fd)
{
	/* procfs shows the PID namespace of the process that mounts it, so
	 * PID 1 mounts it. The kernel allows that mount in a user namespace
	 * only while a fully visible procfs is in the mount namespace: the
	 * host's, under old_root. */
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		setup_failed("mount('proc', '/proc', 'proc')");
	mask_proc();
	if (umount2(old_root, MNT_DETACH) < 0)
		setup_failed("umount2('%s', MNT_DETACH)", old_root);
	if (rmdir(old_root) < 0)
		setup_failed("rmdir('%s')", old_root);

	if (sethostname(hostname, strlen(hostname)) < 0)
		setup_failed("sethostname('%s')", hostname);
	bring_up_loopback();
	/* Inherited by every process PID 1 starts: a crash never writes a core
	 * file into the sandbox's root or the host's core_pattern. */
	struct rlimit no_core = {0, 0};
	if (setrlimit(RLIMIT_CORE, &no_core) < 0)
		setup_failed("setrlimit(RLIMIT_CORE, 0)");

	/* Last, because the steps above need CAP_SYS_ADMIN. Dropping the
	 * bounding set first means no process forked later can regain what it
	 * lacks. */
	restrict_capabilities(keep);
	load_seccomp(seccomp_fd);
}

/* Return the environment variable `name` as a number from `minimum` to
 * `maximum`, or exit with the usage message. */
static long long number_from_environment(const char *name, long long minimum,
					 long long maximum)
{
	const char *text = getenv(name);
	char *end;

	if (text == NULL || *text == '\0')
		goto invalid;
	errno = 0;
	long long value = strtoll(text, &end, 10);
	if (errno == 0 && *end == '\0' && value >= minimum && value <= maximum)
		return value;
invalid:
	fprintf(stderr, "engine-init: invalid %s %s\n%s", name, text ? text : "(unset)",
		USAGE);
	_exit(2);
}

/* Parse CGROUP_FDS, descriptors separated by commas, into `fds`. */
static int cgroup_fds_from_environment(int *fds, int capacity)
{
	const char *text = getenv("CGROUP_FDS");
	int count = 0;

	while (text != NULL && *text != '\0') {
		char *end;
		long value = strtol(text, &end, 10);
		if (end == text || value < 3 || value > INT_MAX || count == capacity ||
		    (*end != ',' && *end != '\0'))
			break;
		fds[count++] = (int)value;
		text = *end == ',' ? end + 1 : end;
		if (*text == '\0')
			return count;
	}
	fprintf(stderr, "engine-init: invalid CGROUP_FDS %s\n%s", text ? text : "(unset)",
		USAGE);
	_exit(2);
}

static int compare_ints(const void *left, const void *right)
{
	return *(const int *)left - *(const int *)right;
}

/* Close every descriptor above stderr that is not in `keep`. */
static void close_all_except(int *keep, int count)
{
	qsort(keep, (size_t)count, sizeof(int), compare_ints);
	unsigned int next = 3;
	for (int i = 0; i < count; i++) {
		if ((unsigned int)keep[i] > next)
			syscall(SYS_close_range, next, keep[i] - 1, 0);
		next = (unsigned int)keep[i] + 1;
	}
	syscall(SYS_close_range, next, ~0u, 0);
}

/* Receive the Engine's START message into `data`; exit quietly when the
 * Engine closes the socket first, which it does when it discards an unused
 * supervisor. */
static size_t receive_start(char **data)
{
	int size = 0;

	struct pollfd readable = {control, POLLIN, 0};
	while (poll(&readable, 1, -1) < 0)
		if (errno != EINTR)
			setup_failed("poll on the control socket");
	if (ioctl(control, FIONREAD, &size) < 0)
		setup_failed("ioctl(FIONREAD) on the control socket");
	*data = malloc(size > 0 ? (size_t)size + 1 : 1);
	if (*data == NULL)
		setup_failed("malloc(%d)", size);
	ssize_t length;
	do
		length = recv(control, *data, size > 0 ? (size_t)size : 1, 0);
	while (length < 0 && errno == EINTR);
	/* ECONNRESET: the Engine closed its end with a message of this
	 * supervisor's unread. */
	if (length == 0 || (length < 0 && errno == ECONNRESET))
		_exit(0);
	if (length < 0)
		setup_failed("receiving the sandbox's spec");
	(*data)[length] = '\0';
	return (size_t)length;
}

/* Fill `spec` from a START message: NUL-terminated "key=value" strings, where
 * each "bind=", "volume_ro=" and "volume_rw=" string is followed by the
 * target path on its own. Return a description of the first problem, or
 * NULL. */
static const char *parse_start(char *data, size_t length, struct root_spec *spec)
{
	struct header header;
	char *end = data + length;

	if (length < sizeof(header))
		return "it is shorter than its header";
	memcpy(&header, data, sizeof(header));
	if (header.magic != MAGIC || header.op != OP_START)
		return "it is no START message";
	memset(spec, 0, sizeof(*spec));
	for (char *cursor = data + sizeof(header); cursor < end;) {
		char *nul = memchr(cursor, '\0', (size_t)(end - cursor));
		char *equals = strchr(cursor, '=');
		if (nul == NULL || equals == NULL)
			return "a field is not of the form key=value";
		*equals = '\0';
		const char *key = cursor, *value = equals + 1;
		cursor = nul + 1;

		struct mount_pair *pair = NULL;
		if (strcmp(key, "bind") == 0) {
			if (spec->bind_count == MAX_MOUNTS)
				return "it has too many binds";
			pair = &spec->binds[spec->bind_count++];
			pair->read_only = 1;
		} else if (strcmp(key, "volume_ro") == 0 || strcmp(key, "volume_rw") == 0) {
			if (spec->volume_count == MAX_MOUNTS)
				return "it has too many volumes";
			pair = &spec->volumes[spec->volume_count++];
			pair->read_only = key[7] == 'r' && key[8] == 'o';
		}
		if (pair != NULL) {
			char *target_end = cursor < end ? memchr(cursor, '\0', (size_t)(end - cursor)) : NULL;
			if (target_end == NULL)
				return "a mount lacks its target";
			pair->source = value;
			pair->target = cursor;
			cursor = target_end + 1;
			continue;
		}

		unsigned long long *number = NULL;
		if (strcmp(key, "hostname") == 0)
			spec->hostname = value;
		else if (strcmp(key, "root") == 0)
			spec->root = value;
		else if (strcmp(key, "lower") == 0)
			spec->lower = value;
		else if (strcmp(key, "upper") == 0)
			spec->upper = value;
		else if (strcmp(key, "work") == 0)
			spec->work = value;
		else if (strcmp(key, "workdir") == 0)
			spec->workdir = value;
		else if (strcmp(key, "address") == 0)
			spec->address = value;
		else if (strcmp(key, "resolv_conf") == 0)
			spec->resolv_conf = value;
		else if (strcmp(key, "tmp_size") == 0)
			number = &spec->tmp_size;
		else if (strcmp(key, "tmp_inodes") == 0)
			number = &spec->tmp_inodes;
		else if (strcmp(key, "shm_size") == 0)
			number = &spec->shm_size;
		else if (strcmp(key, "shm_inodes") == 0)
			number = &spec->shm_inodes;
		else
			return "it has an unknown key";
		if (number != NULL) {
			char *digits_end;
			errno = 0;
			*number = strtoull(value, &digits_end, 10);
			if (errno != 0 || *value < '0' || *value > '9' || *digits_end != '\0')
				return "a size is not a number";
		}
	}
	if (!spec->hostname || !spec->root || !spec->lower || !spec->upper ||
	    !spec->work || !spec->workdir)
		return "it lacks a required field";
	return NULL;
}

/* Send FORKED with a pidfd of PID 1 attached. The Engine signals and watches
 * PID 1 through that pidfd, which stays valid after the zygote reaps the
 * process. */
static void send_forked(pid_t pid)
{
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0)
		setup_failed("pidfd_open(%d)", (int)pid);

	unsigned char buffer[sizeof(struct header) + sizeof(int32_t)];
	struct header header = {MAGIC, OP_FORKED, 0, 0};
	int32_t forked = pid;
	memcpy(buffer, &header, sizeof(header));
	memcpy(buffer + sizeof(header), &forked, sizeof(forked));

	char space[CMSG_SPACE(sizeof(int))] = {0};
	struct iovec vector = {buffer, sizeof(buffer)};
	struct msghdr message = {
		.msg_iov = &vector,
		.msg_iovlen = 1,
		.msg_control = space,
		.msg_controllen = sizeof(space),
	};
	struct cmsghdr *attached = CMSG_FIRSTHDR(&message);
	attached->cmsg_level = SOL_SOCKET;
	attached->cmsg_type = SCM_RIGHTS;
	attached->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(attached), &pidfd, sizeof(int));
	while (sendmsg(control, &message, MSG_NOSIGNAL) < 0)
		if (errno != EINTR)
			setup_failed("sending PID 1's pidfd");
}

/* Set the parent-death signal and check that the zygote did not die before
 * it was set; the kernel clears the signal whenever the euid changes. */
static void follow_parent(pid_t zygote)
{
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
		setup_failed("prctl(PR_SET_PDEATHSIG)");
	if (getppid() != zygote)
		_exit(1);
}

void setup_main(char *program_name)
{
	int cgroup_fds[16];
	int cgroup_count = cgroup_fds_from_environment(cgroup_fds, 16);
	pid_t zygote = (pid_t)number_from_environment("ZYGOTE_PID", 1, INT_MAX);
	control = (int)number_from_environment("CONTROL_FD", 3, INT_MAX);
	int notify_fd = (int)number_from_environment("NOTIFY_FD", 3, INT_MAX);
	int wait_fd = (int)number_from_environment("WAIT_FD", 3, INT_MAX);
	int seccomp_fd = (int)number_from_environment("SECCOMP_FD", 3, INT_MAX);
	long long owner_uid = number_from_environment("OWNER_UID", -1, UINT32_MAX - 1);
	uint64_t keep = (uint64_t)number_from_environment("KEEP_CAPS", 0, LLONG_MAX);

	int keep_fds[20] = {control, notify_fd, wait_fd, seccomp_fd};
	memcpy(keep_fds + 4, cgroup_fds, sizeof(int) * (size_t)cgroup_count);
	close_all_except(keep_fds, 4 + cgroup_count);
	for (int i = 0; i < 4 + cgroup_count; i++)
		if (fcntl(keep_fds[i], F_SETFD, FD_CLOEXEC) < 0) {
			fprintf(stderr,
				"engine-init: descriptor %d: %s; start engine-init from"
				" the zygote, which passes it open\n",
				keep_fds[i], strerror(errno));
			_exit(2);
		}
	prctl(PR_SET_NAME, "engine-sandbox");
	follow_parent(zygote);
	if (setsid() < 0)
		setup_failed("setsid");

	/* Ahead of any request: the slow part, done while the slot waits in
	 * the Engine's pool. */
	if (enter_namespaces(cgroup_fds, cgroup_count, notify_fd, wait_fd, owner_uid) < 0)
		_exit(0);
	follow_parent(zygote);
	/* Checked again by PID 1, which takes the zygote as its parent. */
	int zygote_pidfd = (int)syscall(SYS_pidfd_open, zygote, 0);
	if (zygote_pidfd < 0)
		setup_failed("pidfd_open(%d)", (int)zygote);

	char *data;
	size_t length = receive_start(&data);
	struct root_spec spec;
	const char *problem = parse_start(data, length, &spec);
	if (problem != NULL) {
		errno = EPROTO;
		setup_failed("the sandbox's spec is malformed: %s", problem);
	}
	const char *old_root = build_root(&spec);

	/* PID 1 waits for this process's exit through the pidfd before it
	 * takes the zygote as the parent whose death kills it. */
	int supervisor_pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
	if (supervisor_pidfd < 0)
		setup_failed("pidfd_open(%d)", (int)getpid());
	pid_t pid = fork();
	if (pid < 0)
		setup_failed("fork of the sandbox's PID 1");
	if (pid == 0) {
		/* terminate() in init.c kills every process that PID 1 may
		 * signal, which outside a PID namespace of its own means the
		 * whole host. */
		if (getpid() != 1) {
			errno = EINVAL;
			setup_failed("refusing to run: PID 1 must start a new PID"
				     " namespace, but it is pid %d",
				     (int)getpid());
		}
		prctl(PR_SET_DUMPABLE, 0);
		/* Sandbox code reads /proc/1/cmdline, which shows this memory. */
		size_t name_length = strlen(program_name);
		memset(program_name, 0, name_length);
		memcpy(program_name, "init", name_length < 4 ? name_length : 4);
		prctl(PR_SET_NAME, "init");
		finish_isolation(spec.hostname, old_root, keep, seccomp_fd);
		serve_as_pid1(supervisor_pidfd, zygote_pidfd);
	}
	send_forked(pid);
	_exit(0);
}

int main(int argc, char **argv)
{
	/* Ignored signals stay ignored across execve, and the zygote's Python
	 * runtime ignored some, so every exec'd program would inherit them. */
	for (int number = 1; number < NSIG; number++)
		if (number != SIGKILL && number != SIGSTOP)
			signal(number, SIG_DFL);
	if (argc != 1) {
		fputs(USAGE, stderr);
		return 2;
	}
	setup_main(argv[0]);
}
