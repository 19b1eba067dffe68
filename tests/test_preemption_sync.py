"""Hosts agree on preemption: two trainer processes share a coordinator (torch_xla's preemption
sync manager, through ``runtime.start_preemption_sync``); SIGTERM reaches only one of them and
both save at the same step and exit with the same code.

Each process is its own one-host XLA:CPU world (PJRT on CPU is single-process) writing its own
``output_dir``; what they share is the coordinator, which is what a pod's hosts share too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, read_metrics
from torchxla_rlhf.errors import EXIT_PREEMPTED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def rows(out: str) -> int:
    try:
        return len(read_metrics(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path):
    port = free_port()
    outs = [str(tmp_path / f"host{i}") for i in range(2)]
    procs = []
    for i, out in enumerate(outs):
        env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1", PYTHONPATH=REPO,
                   TORCHXLA_RLHF_COORDINATOR=f"localhost:{port}",
                   TORCHXLA_RLHF_PROCESS_ID=str(i), TORCHXLA_RLHF_NUM_PROCESSES="2",
                   TORCHXLA_RLHF_LEADER_LINGER_S="3")
        cmd = [sys.executable, "-m", "torchxla_rlhf.dpo",
               "--config", f"{REPO}/configs/tiny/dpo.yaml", f"output_dir={out}",
               "logger.progress_bar=false", "logger.log_freq=1", "eval_dataset=null",
               f"train_dataset.path={REPO}/data/tiny/preference_train.jsonl",
               "total_steps=1000", "num_epochs=1000", "save_model_freq=100000",
               "save_training_state=true", "optimizer.accumulate_gradient_steps=1"]
        log = open(tmp_path / f"host{i}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 600
        while min(rows(o) for o in outs) < 3:
            assert time.monotonic() < deadline, "the trainers did not start"
            assert all(p.poll() is None for p in procs), [
                (tmp_path / f"host{i}.log").read_text()[-3000:] for i in range(2)]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # host 1's preemption notice; host 0 gets none
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"host{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs
    steps = []
    for out in outs:
        with open(os.path.join(out, "training-state-latest", "training_state", "trainer_state.json")) as f:
            steps.append(json.load(f)["step"])
    assert steps[0] == steps[1] and 3 <= steps[0] < 1000, (steps, logs)
    assert [rows(o) for o in outs] == [steps[0]] * 2
