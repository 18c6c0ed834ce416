"""DDP: two CPU processes (gloo) launched by torch.distributed.run train one ShortcutMLP.

Checks: gate parameters, weights and float64 multipliers are identical on both ranks and
changed from initialisation; each rank saw a disjoint shard of every batch and together they
saw every sample once per epoch; only rank 0 wrote checkpoints and printed; and the result
matches the same training run in a single process (sharding + gradient averaging reproduce the
global batch). Resuming under torchrun from a folder both ranks see continues bit for bit
(history included); ranks that would start from different steps are refused, not left hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch

from gatedprune.io import read_tensors

WORKER = Path(__file__).with_name("ddp_worker.py")


def _log_text(log_dir: Path, rank: int) -> str:
    files = [p for p in log_dir.rglob("*.log") if p.parent.name == str(rank)]
    return "".join(p.read_text() for p in files)


def _torchrun(out: Path, mode: str, logs: str = "logs") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on localhost with a free port
        "--nproc_per_node=2",
        "--redirects=3",
        f"--log-dir={out / logs}",
        str(WORKER),
        str(out),
        mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        text = "\n".join(f"--- {p}\n{p.read_text()}" for p in (out / logs).rglob("*.log"))
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{text}")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(out, "full")
    return out


@pytest.fixture(scope="module")
def ddp_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_resume")
    for mode in ("stop", "unshared", "resume"):
        _torchrun(out, mode, logs=f"logs-{mode}")
    return out


def _ranks(out: Path) -> list[dict[str, torch.Tensor]]:
    return [read_tensors(out / f"rank{r}.safetensors")[0] for r in range(2)]


def test_ranks_identical_and_trained(ddp_run: Path) -> None:
    r0, r1 = _ranks(ddp_run)
    finals = [k for k in r0 if k.startswith(("final/", "budget/"))]
    assert any("gate" in k for k in finals)
    for k in finals:
        assert torch.equal(r0[k], r1[k]), k
    # the ranks started from different weights: DDP broadcast rank 0's
    assert not torch.equal(r0["init/layers.0.op.weight"], r1["init/layers.0.op.weight"])
    gate_keys = [k for k in r0 if k.startswith("final/") and k.endswith("log_alpha")]
    assert gate_keys
    for k in gate_keys:
        assert not torch.equal(r0[k], r0[k.replace("final/", "init/", 1)]), k
    for k in ("budget/lambda1.flops", "budget/lambda2.flops"):
        assert r0[k].dtype == torch.float64
    # lambda2 ascends on the squared gap, so it moved; lambda1 may end at 0 (anti-windup reset),
    # and is compared across ranks above
    assert float(r0["budget/lambda2.flops"]) > 0.0


def test_disjoint_shards_cover_every_sample(ddp_run: Path) -> None:
    r0, r1 = _ranks(ddp_run)
    x, _ = ddp_worker.make_data()
    ids = x[:, 0]  # (N,) the first feature identifies a sample
    sizes0, sizes1 = r0["seen_sizes"].tolist(), r1["seen_sizes"].tolist()
    steps_per_epoch = -(-ddp_worker.N_TRAIN // ddp_worker.BATCH)
    assert len(sizes0) == len(sizes1) == ddp_worker.EPOCHS * steps_per_epoch
    s0, s1 = r0["seen"].split(sizes0), r1["seen"].split(sizes1)
    for a, b in zip(s0, s1, strict=True):
        assert set(a.tolist()).isdisjoint(b.tolist())
        assert 0 < len(a) - len(b) <= 1 or len(a) == len(b)
    for e in range(ddp_worker.EPOCHS):
        part = slice(e * steps_per_epoch, (e + 1) * steps_per_epoch)
        epoch_ids = torch.cat([*s0[part], *s1[part]])
        assert torch.equal(epoch_ids.sort().values, ids.sort().values)


def test_only_rank0_checkpoints_and_prints(ddp_run: Path) -> None:
    assert sorted(p.name for p in (ddp_run / "ckpt-rank0").iterdir())
    assert not (ddp_run / "ckpt-rank1").exists()
    log0, log1 = _log_text(ddp_run / "logs", 0), _log_text(ddp_run / "logs", 1)
    assert f"epoch {ddp_worker.EPOCHS}/{ddp_worker.EPOCHS}" in log0
    assert "epoch" not in log1


def test_matches_single_process(ddp_run: Path, tmp_path: Path) -> None:
    r0, _ = _ranks(ddp_run)
    net, budget = ddp_worker.make_model(init_seed=100)  # rank 0's initialisation
    x, y = ddp_worker.make_data()
    ddp_worker.trainer(net, budget, None).fit((x, y))
    single = {f"final/{k}": v for k, v in net.state_dict().items()}
    single.update({f"budget/{k}": v for k, v in budget.state_dict().items()})
    for k, v in single.items():
        torch.testing.assert_close(r0[k], v, rtol=0, atol=1e-5, msg=k)


def _without_time(history: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in h.items() if k != "time"} for h in history]


def test_resume_from_a_shared_folder_continues_bit_for_bit(
    ddp_run: Path, ddp_resumed: Path
) -> None:
    """Stopped mid-epoch at step STOP and resumed under torchrun: weights, gates, multipliers
    and the per-epoch records (the interrupted epoch's loss sums every rank's samples) equal
    the uninterrupted run's on both ranks."""
    names = sorted(p.name for p in (ddp_resumed / "ckpt-shared").iterdir())
    total = ddp_worker.EPOCHS * -(-ddp_worker.N_TRAIN // ddp_worker.BATCH)
    assert names == [f"step-{ddp_worker.STOP:09d}.safetensors", f"step-{total:09d}.safetensors"]
    for r in range(2):
        full, full_meta = read_tensors(ddp_run / f"rank{r}.safetensors")
        resumed, meta = read_tensors(ddp_resumed / f"resumed-rank{r}.safetensors")
        assert resumed.keys()
        for k, v in resumed.items():
            assert torch.equal(v, full[k]), (r, k)
        assert _without_time(meta["history"]) == _without_time(full_meta["history"])
        assert meta["before_snap"] == full_meta["before_snap"]


def test_ranks_resuming_from_different_steps_are_refused(ddp_resumed: Path) -> None:
    """Rank 1 looks in a folder of its own without rank 0's checkpoints: both ranks raise a
    ValueError naming the steps instead of hanging in mismatched collectives."""
    for r in range(2):
        message = (ddp_resumed / f"unshared-rank{r}.txt").read_text()
        assert f"different steps (rank 0: step {ddp_worker.STOP}, rank 1: step 0)" in message


def test_ranks_end_with_the_same_batchnorm_statistics(tmp_path: Path) -> None:
    # before: DDP broadcasts buffers at the start of each forward, so after the last step each
    # rank held statistics updated on its own shard: validation and final models differed
    _torchrun(tmp_path, "bn")
    (r0, m0), (r1, m1) = (read_tensors(tmp_path / f"bn-rank{r}.safetensors") for r in range(2))
    stats = [k for k in r0 if "running_" in k]
    assert stats
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert [h["val_loss"] for h in m0["history"]] == [h["val_loss"] for h in m1["history"]]


def test_a_diverged_rank_stops_every_rank(tmp_path: Path) -> None:
    # before: rank 1 raised, rank 0 waited in DDP's all-reduce until torchrun killed it
    _torchrun(tmp_path, "diverge")
    r0 = (tmp_path / "diverge-rank0.txt").read_text()
    r1 = (tmp_path / "diverge-rank1.txt").read_text()
    step = ddp_worker.STOP + 1
    for text in (r0, r1):
        assert f"training diverged at step {step} " in text
    assert "on another rank" in r0
    assert "on this rank: the task loss is inf" in r1
