"""The rollout's decode loop gathers FSDP-sharded weights where ``sampling.gather_weights``
says, read from the optimized per-device HLO of an 8-layer proxy on an 8-device XLA:CPU mesh
(dp=1, fsdp=4, mp=2).

``per_layer``: no layer's weight all-gather may sit outside the ``While`` body (XLA's
loop-invariant code motion hoists every one of them unless the loop keeps them in), every
layer's are inside, and the module's per-device peak is below the hoisted one's. ``hoisted``
is compiled too: its gathers are outside the body, so the check can fail.
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

MESH = (1, 4, 2)
SPEC = dict(mesh="1,4,2", hidden=256, heads=2, kv_heads=2, layers=8, intermediate=688,
            vocab=320, train=False, compute_dtype="bfloat16",
            decode={"batch": 8, "prompt": 16, "new": 4})
H, MP = SPEC["hidden"], MESH[2]
# Gathered (over fsdp) shapes of one layer's column-parallel weights, [H, out/mp]: q, k, v
# (head_dim 128) and gate, up. No activation of the proxy has these shapes.
LAYER_WEIGHTS = {(H, H // MP): 3, (H, SPEC["intermediate"] // MP): 2}


def decode_module(policy: str, dump_dir: str) -> tuple[str, int]:
    """Optimized HLO text and per-device bytes of the proxy's decode-loop module."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_dump_to={dump_dir}")
    spec = json.dumps({**SPEC, "gather_weights": policy})
    proc = subprocess.run([sys.executable, "-m", "tools.memory_probe", spec], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    sizes = [b for key, b in xla_dump.peak_bytes_by_module(dump_dir).items()
             if key.split(".")[1] == "generation_decode_loop"]
    return xla_dump.optimized_hlo(dump_dir, "generation_decode_loop"), max(sizes)


def layers_gathered(hlo: str) -> tuple[float, float]:
    """(inside the While body, outside it): layers' worth of weight all-gathers over fsdp."""
    fsdp = xla_dump.mesh_axis_groups(MESH, 1)
    per_layer = sum(LAYER_WEIGHTS.values())

    def layers(gathers: list) -> float:
        return sum(1 for ag in gathers
                   if set(ag.groups) == fsdp and ag.dims in LAYER_WEIGHTS) / per_layer

    inside, outside = xla_dump.all_gathers_in_and_out_of_loops(hlo, math.prod(MESH))
    return layers(inside), layers(outside)


@pytest.mark.multiprocess
def test_decode_loop_gathers_weights_as_configured(tmp_path):
    per_layer_hlo, per_layer_bytes = decode_module("per_layer", str(tmp_path / "per_layer"))
    hoisted_hlo, hoisted_bytes = decode_module("hoisted", str(tmp_path / "hoisted"))
    assert layers_gathered(per_layer_hlo) == (SPEC["layers"], 0), \
        "per_layer: weight all-gathers outside the decode loop's While body"
    inside, outside = layers_gathered(hoisted_hlo)
    assert outside == SPEC["layers"] and inside == 0, (inside, outside)
    assert per_layer_bytes < hoisted_bytes, (per_layer_bytes, hoisted_bytes)


def test_while_body_computations_are_found():
    hlo = ("%fused (p: f32[2]) -> f32[2] {\n  %x = f32[8,2]{1,0} all-gather(%p), "
           "replica_groups={{0,1,2,3}}, dimensions={0}\n}\n\n"
           "%body (t: (s64[])) -> (s64[]) {\n  %f = f32[2]{0} fusion(%a), kind=kLoop, calls=%fused\n}\n\n"
           "%cond (t: (s64[])) -> pred[] {\n  ROOT %c = pred[] constant(true)\n}\n\n"
           "ENTRY %main (p: f32[2]) -> f32[8,2] {\n  %g = f32[8,4]{1,0} all-gather(%p), "
           "replica_groups={{0,1,2,3}}, dimensions={0}\n"
           "  %w = (s64[]) while(%t), condition=%cond, body=%body\n}\n")
    assert xla_dump.while_body_computations(hlo) == {"body", "fused"}
    inside, outside = xla_dump.all_gathers_in_and_out_of_loops(hlo, 4)
    assert [ag.dims for ag in inside] == [(8, 2)] and [ag.dims for ag in outside] == [(8, 4)]
