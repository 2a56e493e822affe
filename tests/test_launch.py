"""launch.sh and engine/hostfile.py: validation before anything starts, --help, and the printed command.

Fast (no training): every case runs the real script or module in a subprocess and reads what it prints.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import hostfile as hf

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


def check_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine.hostfile", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def launch(*args, cwd=None, **env):
    return subprocess.run(["bash", str(LAUNCH), *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=60, env=_env(**env))


def write(tmp_path, text, name="hostfile"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------------------------------ hostfile module
BAD_HOSTFILES = {
    "malformed": ("node-1 slots=2\nnode-2 slot=2\n", r"hostfile:2: malformed line 'node-2 slot=2'"),
    "no_slots": ("node-1\n", r"hostfile:1: malformed line 'node-1'"),
    "trailing_junk": ("node-1 slots=2 extra\n", r"hostfile:1: malformed line"),
    "slots_zero": ("node-1 slots=0\n", r"hostfile:1: host 'node-1' has slots=0; slots must be >= 1"),
    "slots_negative": ("node-1 slots=-1\n", r"hostfile:1: slots must be a whole number >= 1"),
    "slots_not_number": ("node-1 slots=two\n", r"hostfile:1: slots must be a whole number >= 1"),
    "duplicate": ("node-1 slots=1\n# c\nnode-1 slots=2\n",
                  r"hostfile:3: duplicate host 'node-1' \(first listed on line 1\)"),
    "semicolon": ("node-1;reboot slots=1\n", r"hostfile:1: invalid host name 'node-1;reboot'"),
    "subshell": ("$(touch${IFS}/tmp/x) slots=1\n", r"invalid host name"),
    "backtick": ("`id` slots=1\n", r"invalid host name '`id`'"),
    "pipe": ("a|b slots=1\n", r"invalid host name 'a\|b'"),
    "ampersand": ("a&b slots=1\n", r"invalid host name 'a&b'"),
    "option_like": ("-oProxyCommand=x slots=1\n", r"invalid host name '-oProxyCommand=x'"),
    "bad_ipv4": ("10.0.0.300 slots=1\n", r"invalid host name '10.0.0.300'"),
    "label_too_long": ("a" * 64 + " slots=1\n", r"invalid host name"),
    "empty": ("# only a comment\n\n", r"hostfile: no hosts"),
}


@pytest.mark.parametrize("case", sorted(BAD_HOSTFILES))
def test_bad_hostfile_is_one_line_error(tmp_path, case):
    text, pattern = BAD_HOSTFILES[case]
    path = write(tmp_path, text)
    r = check_cli("check", path)
    assert r.returncode == 2, r
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_missing_hostfile(tmp_path):
    r = check_cli("check", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: hostfile not found: {tmp_path / 'nope'}"


@pytest.mark.parametrize("flag,spec,pattern", [
    ("--include", "node-3", r"--include: unknown host 'node-3', not in the hostfile \(hosts: node-1, 10.0.0.2\)"),
    ("--exclude", "node-1@ghost", r"--exclude: unknown host 'ghost'"),
    ("--include", "node-1:4", r"--include: host 'node-1' has slots 0..3, no slot 4"),
    ("--include", "node-1:x", r"slot 'x' on 'node-1' is not a number"),
    ("--include", "node-1@", r"empty node entry"),
    ("--exclude", "node-1;id", r"invalid host name 'node-1;id'"),
    ("--exclude", "node-1@10.0.0.2", r"--exclude leaves no host to run on"),
])
def test_bad_filter_is_one_line_error(tmp_path, flag, spec, pattern):
    path = write(tmp_path, "node-1 slots=4\n10.0.0.2 slots=2\n")
    r = check_cli("check", path, flag, spec)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr


def test_include_and_exclude_together(tmp_path):
    path = write(tmp_path, "a slots=1\nb slots=1\n")
    r = check_cli("check", path, "--include", "a", "--exclude", "b")
    assert r.returncode == 2 and "mutually exclusive" in r.stderr


def test_node_rank_out_of_range(tmp_path):
    path = write(tmp_path, "a slots=1\nb slots=1\n")
    r = check_cli("check", path, "--node_rank", "2")
    assert r.returncode == 2 and "--node_rank 2 is out of range" in r.stderr and "0..1" in r.stderr


def test_good_hostfile_summary(tmp_path):
    path = write(tmp_path, "# cluster\nworker-0 slots=4   # big one\n\n10.1.2.3 slots=2\nw2.example.org slots=1\n")
    r = check_cli("check", path, "--exclude", "worker-0:0,1", "--node_rank", "1")
    assert r.returncode == 0, r.stderr
    got = dict(line.split("=", 1) for line in r.stdout.split())
    assert got == {"nodes": "3", "procs": "5", "max_slots": "2", "first_host": "worker-0",
                   "hosts": "worker-0,10.1.2.3,w2.example.org", "node_host": "10.1.2.3", "node_slots": "2"}


def test_filter_keeps_hostfile_order():
    hosts = hf.parse_hostfile(["a slots=2", "b slots=3", "c slots=1"])
    assert list(hf.apply_filter(hosts, include="c@a:1")) == ["a", "c"]
    assert hf.apply_filter(hosts, include="c@a:1")["a"] == [1]
    assert hf.apply_filter(hosts, exclude="b:0,2") == {"a": [0, 1], "b": [1], "c": [0]}


@pytest.mark.parametrize("name,ok", [
    ("localhost", True), ("node-01", True), ("gpu01.cluster.local", True), ("127.0.0.2", True),
    ("fqdn.example.", True), ("", False), ("-x", False), ("a_b", False), ("a b", False), ("a;b", False),
    ("::1", False), ("1.2.3", False), ("256.1.1.1", False), ("a..b", False), ("x" * 254, False),
])
def test_is_valid_host(name, ok):
    assert hf.is_valid_host(name) is ok


# ------------------------------------------------------------------------------------------ launch.sh
def test_help_documents_every_option():
    r = launch("--help")
    assert r.returncode == 0
    for opt in ["--nproc_per_node", "--hostfile", "--include", "--exclude", "--num_nodes", "--master_addr",
                "--master_port", "--launcher", "pdsh", "openmpi", "mpich", "slurm", "nossh", "--node_rank",
                "--launcher_args", "--ssh_port", "--train_module", "--dry_run", "OMP_NUM_THREADS", "DS_ENV_FILE",
                "/dev/shm/deepspeed_allreduce_buffer_"]:
        assert opt in r.stdout, opt
    assert launch("-h").stdout == r.stdout


def command_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, stdout
    return lines[0][2:]


def test_dry_run_main_job():
    r = launch("--dry_run", "--master_port", "29517")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert re.fullmatch(r"deepspeed --num_gpus 2 --master_port 29517 --module engine\.train --task "
                        r"image_classification --output_dir runs/digits_vit_rdrop_\d{8}_\d{6} --ds_config "
                        r"ds_configs/zero2\.json", cmd), cmd
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"OMP_NUM_THREADS={threads}" in r.stdout


def test_dry_run_picks_a_port_when_none_given():
    cmd = command_line(launch("--dry_run").stdout)
    port = int(re.search(r"--master_port (\d+)", cmd).group(1))
    assert 1 <= port <= 65535


def test_engine_args_keep_defaults_for_missing_required_flags():
    r = launch("--dry_run", "--master_port", "29517", "--", "--task.model", "tiny", "--output_dir", "runs/x y")
    cmd = command_line(r.stdout)
    assert cmd.endswith("--module engine.train --task image_classification --ds_config ds_configs/zero2.json "
                        r"--task.model tiny --output_dir runs/x\ y"), cmd
    r = launch("--dry_run", "--master_port", "29517", "--", "--task=image_classification", "--ds_config=z.json",
               "--output_dir", "o")
    assert command_line(r.stdout).endswith("--module engine.train --task=image_classification --ds_config=z.json "
                                           "--output_dir o")


def test_user_omp_num_threads_is_kept():
    r = launch("--dry_run", "--master_port", "29517", OMP_NUM_THREADS="3")
    assert r.returncode == 0 and "launch.sh: OMP_NUM_THREADS=" not in r.stdout, r.stdout


def test_dry_run_hostfile_launchers(tmp_path):
    path = write(tmp_path, "n1 slots=2\nn2 slots=2\n")
    r = launch("--dry_run", "--hostfile", path, "--launcher", "openmpi", "--launcher_args",
               "--allow-run-as-root --oversubscribe", "--bind_cores_to_rank", "--", "--output_dir", "o")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout)
    assert cmd.startswith(f"deepspeed --hostfile {path} --master_port 29500 --launcher openmpi --force_multi "
                          r"--no_ssh_check --master_addr n1 --launcher_args=--allow-run-as-root\ --oversubscribe "
                          "--bind_cores_to_rank --module engine.train"), cmd
    r = launch("--dry_run", "--hostfile", path, "--include", "n2:1", "--master_addr", "10.0.0.1")
    cmd = command_line(r.stdout)
    assert f"--hostfile {path} --include n2:1 --master_addr 10.0.0.1 --master_port 29500 --module" in cmd
    r = launch("--dry_run", "--hostfile", path, "--launcher", "nossh", "--node_rank", "1", "--master_addr",
               "10.0.0.1", "--", "--output_dir", "/shared/run1")
    cmd = command_line(r.stdout)
    assert "--master_addr 10.0.0.1 --master_port 29500 --no_ssh --node_rank 1 --module engine.train" in cmd
    assert "OMP_NUM_THREADS=" in r.stdout  # 2 slots on node 1


@pytest.mark.parametrize("args,message", [
    (["--launcher", "nossh"], "--launcher nossh needs --node_rank"),
    (["--launcher", "ssh"], "--launcher must be one of pdsh, openmpi, mpich, slurm, nossh"),
    (["--node_rank", "1"], "--node_rank is only meaningful with --launcher nossh"),
    (["--nproc_per_node", "0"], "--nproc_per_node must be an integer >= 1"),
    (["--master_port", "70000"], "--master_port must be a port number"),
    (["--master_addr", "a;reboot"], "--master_addr: invalid host name 'a;reboot'"),
    (["--hostfile", "/nonexistent/hosts"], "hostfile not found: /nonexistent/hosts"),
    (["--include", "a"], "--include/--exclude need --hostfile"),
    (["--launcher", "openmpi"], "--launcher openmpi needs --hostfile"),
    (["stray"], "unexpected argument 'stray'"),
    (["--launcher", "slurm"], "--launcher slurm: DeepSpeed 0.19.8's slurm runner drops '-m'"),
    (["--hostfile"], "--hostfile needs a value"),
])
def test_launch_rejects_bad_options(args, message):
    r = launch(*args)  # no --dry_run: it must stop before starting anything
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.sh: error: ") and message in lines[0], r.stderr
    assert "+ deepspeed" not in r.stdout


@pytest.mark.parametrize("text,args,message", [
    ("a slots=1\na slots=1\n", [], "duplicate host 'a'"),
    ("a slots=0\n", [], "slots must be >= 1"),
    ("a slots 1\n", [], "malformed line 'a slots 1'"),
    ("a$(id) slots=1\n", [], "invalid host name 'a$(id)'"),
    ("a slots=1\nb slots=1\n", ["--include", "c"], "--include: unknown host 'c'"),
    ("a slots=1\nb slots=1\n", ["--exclude", "c"], "--exclude: unknown host 'c'"),
    ("a slots=1\nb slots=1\n", ["--launcher", "nossh", "--node_rank", "5", "--master_addr", "a"],
     "--node_rank 5 is out of range"),
    ("a slots=1\nb slots=1\n", ["--launcher", "nossh", "--node_rank", "0", "--master_addr", "a"],
     "pass the same --output_dir on every node"),
    ("a slots=1\nb slots=1\n", ["--launcher", "nossh", "--node_rank", "0"], "needs --master_addr"),
    ("a slots=1\nb slots=1\n", ["--launcher", "openmpi", "--include", "a"], "does not support --include"),
])
def test_launch_rejects_bad_hostfile(tmp_path, text, args, message):
    path = write(tmp_path, text)
    r = launch("--hostfile", path, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.sh: error: ") and message in lines[0], r.stderr
    assert "+ deepspeed" not in r.stdout


def test_launch_from_another_directory_finds_the_engine(tmp_path):
    r = launch("--dry_run", "--master_port", "29517", cwd=tmp_path)
    cmd = command_line(r.stdout)
    assert f"--ds_config {REPO}/ds_configs/zero2.json" in cmd
    assert not list(tmp_path.iterdir())  # a dry run leaves nothing behind
