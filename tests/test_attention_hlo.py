"""One sharded decoder layer compiled on an 8-device XLA:CPU mesh (dp=1, fsdp=2, mp=4): the
optimized per-device HLO must keep attention heads split over ``mp``.

Fails when, in the training step (forward + backward, checkpointing on) or a rollout's decode
step, q/k/v or the KV cache are all-gathered over ``mp``, or any per-device array is larger
than ``heads / mp`` heads' ``[S, S]`` scores for the device's rows. HF ``eager`` is run too and
must trip the checks (so the checks can fail). Also checks that the rollout's KV cache is in
the compute dtype (bf16).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tools import xla_dump

MESH = (1, 2, 4)
SPEC = dict(mesh="1,2,4", hidden=320, heads=8, kv_heads=4, layers=1, intermediate=640,
            vocab=320, batch=4, seq=512, gradient_checkpointing=True,
            param_dtype="float32", compute_dtype="bfloat16",
            decode={"batch": 4, "prompt": 24, "new": 2})
HEAD_DIM = SPEC["hidden"] // SPEC["heads"]  # 40: no other dim of the probe equals it
ROWS = SPEC["batch"] // (MESH[0] * MESH[1])


def compile_probe(attn: str, dump_dir: str) -> None:
    """Run tools.memory_probe with 8 devices, dumping to ``dump_dir``."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_dump_to={dump_dir}")
    spec = json.dumps({**SPEC, "attn_implementation": attn})
    proc = subprocess.run([sys.executable, "-m", "tools.memory_probe", spec], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]


def head_violations(dump_dir: str) -> list[str]:
    """What keeps heads from being split over mp, in words (empty: nothing)."""
    mp_groups = xla_dump.mesh_axis_groups(MESH, 2)
    problems = []
    for graph in ("probe_train", "generation_prefill", "generation_decode_loop"):
        hlo = xla_dump.optimized_hlo(dump_dir, graph)
        for ag in xla_dump.all_gathers(hlo, math.prod(MESH)):
            if set(ag.groups) == mp_groups and HEAD_DIM in ag.dims:
                problems.append(f"{graph}: all-gather over mp of {ag.dtype}{list(ag.dims)}")
    # The largest legitimate array is one head-group's scores: anything bigger is a score
    # tensor holding more heads (the vocabulary and MLP are kept far smaller than this).
    limit = ROWS * (SPEC["heads"] // MESH[2]) * SPEC["seq"] ** 2
    for dtype, dims in xla_dump.array_shapes(xla_dump.optimized_hlo(dump_dir, "probe_train")):
        if math.prod(dims) > limit:
            problems.append(f"probe_train: {dtype}{list(dims)} holds more than heads/mp heads' scores")
    return problems


def cache_dtypes(dump_dir: str) -> set[str]:
    """Dtypes of the decode step's per-device KV-cache buffers [rows, kv/mp, T, head_dim] (its
    entry parameters: inside fusions XLA:CPU upcasts bf16 dot operands to f32)."""
    d = SPEC["decode"]
    cache = (d["batch"] // (MESH[0] * MESH[1]), SPEC["kv_heads"] // MESH[2],
             d["prompt"] + d["new"], HEAD_DIM)
    hlo = xla_dump.optimized_hlo(dump_dir, "generation_decode_loop")
    return {dtype for dtype, dims in xla_dump.entry_parameters(hlo) if dims == cache}


@pytest.mark.slow
def test_einsum_attention_keeps_heads_split(tmp_path):
    compile_probe("auto", str(tmp_path))
    assert head_violations(str(tmp_path)) == []
    assert cache_dtypes(str(tmp_path)) == {"bf16"}, "rollout KV cache not in the compute dtype"


@pytest.mark.slow
def test_eager_attention_trips_the_checks(tmp_path):
    compile_probe("eager", str(tmp_path))
    problems = head_violations(str(tmp_path))
    assert any("all-gather over mp" in p for p in problems), problems
    assert any("heads' scores" in p for p in problems), problems


def test_replica_group_spellings():
    """Both HLO spellings of replica groups expand to the mesh's mp groups."""
    mp = xla_dump.mesh_axis_groups(MESH, 2)
    assert mp == {(0, 1, 2, 3), (4, 5, 6, 7)}
    assert set(xla_dump.expand_replica_groups("[2,4]<=[8]", 8)) == mp
    assert set(xla_dump.expand_replica_groups("{{0,1,2,3},{4,5,6,7}}", 8)) == mp
    fsdp = xla_dump.mesh_axis_groups(MESH, 1)
    assert set(xla_dump.expand_replica_groups("[4,2]<=[2,4]T(1,0)", 8)) == fsdp


def test_parse_all_gather_and_shapes():
    hlo = ("  %all-gather.3 = f32[4,8,512,40]{3,2,0,1} all-gather(%call.110), channel_id=26, "
           "replica_groups=[2,4]<=[8], dimensions={1}, use_global_device_ids=true\n"
           "  ROOT %t = (bf16[2,1,26,40]{3,2,1,0}, s64[4]{0}) tuple(%a, %b)\n")
    (ag,) = xla_dump.all_gathers(hlo, 8)
    assert ag.dims == (4, 8, 512, 40) and set(ag.groups) == xla_dump.mesh_axis_groups(MESH, 2)
    assert ("bf16", (2, 1, 26, 40)) in xla_dump.array_shapes(hlo)
    entry = "ENTRY %main (p: f32[2]) -> f32[2] {\n  %p = bf16[2,1,26,40]{3,2,1,0} parameter(0), sharding={replicated}\n}\n"
    assert xla_dump.entry_parameters("%f {\n}\n" + entry) == [("bf16", (2, 1, 26, 40))]
