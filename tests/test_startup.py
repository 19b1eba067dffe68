"""Start-up checks (preflight/checks.py) on the paper's pods with the real Llama-2 13B and 70B
shapes, and the per-host feeding arithmetic for the pods' 16 and 32 hosts."""

import json
import os
import re

import numpy as np
import pytest

from torchxla_rlhf import runtime
from torchxla_rlhf.configs.loader import load_config
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.configs.grpo import GRPOConfig
from torchxla_rlhf.configs.ppo import PPOConfig
from torchxla_rlhf.configs.reward import RewardConfig
from torchxla_rlhf.preflight import checks
from torchxla_rlhf.preflight.mesh import MeshError, parse_mesh_dim
from torchxla_rlhf.preflight.shapes import shape_from_config

from helpers import REPO

with open(os.path.join(REPO, "bench", "shapes", "llama-2-13b", "config.json")) as f:
    LLAMA2_13B = json.load(f)
LLAMA2_70B = dict(LLAMA2_13B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
V3_CORE_HBM = 16 * 2**30
"""A TPU v3 core (one PJRT device) has 16 GiB of HBM."""
KINDS = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig}
POD_LINE = re.compile(r"^#\s+(v3-\d+): (\d+) devices on (\d+) hosts, (mesh_dim=\S+(?: [\w.]+=\S+)*)")


def shipped_pods():
    """``(config, pod, devices, hosts, overrides)`` for every pod line of every 13B header
    (``overrides``: the line's ``key=value`` words, ``mesh_dim`` first)."""
    out = []
    for kind in KINDS:
        path = os.path.join(REPO, "configs", f"{kind}_13b.yaml")
        with open(path) as f:
            pods = [POD_LINE.match(line) for line in f]
        pods = [m.groups() for m in pods if m]
        assert pods, f"{path}: header names no pod"
        out += [(kind, name, int(n), int(h), words.split()) for name, n, h, words in pods]
    return out


