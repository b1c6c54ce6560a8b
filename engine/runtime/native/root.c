/*
 * The sandbox's root directory tree: the overlay, /dev, /tmp, volumes and
 * /etc. PID 1 mounts /proc later (setup.c).
 *
 * The overlay and the image's binds are mounted on host paths below the
 * engine's own sandbox directory. Everything after pivot_root works on paths
 * inside the sandbox's root, so absolute paths and symlinks in the image
 * resolve there. The host's root is then reachable only below a directory
 * with an unguessable name, and check_inside and check_path_inside refuse any
 * path that resolves there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "init.h"

/* Host device nodes bind-mounted into the sandbox's /dev. Nodes cannot be
 * created in a user namespace, and a bind mount without nodev still works. */
static const char *const devices[] = {"null", "zero", "full", "random", "urandom", "tty", NULL};

static const char *const dev_symlinks[][2] = {
	{"ptmx", "pts/ptmx"},	       {"fd", "/proc/self/fd"},
	{"stdin", "/proc/self/fd/0"},  {"stdout", "/proc/self/fd/1"},
	{"stderr", "/proc/self/fd/2"}, {"core", "/proc/kcore"},
};

#define PASSWD                                       \
	"root:x:0:0:root:/root:/bin/sh\n"            \
	"nobody:x:65534:65534:nobody:/nonexistent:" \
	"/usr/sbin/nologin\n"
#define GROUP "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"

/* Where pivot_root put the host's root, for check_inside. */
static char old_root[32];
/* The host's root and the sandbox's root, for check_path_inside. */
static struct statx host_root, sandbox_root;

/* Format a path into `out`, failing on one longer than PATH_MAX. */
static void __attribute__((format(printf, 2, 3)))
format_path(char out[PATH_MAX], const char *format, ...)
{
	va_list arguments;

	va_start(arguments, format);
	int length = vsnprintf(out, PATH_MAX, format, arguments);
	va_end(arguments);
	if (length < 0 || length >= PATH_MAX) {
		/* out contains the path's first PATH_MAX - 1 bytes. */
		errno = ENAMETOOLONG;
		setup_failed("path '%.200s...' is %d bytes long, over the limit of %d", out,
			     length, PATH_MAX - 1);
	}
}

static int is_symlink(const char *path)
{
	struct stat info;

	return lstat(path, &info) == 0 && S_ISLNK(info.st_mode);
}

static int is_directory(const char *path)
{
	struct stat info;

	return stat(path, &info) == 0 && S_ISDIR(info.st_mode);
}

/* Create the directory `path` and its missing parents, as os.makedirs does
 * with exist_ok: an existing directory, or a symlink to one, is fine. */
