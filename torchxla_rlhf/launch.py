"""``python -m torchxla_rlhf.launch``: run one command on every worker of a TPU pod.

What torch_xla's removed ``xla_dist`` did, the PJRT way (one process per host; PJRT finds the
topology, so the command is the same everywhere)::

    python -m torchxla_rlhf.launch --tpu NAME --zone ZONE [--project P] [--env K=V ...]
        [--setup] [--restart-on-preemption] [--dry-run] -- python -m torchxla_rlhf.dpo ...

Per run it

1. asks ``gcloud`` how many workers the TPU has (``tpu-vm describe``);
2. with ``--setup``, installs the package on every worker (``launch/setup_tpu_vm.sh``);
3. checks that every worker's ``--repo-dir`` is at the same git commit (a pod running two
   versions of the code fails in confusing ways, or silently computes something else);
4. starts the command on every worker *in the background* (``nohup setsid``: an ssh drop does
   not kill the run), each writing ``~/.torchxla_rlhf/runs/<run id>/worker-<i>.log`` on its VM;
5. streams worker 0's log here and polls every worker's status;
6. stops every worker when one fails or on Ctrl-C: SIGTERM to each trainer's own process
   group (the trainers save and exit with :data:`EXIT_PREEMPTED`), SIGKILL to what is left
   after ``--kill-grace`` seconds, then checks that no trainer process is left (a worker
   waiting in a collective for a dead peer never exits by itself, and keeps the TPU);
   every worker's exit code is reported, including after a stop;
7. with ``--restart-on-preemption``: when the TPU leaves ``READY``, is deleted (or every
   worker stopped with :data:`EXIT_PREEMPTED`), waits for it to come back and relaunches the
   command with ``resume_from=auto``; a recreated VM is set up again first.

Process ownership. On each worker a small ``bash`` wrapper (its own session, ``setsid``)
starts the trainer as a job with job control on, so the trainer gets a process group of its
own (``trainer.pgid``); the launcher signals that group, never the wrapper, which stays alive to
``wait`` for the trainer and write its exit status to ``rc`` (143 = killed by SIGTERM, 137 =
SIGKILL, 75 = saved and stopped).

Secrets. The values of ``--env`` (and ``HF_TOKEN`` / ``WANDB_API_KEY`` when set here) travel
on ssh's standard input, read into the environment by the remote shell: they never appear on
a command line (visible in ``ps`` on both machines), in a file, or in a log. Only their names
do.

Only ``gcloud`` is needed on the launching machine (this module imports neither torch nor
torch_xla). ``--dry-run`` prints the exact ``gcloud`` commands instead of running them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torchxla_rlhf.errors import EXIT_PREEMPTED

logger = logging.getLogger("torchxla_rlhf.launch")

SECRET_ENV = ("HF_TOKEN", "WANDB_API_KEY")
"""Passed to the workers when set on the launching machine (on stdin, never on a command line)."""

SEED_LIBTPU_INIT_ARGS = (
    "--xla_jf_spmd_threshold_for_windowed_einsum_mib=0 "
    "--xla_tpu_spmd_threshold_for_allgather_cse=10000 "
    "--xla_tpu_enable_latency_hiding_scheduler=true"
)
"""The XLA flags for v3 pods; ``--env LIBTPU_INIT_ARGS=...`` replaces them. Each is defined by
the pinned libtpu (a test searches its library); on the workers the runtime drops, with a
warning, any flag the installed libtpu does not define. (Megacore settings do not apply to
v3, which has none.)"""

RUNS_DIR = "$HOME/.torchxla_rlhf/runs"
"""Per-run state on each worker (expanded by the worker's shell, never here)."""

STATUS_TAG = "torchxla_rlhf-status"
COMMIT_TAG = "torchxla_rlhf-commit"


class LaunchError(RuntimeError):
    """The pod cannot run the command as asked (bad arguments, workers out of step, gcloud)."""


class TpuNotFound(LaunchError):
    """``describe`` says the TPU does not exist (deleted, or not yet recreated)."""


@dataclass(frozen=True)
class TpuState:
    """What ``describe`` said: ``state`` (``READY``, ``PREEMPTED``, ..., ``DELETED`` when the
    node does not exist, ``UNKNOWN`` when gcloud failed: ``detail`` says why) and
    ``identity`` (the node's creation time: it changes when the VM is recreated)."""

    state: str
    detail: str = ""
    identity: str = ""


@dataclass(frozen=True)
class WorkerStatus:
    """One worker's run: ``state`` is ``running``, ``exited`` (``rc`` set), ``lost`` (no
    process and no exit status: killed with the VM) or ``unreachable`` (ssh failed);
    ``alive``: a process of the trainer's group is still there."""

    state: str
    rc: int | None = None
    alive: bool = False


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------


@dataclass
class Options:
    """Everything the launcher was asked to do, parsed and checked."""

    tpu: str
    zone: str
    command: str
    project: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: bool = False
    restart_on_preemption: bool = False
    dry_run: bool = False
    repo_dir: str = "~/torchxla_rlhf"
    repo_url: str | None = None
    run_id: str = ""
    poll_interval: float = 30.0
    kill_grace: float = 60.0
    ssh_timeout: float = 120.0
    setup_timeout: float = 3600.0
    preemption_timeout: float = 6 * 3600.0
    max_restarts: int = 100
    gcloud: str = "gcloud"
    dry_run_workers: int | None = None
    """``--workers``: the pod size ``--dry-run`` prints every worker's commands for."""


def parse_env(pairs: Sequence[str], environ: dict[str, str]) -> dict[str, str]:
    """``K=V`` pairs (a bare ``K`` takes this machine's value), plus :data:`SECRET_ENV` when
    set here; ``PJRT_DEVICE=TPU`` and EasyLM's ``LIBTPU_INIT_ARGS`` unless given."""
    env = {"PJRT_DEVICE": "TPU", "LIBTPU_INIT_ARGS": SEED_LIBTPU_INIT_ARGS}
    env.update({k: environ[k] for k in SECRET_ENV if environ.get(k)})
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            if key not in environ:
                raise LaunchError(f"--env {key}: no '=' and {key} is not set on this machine")
            value = environ[key]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {pair!r}: {key!r} is not a valid environment variable name")
        if "\n" in value:
            raise LaunchError(f"--env {key}: values cannot contain a newline (sent one per line)")
        env[key] = value
    return env


def command_string(argv: Sequence[str]) -> str:
    """The worker command: the words after ``--``, shell-quoted; one word is taken as a shell
    command line as it stands (``-- "cd x && python ..."``)."""
    if not argv:
        raise LaunchError("no command: put it after '--', e.g. -- python -m torchxla_rlhf.dpo ...")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def with_resume_auto(command: str) -> str:
    """``command`` with ``resume_from=auto`` (replacing any ``resume_from=...`` word)."""
    words = shlex.split(command)
    kept = [w for w in words if not w.startswith("resume_from=")]
    if len(kept) != len(words):
        return shlex.join(kept + ["resume_from=auto"])
    return f"{command} resume_from=auto"


def remote_path(path: str) -> str:
    """``path`` for the worker's shell: a leading ``~`` becomes ``$HOME`` (expanded THERE,
    not on the launching machine); the rest is quoted."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (shlex.quote(path[1:]) if len(path) > 1 else "")
    return shlex.quote(path)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: argparse's ``(default: X)``, ``off`` for a
    switch, or the help's own words where the default is not a value (required options have
    none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "(default" in text:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str], environ: dict[str, str] | None = None) -> Options:
    environ = dict(os.environ if environ is None else environ)
    if "--" in argv:
        cut = list(argv).index("--")
        own, command = list(argv[:cut]), list(argv[cut + 1:])
    else:
        own, command = list(argv), []
    p = argparse.ArgumentParser(
        prog="python -m torchxla_rlhf.launch",
        description="Run COMMAND on every worker of a TPU pod (in the background, per-worker "
                    "logs, worker 0's log streamed here).",
        usage="%(prog)s --tpu NAME --zone ZONE [options] -- COMMAND ...",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("--tpu", required=True, help="TPU VM name (gcloud compute tpus tpu-vm list)")
    p.add_argument("--zone", required=True, help="the TPU's zone, e.g. europe-west4-a")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured project)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment for the command (values sent on stdin, never logged); "
                        "a bare K takes this machine's value; repeat for more (default: "
                        "PJRT_DEVICE=TPU, the LIBTPU_INIT_ARGS of the paper's runs, and HF_TOKEN / "
                        "WANDB_API_KEY when set here)")
    p.add_argument("--setup", action="store_true",
                   help="install the package on every worker first (launch/setup_tpu_vm.sh)")
    p.add_argument("--repo-url", help="with --setup: git clone this into --repo-dir where "
                                      "missing (default: none; --repo-dir must exist)")
    p.add_argument("--repo-dir", default="~/torchxla_rlhf",
                   help="the repository on the workers (~ is the worker's home)")
    p.add_argument("--restart-on-preemption", action="store_true",
                   help="when the TPU is preempted, wait for it and relaunch with resume_from=auto")
    p.add_argument("--dry-run", action="store_true",
                   help="print the gcloud commands only (worker 0's, and how the others differ)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --dry-run: print every worker's commands for a pod of N workers "
                        "(default: worker 0's; a run asks gcloud for the count)")
    p.add_argument("--run-id", default="",
                   help="names the per-run log directory on the workers (default: the start "
                        "time, YYYYmmdd-HHMMSS)")
    p.add_argument("--poll-interval", type=float, default=30.0, help="seconds between status polls")
    p.add_argument("--kill-grace", type=float, default=60.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the workers")
    p.add_argument("--ssh-timeout", type=float, default=120.0,
                   help="seconds one ssh call (start, status, stop) may take")
    p.add_argument("--setup-timeout", type=float, default=3600.0,
                   help="seconds the --setup install may take on a worker (torch, torch_xla "
                        "and libtpu are several GB)")
    p.add_argument("--preemption-timeout", type=float, default=6 * 3600.0,
                   help="give up when a preempted TPU is not READY again after this many seconds")
    p.add_argument("--max-restarts", type=int, default=100,
                   help="with --restart-on-preemption: give up after this many relaunches")
    a = p.parse_args(own)
    try:
        cmd = command_string(command)
    except LaunchError as e:
        p.error(str(e))
    if a.workers is not None and (a.workers < 1 or not a.dry_run):
        p.error("--workers N: a count >= 1, with --dry-run only")
    return Options(
        tpu=a.tpu, zone=a.zone, project=a.project, command=cmd,
        env=parse_env(a.env, environ), setup=a.setup, repo_url=a.repo_url,
        restart_on_preemption=a.restart_on_preemption, dry_run=a.dry_run, repo_dir=a.repo_dir,
        run_id=a.run_id or time.strftime("%Y%m%d-%H%M%S"), poll_interval=a.poll_interval,
        kill_grace=a.kill_grace, ssh_timeout=a.ssh_timeout, setup_timeout=a.setup_timeout,
        preemption_timeout=a.preemption_timeout,
        max_restarts=a.max_restarts, gcloud=environ.get("TORCHXLA_RLHF_GCLOUD", "gcloud"),
        dry_run_workers=a.workers,
    )


# ----------------------------------------------------------------------------------------
# Remote shell snippets (pure functions: what --dry-run prints is what runs)
# ----------------------------------------------------------------------------------------


def run_dir(run_id: str) -> str:
    return f"{RUNS_DIR}/{shlex.quote(run_id)}"


def env_prelude(names: Sequence[str]) -> str:
    """Shell that reads one value per name from stdin and exports it (values never in argv)."""
    return "".join(f"IFS= read -r {n} && export {n}; " for n in names)


def env_stdin(env: dict[str, str]) -> str:
    """What goes to ssh's stdin for :func:`env_prelude` of ``env``'s names (same order)."""
    return "".join(f"{v}\n" for v in env.values())


def start_script(opts: Options, worker: int, command: str) -> str:
    """Start ``command`` on ``worker`` in the background, detached from the ssh session, with
    its output in ``worker-<i>.log``.

    A wrapper ``bash`` (``pid``; its own session) runs the trainer as a job with job control
    on (``set -m``), so the trainer has a process group of its own (``trainer.pgid``) that
    :func:`stop_script` signals; the wrapper is not in it, so it survives the stop and writes
    the trainer's exit status to ``rc``."""
    rd = run_dir(opts.run_id)
    inner = (
        f"cd {remote_path(opts.repo_dir)} && "
        "{ [ ! -f .venv/bin/activate ] || . .venv/bin/activate; } && "
        f"{command}"
    )
    wrapper = (
        f"set -m; ( {inner} ) & echo $! > \"$RUN/trainer.pgid\"; "
        "wait $!; echo $? > \"$RUN/rc\""
    )
    return (
        f"set -e; {env_prelude(list(opts.env))}"
        f"export RUN={rd}; mkdir -p \"$RUN\"; rm -f \"$RUN/rc\" \"$RUN/trainer.pgid\"; "
        f"nohup setsid bash -c {shlex.quote(wrapper)} > \"$RUN/worker-{worker}.log\" 2>&1 "
        "< /dev/null & echo $! > \"$RUN/pid\"; "
        f"echo started worker {worker} in \"$RUN\""
    )


_TRAINER_ALIVE = (
    "T=$(cat \"$RUN/trainer.pgid\" 2>/dev/null || true); "
    "if [ -n \"$T\" ] && kill -0 -- -$T 2>/dev/null; then A=alive; else A=gone; fi; "
)


def status_script(run_id: str) -> str:
    """Print ``<tag> exited <rc> <alive|gone>``, ``<tag> running <alive|gone>`` or
    ``<tag> lost gone`` (no process, no rc: killed with the VM). ``alive``: a process of the
    trainer's group is left (a stop is verified by ``gone``)."""
    rd = run_dir(run_id)
    return (
        f"RUN={rd}; {_TRAINER_ALIVE}"
        f"if [ -f \"$RUN/rc\" ]; then echo {STATUS_TAG} exited $(cat \"$RUN/rc\") $A; "
        f"elif [ $A = alive ] || {{ [ -f \"$RUN/pid\" ] && kill -0 $(cat \"$RUN/pid\") 2>/dev/null; }}; "
        f"then echo {STATUS_TAG} running $A; else echo {STATUS_TAG} lost $A; fi"
    )


def stop_script(run_id: str, sig: str) -> str:
    """Signal the trainer's own process group (not the wrapper, which records the exit
    status); before the trainer has started, the wrapper's group."""
    return (
        f"RUN={run_dir(run_id)}; T=$(cat \"$RUN/trainer.pgid\" 2>/dev/null || true); "
        f"if [ -n \"$T\" ]; then kill -{sig} -- -$T 2>/dev/null; "
        f"elif [ -f \"$RUN/pid\" ]; then kill -{sig} -- -$(cat \"$RUN/pid\") 2>/dev/null; fi; true"
    )


def commit_script(repo_dir: str) -> str:
    return (
        f"cd {remote_path(repo_dir)} && echo {COMMIT_TAG} $(git rev-parse HEAD) "
        "$(git status --porcelain --untracked-files=no | wc -l)"
    )


def setup_script(repo_dir: str, repo_url: str | None) -> str:
    clone = (
        f"[ -d {remote_path(repo_dir)} ] || git clone {shlex.quote(repo_url)} {remote_path(repo_dir)}; "
        if repo_url else ""
    )
    return f"set -e; {clone}cd {remote_path(repo_dir)} && bash launch/setup_tpu_vm.sh"


def tail_script(run_id: str) -> str:
    rd = run_dir(run_id)
    # Wait for the file: the worker may not have created it yet when the stream starts.
    return (f"RUN={rd}; while [ ! -f \"$RUN/worker-0.log\" ]; do sleep 1; done; "
            "exec tail -n +1 -F \"$RUN/worker-0.log\"")


# ----------------------------------------------------------------------------------------
# gcloud
# ----------------------------------------------------------------------------------------


class Pod:
    """The ``gcloud compute tpus tpu-vm`` calls the launcher makes (one place to fake)."""

    def __init__(self, opts: Options, echo: Callable[[str], None] = print):
        self.opts = opts
        self.echo = echo

    def _base(self, verb: str) -> list[str]:
        cmd = [self.opts.gcloud, "compute", "tpus", "tpu-vm", verb, self.opts.tpu,
               f"--zone={self.opts.zone}"]
        if self.opts.project:
            cmd.append(f"--project={self.opts.project}")
        return cmd

    def ssh_argv(self, worker: int, script: str) -> list[str]:
        return self._base("ssh") + [f"--worker={worker}", f"--command={script}"]

    def describe(self) -> dict:
        """``tpu-vm describe`` as JSON (``state``, ``networkEndpoints``: one per worker).
        :class:`TpuNotFound` when the TPU does not exist (deleted), :class:`LaunchError` when
        gcloud fails otherwise."""
        argv = self._base("describe") + ["--format=json"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True,
                                 timeout=self.opts.ssh_timeout)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{shlex.join(argv)} timed out after {self.opts.ssh_timeout:.0f}s") from None
        if out.returncode:
            err = out.stderr.strip()
            if re.search(r"NOT_FOUND|was not found", err):
                raise TpuNotFound(f"TPU {self.opts.tpu} does not exist (deleted): {err[-300:]}")
            raise LaunchError(f"{shlex.join(argv)} failed ({out.returncode}): {err[-300:]}")
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError as e:
            raise LaunchError(f"{shlex.join(argv)}: not JSON ({e})") from None

    def state(self) -> TpuState:
        """The TPU's state (``READY``, ``PREEMPTED``, ...), ``DELETED`` when it does not exist,
        ``UNKNOWN`` (with gcloud's error as ``detail``) when describe fails otherwise: a failed
        describe is not read as "not preempted" nor as "preempted"."""
        try:
            d = self.describe()
        except TpuNotFound as e:
            return TpuState("DELETED", str(e))
        except LaunchError as e:
            return TpuState("UNKNOWN", str(e))
        return TpuState(str(d.get("state", "UNKNOWN")), "", str(d.get("createTime") or d.get("id") or ""))

    def num_workers(self) -> int:
        endpoints = self.describe().get("networkEndpoints") or []
        if not endpoints:
            raise LaunchError(f"TPU {self.opts.tpu}: describe lists no workers (networkEndpoints)")
        return len(endpoints)

    def ssh(self, worker: int, script: str, stdin: str = "", timeout: float | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(worker, script), input=stdin, capture_output=True,
                              text=True, timeout=timeout)

    def on_all(self, workers: int, script: Callable[[int], str] | str, stdin: str = "",
               timeout: float | None = None) -> list[subprocess.CompletedProcess]:
        """One ssh per worker, in parallel (like ``--worker=all``, but each result is kept);
        each may take ``timeout`` seconds (default ``--ssh-timeout``)."""
        limit = self.opts.ssh_timeout if timeout is None else timeout

        def one(i: int) -> subprocess.CompletedProcess:
            s = script(i) if callable(script) else script
            try:
                return self.ssh(i, s, stdin, timeout=limit)
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(self.ssh_argv(i, s), 255, "",
                                                   f"ssh timed out after {limit:.0f}s")

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, 64)) as ex:
            return list(ex.map(one, range(workers)))


