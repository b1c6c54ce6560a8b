/*
 * Moving a supervisor into its sandbox's cgroups and new namespaces.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <sched.h>
#include <unistd.h>

#include "init.h"

/* Every namespace a sandbox gets. One unshare call creates them, so the new
 * user namespace owns all the others and the capabilities it grants apply to
 * them. CLONE_NEWPID affects only the children forked afterwards. */
#define SANDBOX_NAMESPACES                                                   \
	(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | \
	 CLONE_NEWCGROUP | CLONE_NEWPID)

/*
 * Join the sandbox's cgroups and move into new namespaces, as uid 0 inside.
 *
 * `notify_fd` and `wait_fd` are pipes to the zygote, which writes the id maps
 * once a byte on `notify_fd` reports that the user namespace exists. With an
 * `owner_uid` of 0 or more the process first becomes that unprivileged host
 * uid, which then owns the new user namespace. Returns -1 when the Engine
 * removed a cgroup before this process joined it, as it does when it cancels
 * a prefork.
 */
int enter_namespaces(const int *cgroup_fds, int cgroup_count, int notify_fd,
		     int wait_fd, long long owner_uid)
{
	/* Joining first makes the cgroup namespace below rooted at the
	 * sandbox's own cgroup, and every process forked later starts inside
	 * it, so no exec pays for a cgroup migration. */
	for (int i = 0; i < cgroup_count; i++) {
		if (write(cgroup_fds[i], "0", 1) != 1) {
			if (errno == ENODEV)
				return -1;
			setup_failed("joining a cgroup (write to cgroup.procs)");
		}
		close(cgroup_fds[i]);
	}

	/* Supplementary groups survive unshare(CLONE_NEWUSER) and would keep
	 * granting the host's root group inside the sandbox. */
	if (setgroups(0, NULL) < 0)
		setup_failed("setgroups([])");

	/* The kernel charges per-user limits (inotify instances, pending
	 * signals, POSIX message queues) to the owner of each user namespace on
	 * the way up, so a root-owned namespace would let sandbox code use up
	 * host root's. */
	if (owner_uid >= 0) {
		gid_t gid = (gid_t)owner_uid;
		uid_t uid = (uid_t)owner_uid;
		if (setresgid(gid, gid, gid) < 0)
			setup_failed("setresgid(%lld)", owner_uid);
		if (setresuid(uid, uid, uid) < 0)
			setup_failed("setresuid(%lld)", owner_uid);
	}

	if (unshare(SANDBOX_NAMESPACES) < 0)
		setup_failed("unshare of the sandbox's namespaces");

	/* Only a process outside the namespace, root on the host, may map host
	 * ids into it. Until the map exists this process has no usable uid. */
	char answer = 0;
	if (write(notify_fd, "u", 1) != 1)
		setup_failed("telling the zygote that the user namespace exists");
	if (read(wait_fd, &answer, 1) != 1 || answer != 'g') {
		errno = EPROTO;
		setup_failed("the zygote did not write the uid and gid maps");
	}
	close(notify_fd);
	close(wait_fd);

	if (setresgid(0, 0, 0) < 0)
		setup_failed("setresgid(0)");
	if (setgroups(0, NULL) < 0)
		setup_failed("setgroups([]) in the user namespace");
	if (setresuid(0, 0, 0) < 0)
		setup_failed("setresuid(0)");
	return 0;
}