static int make_dirs(const char *path, mode_t mode)
{
	char partial[PATH_MAX];

	if (snprintf(partial, sizeof(partial), "%s", path) >= (int)sizeof(partial)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	for (char *slash = partial + 1;; slash++) {
		if (*slash != '/' && *slash != '\0')
			continue;
		char separator = *slash;
		*slash = '\0';
		if (mkdir(partial, mode) < 0 && (errno != EEXIST || !is_directory(partial)))
			return -1;
		if (separator == '\0')
			return 0;
		*slash = separator;
	}
}

/* Create the directory `path`, replacing a symlink that the image put at its
 * last component. */
static void make_dir(const char *path, mode_t mode)
{
	if (is_symlink(path) && unlink(path) < 0)
		setup_failed("unlink('%s')", path);
	if (make_dirs(path, mode) < 0)
		setup_failed("mkdir('%s')", path);
}

/* Create the empty file `path` unless a file is there; a symlink at its last
 * component is replaced. */
static void ensure_file(const char *path)
{
	struct stat info;

	if (is_symlink(path) && unlink(path) < 0)
		setup_failed("unlink('%s')", path);
	if (stat(path, &info) == 0)
		return;
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		setup_failed("creating '%s'", path);
	close(fd);
}

/* Resolve every symlink in `path` into `resolved`, as Python's
 * os.path.realpath does: components that do not exist are kept as they are,
 * so the result names where a later mkdir would land. */
static void resolve(const char *path, char resolved[PATH_MAX])
{
	char pending[PATH_MAX], joined[PATH_MAX], target[PATH_MAX];
	int links = 0;

	format_path(pending, "%s", path);
	resolved[0] = '\0';
	char *rest = pending;
	while (*rest != '\0') {
		while (*rest == '/')
			rest++;
		if (*rest == '\0')
			break;
		char *component = rest;
		while (*rest != '/' && *rest != '\0')
			rest++;
		size_t length = (size_t)(rest - component);
		if (length == 1 && component[0] == '.')
			continue;
		if (length == 2 && component[0] == '.' && component[1] == '.') {
			char *slash = strrchr(resolved, '/');
			if (slash != NULL)
				*slash = '\0';
			continue;
		}
		format_path(joined, "%s/%.*s", resolved, (int)length, component);
		ssize_t target_length = readlink(joined, target, sizeof(target) - 1);
		if (target_length < 0) {
			/* Not a symlink, or missing: keep the component. */
			memcpy(resolved, joined, strlen(joined) + 1);
			continue;
		}
		if (++links > 40) {
			errno = ELOOP;
			setup_failed("resolving '%s'", path);
		}
		target[target_length] = '\0';
		if (target[0] == '/')
			resolved[0] = '\0';
		format_path(joined, "%s/%s", target, rest);
		memcpy(pending, joined, strlen(joined) + 1);
		rest = pending;
	}
	if (resolved[0] == '\0')
		strcpy(resolved, "/");
}

/* Return the resolved `path`, in `resolved`, or fail if it leads below the
 * host's root. */
static const char *check_inside(const char *path, char resolved[PATH_MAX])
{
	size_t length = strlen(old_root);

	resolve(path, resolved);
	if (strncmp(resolved, old_root, length) == 0 &&
	    (resolved[length] == '\0' || resolved[length] == '/')) {
		errno = ELOOP;
		setup_failed("'%s' resolves to the host's root through a symlink", path);
	}
	return resolved;
}

static void identify(int fd, const char *path, struct statx *info)
{
	if (statx(fd, fd == AT_FDCWD ? path : "", fd == AT_FDCWD ? 0 : AT_EMPTY_PATH,
		  STATX_INO | STATX_MNT_ID, info) < 0)
		setup_failed("statx('%s')", path);
	if (!(info->stx_mask & STATX_MNT_ID)) {
		errno = ENOSYS;
		setup_failed("statx('%s') returned no mount id", path);
	}
}

static int same_directory(const struct statx *left, const struct statx *right)
{
	return left->stx_mnt_id == right->stx_mnt_id && left->stx_ino == right->stx_ino;
}

/* Fail if the directory that `directory` refers to lies below the host's
 * root. The walk up through ".." from any directory ends at the sandbox's
 * root, and it passes the host's root on the way from a directory below
 * that. `path` names the directory in messages. Unlike check_inside, this
 * puts no limit on the length of the path that symlinks lead to. */
static void check_fd_inside(int directory, const char *path)
{
	struct statx current;
	int fd = openat(directory, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0)
		setup_failed("opening '%s'", path);
	for (;;) {
		identify(fd, path, &current);
		if (same_directory(&current, &host_root)) {
			errno = ELOOP;
			setup_failed("'%s' resolves to the host's root through a symlink", path);
		}
		if (same_directory(&current, &sandbox_root))
			break;
		int parent = openat(fd, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);
		if (parent < 0)
			setup_failed("opening a parent directory of '%s'", path);
		close(fd);
		fd = parent;
	}
	close(fd);
}

/* check_fd_inside for the existing directory `path`, as the kernel resolves
 * it. */
static void check_path_inside(const char *path)
{
	int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0)
		setup_failed("opening '%s'", path);
	check_fd_inside(fd, path);
	close(fd);
}

/* Write `text` to `path`. Whatever the image put there that is neither a
 * regular file nor a directory is replaced: a symlink, a socket, a device
 * node, or a FIFO, whose open for writing would block until a reader came.
 * O_NONBLOCK makes such an open fail with ENXIO instead. */
static void write_file(const char *path, const char *text)
{
	char directory[PATH_MAX];
	struct stat info;

	if (lstat(path, &info) == 0 && !S_ISREG(info.st_mode) && !S_ISDIR(info.st_mode) &&
	    unlink(path) < 0)
		setup_failed("unlink('%s')", path);
	format_path(directory, "%s", path);
	*strrchr(directory, '/') = '\0';
	check_path_inside(directory[0] ? directory : "/");
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC,
		      0644);
	if (fd < 0)
		setup_failed("opening '%s'", path);
	size_t length = strlen(text);
	for (size_t done = 0; done < length;) {
		ssize_t written = write(fd, text + done, length - done);
		if (written < 0)
			setup_failed("writing '%s'", path);
		done += (size_t)written;
	}
	close(fd);
}

