"""The Kubeflow MPI Operator's part (v2beta1), played on a cluster of namespaced nodes
(tests/support/cluster.py) with a rendered MPIJob (`kubectl kustomize k8s/overlays/...`).

What the operator does, and what is done here instead (its source: kubeflow/mpi-operator,
pkg/controller/mpi_job_controller.go):

- one pod per Worker replica, named `<job>-worker-<i>`, resolvable as
  `<job>-worker-<i>.<job>.<namespace>.svc`: a node with that hostname, its /etc/hosts naming
  every pod, and its own PID namespace, where the Worker container's command is PID 1, run as
  the pod's `securityContext.runAsUser` (a user that exists only inside the node's mount
  namespace, with a home on a tmpfs, as in the image);
- a Secret `<job>-ssh` with a generated ECDSA key, mounted at `spec.sshAuthMountPath` on every
  pod as `id_rsa`, `id_rsa.pub` and `authorized_keys` (root-owned, mode 0644 when the path is
  not /root/.ssh); the image's client config (launch/ssh/ssh_config in /etc/ssh/ssh_config.d);
- a ConfigMap `<job>-config` with `hostfile` (`<pod fqdn> slots=<slotsPerWorker>` per worker,
  for Open MPI), mounted at /etc/mpi on the launcher, and the launcher's env (K_MPI_JOB_ROLE,
  OMPI_MCA_orte_default_hostfile, OMPI_MCA_orte_keep_fqdn_hostnames, OMPI_MCA_plm_rsh_args,
  OMPI_MCA_orte_set_default_slots);
- `launcherCreationPolicy: WaitForWorkersReady`: the launcher pod starts once every worker's
  readiness probe (a TCP check of its port) passes; its container command is its PID 1.

The images cannot run here: the containers' paths are this machine's install, bind-mounted
where the image has them (/opt/distft: the repository; the virtualenv is this one), the
config volume (the ConfigMap's job.yaml) and the data volume (a shared directory standing in
for the PersistentVolumeClaim) at their mountPaths. Each pod gets its own /tmp.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import cluster

ROOT = cluster.ROOT
NAMESPACE = "default"


def pod_spec(job: dict, role: str) -> dict:
    return job["spec"]["mpiReplicaSpecs"][role]["template"]["spec"]


class MPIJobCluster(cluster.Cluster):
    """Worker pods are nodes 0..replicas-1 (booted at start), the launcher pod the last node
    (started by `run_launcher`, once the workers are ready)."""

    def __init__(self, job: dict, config: dict, claims: set, workdir: str):
        self.job, self.spec = job, job["spec"]
        self.job_name = job["metadata"]["name"]
        self.replicas = self.spec["mpiReplicaSpecs"]["Worker"]["replicas"]
        self.slots = self.spec.get("slotsPerWorker", 1)
        self.key_path = self.spec.get("sshAuthMountPath", "/root/.ssh")
        self.config = config  # ConfigMap name -> {file: text}
        self.claims = claims  # PersistentVolumeClaim names
        super().__init__(self.replicas + 1, workdir)
        for i, node in enumerate(self.nodes[:-1]):
            node.name = f"{self.job_name}-worker-{i}"
        self.launcher = self.nodes[-1]
        self.launcher.name = f"{self.job_name}-launcher"
        self.made_dirs: list[str] = []

    def fqdn(self, node) -> str:
        return f"{node.name}.{self.job_name}.{NAMESPACE}.svc"

    def hostfile(self) -> str:
        return "".join(f"{self.fqdn(n)} slots={self.slots}\n" for n in self.nodes[:-1])

    # --- what the cluster makes before any pod starts ----------------------------------------

    def _files(self) -> None:
        d = self.dir
        with open(os.path.join(d, "hosts"), "w") as fh:
            fh.write("127.0.0.1 localhost\n" + "".join(f"{n.address} {self.fqdn(n)} {n.name}\n" for n in self.nodes))
        secret = os.path.join(d, "ssh-secret")  # the operator's <job>-ssh Secret, as mounted
        os.makedirs(secret, exist_ok=True)
        key = os.path.join(secret, "id_rsa")
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-N", "", "-f", key], check=True)
        shutil.copy(key + ".pub", os.path.join(secret, "authorized_keys"))
        for name in os.listdir(secret):
            os.chmod(os.path.join(secret, name), 0o600 if self.key_path == "/root/.ssh" else 0o644)
        os.chmod(secret, 0o755)
        os.makedirs(os.path.join(d, "mpi"), exist_ok=True)
        with open(os.path.join(d, "mpi", "hostfile"), "w") as fh:
            fh.write(self.hostfile())
        for cm_name, files in self.config.items():
            os.makedirs(os.path.join(d, "configmaps", cm_name), exist_ok=True)
            for name, text in files.items():
                with open(os.path.join(d, "configmaps", cm_name, name), "w") as fh:
                    fh.write(text)
        data = os.path.join(d, "data")  # the PersistentVolumeClaim: shared by every pod
        os.makedirs(data, exist_ok=True)
        os.chmod(data, 0o777)
        self.user, self.uid, self.gid, self.home = self._user()
        for name in ("passwd", "group"):
            lines = [line for line in open(f"/etc/{name}") if line.split(":")[0] != self.user
                     and line.split(":")[2] != str(self.uid if name == "passwd" else self.gid)]
            entry = (f"{self.user}:x:{self.uid}:{self.gid}::{self.home}:/bin/bash\n" if name == "passwd"
                     else f"{self.user}:x:{self.gid}:\n")
            with open(os.path.join(d, name), "w") as fh:
                fh.writelines(lines + [entry])

    def _user(self):
        """The pods' user: runAsUser/runAsGroup, named after its home, the parent of
        sshAuthMountPath (the image's `useradd --create-home`)."""
        ctx = pod_spec(self.job, "Worker").get("securityContext", {})
        uid, gid = ctx.get("runAsUser", 0), ctx.get("runAsGroup", ctx.get("runAsUser", 0))
        home = os.path.dirname(self.key_path.rstrip("/"))
        return (os.path.basename(home) if uid else "root"), uid, gid, home

    # --- pods ---------------------------------------------------------------------------------

    def _mounts(self, node, role: str) -> list[tuple[str, str]]:
        """(source on this machine, path in the pod) for the pod's volumes."""
        spec = pod_spec(self.job, role)
        (container,) = spec["containers"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = [(ROOT, "/opt/distft"), (os.path.join(self.dir, "ssh-secret"), self.key_path)]
        for m in container.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "configMap" in v:
                if v["configMap"]["name"] not in self.config:  # a pod would wait for it forever
                    raise RuntimeError(f"{role} mounts ConfigMap {v['configMap']['name']}, which is not rendered")
                mounts.append((os.path.join(self.dir, "configmaps", v["configMap"]["name"]), m["mountPath"]))
            elif "persistentVolumeClaim" in v:
                if v["persistentVolumeClaim"]["claimName"] not in self.claims:
                    raise RuntimeError(f"{role} mounts claim {v['persistentVolumeClaim']['claimName']}, "
                                       "which is not rendered")
                mounts.append((os.path.join(self.dir, "data"), m["mountPath"]))
        if role == "Launcher":
            mounts.append((os.path.join(self.dir, "mpi"), "/etc/mpi"))
        return mounts

    def pod_command(self, node, role: str, command: list[str]) -> list[str]:
        """`command` as the pod's PID 1: hostname, /etc/hosts, the user, the volumes, a private
        /tmp and home, then exec as runAsUser."""
        d = self.dir
        setup = [f"hostname {node.name}", f"mount --bind {d}/hosts /etc/hosts",
                 f"mount --bind {d}/passwd /etc/passwd", f"mount --bind {d}/group /etc/group",
                 "mount -t tmpfs -o mode=755 home /home",
                 f"mkdir -p {self.home} && chown {self.uid}:{self.gid} {self.home}",
                 "mount -t tmpfs -o mode=755 sshconf /etc/ssh/ssh_config.d",
                 f"cp {ROOT}/launch/ssh/ssh_config /etc/ssh/ssh_config.d/distft.conf"]
        setup += self._reach_the_interpreter()
        hold, back = self._venv_back_over_tmp()
        for source, target in self._mounts(node, role):
            if not os.path.isdir(target) and not target.startswith("/home/"):
                os.makedirs(target)  # a mount point on this machine (removed at close)
                self.made_dirs.append(target)
            setup.append(f"mkdir -p {target} && mount --bind {source} {target}")
        setup += hold + ["mount -t tmpfs -o mode=1777 tmp /tmp"] + back  # the sources above live under /tmp
        setup += [f"exec setpriv --reuid={self.uid} --regid={self.gid} --clear-groups "
                  f"env HOME={self.home} USER={self.user} LOGNAME={self.user} \"$@\""]
        return ["ip", "netns", "exec", node.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "--pid", "--fork", "--mount-proc", "sh", "-c", " && ".join(setup), "pod"] + command

    def _reach_the_interpreter(self) -> list[str]:
        """The image's Python is readable by its user; this machine's may live under a directory
        only root may enter (a pyenv in /root): the pod gets a tmpfs there with just the
        interpreter's installation bound into it."""
        base = os.path.realpath(sys.base_prefix)
        parts = base.strip("/").split("/")
        for i in range(1, len(parts)):
            closed = "/" + "/".join(parts[:i])
            if not os.stat(closed).st_mode & 0o001:
                keep = os.path.join(self.dir, "interpreter")
                os.makedirs(keep, exist_ok=True)
                return [f"mount --bind {base} {keep}", f"mount -t tmpfs -o mode=755 closed {closed}",
                        f"mkdir -p {base} && mount --bind {keep} {base}"]
        return []

    @staticmethod
    def _venv_back_over_tmp() -> tuple[list[str], list[str]]:
        """The image's repository and virtualenv are at one path in every pod; this machine's may
        live under /tmp (a clone there), which the pod's private /tmp covers: each is held in the
        pod's own /home tmpfs while /tmp is mounted, then bound back at its path (the venv's
        scripts' #! lines and its editable install of distft name those paths). Returns the
        commands before and after mounting /tmp."""
        paths = []
        for path in sorted({os.path.realpath(ROOT), os.path.realpath(sys.prefix)}):
            if path.startswith("/tmp/") and not any(path.startswith(p + "/") for p in paths):
                paths.append(path)
        hold = [f"mkdir -p /home/.held/{i} && mount --bind {p} /home/.held/{i}" for i, p in enumerate(paths)]
        back = [f"mkdir -p {p} && mount --bind /home/.held/{i} {p}" for i, p in enumerate(paths)]
        return hold, back

    def pod_env(self, role: str) -> dict:
        (container,) = pod_spec(self.job, role)["containers"]
        env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
               "DISTFT_VENV": sys.prefix, "K_MPI_JOB_ROLE": role.lower()}
        if role == "Launcher":
            env.update({"OMPI_MCA_orte_keep_fqdn_hostnames": "true",
                        "OMPI_MCA_orte_default_hostfile": "/etc/mpi/hostfile",
                        "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
                        "OMPI_MCA_orte_set_default_slots": str(self.slots)})
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        return env

    def boot(self, node, wait: bool = True) -> None:
        if node is self.launcher:
            return  # WaitForWorkersReady: run_launcher starts it
        (container,) = pod_spec(self.job, "Worker")["containers"]
        log_path = os.path.join(self.dir, f"{node.name}.log")
        log = open(log_path, "a")
        node.init = subprocess.Popen(self.pod_command(node, "Worker", container["command"] + container.get("args", [])),
                                     env=self.pod_env("Worker"), stdout=log, stderr=subprocess.STDOUT)
        node.pid1 = self._child_of(node.init, log_path)
        if wait:
            self._wait_for_sshd(node)

    def sshd_log(self, node) -> str:
        try:
            return open(os.path.join(self.dir, f"{node.name}.log")).read()[-1500:]
        except OSError:
            return ""

    def _wait_for_sshd(self, node, seconds: float = 30) -> None:
        """The worker's readinessProbe: a TCP connection to its port, from the pod itself."""
        if node is self.launcher:
            return
        (container,) = pod_spec(self.job, "Worker")["containers"]
        port = container["readinessProbe"]["tcpSocket"]["port"]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if node.init.poll() is not None:
                raise RuntimeError(f"{node.name}: worker exited {node.init.returncode}: " + self.sshd_log(node))
            probe = subprocess.run(node.enter(["bash", "-c", f"echo > /dev/tcp/{node.address}/{port}"]),
                                   capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"{node.name}: never ready on port {port}: " + self.sshd_log(node))

    def run_launcher(self, extra_args: list[str] = ()) -> subprocess.Popen:
        """The launcher pod: its container's command and args (plus `extra_args`) as its PID 1."""
        (container,) = pod_spec(self.job, "Launcher")["containers"]
        command = container["command"] + container.get("args", []) + list(extra_args)
        proc = subprocess.Popen(self.pod_command(self.launcher, "Launcher", command), env=self.pod_env("Launcher"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.launcher.init = proc
        return proc

    def close(self) -> None:
        super().close()
        for path in reversed(self.made_dirs):
            try:
                os.rmdir(path)
            except OSError:
                pass
