"""Two processes × 4 simulated devices (`jax.distributed` on localhost) load the release-layout FP8 fixture — and its
`dsv3 convert` output — into one global 8-device mesh (`experiments/release_load_memory.py --processes 2`): each
process holds only its own shards (half the bytes), and together they hold exactly the shards one process
holding all 8 devices does, bit for bit."""

from __future__ import annotations

import importlib.util
import os

import jax
import pytest
from conftest import REPO
from convert_fixtures import write_fp8_checkpoint

import dsv3_jax as d
from dsv3_jax.ckpt import convert
from dsv3_jax.parallel import api as sa
from dsv3_jax.parallel import get_layout, make_mesh

LAYOUT = "cpu-8-ep"
TIMEOUT_S = 300


def _experiment():
    spec = importlib.util.spec_from_file_location("release_load_memory",
                                                  os.path.join(REPO, "experiments", "release_load_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_multihost")
    hf = write_fp8_checkpoint(str(root / "fp8")).directory
    convert(hf, root / "converted", "fp8", progress=False)
    return {"hf": hf, "converted": str(root / "converted")}


@pytest.mark.parametrize("kind", ["hf", "converted"])
def test_two_processes_hold_half_each_and_together_all(dirs, kind):
    experiment = _experiment()
    rows = experiment.run_children(dirs[kind], LAYOUT, None, 2, digest=True, timeout=TIMEOUT_S)
    assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in rows] == [(0, 2, 8, 4),
                                                                                                 (1, 2, 8, 4)]
    assert all(r["converted"] == (kind == "converted") for r in rows)
    # the reference: this process, all 8 devices (conftest), the same layout
    layout = get_layout(LAYOUT)
    mesh = make_mesh(layout)
    config = d.ModelConfig.from_hf_config(dirs[kind])
    _, variables = d.load_pretrained(dirs[kind], shardings=sa.variable_shardings(config, layout, mesh))
    single = experiment.shard_digests(variables)
    both = {k: sorted(set(rows[0]["digests"][k]) | set(rows[1]["digests"][k])) for k in single}
    assert both == single
    total = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(variables) for s in leaf.addressable_shards)
    held = [r["held_bytes"] for r in rows]
    assert sum(held) == total
    assert abs(held[0] - held[1]) <= 0.02 * total  # replicated leaves count on both; experts split 4 + 4
