/*
 * engine-init as the sandbox's PID 1, once isolation is complete.
 *
 * setup.c forks PID 1 and finishes its isolation, then calls serve_as_pid1.
 * PID 1 serves the Engine on the SOCK_SEQPACKET socket `control`, with the
 * binary messages of engine/runtime/protocol.py. Every message starts with
 * a header {u8 magic 0xE1, u8 op, u16 zero, u32 id}:
 *
 *   EXEC  {u32 nofile, u32 argc, u32 envc} cwd\0 argv...\0 env...\0 + 3 fds
 *         -> STARTED {i32 pid} or FAILED {i32 errno} message
 *   KILL  {i32 pid, i32 signal, u32 group}
 *   TERMINATE
 *
 * and it sends READY once at start and EXIT {i32 pid, i32 status} for every
 * process it started that ends, with the raw wait status. At TERMINATE it
 * sends SIGKILL to every process of the namespace and replies KILLED, because
 * from then on no process of the sandbox runs code of its own again. It then
 * reaps and reports them and exits. At end of stream it does the same
 * without the reply.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "init.h"


/* The Engine sends at most 4 MiB of argv and env; the rest is headroom. */
#define MAX_MESSAGE_BYTES (8u << 20)
#define MAX_FDS 16
/* Stack of the vfork-style child between clone and execve. */
#define CHILD_STACK_BYTES (64 * 1024)
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
/* oom_score_adj of every process exec starts, so the OOM killer picks them
 * before PID 1. */
#define SANDBOX_OOM_SCORE_ADJ "500"

int control = -1;

/* Pids of the processes started by EXEC that are not reaped yet: an open
 * addressing hash set, where 0 is a free slot and -1 a deleted one. */
static pid_t *children;
static size_t children_capacity;
static size_t children_used;

static size_t slot_of(pid_t pid, size_t capacity)
{
	return ((uint32_t)pid * 2654435761u) & (capacity - 1);
}

static void children_insert(pid_t pid);

static void children_grow(void)
{
	pid_t *old = children;
	size_t old_capacity = children_capacity;

	children_capacity = old_capacity ? old_capacity * 2 : 64;
	children = calloc(children_capacity, sizeof(pid_t));
	if (children == NULL) {
		perror("engine-init: calloc");
		_exit(1);
	}
	children_used = 0;
	for (size_t i = 0; i < old_capacity; i++)
		if (old[i] > 0)
			children_insert(old[i]);
	free(old);
}

static void children_insert(pid_t pid)
{
	if ((children_used + 1) * 2 > children_capacity)
		children_grow();
	size_t i = slot_of(pid, children_capacity);
	while (children[i] > 0)
		i = (i + 1) & (children_capacity - 1);
	if (children[i] == 0)
		children_used++;
	children[i] = pid;
}

static size_t children_find(pid_t pid)
{
	if (children_capacity == 0)
		return SIZE_MAX;
	size_t i = slot_of(pid, children_capacity);
	while (children[i] != 0) {
		if (children[i] == pid)
			return i;
		i = (i + 1) & (children_capacity - 1);
	}
	return SIZE_MAX;
}

static int children_remove(pid_t pid)
{
	size_t i = children_find(pid);
	if (i == SIZE_MAX)
		return 0;
	children[i] = -1;
	return 1;
}

