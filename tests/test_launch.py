"""The pod launcher against a fake ``gcloud`` whose "workers" are local shells.

The fake (written into ``tmp_path``) answers ``tpu-vm describe`` from files in its root and runs
``tpu-vm ssh --worker=I --command=C`` as ``bash -c C`` with ``HOME=<root>/worker-I`` and a bare
environment (as ssh would: nothing of the launching machine's environment arrives except what
the launcher sends). Every call's argv is appended to ``calls.log``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from torchxla_rlhf.errors import EXIT_PREEMPTED
from torchxla_rlhf.launch import (
    Launcher,
    LaunchError,
    command_string,
    parse_args,
    parse_env,
    remote_path,
    with_resume_auto,
)

REPO = Path(__file__).resolve().parents[1]

FAKE_GCLOUD = r'''#!{python}
import json, os, subprocess, sys
root = os.environ["FAKE_GCLOUD_ROOT"]
with open(os.path.join(root, "calls.log"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb = args[3]
def read(name, default):
    p = os.path.join(root, name)
    return open(p).read().strip() if os.path.exists(p) else default
state = read("state", "READY")
if verb == "describe":
    if state != "READY":
        # PREEMPTED (or DELETED) for as many describes as "preempted_polls" says, then READY
        # again; a deleted node comes back as a new VM (another createTime).
        left = int(read("preempted_polls", "0"))
        if left <= 0:
            if state == "DELETED":
                created = int(read("created", "0")) + 1
                open(os.path.join(root, "created"), "w").write(str(created))
            state = "READY"
            open(os.path.join(root, "state"), "w").write("READY")
        else:
            open(os.path.join(root, "preempted_polls"), "w").write(str(left - 1))
    if state == "DELETED":
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
              "'projects/p/locations/z/nodes/t' was not found", file=sys.stderr)
        sys.exit(1)
    n = int(read("workers", "2"))
    print(json.dumps({"state": state, "createTime": "t" + read("created", "0"),
                      "networkEndpoints": [{"ipAddress": f"10.0.0.{i}"} for i in range(n)]}))
    sys.exit(0)
if verb == "ssh":
    worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    if state != "READY":
        print("ssh: connect to host: Connection refused", file=sys.stderr)
        sys.exit(255)
    home = os.path.join(root, f"worker-{worker}")
    env = {"HOME": home, "PATH": os.environ["PATH"], "FAKE_GCLOUD_ROOT": root, "FAKE_WORKER": worker}
    sys.exit(subprocess.run(["bash", "-c", command], env=env, cwd=home).returncode)
sys.exit(f"fake gcloud: unknown verb {verb}")
'''

# The "training" command: records its arguments and environment per worker, then behaves as
# the test's BEHAVIOUR file says for this worker.
WORKER_SCRIPT = textwrap.dedent('''
    import os, sys, time, pathlib
    root = pathlib.Path(os.environ["FAKE_GCLOUD_ROOT"]); w = os.environ["FAKE_WORKER"]
    with open(root / f"ran-{w}.txt", "a") as f:
        f.write(" ".join(sys.argv[1:]) + " | token=" + os.environ.get("HF_TOKEN", "-")
                + " extra=" + os.environ.get("EXTRA", "-") + " pjrt=" + os.environ.get("PJRT_DEVICE", "-") + "\\n")
    print(f"worker {w} says hello", flush=True)
    (root / f"trainer-{w}.pid").write_text(str(os.getpid()))
    mode = (root / "behaviour").read_text().split()[int(w)]
    if mode == "ok":
        sys.exit(0)
    if mode == "fail":
        time.sleep(0.5); sys.exit(3)
    if mode == "hang":
        time.sleep(600)
    if mode == "stubborn":  # a trainer stuck in a collective: SIGTERM does not end it
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    if mode == "saves":  # a trainer that saves on SIGTERM and exits with the preemption code
        import signal
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
        time.sleep(600)
    if mode == "delete-once":
        # Worker 0 plays the node's deletion once worker 1 runs: worker 1's processes die with
        # the VM, describe answers NOT_FOUND twice, then a new VM is READY.
        if "resume_from=auto" in sys.argv:
            sys.exit(0)
        if w != "0":
            time.sleep(600)
        deadline = time.time() + 60
        while not (root / "ran-1.txt").exists() and time.time() < deadline:
            time.sleep(0.1)
        run1 = root / "worker-1" / ".torchxla_rlhf" / "runs" / "r1"
        for name in ("trainer.pgid", "pid"):
            try:
                os.killpg(int((run1 / name).read_text()), 9)
            except (FileNotFoundError, ProcessLookupError):
                pass
        (root / "preempted_polls").write_text("2"); (root / "state").write_text("DELETED")
        sys.exit(143)
    if mode == "preempt-once":
        # Worker 0 plays the maintenance event once worker 1 runs: worker 1's VM goes away
        # (its process group is killed), the TPU reads PREEMPTED for two describes.
        if "resume_from=auto" in sys.argv:
            sys.exit(0)
        if w != "0":
            time.sleep(600)
        deadline = time.time() + 60
        while not (root / "ran-1.txt").exists() and time.time() < deadline:
            time.sleep(0.1)
        pid_file = root / "worker-1" / ".torchxla_rlhf" / "runs" / "r1" / "pid"
        os.killpg(int(pid_file.read_text()), 9)
        (root / "preempted_polls").write_text("2"); (root / "state").write_text("PREEMPTED")
        sys.exit(143)
''')


@pytest.fixture
def pod(tmp_path):
    """A fake two-worker pod: each worker has a clone of one git repository."""
    root = tmp_path / "pod"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
    gcloud.chmod(0o755)
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "work.py").write_text(WORKER_SCRIPT)
    # The install: longer than an ssh call may take (--ssh-timeout in the tests that set up).
    (origin / "launch").mkdir()
    (origin / "launch" / "setup_tpu_vm.sh").write_text(
        'sleep "$(cat "$FAKE_GCLOUD_ROOT/setup_seconds" 2>/dev/null || echo 0)"\n'
        'echo set up >> "$FAKE_GCLOUD_ROOT/setup-$FAKE_WORKER.txt"\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(origin)], check=True)
    subprocess.run(git + ["-C", str(origin), "add", "."], check=True)
    subprocess.run(git + ["-C", str(origin), "commit", "-qm", "x"], check=True)
    for w in range(2):
        (root / f"worker-{w}").mkdir()
        subprocess.run(["git", "clone", "-q", str(origin), str(root / f"worker-{w}" / "torchxla_rlhf")],
                       check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    env.update(FAKE_GCLOUD_ROOT=str(root), PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(REPO))
    return root, env


def launch(env, *args, timeout=120):
    cmd = [sys.executable, "-m", "torchxla_rlhf.launch", "--tpu", "t", "--zone", "z",
           "--poll-interval", "0.5", "--kill-grace", "3", "--run-id", "r1", *args,
           "--", sys.executable, "work.py", "output_dir=gs://b/run"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ran(root: Path, w: int) -> list[str]:
    p = root / f"ran-{w}.txt"
    return p.read_text().splitlines() if p.exists() else []


def test_runs_everywhere_streams_worker0_and_keeps_secrets_off_command_lines(pod):
    root, env = pod
    (root / "behaviour").write_text("ok ok")
    env["HF_TOKEN"] = "s3cret-token"
    r = launch(dict(env, EXTRA_LOCAL="v"), "--env", "EXTRA=x y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worker 0 says hello" in r.stdout  # worker 0's log streamed here
    for w in range(2):
        (line,) = ran(root, w)
        assert line == "output_dir=gs://b/run | token=s3cret-token extra=x y pjrt=TPU"
        log = root / f"worker-{w}" / ".torchxla_rlhf" / "runs" / "r1" / f"worker-{w}.log"
        assert f"worker {w} says hello" in log.read_text()
    calls = (root / "calls.log").read_text()
    assert "s3cret-token" not in calls and "x y" not in calls
    assert "s3cret-token" not in r.stdout + r.stderr
    # ~ in the repository path reaches the worker unexpanded: "$HOME" is the worker's home.
    assert '\\"$HOME\\"/torchxla_rlhf' in calls and str(Path.home()) + "/torchxla_rlhf" not in calls


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (not yet reaped by its wrapper) counts as gone: it holds nothing.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def trainer_pid(root: Path, w: int) -> int:
    return int((root / f"trainer-{w}.pid").read_text())


def test_a_failing_worker_stops_the_others(pod):
    root, env = pod
    (root / "behaviour").write_text("hang fail")
    t0 = time.monotonic()
    r = launch(env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "worker 1 exited with code 3" in r.stdout
    assert time.monotonic() - t0 < 60
    # Worker 0's trainer (not just its wrapper) is gone, and its exit status was recorded.
    assert gone(trainer_pid(root, 0))
    assert "exit codes: worker 0: 143, worker 1: 3" in r.stdout


def test_a_trainer_ignoring_sigterm_is_killed_after_the_grace_period(pod):
    root, env = pod
    (root / "behaviour").write_text("stubborn fail")
    t0 = time.monotonic()
    r = launch(env)  # --kill-grace 3
    assert r.returncode == 3, r.stdout + r.stderr
    assert "still running 3s after SIGTERM: SIGKILL" in r.stdout
    assert gone(trainer_pid(root, 0))
    assert "exit codes: worker 0: 137, worker 1: 3" in r.stdout
    assert time.monotonic() - t0 < 60


def test_exit_codes_are_recorded_after_a_stop(pod):
    root, env = pod
    (root / "behaviour").write_text("saves fail")
    r = launch(env)
    assert r.returncode == 3, r.stdout + r.stderr
    # Worker 0 saved on SIGTERM and exited with the preemption code: recorded, not "lost".
    assert f"exit codes: worker 0: {EXIT_PREEMPTED}, worker 1: 3" in r.stdout
    rc0 = root / "worker-0" / ".torchxla_rlhf" / "runs" / "r1" / "rc"
    assert rc0.read_text().strip() == str(EXIT_PREEMPTED)
    assert gone(trainer_pid(root, 0))


def test_a_setup_longer_than_an_ssh_call_succeeds(pod):
    """The install has its own timeout: here 4 s of "installing" against 1.5 s per ssh call
    (the defaults: an hour against two minutes)."""
    root, env = pod
    (root / "behaviour").write_text("ok ok")
    (root / "setup_seconds").write_text("4")
    r = launch(env, "--setup", "--ssh-timeout", "1.5", "--setup-timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [len(ran(root, w)) for w in range(2)] == [1, 1]
    assert (root / "setup-0.txt").exists() and (root / "setup-1.txt").exists()
    defaults = parse_args(["--tpu", "t", "--zone", "z", "--", "true"], {})
    assert defaults.setup_timeout >= 30 * 60 and defaults.ssh_timeout < defaults.setup_timeout


def test_a_too_long_setup_fails_naming_the_timeout(pod):
    root, env = pod
    (root / "behaviour").write_text("ok ok")
    (root / "setup_seconds").write_text("30")
    r = launch(env, "--setup", "--setup-timeout", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "setup failed on worker(s) [0, 1]" in r.stderr and "timed out after 1s" in r.stderr


def test_a_deleted_node_is_reported_as_deleted(pod):
    root, env = pod
    (root / "behaviour").write_text("delete-once delete-once")
    r = launch(env)
    assert r.returncode == EXIT_PREEMPTED, r.stdout + r.stderr
    assert "TPU t was deleted" in r.stdout and "NOT_FOUND" in r.stdout


def test_relaunch_on_a_recreated_node_sets_it_up_first(pod):
    root, env = pod
    (root / "behaviour").write_text("delete-once delete-once")
    r = launch(env, "--restart-on-preemption")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "was deleted" in r.stdout and "(recreated)" in r.stdout
    for w in range(2):
        assert (root / f"setup-{w}.txt").read_text().count("set up") == 1  # only after recreation
        first, second = ran(root, w)
        assert "resume_from=auto" in second


def test_a_failing_describe_is_not_read_as_preemption(tmp_path):
    from torchxla_rlhf.launch import Launcher, TpuState

    class FlakyPod:
        def state(self):
            return TpuState("UNKNOWN", "gcloud: network unreachable")

    lines: list[str] = []
    opts = parse_args(["--tpu", "t", "--zone", "z", "--", "true"], {})
    launcher = Launcher(opts, pod=FlakyPod(), echo=lines.append)
    assert launcher._preempted_state() is False
    assert "cannot tell whether TPU t was preempted: gcloud: network unreachable" in lines[0]


def test_preemption_restarts_with_resume_auto(pod):
    root, env = pod
    (root / "behaviour").write_text("preempt-once preempt-once")
    r = launch(env, "--restart-on-preemption")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PREEMPTED" in r.stdout and "relaunching" in r.stdout
    for w in range(2):
        first, second = ran(root, w)
        assert "resume_from=auto" not in first
        assert second.startswith("output_dir=gs://b/run resume_from=auto |")


@pytest.mark.slow
def test_preemption_without_restart_exits_with_the_preemption_code(pod):
    root, env = pod
    (root / "behaviour").write_text("preempt-once preempt-once")
    r = launch(env)
    assert r.returncode == EXIT_PREEMPTED, r.stdout + r.stderr
    assert [len(ran(root, w)) for w in range(2)] == [1, 1]


def test_workers_on_different_commits_are_refused(pod):
    root, env = pod
    (root / "behaviour").write_text("ok ok")
    repo1 = root / "worker-1" / "torchxla_rlhf"
    (repo1 / "work.py").write_text((repo1 / "work.py").read_text() + "\n# changed\n")
    subprocess.run(["git", "-C", str(repo1), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qam", "y"], check=True)
    r = launch(env)
    assert r.returncode == 2
    assert "different commits" in r.stderr and "worker 1" in r.stderr
    assert not ran(root, 0) and not ran(root, 1)


@pytest.mark.slow
def test_ctrl_c_stops_every_worker(pod):
    root, env = pod
    (root / "behaviour").write_text("hang hang")
    cmd = [sys.executable, "-m", "torchxla_rlhf.launch", "--tpu", "t", "--zone", "z",
           "--poll-interval", "0.5", "--kill-grace", "3", "--run-id", "r1",
           "--", sys.executable, "work.py"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(ran(root, 0)) + len(ran(root, 1)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    assert "exit codes: worker 0: 143, worker 1: 143" in out
    for w in range(2):
        wrapper = int((root / f"worker-{w}" / ".torchxla_rlhf" / "runs" / "r1" / "pid").read_text())
        assert gone(trainer_pid(root, w)) and gone(wrapper)


def test_dry_run_prints_the_commands(pod):
    root, env = pod
    r = launch(env, "--dry-run", "--setup", "--project", "p", "--restart-on-preemption")
    assert r.returncode == 0, r.stderr
    assert "gcloud compute tpus tpu-vm describe t --zone=z --project=p --format=json" in r.stdout
    assert "launch/setup_tpu_vm.sh" in r.stdout and "nohup setsid" in r.stdout
    assert "resume_from=auto" in r.stdout
    assert not (root / "calls.log").exists()  # nothing ran


def test_argument_rules():
    assert command_string(["python", "-m", "x", "a b"]) == "python -m x 'a b'"
    assert command_string(["cd x && python y"]) == "cd x && python y"
    with pytest.raises(LaunchError, match="no command"):
        command_string([])
    assert with_resume_auto("python t.py resume_from=gs://x/c a=1") == "python t.py a=1 resume_from=auto"
    assert with_resume_auto("python t.py") == "python t.py resume_from=auto"
    assert remote_path("~/r") == '"$HOME"/r' and remote_path("/abs path") == "'/abs path'"
    env = parse_env(["A=1", "B"], {"B": "2", "HF_TOKEN": "t"})
    assert env["A"] == "1" and env["B"] == "2" and env["HF_TOKEN"] == "t" and env["PJRT_DEVICE"] == "TPU"
    with pytest.raises(LaunchError, match="not set"):
        parse_env(["MISSING"], {})
    with pytest.raises(LaunchError, match="newline"):
        parse_env(["A=1\n2"], {})
    opts = parse_args(["--tpu", "t", "--zone", "z", "--", "echo", "hi"], {})
    assert opts.command == "echo hi" and opts.repo_dir == "~/torchxla_rlhf"


def test_help_gives_every_flag_a_help_text_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"], {})
    assert e.value.code == 0
    out = capsys.readouterr().out
    body = out[out.index("options:"):]
    entries = re.split(r"\n  (?=-)", body)[1:]  # one per option, its help wrapped under it
    flags = {m.group(1): " ".join(entry.split()) for entry in entries
             if (m := re.match(r"(--[\w-]+)", entry))}
    assert {"--tpu", "--zone", "--project", "--env", "--setup", "--repo-url", "--repo-dir",
            "--restart-on-preemption", "--dry-run", "--workers", "--run-id", "--poll-interval",
            "--kill-grace", "--preemption-timeout", "--max-restarts"} <= set(flags)
    for flag, text in flags.items():
        described = text.split(None, 1)[1] if text.count(" ") else ""
        assert len(described) > 20, (flag, text)  # a help text, not just the metavar
        if flag not in ("--tpu", "--zone"):  # required: no default
            assert "(default: " in text, (flag, text)
    assert "(default: 30.0)" in flags["--poll-interval"] and "(default: off)" in flags["--setup"]


def test_dry_run_prints_every_worker_or_says_how_they_differ():
    opts = parse_args(["--tpu", "t", "--zone", "z", "--dry-run", "--run-id", "r", "--", "true"], {})
    lines = Launcher(opts).dry_run()
    assert all("--worker=0" in line for line in lines if "ssh" in line and not line.startswith("#"))
    assert "gets the same commands with --worker=I" in lines[-1]
    opts = parse_args(["--tpu", "t", "--zone", "z", "--dry-run", "--workers", "3", "--run-id", "r",
                       "--", "true"], {})
    lines = Launcher(opts).dry_run(opts.dry_run_workers)
    starts = [line for line in lines if "nohup setsid" in line]
    assert [("--worker=%d" % i) in s and f"worker-{i}.log" in s for i, s in enumerate(starts)] == [True] * 3
    assert not any("--worker=I" in line for line in lines)
    with pytest.raises(SystemExit):
        parse_args(["--tpu", "t", "--zone", "z", "--workers", "3", "--", "true"], {})


def _libtpu_so() -> str | None:
    """The pinned libtpu's shared library: installed, or unpacked from the wheel
    (``pip download --no-deps libtpu==<torch_xla[tpu]'s pin>``) into TORCHXLA_RLHF_LIBTPU_SO."""
    from torchxla_rlhf.libtpu_flags import libtpu_library

    path = os.environ.get("TORCHXLA_RLHF_LIBTPU_SO") or libtpu_library()
    return path if path and os.path.isfile(path) else None


@pytest.mark.skipif(_libtpu_so() is None, reason="no libtpu.so here: install libtpu (torch_xla[tpu]) "
                    "or set TORCHXLA_RLHF_LIBTPU_SO to one unpacked from its wheel")
def test_default_libtpu_flags_exist_in_the_pinned_libtpu():
    from torchxla_rlhf.launch import SEED_LIBTPU_INIT_ARGS
    from torchxla_rlhf.libtpu_flags import filter_init_args

    kept, dropped = filter_init_args(SEED_LIBTPU_INIT_ARGS, _libtpu_so())
    assert dropped == [] and kept == SEED_LIBTPU_INIT_ARGS
    # The seed's flags that 2.9's libtpu no longer defines (the first is only a reserved
    # protobuf field name there), a made-up one, a stray word, a prefix of a real flag.
    kept, dropped = filter_init_args(
        "--xla_tpu_spmd_rewrite_einsum_with_reshape=true --xla_no_such_flag_anywhere=1 "
        "TPU_MEGACORE=MEGACORE_DENSE --xla_tpu_enable_latency_hiding=true "
        "--xla_tpu_enable_latency_hiding_scheduler=true", _libtpu_so())
    assert kept == "--xla_tpu_enable_latency_hiding_scheduler=true"
    assert len(dropped) == 4


def test_unknown_libtpu_flags_are_dropped_with_a_warning(tmp_path, monkeypatch, caplog):
    from torchxla_rlhf import libtpu_flags

    lib = tmp_path / "libtpu.so"
    lib.write_bytes(b"\0\x7fELF\0xla_known_flag\0R(xla_gone\0xla_gone_too_long\0")
    monkeypatch.setattr(libtpu_flags, "libtpu_library", lambda: str(lib))
    env = {"LIBTPU_INIT_ARGS": "--xla_known_flag=1 --xla_gone=2 --gone_too_long MEGACORE"}
    with caplog.at_level("WARNING"):
        assert libtpu_flags.drop_unknown_init_args(env) == ["--xla_gone=2", "--gone_too_long", "MEGACORE"]
    assert env["LIBTPU_INIT_ARGS"] == "--xla_known_flag=1"
    assert "dropping '--xla_gone=2'" in caplog.text
    monkeypatch.setattr(libtpu_flags, "libtpu_library", lambda: None)  # XLA:CPU: untouched
    env = {"LIBTPU_INIT_ARGS": "--anything"}
    assert libtpu_flags.drop_unknown_init_args(env) == [] and env["LIBTPU_INIT_ARGS"] == "--anything"
