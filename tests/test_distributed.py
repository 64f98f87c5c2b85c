"""Data-parallel training on CPU with gloo: equal to one process, ranks in lockstep, resume, failures, errors.

Workers join through a file store (tests/_dist_worker.py) or through ``auglocal train --nproc-per-node 2``
(torch's elastic launcher with a standalone rendezvous on a free port); every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
WORKER_TIMEOUT = 240


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def recipe(**changes):
    r = {
        "name": "dp",
        "rule": "auglocal",
        "model": {"name": "_dist_worker:plain_net", "kwargs": {"width": 4}},
        "convert": {"layers": 3, "aux_depth": 1},
        "data": {"name": "digits", "train_subset": 160, "eval_subset": 50, "augment": "none"},
        "optimizer": {"name": "momentum", "lr": 0.05, "per_layer": True},
        "schedule": {"name": "none"},
        "epochs": 1,
        "batch_size": 32,
        "seed": 3,
        "device": "cpu",
        "num_threads": 1,
        "deterministic": True,
        "dist_timeout": 30,
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        r[section] = {**r.get(section, {}), name: value} if name else value
    return r


def run_ranks(tmp_path, out, rec, *, world, resume=False, stop_after=None):
    """Start ``world`` worker processes (world 1: train here, without a process group); their records, by rank."""
    if world == 1:
        sys.path.insert(0, str(TESTS))
        try:
            from _dist_worker import record_training

            return [record_training(rec, str(out), resume=resume, stop_after=stop_after)]
        finally:
            sys.path.remove(str(TESTS))
    init = tmp_path / f"store-{time.monotonic_ns()}"
    extra = (["--resume"] if resume else []) + (["--stop-after", str(stop_after)] if stop_after else [])
    procs = [subprocess.Popen([sys.executable, str(TESTS / "_dist_worker.py"), str(r), str(world), str(init),
                               str(out), json.dumps(rec), *extra], env=_env(), cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=WORKER_TIMEOUT)[0])
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    suffix = "-resumed" if resume else ""
    return [torch.load(out / f"rank{r}-of-{world}{suffix}.pt", weights_only=False) for r in range(world)]


def assert_ranks_identical(ranks):
    steps = len(ranks[0]["records"])
    assert steps > 0 and all(len(r["records"]) == steps for r in ranks)
    for i in range(steps):
        for other in ranks[1:]:
            for key, value in ranks[0]["records"][i]["state"].items():
                # bit-identical: averaged gradients, the same step, the same broadcast buffers
                assert torch.equal(value, other["records"][i]["state"][key]), f"step {i + 1}: {key} differs"


def test_two_ranks_equal_one_process_and_stay_identical(tmp_path):
    rec = recipe()
    single = run_ranks(tmp_path, tmp_path / "one", rec, world=1)[0]
    ranks = run_ranks(tmp_path, tmp_path / "two", rec, world=2)
    assert_ranks_identical(ranks)
    steps = len(single["records"])
    assert steps == 5 and len(ranks[0]["records"]) == steps  # 160 samples / 32 per global batch
    for i in range(steps):
        # each rank's losses are over its 16 images: their mean is the single process's over the 32
        mean = (ranks[0]["records"][i]["losses"] + ranks[1]["records"][i]["losses"]) / 2
        torch.testing.assert_close(mean, single["records"][i]["losses"], rtol=1e-5, atol=1e-5)
        for key, value in single["records"][i]["state"].items():
            torch.testing.assert_close(ranks[0]["records"][i]["state"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=f"step {i + 1}: {key}")
    assert ranks[0]["top1"] == pytest.approx(single["top1"], abs=1e-6)  # sharded evaluation, counts summed
    metrics = [json.loads(line) for line in (tmp_path / "two" / "auglocal" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train_samples"] == 160  # over both ranks


def test_one_optimizer_per_batch_and_batchnorm_stay_in_sync(tmp_path):
    # BatchNorm: each rank normalises over its own half, so only lockstep (not equality to one process) holds;
    # the running statistics are rank 0's on every rank, as DDP's broadcast_buffers makes them.
    rec = recipe(model__kwargs={"width": 4, "norm": True}, optimizer__per_layer=False, data__augment="crop")
    ranks = run_ranks(tmp_path, tmp_path / "bn", rec, world=2)
    assert_ranks_identical(ranks)
    running = [k for k in ranks[0]["records"][0]["state"] if k.endswith("running_mean")]
    assert running
    first, last = ranks[0]["records"][0]["state"], ranks[0]["records"][-1]["state"]
    assert any(not torch.equal(first[k], last[k]) for k in running)  # the statistics did move


def test_resume_on_another_world_size(tmp_path):
    rec = recipe(epochs=2)
    straight = run_ranks(tmp_path, tmp_path / "straight", rec, world=1)[0]
    out = tmp_path / "switch"
    first = run_ranks(tmp_path, out, rec, world=2, stop_after=3)  # a stop on rank 0 alone stops both
    assert all(r["interrupted"] for r in first) and all(len(r["records"]) == 3 for r in first)
    second = run_ranks(tmp_path, out, rec, world=1, resume=True)[0]
    assert len(second["records"]) == len(straight["records"]) - 3
    final, expected = second["records"][-1]["state"], straight["records"][-1]["state"]
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert second["top1"] == pytest.approx(straight["top1"], abs=1e-6)


def _launch(tmp_path, rec, *extra, nproc=2):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(rec))
    return subprocess.Popen([sys.executable, "-m", "auglocal_fx", "train", str(path), "--nproc-per-node", str(nproc),
                             "-o", str(tmp_path / "run"), "-q", *extra], env=_env(), cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
@pytest.mark.parametrize("stages", [1, 2], ids=["data-parallel", "layer-parallel"])
def test_killing_one_rank_stops_every_rank(tmp_path, stages):
    # a checkpoint every few seconds, and long enough to kill; with 2 stages, rank 1 is the second stage
    rec = recipe(epochs=500, data__train_subset=320, parallel={"stages": stages})
    launcher = _launch(tmp_path, rec)
    try:
        deadline = time.monotonic() + 120
        workers = []
        while time.monotonic() < deadline and not (tmp_path / "run" / "auglocal" / "checkpoint.pt").exists():
            assert launcher.poll() is None, launcher.communicate()[1][-2000:]
            time.sleep(0.5)
        workers = [c for c in _children(launcher.pid) if "auglocal_fx" in _cmdline(c)]
        assert len(workers) == 2, [(c, _cmdline(c)) for c in _children(launcher.pid)]
        checkpoint = (tmp_path / "run" / "auglocal" / "checkpoint.pt").read_bytes()
        killed_at = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode not in (0, None)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "rank 1 was killed by SIGKILL" in lines[-1], err[-3000:]
    assert any(line.startswith("Error: rank 0:") for line in lines), err[-2000:]  # the survivor says why
    for w in workers:
        assert not Path(f"/proc/{w}").exists() or "zombie" in Path(f"/proc/{w}/status").read_text()
    from auglocal_fx.train._checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run" / "auglocal" / "checkpoint.pt")["next_epoch"] >= 1  # still readable
    assert checkpoint  # the one read before the kill was complete too


def test_batch_size_that_does_not_divide_is_one_clear_error(tmp_path):
    launcher = _launch(tmp_path, recipe(batch_size=33))
    _, err = launcher.communicate(timeout=WORKER_TIMEOUT)
    assert launcher.returncode == 1
    assert "recipe field 'batch_size' (33) is the global batch and must divide among the 2 ranks" in err
    assert "Traceback" not in err


def test_wrong_world_size_and_sync_bn_on_cpu_are_refused(tmp_path):
    from auglocal_fx.distributed import DistError, init_distributed
    from auglocal_fx.train import RecipeError, train

    with pytest.raises(DistError, match=r"a device mesh of shape \(2, 2\) needs 4 processes, but the job has 1"):
        init_distributed(device_type="cpu", timeout_s=10, init_method=f"file://{tmp_path / 'store'}", rank=0,
                         world_size=1, mesh_shape=(2, 2))
    with pytest.raises(RecipeError, match="recipe field 'sync_bn' needs CUDA"):
        train(recipe(sync_bn=True), output_dir=tmp_path / "bn", quiet=True)
    from click.testing import CliRunner

    from auglocal_fx.cli.main import main

    result = CliRunner().invoke(main, ["train", "quickstart", "--nproc-per-node", "0"])
    assert result.exit_code == 2 and "--nproc-per-node" in result.output
