"""Multi-node launch paths with real processes: pdsh over a real sshd, mpirun, DeepSpeed's openmpi mode, --no_ssh,
a rank killed mid-run on every path, and a 2-rank checkpoint resumed on 1 rank through a universal checkpoint.

Two "nodes" are 127.0.0.1 and 127.0.0.2, both served by an sshd this module starts on loopback with its own host
key, client key, config and port, all in a temporary directory; the machine's ssh configuration is not touched
(ssh reads a config given with -F by a wrapper put first on PATH for these runs only). Needs root for sshd's
privilege separation directory, plus the Debian packages pdsh, openssh-server and openssh-client.

Each run uses its own master port and must leave no /dev/shm/deepspeed_allreduce_buffer_* file of that port.
Run with: pytest -m multinode tests/test_multinode.py
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"
PY = sys.executable
BIN = Path(PY).parent
KILL_DEADLINE_S = 60      # the whole job must be gone this long after a rank is killed
RUN_TIMEOUT_S = 240       # a run that takes longer than this hangs

# A tiny R-Drop run: ViT preset "tiny" on 64 digits, no evaluation until the end, nothing but checkpoints written.
ENGINE_FAST = ["--task", "image_classification", "--ds_config", str(REPO / "ds_configs" / "zero2.json"),
               "--task.model", "tiny", "--task.max_train_examples", "64", "--train.micro_batch_size", "8",
               "--eval.every_steps", "0", "--log.tensorboard", "false", "--log.progress", "false",
               "--checkpoint.export_hf", "false", "--checkpoint.save_best", "false", "--dist.timeout_s", "30"]


# ------------------------------------------------------------------------------------------------ helpers
def base_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ENV_FILE"):
        env.pop(var, None)
    env.update(extra)
    return env


def shm_files(port: int) -> list:
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def start(cmd, env, cwd=None) -> subprocess.Popen:
    """Start a launcher in its own session (so a stuck one can be killed with everything under it)."""
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd or REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run still going after {timeout} s:\n{out[-6000:]}")
    return out


def run(cmd, env, cwd=None, timeout: float = RUN_TIMEOUT_S):
    proc = start(cmd, env, cwd)
    out = finish(proc, timeout)
    return proc.returncode, out


def launch_cmd(*args):
    return ["bash", LAUNCH, *args]


def zero_shards(ckpt: Path) -> list:
    return sorted(p.name for p in ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))


def rank_processes(marker: str) -> dict:
    """{rank: pid} of the engine.train processes whose command line holds `marker` (the run's output dir)."""
    ranks = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if b"engine.train" not in argv or marker.encode() not in argv:
                continue
            if any(b"deepspeed.launcher" in a or a.endswith((b"pdsh", b"ssh", b"mpirun", b"prterun", b"bash"))
                   for a in argv[:4]):
                continue
            if argv[argv.index(b"engine.train") - 1] != b"-m":
                continue
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        rank = env.get(b"RANK") or env.get(b"OMPI_COMM_WORLD_RANK")
        if rank is not None:
            ranks[int(rank)] = int(d.name)
    return ranks


def wait_for(predicate, timeout: float, procs=(), what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"launcher exited with {p.returncode} while waiting for {what}:\n"
                            f"{p.communicate()[0][-6000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def rank_lines(out: str) -> dict:
    """{rank: (world, node_rank, pid)} from the line every rank of engine.train prints once its process group is up
    (`[engine] rank R/W local_rank L node_rank N host H pid P backend B`), pdsh's "host: " prefix allowed."""
    found = {}
    for m in re.finditer(r"^(?:\S+: )?\[engine\] rank (\d+)/(\d+) local_rank \d+ node_rank (\d+) host \S+ pid (\d+)",
                         out, re.M):
        found[int(m.group(1))] = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
    return found


def engine_done(out: str, step: int) -> bool:
    return re.search(rf"\[engine\] done: step={step}\b", out) is not None


@pytest.fixture(autouse=True)
def _no_leaked_shm():
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    leaked = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before
    # Only files of ports this module used count: the lead's tests may run concurrently.
    mine = [f for f in leaked if any(f"_{p}_" in f for p in _PORTS)]
    for f in mine:
        os.unlink(f)
    assert not mine, f"DeepSpeed shm buffers left behind: {mine}"


_PORTS: list = []


@pytest.fixture
def port() -> int:
    p = free_port()
    _PORTS.append(p)
    return p


# ------------------------------------------------------------------------------------------------ sshd
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on 127.0.0.1 and 127.0.0.2 with throwaway keys; an `ssh` wrapper that uses them. Stopped always."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    for tool in ("pdsh", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} not installed: apt-get install -y pdsh openssh-server openssh-client")
    if not os.path.exists(sshd_bin):
        pytest.fail("sshd not installed: apt-get install -y openssh-server")
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd runs as root (privilege separation directory /run/sshd)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / key], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    ssh_port = free_port()
    (d / "sshd_config").write_text(
        f"Port {ssh_port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {d}/host_key\n"
        f"PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\nMaxStartups 50\n")
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1 127.0.0.2\n  Port {ssh_port}\n  IdentityFile {d}/client_key\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
    wrapper_dir = d / "bin"
    wrapper_dir.mkdir()
    real_ssh = shutil.which("ssh")
    (wrapper_dir / "ssh").write_text(f'#!/bin/sh\nexec {real_ssh} -F {d}/ssh_config "$@"\n')
    (wrapper_dir / "ssh").chmod(0o755)

    made_privsep = not os.path.isdir("/run/sshd")
    if made_privsep:
        os.makedirs("/run/sshd", mode=0o755)
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", d / "sshd_config"], stdout=log, stderr=subprocess.STDOUT)
    try:
        env = base_env(PATH=f"{wrapper_dir}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(["ssh", "127.0.0.2", "echo", "ok"], env=env, capture_output=True, text=True)
            if r.stdout.strip() == "ok":
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"test sshd did not come up: {r.stderr}\n{(d / 'sshd.log').read_text()}")
            time.sleep(0.2)
        yield {"env": env, "log": d / "sshd.log", "dir": d}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def accepted_logins(sshd) -> int:
    return sshd["log"].read_text().count("Accepted publickey")


