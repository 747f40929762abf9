"""Where users run it: horovodrun across nodes, Kubernetes (MPIJob via kustomize), Slurm, Docker."""
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jsonschema
import kubernetes_validate
import pytest
import yaml

from distft.components import checkpoint
from distft import launchenv
from distft.supervisor.launch import first_failure_code
from distft.config import load_config

from conftest import MPI_ENV, ROOT, kustomize, read_summary, small_config, write_config
from processes import kill_tree, logged_steps, wait_for
import slurm
from slurm import free_port

spec = importlib.util.spec_from_file_location("hosts", os.path.join(ROOT, "launch", "hosts.py"))
hosts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hosts)
BIN = os.path.dirname(sys.executable)


# --- hostfile / node list helper -----------------------------------------------------------------

@pytest.mark.parametrize("nodelist, expected", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_slurm_nodelists_expand(nodelist, expected):
    assert hosts.expand_nodelist(nodelist) == expected


def test_slurm_allocation_to_horovodrun_hosts():
    env = {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_TASKS_PER_NODE": "4(x2),2"}
    assert hosts.horovodrun_args(hosts.from_slurm(env)) == "-np 10 -H gpu01:4,gpu02:4,gpu03:2"


def test_hostfiles_in_open_mpi_and_horovod_forms():
    text = "# MPI Operator\nworker-0.distft-worker slots=4\nworker-1.distft-worker:4\nlonely\n"
    assert hosts.horovodrun_args(hosts.parse_hostfile(text, default_slots=2)) == \
        "-np 10 -H worker-0.distft-worker:4,worker-1.distft-worker:4,lonely:2"
    with pytest.raises(ValueError, match="hostfile line 1"):
        hosts.parse_hostfile("bad host line with words")


def test_hosts_cli_reports_errors_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "launch/hosts.py", "--hostfile", str(tmp_path / "none")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("hosts.py: ")


# --- Docker -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, base, extra", [("Dockerfile", "nvidia/cuda:11.2", "cu112"),
                                               ("Dockerfile.cpu", "python:3.11", "cpu")])
def test_dockerfiles_lint_clean_and_install_with_the_install_script(name, base, extra):
    path = os.path.join(ROOT, "launch", "docker", name)
    lint = subprocess.run([os.path.join(BIN, "hadolint"), path], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = open(path).read()
    assert re.search(rf"^FROM {re.escape(base)}", text, re.M)
    run_lines = " ".join(re.findall(r"^RUN (.*(?:\n .*)*)", text, re.M))
    assert f"DISTFT_EXTRA={extra}" in run_lines and "bash launch/install.sh" in run_lines
    assert re.findall(r"^USER (.*)$", text, re.M)[-1] == "1000:1000"  # not root
    assert "openssh" in text


# --- Kubernetes -----------------------------------------------------------------------------------

def mpijob_schema():
    crd = yaml.safe_load(open(os.path.join(ROOT, "tests", "data", "kubeflow.org_mpijobs.yaml")))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return version["schema"]["openAPIV3Schema"]


K8S_VERSION = "1.30.0"


@pytest.mark.parametrize("overlay", ["cpu-smoke", "gpu-2x4"])
def test_kustomize_output_validates_against_kubernetes_and_the_mpijob_crd(overlay):
    docs = kustomize(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "MPIJob", "PersistentVolumeClaim", "PodMonitor"]
    for doc in docs:
        if doc["kind"] == "MPIJob":
            jsonschema.validate(doc, mpijob_schema())
            for role, replica in doc["spec"]["mpiReplicaSpecs"].items():
                # the pod templates against the real Kubernetes PodTemplate schema
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": f"{role.lower()}"},
                                              "template": replica["template"]}, K8S_VERSION, strict=True)
        elif doc["kind"] == "PodMonitor":
            # no schema for the Prometheus Operator CRD is vendored: check what it must say
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert all(e["honorLabels"] and e["port"].startswith("distft-") for e in doc["spec"]["podMetricsEndpoints"])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_mpijob_schema_rejects_a_broken_job():
    (job,) = [d for d in kustomize("cpu-smoke") if d["kind"] == "MPIJob"]
    job["spec"]["slotsPerWorker"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="'four' is not of type 'integer'"):
        jsonschema.validate(job, mpijob_schema())
    del job["spec"]["mpiReplicaSpecs"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, mpijob_schema())


