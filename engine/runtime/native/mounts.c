/*
 * Mounts inside a sandbox's mount namespace. Every function here runs after
 * the namespace was made private, so nothing it mounts propagates to the
 * host. A failure reports the call and exits (setup_failed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "init.h"

/* The mount flags that statvfs reports for `path`. A remount in a user
 * namespace must keep them, because the kernel locks those of mounts that
 * came from a more privileged namespace. */
unsigned long current_flags(const char *path)
{
	static const unsigned long pairs[][2] = {
		{ST_RDONLY, MS_RDONLY},     {ST_NOSUID, MS_NOSUID},
		{ST_NODEV, MS_NODEV},       {ST_NOEXEC, MS_NOEXEC},
		{ST_NOATIME, MS_NOATIME},   {ST_NODIRATIME, MS_NODIRATIME},
		{ST_RELATIME, MS_RELATIME},
	};
	struct statvfs info;
	unsigned long flags = 0;

	if (statvfs(path, &info) < 0)
		setup_failed("statvfs('%s')", path);
	for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++)
		if (info.f_flag & pairs[i][0])
			flags |= pairs[i][1];
	return flags;
}

/* Remount the bind mount `target` with its current flags plus `flags`, and
 * check that they hold: the kernel ignores flags on the first bind call. */
void remount_bind(const char *target, unsigned long flags)
{
	flags |= current_flags(target);
	if (mount(NULL, target, NULL, MS_BIND | MS_REMOUNT | flags, NULL) < 0)
		setup_failed("mount(NULL, '%s', MS_BIND|MS_REMOUNT|%#lx)", target, flags);
	unsigned long applied = current_flags(target);
	if ((applied & flags) != flags) {
		errno = EPERM;
		setup_failed("bind mount on '%s' lacks flags %#lx", target, flags & ~applied);
	}
}

/* Bind-mount `source` on `target`, not recursively, with `flags` added. */
void bind_mount(const char *source, const char *target, unsigned long flags)
{
	if (mount(source, target, NULL, MS_BIND, NULL) < 0)
		setup_failed("mount('%s', '%s', MS_BIND)", source, target);
	remount_bind(target, flags);
}

/* Bind-mount `source` on the directory that the descriptor `target` refers
 * to, not recursively, with the MOUNT_ATTR_* flags `attributes` added, and
 * check that they hold. `name` names the target in messages. The new mount
 * API attaches the mount to that very directory, wherever its path leads by
 * now, and applies the flags before the mount is visible. */
void bind_mount_at(const char *source, int target, const char *name,
		   uint64_t attributes)
{
	struct mount_attr attr = {.attr_set = attributes};
	int tree = open_tree(AT_FDCWD, source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);

	if (tree < 0)
		setup_failed("open_tree('%s', OPEN_TREE_CLONE)", source);
	if (mount_setattr(tree, "", AT_EMPTY_PATH, &attr, sizeof(attr)) < 0)
		setup_failed("mount_setattr on a copy of '%s' (%#llx)", source,
			     (unsigned long long)attributes);
	if (move_mount(tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
		setup_failed("move_mount('%s' to '%s')", source, name);

	struct statvfs info;
	if (fstatvfs(tree, &info) < 0)
		setup_failed("fstatvfs of the mount on '%s'", name);
	close(tree);
	static const uint64_t pairs[][2] = {
		{MOUNT_ATTR_RDONLY, ST_RDONLY},
		{MOUNT_ATTR_NOSUID, ST_NOSUID},
		{MOUNT_ATTR_NODEV, ST_NODEV},
		{MOUNT_ATTR_NOEXEC, ST_NOEXEC},
	};
	for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++)
		if ((attributes & pairs[i][0]) && !(info.f_flag & pairs[i][1])) {
			errno = EPERM;
			setup_failed("bind mount on '%s' lacks attribute %#llx", name,
				     (unsigned long long)pairs[i][0]);
		}
}

int is_mount_point(const char *path)
{
	struct statx info;

	if (statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS, &info) < 0)
		setup_failed("statx('%s')", path);
	return (info.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) &&
	       (info.stx_attributes & STATX_ATTR_MOUNT_ROOT);
}

/* Make `target` read-only, keeping its other flags and its submounts. A path
 * that is no mount point is first bind-mounted on itself, which gives it a
 * mount of its own to remount. */
void remount_read_only(const char *target)
{
	if (!is_mount_point(target) && mount(target, target, NULL, MS_BIND, NULL) < 0)
		setup_failed("mount('%s', '%s', MS_BIND)", target, target);
	remount_bind(target, MS_RDONLY);
}

/* Mount a tmpfs of at most `size` bytes and `inodes` files, 0 meaning the
 * kernel's default, half of RAM. */
void mount_tmpfs(const char *target, unsigned int mode, unsigned long long size,
		 unsigned long long inodes, unsigned long flags)
{
	char options[96];
	int length = snprintf(options, sizeof(options), "mode=%o", mode);

	if (size)
		length += snprintf(options + length, sizeof(options) - length, ",size=%llu",
				   size);
	if (inodes)
		snprintf(options + length, sizeof(options) - length, ",nr_inodes=%llu",
			 inodes);
	if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | flags, options) < 0)
		setup_failed("mount('tmpfs', '%s', 'tmpfs', '%s')", target, options);
}