# ------------------------------------------------------------------------------------------------ a. pdsh/ssh
def test_pdsh_two_nodes_over_ssh(sshd, tmp_path, port):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    work = tmp_path / "work"   # the launch directory, with a user .deepspeed_env that must reach the ranks
    work.mkdir()
    user_env = "RDROP_TEST_MARK=from_user_env_file\n"
    (work / ".deepspeed_env").write_text(user_env)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out_dir = tmp_path / "run"
    logins = accepted_logins(sshd)

    rc, out = run(launch_cmd("--hostfile", hostfile, "--launcher", "pdsh", "--master_addr", "127.0.0.1",
                             "--master_port", port, "--", *ENGINE_FAST, "--output_dir", out_dir,
                             "--train.max_steps", "4", "--checkpoint.every_steps", "4"),
                  env=dict(sshd["env"], TMPDIR=str(tmpdir)), cwd=work)
    assert rc == 0, out[-6000:]
    assert re.search(r"cmd = pdsh -S -f \d+ -w 127\.0\.0\.1,127\.0\.0\.2 ", out), out[-6000:]
    # Both nodes' DeepSpeed launchers ran through pdsh (its "host: " prefix) with their node ranks in a world of 2.
    assert re.search(r"^127\.0\.0\.1: .*nnodes=2, num_local_procs=1, node_rank=0$", out, re.M), out[-6000:]
    assert re.search(r"^127\.0\.0\.2: .*nnodes=2, num_local_procs=1, node_rank=1$", out, re.M), out[-6000:]
    assert re.search(r"^127\.0\.0\.2: .*dist_world_size=2$", out, re.M)
    # ... and the engine's ranks report the world they joined: rank 1 on the second node.
    assert re.search(r"^127\.0\.0\.1: \[engine\] rank 0/2 local_rank 0 node_rank 0 ", out, re.M), out[-6000:]
    assert re.search(r"^127\.0\.0\.2: \[engine\] rank 1/2 local_rank 0 node_rank 1 ", out, re.M), out[-6000:]
    assert accepted_logins(sshd) >= logins + 2            # the ssh check + one session per node, really via sshd
    # The user's .deepspeed_env was merged into the exports; OMP_NUM_THREADS and PYTHONPATH travel too.
    assert "export RDROP_TEST_MARK=from_user_env_file;" in out
    assert "export OMP_NUM_THREADS=1;" in out
    assert re.search(rf"export PYTHONPATH=\S*{re.escape(str(REPO))}[:;]", out), out[-6000:]
    assert (work / ".deepspeed_env").read_text() == user_env        # left as it was
    assert not list(tmpdir.iterdir())                              # the temporary DS_ENV_FILE is gone
    assert engine_done(out, 4)
    assert zero_shards(out_dir / "checkpoints" / "global_step4") == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