# ----------------------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------------------


def parse_status(result: subprocess.CompletedProcess) -> WorkerStatus:
    """A :class:`WorkerStatus` from :func:`status_script`'s output (``unreachable`` when ssh
    failed or printed no status)."""
    m = re.search(rf"{STATUS_TAG} (running|exited|lost)(?: (-?\d+))?(?: (alive|gone))?",
                  result.stdout or "")
    if result.returncode or not m:
        return WorkerStatus("unreachable")
    return WorkerStatus(m.group(1), int(m.group(2)) if m.group(2) else None, m.group(3) == "alive")


def check_commits(results: Sequence[subprocess.CompletedProcess]) -> str:
    """The commit every worker is at; :class:`LaunchError` naming who differs otherwise."""
    commits: dict[int, str] = {}
    for i, r in enumerate(results):
        m = re.search(rf"{COMMIT_TAG} ([0-9a-f]{{7,40}}) (\d+)", r.stdout or "")
        if r.returncode or not m:
            raise LaunchError(f"worker {i}: cannot read the repository's commit "
                              f"({(r.stderr or r.stdout).strip()[-300:]})")
        commits[i] = m.group(1)
        if int(m.group(2)):
            logger.warning("worker %d: %s uncommitted change(s) in the repository", i, m.group(2))
    if len(set(commits.values())) > 1:
        listing = ", ".join(f"worker {i}: {c[:12]}" for i, c in commits.items())
        raise LaunchError(f"the workers run different commits ({listing}); check out the same "
                          "commit everywhere (git -C REPO checkout COMMIT via the launcher)")
    return commits[0]