def test_gpu_overlay_is_two_nodes_of_four_gpus():
    docs = {d["kind"]: d for d in kustomize("gpu-2x4")}
    job = docs["MPIJob"]["spec"]
    worker = job["mpiReplicaSpecs"]["Worker"]
    assert job["slotsPerWorker"] == 4 and worker["replicas"] == 2
    container = worker["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4 and container["image"] == "distft:cu112"
    assert [p["containerPort"] for p in container["ports"]] == [9400, 9401, 9402, 9403]
    assert job["runPolicy"]["cleanPodPolicy"] and job["runPolicy"]["backoffLimit"] >= 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/data" in mounts  # the shared volume: checkpoints survive pod restarts
    cfg = yaml.safe_load(docs["ConfigMap"]["data"]["job.yaml"])
    assert cfg["train"]["output"].startswith("/data/")


@pytest.mark.parametrize("overlay", ["cpu-smoke", "gpu-2x4"])
def test_configmap_job_is_a_valid_distft_config(tmp_path, overlay):
    docs = {d["kind"]: d for d in kustomize(overlay)}
    (tmp_path / "job.yaml").write_text(docs["ConfigMap"]["data"]["job.yaml"])
    load_config(str(tmp_path / "job.yaml"))


def ssh_port(path):
    (port,) = re.findall(r"^\s*Port\s+(\d+)", open(os.path.join(ROOT, path)).read(), re.M)
    return int(port)


@pytest.mark.parametrize("overlay", ["cpu-smoke", "gpu-2x4"])
def test_mpijob_workers_run_sshd_as_the_pod_user_and_the_launcher_waits_for_them(overlay):
    (job,) = [d for d in kustomize(overlay) if d["kind"] == "MPIJob"]
    spec = job["spec"]
    launcher, worker = (spec["mpiReplicaSpecs"][r]["template"]["spec"] for r in ("Launcher", "Worker"))
    dockerfile = open(os.path.join(ROOT, "launch", "docker", "Dockerfile.cpu")).read()
    (home,) = re.findall(r"useradd --create-home --uid 1000 (\w+)", dockerfile)
    for pod in (launcher, worker):
        assert pod["securityContext"]["runAsUser"] == 1000
    # the operator mounts the keys where uid 1000 looks for them (its default is /root/.ssh)
    assert spec["sshAuthMountPath"] == f"/home/{home}/.ssh"
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    (container,) = worker["containers"]
    assert container["command"] == ["bash", "/opt/distft/launch/worker.sh"]  # not the image's launch.sh
    sshd = ssh_port("launch/ssh/sshd_config")
    assert sshd == 2222 and ssh_port("launch/ssh/ssh_config") == sshd
    assert container["readinessProbe"]["tcpSocket"]["port"] == sshd
    env = {e["name"]: e["value"] for e in launcher["containers"][0]["env"]}
    assert env["DISTFT_SSH_PORT"] == str(sshd)
    assert "launch/ssh/ssh_config /etc/ssh/ssh_config.d/" in dockerfile


def test_worker_entry_point_serves_ssh_that_the_client_config_reaches(tmp_path):
    """launch/worker.sh as this user (root in CI): its own host key in a writable directory,
    public-key login only, the client config logs in without a prompt; SIGTERM ends it."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id_ed25519.pub").read_text())
    os.chmod(tmp_path, 0o700)
    if os.getuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # root's sshd wants its privilege separation directory
    port = free_port()
    sshd = subprocess.Popen(["bash", "launch/worker.sh", "-o", f"Port={port}", "-o",
                             f"AuthorizedKeysFile={tmp_path / 'authorized_keys'}"], cwd=ROOT,
                            env={**os.environ, "DISTFT_SSHD_DIR": str(tmp_path / "sshd"),
                                 "DISTFT_STOP_FILE": str(tmp_path / "stop")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        login = ["ssh", "-F", os.path.join(ROOT, "launch", "ssh", "ssh_config"), "-p", str(port),
                 "-o", "BatchMode=yes", f"{user}@127.0.0.1"]
        ok = subprocess.run(login + ["-i", str(key), "echo", "in-the-pod"], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and ok.stdout.strip() == "in-the-pod", ok.stderr
        # a password is never asked for: without the key the login fails at once
        no_key = subprocess.run(login + ["-o", "IdentitiesOnly=yes", "-i", str(tmp_path / "none"), "true"],
                                capture_output=True, text=True, timeout=30)
        assert no_key.returncode == 255
        assert (tmp_path / "sshd" / "host_ed25519_key").exists()
    finally:
        sshd.terminate()
        out = sshd.communicate(timeout=10)[0]
    assert "Server listening" in out
    # SIGTERM (the pod's) became a stop request for the ranks of any launch, and sshd ended
    assert (tmp_path / "stop").read_text() == launchenv.ANY_LAUNCH and sshd.returncode == 0


@pytest.mark.horovod
def test_mpijob_launcher_command_runs_locally_on_two_slots(tmp_path):
    docs = {d["kind"]: d for d in kustomize("cpu-smoke")}
    launcher = docs["MPIJob"]["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    (tmp_path / "job.yaml").write_text(docs["ConfigMap"]["data"]["job.yaml"])
    (tmp_path / "hostfile").write_text("localhost slots=2\n")  # what the operator would mount
    env = {e["name"]: e["value"] for e in launcher["env"]}
    env["DISTFT_HOSTFILE"] = str(tmp_path / "hostfile")
    local = {"/opt/distft": ROOT, "/etc/distft/job.yaml": str(tmp_path / "job.yaml")}
    cmd = [next((v + a[len(k):] for k, v in local.items() if a.startswith(k)), a)
           for a in launcher["command"] + launcher["args"]]
    cmd += ["--set", f"train.output={tmp_path / 'out'}"]  # /data is the pod's volume
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **MPI_ENV, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = read_summary(tmp_path / "out")
    assert s["world_size"] == 2 and s["steps"] == 20


# --- our launcher: the stop request and the exit status pass through horovodrun ---------------


# stopped by a signal, never run to its end: it must outlast Slurm's time-limit signal (30-60 s
# after the start); 50 epochs (1,100 steps) once ended in about 30 s on 2 nodes
LONG_RUN = dict(train={"epochs": 1000, "max_steps": None, "checkpoint_every_epochs": 0, "log_every": 2})


def launch(args, env, **kw):
    return subprocess.Popen(["bash", "launch/launch.sh"] + args, cwd=ROOT, env={**os.environ, **MPI_ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.horovod
def test_sigterm_to_the_launcher_waits_for_a_slow_checkpoint_and_exits_75_then_resumes(tmp_path, pretrained):
    """What a launcher pod's eviction and Slurm's B:TERM hit. The checkpoint takes 20 s to write:
    far past horovodrun's 5 s SIGKILL, which must never start."""
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, **LONG_RUN))
    out = tmp_path / "out"
    env = {"DISTFT_NP": "2", "DISTFT_STOP_FILE": str(tmp_path / "stop"), "DISTFT_FAULT_CHECKPOINT_DELAY": "20"}
    proc = launch(["--config", cfg], env)
    try:
        wait_for(lambda: logged_steps(out), 180, "training steps")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 75, text[-3000:]
    assert took >= 20  # the slowed write ran to its end
    step = int(text.split("preempted (SIGTERM) at step ")[1].split(";")[0])
    assert checkpoint.latest(str(out)).meta["step"] == step
    # launch.sh's default controller is MPI (mpirun's report carries no per-rank line as Gloo's does)
    assert text.startswith("[launch] horovodrun -np 2 -H localhost:2 --mpi") and "the job's exit status: 75" in text
    # the same command resumes there and finishes a short remainder
    again = launch(["--config", cfg, "--set", f"train.max_steps={step + 3}"], {"DISTFT_NP": "2"})
    text2, _ = again.communicate(timeout=300)
    assert again.returncode == 0, text2[-3000:]
    s = read_summary(out)
    assert s["resumed"] and s["steps"] == step + 3 and s["steps_this_run"] == 3 and s["world_size"] == 2