# ------------------------------------------------------------------------------------------------ b. MPI
def test_mpirun_direct(tmp_path, port):
    out_dir = tmp_path / "run"
    env = base_env(MASTER_PORT=str(port))
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl_tcp_if_include", "lo",
           "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "PATH", "-x", "DS_ACCELERATOR", "-x", "MASTER_PORT",
           PY, "-m", "engine.train", *ENGINE_FAST, "--output_dir", out_dir, "--train.max_steps", "4",
           "--checkpoint.every_steps", "4"]
    rc, out = run(cmd, env)
    assert rc == 0, out[-6000:]
    assert engine_done(out, 4)
    assert sorted(rank_lines(out)) == [0, 1] and {w for w, _, _ in rank_lines(out).values()} == {2}, out[-6000:]
    # No RANK/WORLD_SIZE were given: two ZeRO partitions prove that mpi4py discovery built a world of 2.
    assert zero_shards(out_dir / "checkpoints" / "global_step4") == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_deepspeed_openmpi_launcher(tmp_path, port):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out_dir = tmp_path / "run"
    rc, out = run(launch_cmd("--hostfile", hostfile, "--launcher", "openmpi", "--master_port", port,
                             "--launcher_args", "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo",
                             "--", *ENGINE_FAST, "--output_dir", out_dir, "--train.max_steps", "4",
                             "--checkpoint.every_steps", "4"), env=base_env())
    assert rc == 0, out[-6000:]
    assert re.search(r"cmd = mpirun -n 2 -hostfile \S+ .*--allow-run-as-root --oversubscribe", out), out[-6000:]
    assert "-x OMP_NUM_THREADS=1" in out
    assert sorted(rank_lines(out)) == [0, 1] and {w for w, _, _ in rank_lines(out).values()} == {2}, out[-6000:]
    assert engine_done(out, 4)
    assert len(zero_shards(out_dir / "checkpoints" / "global_step4")) == 2


# ------------------------------------------------------------------------------------------------ c. no ssh
def nossh_cmds(hostfile, port, out_dir, *engine_args):
    return [launch_cmd("--hostfile", hostfile, "--launcher", "nossh", "--node_rank", r, "--master_addr",
                       "127.0.0.1", "--master_port", port, "--", *ENGINE_FAST, "--output_dir", out_dir,
                       *engine_args) for r in (0, 1)]


def test_nossh_two_launchers_form_one_world(tmp_path, port):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out_dir = tmp_path / "run"
    procs = [start(c, base_env()) for c in nossh_cmds(hostfile, port, out_dir, "--train.max_steps", "4",
                                                        "--checkpoint.every_steps", "4")]
    outs = [finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    for r, out in enumerate(outs):
        assert f"nnodes=2, num_local_procs=1, node_rank={r}" in out, out[-4000:]
        assert "dist_world_size=2" in out
        assert f"--no_ssh --node_rank {r}" in out
        assert rank_lines(out) == {r: (2, r, rank_lines(out)[r][2])}, out[-4000:]  # rank r of 2, on node r
    assert engine_done(outs[0], 4)
    assert len(zero_shards(out_dir / "checkpoints" / "global_step4")) == 2


# ------------------------------------------------------------------------------------------------ d. failure
LONG_RUN = ["--train.max_steps", "100000", "--checkpoint.every_steps", "2", "--checkpoint.keep_last", "2"]


def kill_a_rank_and_wait(procs, out_dir: Path, world: int = 2) -> float:
    """Once a checkpoint exists, SIGKILL rank 1; return how long the launchers took to end (each must fail)."""
    latest = out_dir / "checkpoints" / "latest"
    wait_for(latest.is_file, RUN_TIMEOUT_S, procs, "the first checkpoint")
    ranks = wait_for(lambda: (r := rank_processes(str(out_dir))) and len(r) == world and r, 30, procs,
                     f"{world} rank processes")
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.monotonic()
    deadline = t0 + KILL_DEADLINE_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"the job did not end within {KILL_DEADLINE_S} s of a rank being killed")
    elapsed = time.monotonic() - t0
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode != 0, f"launcher exited 0 although rank 1 was killed:\n{out[-4000:]}"
    # Nothing of the run may survive it.
    assert wait_for(lambda: not rank_processes(str(out_dir)), 15, (), "the ranks to disappear")
    return elapsed