def check(kind, mesh, devices, hosts, shape=LLAMA2_13B, overrides=(), hbm=V3_CORE_HBM):
    cfg = load_config(KINDS[kind], os.path.join(REPO, "configs", f"{kind}_13b.yaml"),
                      [f"mesh_dim={mesh}", *overrides])
    s = shape_from_config(shape, "test")
    return checks.check_run(cfg, {"model": s, "reward_model": s}, devices, hosts,
                            devices // hosts, hbm_bytes=hbm)


@pytest.mark.parametrize("kind,pod,devices,hosts,words", shipped_pods())
def test_every_shipped_13b_config_starts_on_its_pods(kind, pod, devices, hosts, words):
    mesh = words[0].removeprefix("mesh_dim=")
    report = check(kind, mesh, devices, hosts, overrides=words[1:])
    assert report.ok, f"{kind}_13b on {pod} ({words}):\n{report.failures_line()}"
    names = {c.name for c in report.checks}
    # "weights split over the mesh" is only reported when it fails.
    assert {"mesh uses the pod's devices", "attention heads over mp", "batch rows over dp*fsdp",
            "memory per device", "per-host feeding"} <= names
    assert report.plan is not None and report.plan.fits


def test_the_shipped_meshes_are_the_headers_first_pod_and_the_seed_dpo_mesh_is_checked():
    pods = shipped_pods()
    for kind in KINDS:
        cfg = load_config(KINDS[kind], os.path.join(REPO, "configs", f"{kind}_13b.yaml"))
        assert f"mesh_dim={cfg.mesh_dim}" == next(p[4][0] for p in pods if p[0] == kind)
    assert ("dpo", "v3-256", 256, 32, ["mesh_dim=-1,16,16"]) in pods
    assert {(p[1], p[2], p[3]) for p in pods} == {("v3-256", 256, 32), ("v3-128", 128, 16)}


def test_a_13b_run_that_does_not_fit_a_v3_128_names_the_meshes_that_do():
    """The RM with mp=64 on a v3-128: 32 rows of 4096 tokens per device (the TPU compiler
    splits the 40 heads over 8 of the 64, 5 a device) peak over a v3 core's 16 GiB: the run
    stops at start-up, naming the memory check and the meshes that do fit."""
    report = check("reward", "-1,2,64", 128, 16)
    assert not report.ok and report.plan is not None and report.plan.fits is False
    bad = {c.name: c.detail for c in report.errors}
    assert "of 16.00 GiB" in bad["memory per device"]
    fits = re.findall(r"'(\d+,\d+,\d+)'", bad["a mesh that fits"])
    assert fits and "1,2,64" not in fits and all(check("reward", m, 128, 16).ok for m in fits)


def test_ppo_13b_fits_a_v3_128_on_the_seeds_mesh():
    """PPO 13B at 1,32,4 on a v3-128 peaks in the rollout (KV cache), under 16 GiB."""
    report = check("ppo", "1,32,4", 128, 16)
    assert report.ok and report.plan.fits and report.plan.peak_phase.startswith("rollout")


def test_seed_dpo_mesh_runs_with_uneven_heads_and_says_what_it_costs():
    report = check("dpo", "-1,16,16", 256, 32)
    assert report.ok
    rows = next(c for c in report.checks if c.name == "batch rows over dp*fsdp")
    assert "= 16 over dp*fsdp = 1*16 = 16: 1 row(s) per device" in rows.detail
    heads = [c for c in report.warnings if c.name == "attention heads over mp"]
    assert heads and "mp=16 does not divide num_attention_heads=40" in heads[0].detail
    assert "reshards q/k/v" in heads[0].detail


def test_70b_shapes_on_the_seed_dpo_mesh():
    """The 70B's dims split over the seed's mesh; its memory is another matter (on 64 v3
    cores its sharded state alone, 70B x 16 B / 64, is over a core's 16 GiB), so this checks
    the splits with the device memory unknown."""
    report = check("dpo", "-1,16,16", 256, 32, shape=LLAMA2_70B, hbm=None)
    assert report.ok, report.failures_line()
    assert any("num_key_value_heads=8" in c.detail for c in report.warnings)
    assert "not checked" in next(c.detail for c in report.checks if c.name == "memory per device")
    assert not check("dpo", "-1,8,8", 64, 8, shape=LLAMA2_70B).ok


def test_state_that_does_not_fit_a_device_is_refused():
    # 70B DPO (policy with AdamW + reference, fp32) on 16 v3 cores: 70B * 18 B / 16 > 16 GiB.
    report = check("dpo", "1,16,1", 16, 2, shape=LLAMA2_70B)
    bad = {c.name: c.detail for c in report.errors}
    assert "shard more ways" in bad["memory per device"]
    assert report.plan.fits is False


def test_seed_reward_mesh_on_a_v3_256_names_the_key_and_what_fits():
    report = check("reward", "-1,64,8", 256, 32)
    assert not report.ok
    (err,) = report.errors
    assert err.key == "mesh_dim" and "512" in err.detail
    fits = re.findall(r"'(\d+,\d+,\d+)'", err.detail)
    assert fits and all(check("reward", m, 256, 32).ok for m in fits)


def test_batch_that_does_not_split_names_the_key():
    report = check("dpo", "-1,16,16", 256, 32, overrides=["train_dataset.batch_size=4"])
    keys = {c.key for c in report.errors}
    assert "train_dataset.batch_size" in keys and "mesh_dim" in keys  # + the meshes that fit
    assert "= 8 over dp*fsdp = 1*16 = 16: does not divide" in report.failures_line()
    assert "train_dataset.batch_size: batch rows over dp*fsdp" in report.failures_line()
    assert "\n" not in report.failures_line()


def test_suggested_meshes_pass_every_check():
    """Every suggested mesh passes the checks, memory included ('-1,1,1', which the sharding
    rules refuse, is never suggested)."""
    cfg = load_config(DPOConfig, os.path.join(REPO, "configs", "dpo_13b.yaml"))
    s = shape_from_config(LLAMA2_13B, "test")
    fits = checks.fitting_meshes(cfg, {"model": s}, 256, V3_CORE_HBM, limit=100)
    assert "1,16,16" in fits and "256,1,1" not in fits
    assert all(check("dpo", m, 256, 32).ok for m in fits)
    # 16 rows need dp*fsdp <= 16, so mp >= 16 on 256 devices: no mesh splits the 40 heads
    # evenly, and the seed's (fewest replicas) comes first.
    assert fits[0] == "1,16,16" and all(int(m.split(",")[2]) >= 16 for m in fits)


def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(MeshError, match=r"'-1,64,8' does not fit 256.*start-up checks"):
        parse_mesh_dim("-1,64,8", 256)
    # The runtime builds its mesh from the same parse.
    assert runtime.parse_mesh_dim is parse_mesh_dim and runtime.MeshError is MeshError


# --------------------------------------------------------------- per-host feeding arithmetic


@pytest.mark.parametrize("hosts,mesh", [(32, (1, 16, 16)), (16, (1, 16, 8)), (32, (1, 64, 4)),
                                        (16, (1, 64, 2)), (32, (2, 32, 4))])
def test_each_host_uploads_only_its_devices_rows(hosts, mesh):
    """v3 hosts hold 8 devices each; with devices numbered host by host, each host uploads
    the row blocks of its own devices only, and all hosts together cover every row."""
    dp, fsdp, mp = mesh
    n = dp * fsdp * mp
    rows = 2 * dp * fsdp
    per_host = n // hosts
    covered = np.zeros(rows, dtype=int)
    for p in range(hosts):
        ordinals = range(p * per_host, (p + 1) * per_host)
        spans = runtime.host_rows(rows, mesh, np.arange(n), ordinals)
        for lo, hi in spans:
            covered[lo:hi] += 1
        # A host's 8 devices span 8 / mp batch blocks (at least 1): 2 rows per block here.
        assert sum(hi - lo for lo, hi in spans) == 2 * max(1, per_host // mp)
    # Every row block is held by the mp devices of its (dp, fsdp) position.
    owners = max(1, mp // per_host)
    assert (covered == owners).all()


def test_seed_dpo_batch_on_32_hosts():
    """16 rows over the 32 hosts of a v3-256 with -1,16,16: host p uploads row p // 2."""
    for p in range(32):
        assert runtime.host_rows(16, (1, 16, 16), np.arange(256), range(8 * p, 8 * p + 8)) == [(p // 2, p // 2 + 1)]


def test_shard_slices_combine_axes_major_to_minor():
    sizes = {"dp": 2, "fsdp": 4, "mp": 2}
    assert runtime.shard_slices((16, 3), (("dp", "fsdp"), None), sizes, (1, 2, 0)) == (slice(12, 14), slice(0, 3))
    assert runtime.shard_slices((8, 6), ("fsdp", "mp"), sizes, (0, 3, 1)) == (slice(6, 8), slice(3, 6))
    with pytest.raises(ValueError, match="does not split 8 ways"):
        runtime.shard_slices((12,), (("dp", "fsdp"),), sizes, (0, 0, 0))


def test_the_trainers_hook_raises_one_line_or_the_plan(tmp_path):
    """``startup.on_devices`` (what ``setup_run`` calls with the runtime's topology): a
    failed check is one line naming the key; a plan over the memory is the plan's table."""
    from torchxla_rlhf.preflight.memory_plan import DoesNotFit
    from torchxla_rlhf.preflight.startup import Topology, on_devices

    cfg = load_config(DPOConfig, os.path.join(REPO, "configs", "tiny", "dpo.yaml"),
                      [f"output_dir={tmp_path}", "mesh_dim=1,3,1"])
    with pytest.raises(checks.StartupError) as e:
        on_devices(cfg, Topology(4, "test", 1, 4, None))
    assert "\n" not in str(e.value) and "mesh_dim: mesh uses the pod's devices" in str(e.value)
    cfg = load_config(DPOConfig, os.path.join(REPO, "configs", "tiny", "dpo.yaml"),
                      [f"output_dir={tmp_path}", "mesh_dim=1,2,2"])
    with pytest.raises(DoesNotFit, match="DOES NOT FIT"):
        on_devices(cfg, Topology(4, "test", 1, 4, 2**20))
    report = on_devices(cfg, Topology(4, "test", 1, 4, 2**30))
    assert report.mesh == (1, 2, 2) and report.plan.fits