@pytest.mark.horovod
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_a_user_error_on_the_ranks_is_the_launchers_exit_2(tmp_path, pretrained, controller):
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, data={"train": str(tmp_path / "nowhere")}))
    proc = launch(["--config", cfg], {"DISTFT_NP": "2", "DISTFT_CONTROLLER": controller})
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, text[-3000:]
    assert "nowhere" in text and "the job's exit status: 2 " in text


def test_exit_codes_are_read_from_horovodrun_and_mpirun_reports_not_from_rank_output():
    gloo = ["[0]<stderr>:Exit code: 9", "RuntimeError: Horovod detected ... was:", "Process name: 1",
            "Exit code: 75"]
    assert first_failure_code(gloo) == 75
    mpi = ["  Process name: [[123,1],0]", "  Exit code:    2", "RuntimeError: mpirun failed with exit code 2"]
    assert first_failure_code(mpi) == 2
    assert first_failure_code(["[1,0]<stdout>:Exit code: 3"]) is None


# --- Slurm ---------------------------------------------------------------------------------------

@pytest.fixture
def slurm_cluster(tmp_path):
    """A real single-node Slurm (tests/support/slurm.py): munged, slurmctld and slurmd on this machine."""
    nodes = slurm.Slurm(str(tmp_path / "slurm"), [slurm.here(str(tmp_path / "slurm" / "spool"))])
    try:
        yield nodes.start()
    finally:
        nodes.close()


@pytest.mark.horovod
def test_sbatch_runs_a_two_task_job_to_completion(tmp_path, pretrained, slurm_cluster):
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, pretrained, train={"max_steps": 5}))
    log = tmp_path / "slurm-%j.out"
    proc = slurm_cluster.client(["sbatch", "--wait", f"--chdir={ROOT}", f"--output={log}", "launch/slurm/distft.sbatch",
                                 "--config", cfg, "--set", f"train.output={tmp_path / 'out'}"],
                                cwd=ROOT, env={**MPI_ENV, "DISTFT_VENV": sys.prefix}, timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-3000:]
    s = read_summary(tmp_path / "out")
    assert s["world_size"] == 2 and s["steps"] == 5
    assert "[launch] srun --mpi=pmix (2 tasks on " in logs