void send_message(const void *data, size_t length)
{
	/* A failed send means the Engine is gone; the next poll then reports
	 * the end of stream and PID 1 terminates. */
	while (send(control, data, length, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
}

void send_header(uint8_t op, uint32_t id, const void *body, size_t length)
{
	unsigned char buffer[sizeof(struct header) + 8 + MAX_ERROR_BYTES];
	struct header header = {MAGIC, op, 0, id};

	if (length > sizeof(buffer) - sizeof(header))
		length = sizeof(buffer) - sizeof(header);
	memcpy(buffer, &header, sizeof(header));
	if (length > 0)
		memcpy(buffer + sizeof(header), body, length);
	send_message(buffer, sizeof(header) + length);
}

void send_error(uint8_t op, uint32_t id, int error, const char *format,
		va_list arguments)
{
	unsigned char body[4 + MAX_ERROR_BYTES];
	int32_t number = error ? error : EIO;

	memcpy(body, &number, 4);
	int length = vsnprintf((char *)body + 4, MAX_ERROR_BYTES, format, arguments);
	if (length < 0)
		length = 0;
	if (length >= MAX_ERROR_BYTES)
		length = MAX_ERROR_BYTES - 1;
	send_header(op, id, body, 4 + (size_t)length);
}

void send_failed(uint32_t id, int error, const char *format, ...)
{
	va_list arguments;

	va_start(arguments, format);
	send_error(OP_FAILED, id, error, format, arguments);
	va_end(arguments);
}

static void send_exit(pid_t pid, int status)
{
	int32_t body[2] = {pid, status};

	send_header(OP_EXIT, 0, body, sizeof(body));
}

/* Spawn arguments shared with the child, which runs on its own stack in this
 * process's memory until execve succeeds or it exits. */
struct spawn {
	const char *path;
	char **argv;
	char **envp;
	int stdio[3];
	int cwd;
	rlim_t nofile;
	int error;
};

static int spawn_child(void *argument)
{
	struct spawn *spawn = argument;
	sigset_t empty;
	struct rlimit limit = {spawn->nofile, spawn->nofile};

	sigemptyset(&empty);
	if (sigprocmask(SIG_SETMASK, &empty, NULL) < 0 || setsid() < 0 ||
	    setrlimit(RLIMIT_NOFILE, &limit) < 0 || fchdir(spawn->cwd) < 0)
		goto failed;
	for (int target = 0; target < 3; target++)
		if (dup2(spawn->stdio[target], target) < 0)
			goto failed;
	if (syscall(SYS_close_range, 3, ~0u, 0) < 0)
		goto failed;
	execve(spawn->path, spawn->argv, spawn->envp);
failed:
	spawn->error = errno;
	_exit(127);
}

/* `path` is relative to the directory `cwd`, as the child's execve will
 * resolve it after its fchdir. */
static int is_executable_file(int cwd, const char *path)
{
	struct stat info;

	return fstatat(cwd, path, &info, 0) == 0 && S_ISREG(info.st_mode) &&
	       faccessat(cwd, path, X_OK, 0) == 0;
}

/* Return the file to execute for argv[0], searching PATH as execvp does, in
 * `buffer`; NULL when no directory has it. Relative entries of PATH, the
 * empty one included, name directories below the exec's cwd. */
static const char *find_program(const char *name, const char *path, int cwd,
				char *buffer, size_t size)
{
	if (strchr(name, '/') != NULL)
		return name;
	while (path != NULL) {
		const char *end = strchr(path, ':');
		size_t length = end ? (size_t)(end - path) : strlen(path);
		const char *directory = length ? path : ".";
		int directory_length = length ? (int)length : 1;

		if ((size_t)snprintf(buffer, size, "%.*s/%s", directory_length, directory,
				     name) < size &&
		    is_executable_file(cwd, buffer))
			return buffer;
		path = end ? end + 1 : NULL;
	}
	return NULL;
}

static void describe_exec_error(uint32_t id, int error, const char *program)
{
	int bare = strchr(program, '/') == NULL;

	if (error == ENOENT && bare)
		send_failed(id, error, "executable '%s' not found in PATH", program);
	else if (error == ENOENT)
		send_failed(id, error, "executable '%s' not found", program);
	else if (error == EACCES)
		send_failed(id, error, "'%s' is not executable: permission denied",
			    program);
	else if (error == ENOEXEC)
		send_failed(id, error, "'%s' is not in an executable format", program);
	else
		send_failed(id, error, "exec of '%s' failed: %s", program,
			    strerror(error));
}

static int open_cwd(uint32_t id, const char *cwd)
{
	/* RESOLVE_NO_MAGICLINKS: a cwd such as /proc/self/fd/N or /proc/1/cwd
	 * cannot hand the child a directory that one of PID 1's descriptors
	 * holds, which might lie outside the sandbox's root. */
	struct open_how how = {
		.flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
		.resolve = RESOLVE_NO_MAGICLINKS,
	};
	int fd = (int)syscall(SYS_openat2, AT_FDCWD, cwd, &how, sizeof(how));

	if (fd >= 0)
		return fd;
	if (errno == ELOOP)
		send_failed(id, errno,
			    "cannot change to cwd '%s': it passes through a /proc magic"
			    " link or a symlink loop; use a plain directory",
			    cwd);
	else
		send_failed(id, errno, "cannot change to cwd '%s': %s", cwd,
			    strerror(errno));
	return -1;
}

static void raise_oom_score(pid_t pid)
{
	/* After execve the child is dumpable again and owned by the sandbox's
	 * root, which PID 1 is, so PID 1 may write its file. A child that has
	 * exited already is skipped. */
	char path[64];

	snprintf(path, sizeof(path), "/proc/%d/oom_score_adj", (int)pid);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t ignored = write(fd, SANDBOX_OOM_SCORE_ADJ, strlen(SANDBOX_OOM_SCORE_ADJ));
	(void)ignored;
	close(fd);
}

/* Split `count` NUL-terminated strings off the front of [*cursor, end) into
 * `strings`; return -1 if the message ends first. */
static int take_strings(char **cursor, char *end, char **strings, uint32_t count)
{
	for (uint32_t i = 0; i < count; i++) {
		char *nul = memchr(*cursor, '\0', (size_t)(end - *cursor));
		if (nul == NULL)
			return -1;
		strings[i] = *cursor;
		*cursor = nul + 1;
	}
	strings[count] = NULL;
	return 0;
}

static void handle_exec(uint32_t id, char *body, size_t length, int *fds, int nfds)
{
	uint32_t fields[3];
	char **argv = NULL, **envp = NULL, *cwd[2];
	char program_buffer[4096];
	const char *program, *path = DEFAULT_PATH;
	static char *stack;

	if (nfds != 3) {
		send_failed(id, EINVAL, "exec needs 3 stdio descriptors, not %d", nfds);
		return;
	}
	if (length < sizeof(fields)) {
		send_failed(id, EINVAL, "exec message is truncated");
		return;
	}
	memcpy(fields, body, sizeof(fields));
	char *cursor = body + sizeof(fields), *end = body + length;
	uint32_t argc = fields[1], envc = fields[2];
	if (argc == 0 || argc > length || envc > length) {
		send_failed(id, EINVAL, "exec message has %u arguments and %u variables",
			    argc, envc);
		return;
	}
	argv = calloc((size_t)argc + 1, sizeof(char *));
	envp = calloc((size_t)envc + 1, sizeof(char *));
	if (argv == NULL || envp == NULL) {
		send_failed(id, ENOMEM, "out of memory");
		goto done;
	}
	if (take_strings(&cursor, end, cwd, 1) < 0 ||
	    take_strings(&cursor, end, argv, argc) < 0 ||
	    take_strings(&cursor, end, envp, envc) < 0) {
		send_failed(id, EINVAL, "exec message is truncated");
		goto done;
	}
	for (uint32_t i = 0; i < envc; i++)
		if (strncmp(envp[i], "PATH=", 5) == 0)
			path = envp[i] + 5;

	struct spawn spawn = {
		.argv = argv,
		.envp = envp,
		.stdio = {fds[0], fds[1], fds[2]},
		.nofile = fields[0],
	};
	spawn.cwd = open_cwd(id, cwd[0]);
	if (spawn.cwd < 0)
		goto done;
	program = find_program(argv[0], path, spawn.cwd, program_buffer,
			       sizeof(program_buffer));
	if (program == NULL) {
		describe_exec_error(id, ENOENT, argv[0]);
		close(spawn.cwd);
		goto done;
	}
	spawn.path = program;
	if (stack == NULL && (stack = malloc(CHILD_STACK_BYTES)) == NULL) {
		send_failed(id, ENOMEM, "out of memory");
		close(spawn.cwd);
		goto done;
	}

	/* CLONE_VM | CLONE_VFORK, as posix_spawn does: the copy costs nothing,
	 * and this process sleeps until the child has called execve or exited,
	 * so spawn.error is final when clone returns. */
	pid_t pid = clone(spawn_child, stack + CHILD_STACK_BYTES,
			  CLONE_VM | CLONE_VFORK | SIGCHLD, &spawn);
	int clone_error = errno;
	close(spawn.cwd);
	if (pid < 0) {
		send_failed(id, clone_error, "cannot start '%s': %s", argv[0],
			    strerror(clone_error));
		goto done;
	}
	if (spawn.error != 0) {
		/* The child has exited; the reaper skips it because it is not in
		 * the set of children. */
		describe_exec_error(id, spawn.error, argv[0]);
		goto done;
	}
	children_insert(pid);
	raise_oom_score(pid);
	int32_t started = pid;
	send_header(OP_STARTED, id, &started, sizeof(started));
done:
	free(argv);
	free(envp);
}

static void handle_kill(char *body, size_t length)
{
	int32_t fields[3];

	if (length < sizeof(fields))
		return;
	memcpy(fields, body, sizeof(fields));
	pid_t pid = fields[0];
	/* Only processes that exec started and that are not reaped yet, so the
	 * pid cannot belong to anything else. */
	if (pid <= 0 || children_find(pid) == SIZE_MAX)
		return;
	kill(fields[2] ? -pid : pid, fields[1]);
}

static void reap(void)
{
	int status;
	pid_t pid;

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		if (children_remove(pid))
			send_exit(pid, status);
}

static void terminate(int reply)
{
	int status;
	pid_t pid;

	kill(-1, SIGKILL);
	if (reply)
		send_header(OP_KILLED, 0, NULL, 0);
	while ((pid = waitpid(-1, &status, 0)) > 0 || errno == EINTR)
		if (pid > 0 && children_remove(pid))
			send_exit(pid, status);
	_exit(0);
}

/* Receive one message and its descriptors; return its length, 0 at end of
 * stream, or -1 for a message to drop. */
static ssize_t receive(char **data, int *fds, int *nfds)
{
	int size = 0;
	char control_buffer[CMSG_SPACE(MAX_FDS * sizeof(int))];

	*nfds = 0;
	if (ioctl(control, FIONREAD, &size) < 0)
		return 0;
	if (size < 0 || (unsigned)size > MAX_MESSAGE_BYTES)
		size = MAX_MESSAGE_BYTES;
	*data = malloc(size > 0 ? (size_t)size : 1);
	if (*data == NULL)
		return 0;

	struct iovec vector = {*data, size > 0 ? (size_t)size : 1};
	struct msghdr message = {
		.msg_iov = &vector,
		.msg_iovlen = 1,
		.msg_control = control_buffer,
		.msg_controllen = sizeof(control_buffer),
	};
	ssize_t length;
	do
		length = recvmsg(control, &message, MSG_CMSG_CLOEXEC);
	while (length < 0 && errno == EINTR);
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		for (int i = 0; i < count && *nfds < MAX_FDS; i++)
			memcpy(&fds[(*nfds)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	}
	if (length <= 0)
		return 0;
	if (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		fprintf(stderr, "engine-init: dropped a truncated message\n");
		return -1;
	}
	return length;
}

/* Make PID 1 die with the zygote, its parent once the supervisor has exited.
 * The parent-death signal follows the parent of the moment it is set, so it
 * is set only after the supervisor is gone, and a zygote that died before
 * that is caught by its pidfd. */
static int follow_zygote(int supervisor, int zygote)
{
	struct pollfd exited = {supervisor, POLLIN, 0};

	while (poll(&exited, 1, -1) < 0)
		if (errno != EINTR)
			return -1;
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
		return -1;
	struct pollfd dead = {zygote, POLLIN, 0};
	if (poll(&dead, 1, 0) != 0)
		return -1;
	return 0;
}

static void serve(int signals)
{
	struct pollfd polled[2] = {{control, POLLIN, 0}, {signals, POLLIN, 0}};

	for (;;) {
		if (poll(polled, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			terminate(0);
		}
		if (polled[1].revents) {
			struct signalfd_siginfo info;
			while (read(signals, &info, sizeof(info)) > 0)
				;
			reap();
		}
		if (!polled[0].revents)
			continue;

		char *data = NULL;
		int fds[MAX_FDS], nfds;
		ssize_t length = receive(&data, fds, &nfds);
		if (length == 0)
			terminate(0);
		struct header header;
		if (length >= (ssize_t)sizeof(header)) {
			memcpy(&header, data, sizeof(header));
			char *body = data + sizeof(header);
			size_t body_length = (size_t)length - sizeof(header);
			if (header.magic != MAGIC)
				fprintf(stderr, "engine-init: dropped a message of unknown form\n");
			else if (header.op == OP_EXEC)
				handle_exec(header.id, body, body_length, fds, nfds);
			else if (header.op == OP_KILL)
				handle_kill(body, body_length);
			else if (header.op == OP_TERMINATE)
				terminate(1);
		}
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		free(data);
	}
}


void serve_as_pid1(int supervisor_pidfd, int zygote_pidfd)
{
	sigset_t child_signal;

	if (follow_zygote(supervisor_pidfd, zygote_pidfd) < 0) {
		fprintf(stderr, "engine-init: the zygote exited during setup\n");
		_exit(1);
	}
	/* Nothing but stdio and the control socket stays open. */
	syscall(SYS_close_range, 3, control - 1, 0);
	syscall(SYS_close_range, control + 1, ~0u, 0);

	/* SIGCHLD arrives through a descriptor; children unblock it. */
	sigemptyset(&child_signal);
	sigaddset(&child_signal, SIGCHLD);
	sigprocmask(SIG_BLOCK, &child_signal, NULL);
	int signals = signalfd(-1, &child_signal, SFD_CLOEXEC | SFD_NONBLOCK);
	if (signals < 0) {
		send_failed(0, errno, "signalfd: %s", strerror(errno));
		_exit(1);
	}

	struct header ready = {MAGIC, OP_READY, 0, 0};
	send_message(&ready, sizeof(ready));
	serve(signals);
	_exit(0);
}