static void mount_root(const struct root_spec *spec)
{
	char options[3 * PATH_MAX + 64];
	const char *layers[] = {spec->lower, spec->upper, spec->work};

	/* overlayfs splits its options at ',' and its lower layers at ':'. */
	for (int i = 0; i < 3; i++)
		if (strpbrk(layers[i], ",:") != NULL) {
			errno = EINVAL;
			setup_failed("overlay path '%s' must not contain ',' or ':'", layers[i]);
		}
	/* userxattr makes overlayfs keep its metadata in user.* xattrs, which
	 * is what a mount inside a user namespace may use. volatile drops every
	 * sync of the upper layer: the layer is deleted with its sandbox, so
	 * syncing it only costs a file system commit at each unmount. */
	if (snprintf(options, sizeof(options),
		     "lowerdir=%s,upperdir=%s,workdir=%s,userxattr,volatile", spec->lower,
		     spec->upper, spec->work) >= (int)sizeof(options)) {
		errno = ENAMETOOLONG;
		setup_failed("overlay options for '%s'", spec->root);
	}
	if (mount("overlay", spec->root, "overlay", MS_NOSUID | MS_NODEV, options) < 0)
		setup_failed("mount('overlay', '%s', 'overlay', '%s')", spec->root, options);
	for (int i = 0; i < spec->bind_count; i++) {
		const struct mount_pair *bind = &spec->binds[i];
		char target[PATH_MAX];
		const char *inside = bind->target;
		while (*inside == '/')
			inside++;
		format_path(target, "%s/%s", spec->root, inside);
		if (is_directory(bind->source))
			make_dir(target, 0755);
		else
			ensure_file(target);
		bind_mount(bind->source, target, MS_RDONLY | MS_NOSUID | MS_NODEV);
	}
}

static void mount_dev(const struct root_spec *spec)
{
	char path[64], source[96];

	make_dir("/dev", 0755);
	check_path_inside("/dev");
	mount_tmpfs("/dev", 0755, 1 << 20, 0, 0);
	for (const char *const *name = devices; *name; name++) {
		snprintf(path, sizeof(path), "/dev/%s", *name);
		snprintf(source, sizeof(source), "%s/dev/%s", old_root, *name);
		ensure_file(path);
		bind_mount(source, path, MS_NOSUID | MS_NOEXEC);
	}
	if (mkdir("/dev/pts", 0755) < 0 || mkdir("/dev/shm", 0755) < 0)
		setup_failed("mkdir in /dev");
	/* A new devpts instance, so the host's ptys never appear in the sandbox. */
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		  "newinstance,ptmxmode=0666,mode=0620") < 0)
		setup_failed("mount('devpts', '/dev/pts', 'devpts')");
	mount_tmpfs("/dev/shm", 01777, spec->shm_size, spec->shm_inodes, 0);
	for (size_t i = 0; i < sizeof(dev_symlinks) / sizeof(dev_symlinks[0]); i++) {
		snprintf(path, sizeof(path), "/dev/%s", dev_symlinks[i][0]);
		if (symlink(dev_symlinks[i][1], path) < 0)
			setup_failed("symlink('%s', '%s')", dev_symlinks[i][1], path);
	}
	remount_read_only("/dev");
}

static void write_etc(const struct root_spec *spec)
{
	char hosts[512];
	struct stat info;

	char line[128];
	snprintf(line, sizeof(line), "%s\n", spec->hostname);
	write_file("/etc/hostname", line);
	int length = snprintf(hosts, sizeof(hosts),
			      "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
			      "127.0.1.1\t%s\n",
			      spec->hostname);
	if (spec->address != NULL)
		snprintf(hosts + length, sizeof(hosts) - length, "%s\t%s\n", spec->address,
			 spec->hostname);
	write_file("/etc/hosts", hosts);
	/* Loopback-only sandboxes have no resolver to reach. */
	write_file("/etc/resolv.conf",
		   spec->resolv_conf ? spec->resolv_conf : "# no network: no name servers\n");
	if (is_symlink("/etc/passwd") || stat("/etc/passwd", &info) < 0 ||
	    !S_ISREG(info.st_mode))
		write_file("/etc/passwd", PASSWD);
	if (is_symlink("/etc/group") || stat("/etc/group", &info) < 0 ||
	    !S_ISREG(info.st_mode))
		write_file("/etc/group", GROUP);
}

/* Bind-mount a volume's directory, a host path under the old root, on its
 * target inside the sandbox. The target is created inside the sandbox's
 * root, and a symlink that the image placed at its last component is
 * replaced by a directory. A symlink higher up resolves inside the root, and
 * check_inside rejects one that leads to the host's root. */