class Launcher:
    """One launch (and its restarts after preemption)."""

    def __init__(self, opts: Options, pod: Pod | None = None, echo: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.opts = opts
        self.pod = pod or Pod(opts, echo)
        self.echo = echo
        self.clock, self.sleep = clock, sleep
        self._tail: subprocess.Popen | None = None
        self.exit_codes: list[int | None] = []
        """Each worker's exit status of the last run (None: lost or unreachable)."""

    # -- dry run ----------------------------------------------------------------------

    def dry_run(self, workers: int | None = None) -> list[str]:
        """The commands a run would make: every worker's for a pod of ``workers``; with None,
        worker 0's and a line saying how the others' differ."""
        o, pod = self.opts, self.pod
        shown = range(workers) if workers else range(1)

        def each(script: Callable[[int], str], note: str = "") -> list[str]:
            return [shlex.join(pod.ssh_argv(i, script(i))) + note for i in shown]

        lines = [shlex.join(pod._base("describe") + ["--format=json"])
                 + "   # the worker count: one networkEndpoint per worker"]
        if o.setup:
            lines += each(lambda i: setup_script(o.repo_dir, o.repo_url))
        lines += each(lambda i: commit_script(o.repo_dir))
        lines += each(lambda i: start_script(o, i, o.command),
                      f"   # stdin: the values of {', '.join(o.env)}")
        lines.append(shlex.join(pod.ssh_argv(0, tail_script(o.run_id))))
        lines += each(lambda i: status_script(o.run_id), "   # every poll")
        lines += each(lambda i: stop_script(o.run_id, "TERM"), "   # on failure / Ctrl-C, then KILL")
        if o.restart_on_preemption:
            lines += ["# after a preemption: " + line for line in
                      each(lambda i: start_script(o, i, with_resume_auto(o.command)))]
        if not workers:
            lines.append("# every other worker I (1 .. N-1, N from the describe above) gets the "
                         "same commands with --worker=I; its start command also names its log "
                         "worker-I.log (--workers N prints them all)")
        return lines

    # -- run --------------------------------------------------------------------------

    def run(self) -> int:
        """Launch, watch, restart after preemptions; the exit code of the run."""
        if self.opts.dry_run:
            for line in self.dry_run(self.opts.dry_run_workers):
                self.echo(line)
            return 0
        command, restarts, setup = self.opts.command, 0, self.opts.setup
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                workers = self.pod.num_workers()
                identity = self.pod.state().identity
                if setup:
                    self._setup(workers)
                commit = check_commits(self.pod.on_all(workers, commit_script(self.opts.repo_dir)))
                self.echo(f"[launch] {workers} worker(s) at commit {commit[:12]}; run "
                          f"{self.opts.run_id}; logs in ~/.torchxla_rlhf/runs/{self.opts.run_id}/ "
                          "on each worker")
                outcome, rc = self._run_once(workers, command)
                if outcome != "preempted":
                    return rc
                if not self.opts.restart_on_preemption:
                    self.echo("[launch] the TPU was preempted; rerun with resume_from=auto "
                              "(or use --restart-on-preemption)")
                    return rc or EXIT_PREEMPTED
                restarts += 1
                if restarts > self.opts.max_restarts:
                    self.echo(f"[launch] preempted {restarts} times; giving up")
                    return rc or EXIT_PREEMPTED
                recreated = self._wait_ready(identity)
                # A recreated VM is a fresh disk: install (and clone) again before relaunching.
                setup = self.opts.setup or recreated
                command = with_resume_auto(self.opts.command)
                self.echo(f"[launch] relaunching (restart {restarts}"
                          + (", after setting up the recreated VM" if recreated else "")
                          + f"): {command}")
        finally:
            signal.signal(signal.SIGINT, previous)

    def _setup(self, workers: int) -> None:
        self.echo(f"[launch] setting up {workers} worker(s) (up to {self.opts.setup_timeout:.0f}s)")
        results = self.pod.on_all(workers, setup_script(self.opts.repo_dir, self.opts.repo_url),
                                  timeout=self.opts.setup_timeout)
        failed = [i for i, r in enumerate(results) if r.returncode]
        if failed:
            r = results[failed[0]]
            raise LaunchError(f"setup failed on worker(s) {failed}; worker {failed[0]}:\n"
                              f"{(r.stdout + r.stderr)[-2000:]}")

    def _statuses(self, workers: int) -> list[WorkerStatus]:
        return [parse_status(r) for r in self.pod.on_all(workers, status_script(self.opts.run_id))]

    def _run_once(self, workers: int, command: str) -> tuple[str, int]:
        """Start, stream, poll. ``("done"|"failed"|"preempted"|"interrupted", rc)``."""
        o = self.opts
        self.exit_codes = [None] * workers
        started = self.pod.on_all(workers, lambda i: start_script(o, i, command), env_stdin(o.env))
        bad = [i for i, r in enumerate(started) if r.returncode]
        if bad:
            self._stop_all(workers)
            if self._preempted_state():
                return "preempted", EXIT_PREEMPTED
            raise LaunchError(f"could not start on worker(s) {bad}: {started[bad[0]].stderr[-500:]}")
        self._start_tail()
        try:
            while True:
                self.sleep(o.poll_interval)
                statuses = self._statuses(workers)
                self.exit_codes = [st.rc for st in statuses]
                outcome = self._judge(statuses)
                if outcome is None:
                    continue
                kind, rc = outcome
                if kind != "done":
                    self._stop_all(workers)
                self._report_exit_codes()
                return kind, rc
        except KeyboardInterrupt:
            self.echo("[launch] Ctrl-C: stopping every worker")
            self._stop_all(workers)
            self._report_exit_codes()
            return "interrupted", 130
        finally:
            self._stop_tail()

    def _report_exit_codes(self) -> None:
        codes = ", ".join(f"worker {i}: {'?' if rc is None else rc}"
                          for i, rc in enumerate(self.exit_codes))
        self.echo(f"[launch] exit codes: {codes}")

    def _judge(self, statuses: list[WorkerStatus]) -> tuple[str, int] | None:
        """None while the run goes on; otherwise how it ended."""
        exited = [st.rc for st in statuses if st.state == "exited"]
        if len(exited) == len(statuses):
            if all(rc == EXIT_PREEMPTED for rc in exited):
                return "preempted", EXIT_PREEMPTED
            first_bad = next((rc for rc in exited if rc), 0)
            if first_bad and self._preempted_state():
                return "preempted", first_bad
            return ("failed" if first_bad else "done"), first_bad
        broken = [(i, st) for i, st in enumerate(statuses)
                  if st.state in ("lost", "unreachable")
                  or (st.state == "exited" and st.rc not in (0, EXIT_PREEMPTED))]
        if not broken:
            return None
        if self._preempted_state():
            return "preempted", EXIT_PREEMPTED
        i, st = broken[0]
        self.echo(f"[launch] worker {i} {st.state}" + (f" with code {st.rc}" if st.rc is not None else "")
                  + "; stopping every worker")
        return "failed", st.rc if st.rc else 1

    def _preempted_state(self) -> bool:
        """True when the TPU is gone or not ``READY``. A failed ``describe`` is reported and
        counts as neither (the worker's failure then stands as a failure)."""
        st = self.pod.state()
        if st.state == "DELETED":
            self.echo(f"[launch] TPU {self.opts.tpu} was deleted: {st.detail}")
            return True
        if st.state == "UNKNOWN":
            self.echo(f"[launch] cannot tell whether TPU {self.opts.tpu} was preempted: {st.detail}")
            return False
        if st.state != "READY":
            self.echo(f"[launch] TPU {self.opts.tpu} is {st.state}")
            return True
        return False

    def _wait_ready(self, identity: str) -> bool:
        """Wait until the TPU is ``READY``; True when it is another VM than ``identity``
        (recreated after a deletion, or with another creation time)."""
        deadline = self.clock() + self.opts.preemption_timeout
        recreated = False
        while (st := self.pod.state()).state != "READY":
            recreated |= st.state == "DELETED"
            if self.clock() > deadline:
                raise LaunchError(f"TPU {self.opts.tpu} still {st.state} after "
                                  f"{self.opts.preemption_timeout:.0f}s"
                                  + (f" ({st.detail})" if st.detail else ""))
            self.sleep(self.opts.poll_interval)
        recreated |= bool(identity and st.identity and st.identity != identity)
        self.echo(f"[launch] TPU {self.opts.tpu} is READY again"
                  + (" (recreated)" if recreated else ""))
        return recreated

    def _stop_all(self, workers: int) -> None:
        """SIGTERM every worker's trainer (the trainers save and exit), SIGKILL what is left
        after ``--kill-grace`` seconds, then check that no trainer process is left. Records
        each worker's exit status in :attr:`exit_codes`."""
        o = self.opts
        self.pod.on_all(workers, stop_script(o.run_id, "TERM"))
        deadline = self.clock() + o.kill_grace
        statuses = self._statuses(workers)
        while any(st.alive or st.state == "running" for st in statuses) and self.clock() < deadline:
            self.sleep(min(o.poll_interval, 1.0))
            statuses = self._statuses(workers)
        left = [i for i, st in enumerate(statuses) if st.alive or st.state == "running"]
        if left:
            self.echo(f"[launch] worker(s) {left} still running {o.kill_grace:.0f}s after "
                      "SIGTERM: SIGKILL")
            self.pod.on_all(workers, stop_script(o.run_id, "KILL"))
            deadline = self.clock() + max(10.0, o.poll_interval)
            statuses = self._statuses(workers)
            while any(st.alive for st in statuses) and self.clock() < deadline:
                self.sleep(0.5)
                statuses = self._statuses(workers)
            alive = [i for i, st in enumerate(statuses) if st.alive]
            if alive:
                self.echo(f"[launch] WARNING: worker(s) {alive} still have trainer processes "
                          "after SIGKILL (the next launch may find the TPU busy)")
        # A worker whose VM is gone keeps the code it had (None when never seen).
        self.exit_codes = [st.rc if st.state == "exited" else prev
                           for st, prev in zip(statuses, self.exit_codes + [None] * workers)]

    def _start_tail(self) -> None:
        self._tail = subprocess.Popen(self.pod.ssh_argv(0, tail_script(self.opts.run_id)),
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def _stop_tail(self) -> None:
        if self._tail is not None and self._tail.poll() is None:
            # Its own session: end the ssh (or the fake's shell) and the tail it runs.
            os.killpg(self._tail.pid, signal.SIGTERM)
            try:
                self._tail.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._tail.pid, signal.SIGKILL)
        self._tail = None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[launch] %(message)s")
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        return Launcher(opts, echo=lambda s: print(s, flush=True)).run()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