def assert_last_checkpoint_complete(out_dir: Path, world: int = 2):
    root = out_dir / "checkpoints"
    tag = (root / "latest").read_text().strip()
    assert re.fullmatch(r"global_step\d+", tag)
    ckpt = root / tag
    assert (ckpt / "mp_rank_00_model_states.pt").is_file()
    assert len(zero_shards(ckpt)) == world
    assert (ckpt / "config.json").is_file()
    return int(tag[len("global_step"):])


def test_rank_killed_local_launcher_then_resume(tmp_path, port):
    out_dir = tmp_path / "run"
    args = ("--master_port", port, "--nproc_per_node", "2", "--")
    proc = start(launch_cmd(*args, *ENGINE_FAST, "--output_dir", out_dir, *LONG_RUN), base_env())
    kill_a_rank_and_wait([proc], out_dir)
    assert not shm_files(port)
    step = assert_last_checkpoint_complete(out_dir)
    # The last good checkpoint resumes: same command with --resume auto, a few steps further.
    rc, out = run(launch_cmd(*args, *ENGINE_FAST, "--output_dir", out_dir, "--resume", "auto",
                             "--train.max_steps", str(step + 2), "--checkpoint.every_steps", "2"), base_env())
    assert rc == 0, out[-6000:]
    assert f"[engine] resumed from {out_dir / 'checkpoints' / f'global_step{step}'} at step {step}" in out, \
        out[-6000:]
    assert engine_done(out, step + 2)
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{step + 2}"


def test_rank_killed_pdsh(sshd, tmp_path, port):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out_dir = tmp_path / "run"
    proc = start(launch_cmd("--hostfile", hostfile, "--launcher", "pdsh", "--master_addr", "127.0.0.1",
                            "--master_port", port, "--", *ENGINE_FAST, "--output_dir", out_dir, *LONG_RUN),
                 sshd["env"])
    kill_a_rank_and_wait([proc], out_dir)
    assert not shm_files(port)
    assert_last_checkpoint_complete(out_dir)


def test_rank_killed_mpirun(tmp_path, port):
    out_dir = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl_tcp_if_include", "lo",
           "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "PATH", "-x", "DS_ACCELERATOR", "-x", "MASTER_PORT",
           PY, "-m", "engine.train", *ENGINE_FAST, "--output_dir", out_dir, *LONG_RUN]
    proc = start(cmd, base_env(MASTER_PORT=str(port)))
    kill_a_rank_and_wait([proc], out_dir)
    assert not shm_files(port)
    assert_last_checkpoint_complete(out_dir)


def test_rank_killed_nossh(tmp_path, port):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out_dir = tmp_path / "run"
    procs = [start(c, base_env()) for c in nossh_cmds(hostfile, port, out_dir, *LONG_RUN)]
    kill_a_rank_and_wait(procs, out_dir)
    assert not shm_files(port)
    assert_last_checkpoint_complete(out_dir)


# ------------------------------------------------------------------------------------------------ e. 2 -> 1 rank
def test_resume_on_fewer_ranks_via_universal_checkpoint(tmp_path, port):
    out_dir = tmp_path / "run"
    rc, out = run(launch_cmd("--master_port", port, "--nproc_per_node", "2", "--", *ENGINE_FAST, "--output_dir",
                             out_dir, "--train.max_steps", "4", "--checkpoint.every_steps", "4"), base_env())
    assert rc == 0, out[-6000:]
    root = out_dir / "checkpoints"
    assert len(zero_shards(root / "global_step4")) == 2
    # A ZeRO-2 checkpoint of 2 ranks does not load on 1 rank as it is; convert it (README, "Running on a cluster").
    r = subprocess.run([PY, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", root / "global_step4",
                        "--output_folder", root / "global_step4_universal", "--num_extract_workers", "1",
                        "--num_merge_workers", "1", "--inject_missing_state"],
                       env=base_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (root / "global_step4_universal" / "zero").is_dir()
    assert (root / "latest_universal").read_text().strip() == "global_step4_universal"

    rc, out = run(launch_cmd("--master_port", port, "--nproc_per_node", "1", "--", *ENGINE_FAST, "--output_dir",
                             out_dir, "--resume", str(root / "global_step4_universal"), "--checkpoint.universal",
                             "true", "--train.max_steps", "6", "--checkpoint.every_steps", "2"), base_env())
    assert rc == 0, out[-6000:]
    assert "resuming on 1 ranks from a 2-rank checkpoint" in out, out[-6000:]
    assert re.search(r"\[engine\] resumed from \S+global_step4_universal at step 4", out), out[-6000:]
    assert engine_done(out, 6)
    # The continued run saved on one rank: a single ZeRO partition.
    assert zero_shards(root / "global_step6") == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