static void mount_volume(const struct mount_pair *volume)
{
	char parent[PATH_MAX], resolved[PATH_MAX], target[PATH_MAX], source[PATH_MAX];

	if (volume->target[0] != '/' || strcmp(volume->target, "/") == 0) {
		errno = EINVAL;
		setup_failed("volume mount path '%s' must be absolute", volume->target);
	}
	format_path(parent, "%s", volume->target);
	char *slash = strrchr(parent, '/');
	const char *base = volume->target + (slash - parent) + 1;
	*slash = '\0';
	if (parent[0] == '\0')
		strcpy(parent, "/");
	if (make_dirs(check_inside(parent, resolved), 0755) < 0)
		setup_failed("mkdir('%s')", resolved);
	format_path(target, "%s/%s", strcmp(resolved, "/") ? resolved : "", base);
	make_dir(target, 0755);

	/* `target` has no symlink left in it. A sandbox that shares a volume
	 * mounted above this one could put one there now. The open then fails
	 * rather than follow it, so the mount lands on the directory that was
	 * checked. */
	struct open_how how = {
		.flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
		.resolve = RESOLVE_NO_SYMLINKS,
	};
	int target_fd = (int)syscall(SYS_openat2, AT_FDCWD, target, &how, sizeof(how));
	if (target_fd < 0)
		setup_failed("opening the volume mount point '%s'", target);
	check_fd_inside(target_fd, target);
	format_path(source, "%s%s", old_root, volume->source);
	bind_mount_at(source, target_fd, target,
		      MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV |
			      (volume->read_only ? MOUNT_ATTR_RDONLY : 0));
	close(target_fd);
}

/* Report a workdir that cannot exist in the sandbox, the caller's error,
 * and exit. */
static void __attribute__((noreturn, format(printf, 2, 3)))
workdir_invalid(int error, const char *format, ...)
{
	va_list arguments;

	va_start(arguments, format);
	send_error(OP_INVALID, 0, error, format, arguments);
	va_end(arguments);
	_exit(0);
}

/* Create the workdir and its missing parents, one level at a time. A
 * component that exists but is not a directory is the caller's error. */
static void make_workdir(const char *path)
{
	char current[PATH_MAX];

	if (snprintf(current, sizeof(current), "%s", path) >= (int)sizeof(current))
		workdir_invalid(ENAMETOOLONG, "workdir '%.200s...': File name too long",
				path);
	for (char *slash = current + 1;; slash++) {
		if (*slash != '/' && *slash != '\0')
			continue;
		char separator = *slash;
		*slash = '\0';
		if (slash[-1] != '/' && mkdir(current, 0755) < 0) {
			int error = errno;
			if (error != EEXIST)
				workdir_invalid(error, "workdir '%s': %s", path, strerror(error));
			if (!is_directory(current))
				workdir_invalid(ENOTDIR, "workdir '%s': '%s' is not a directory",
						path, current);
		}
		if (separator == '\0')
			break;
		*slash = separator;
	}
	check_path_inside(path);
}

const char *build_root(const struct root_spec *spec)
{
	unsigned char random[8];
	char put_old[PATH_MAX];

	/* Before any mount: nothing mounted from here on may propagate to the
	 * host. */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		setup_failed("mount(NULL, '/', MS_REC|MS_PRIVATE)");
	mount_root(spec);

	/* pivot_root early, keeping the host's root under a name the image
	 * cannot predict, so that every later path, and every symlink in the
	 * image, resolves inside the sandbox's root. */
	if (getrandom(random, sizeof(random), 0) != sizeof(random))
		setup_failed("getrandom");
	int length = snprintf(old_root, sizeof(old_root), "/.host-");
	for (size_t i = 0; i < sizeof(random); i++)
		length += snprintf(old_root + length, sizeof(old_root) - length, "%02x",
				   random[i]);
	format_path(put_old, "%s%s", spec->root, old_root);
	if (mkdir(put_old, 0700) < 0)
		setup_failed("mkdir('%s')", put_old);
	if (syscall(SYS_pivot_root, spec->root, put_old) < 0)
		setup_failed("pivot_root('%s', '%s')", spec->root, put_old);
	if (chdir("/") < 0)
		setup_failed("chdir('/')");
	identify(AT_FDCWD, "/", &sandbox_root);
	identify(AT_FDCWD, old_root, &host_root);

	/* The directories the image may lack; /sys stays an empty directory. */
	static const char *const directories[] = {"/proc", "/sys", "/root", "/etc", NULL};
	for (const char *const *name = directories; *name; name++) {
		make_dir(*name, 0755);
		check_path_inside(*name);
	}
	mount_dev(spec);
	make_dir("/tmp", 01777);
	check_path_inside("/tmp");
	mount_tmpfs("/tmp", 01777, spec->tmp_size, spec->tmp_inodes, 0);
	write_etc(spec);
	for (int i = 0; i < spec->volume_count; i++)
		mount_volume(&spec->volumes[i]);
	make_workdir(spec->workdir);
	return old_root;
}
