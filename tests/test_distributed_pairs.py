"""``monai_icon.apps.distributed``: the pieces of ``register-pairs`` under torchrun (the environment, each rank's
device, sharding the pairs, gathering the summaries in order, a failing pair named with its rank), in one process
and in two gloo processes started by torchrun."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT
from monai_icon.apps.distributed import (
    PairError,
    TorchrunEnv,
    gather_in_order,
    process_group,
    rank_device,
    rank_failures,
    run_pair,
    shard_pairs,
    torchrun_env,
)


def test_the_environment_of_torchrun_and_a_single_process():
    assert torchrun_env({}) == TorchrunEnv(0, 1, 0) and torchrun_env({}).is_main
    env = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == TorchrunEnv(3, 4, 1) and env.distributed and not env.is_main
    assert torchrun_env({"RANK": "2", "WORLD_SIZE": "3"}).local_rank == 2  # LOCAL_RANK defaults to RANK
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(ValueError):
            torchrun_env(bad)


def test_each_rank_gets_its_own_device(monkeypatch):
    two = TorchrunEnv(1, 2, 1)
    assert rank_device("cpu", two) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert rank_device(None, two) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            rank_device("cuda", two)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(None, two) == torch.device("cuda", 1)
    assert rank_device("cuda", two) == torch.device("cuda", 1)
    assert rank_device("cuda:0", two) == torch.device("cuda", 0)  # an explicit index is kept for every rank
    with pytest.raises(ValueError, match="no GPU of its own"):
        rank_device("cuda", TorchrunEnv(2, 3, 2))


@pytest.mark.parametrize("count,world", [(0, 2), (1, 3), (7, 2), (7, 3), (8, 4), (5, 1)])
def test_shards_hold_each_pair_exactly_once_in_order(count, world):
    pairs = [f"p{i}" for i in range(count)]
    shards = [shard_pairs(pairs, rank, world) for rank in range(world)]
    for shard in shards:
        assert [i for i, _ in shard] == sorted(i for i, _ in shard)
        assert all(pairs[i] == p for i, p in shard)
    assert sorted(i for shard in shards for i, _ in shard) == list(range(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_pairs(pairs, world, world)


def test_single_process_gathering_sorts_and_checks_the_indices():
    assert gather_in_order([(1, "b"), (0, "a"), (2, "c")], 3) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"missing indices \[2\]"):
        gather_in_order([(0, "a"), (1, "b")], 3)
    with pytest.raises(ValueError, match=r"repeated \[1\]"):
        gather_in_order([(0, "a"), (1, "b"), (1, "b")], 2)


def test_a_failing_pair_is_named_with_its_rank():
    def fails(x):
        raise FileNotFoundError(f"no such file: {x}")

    assert run_pair(lambda x: x + 1, "p0", 1) == 2
    message = r"pair 'p4' failed on rank 1 of 2: FileNotFoundError: no such file: m.nii"
    with pytest.raises(PairError, match=message) as err:
        run_pair(fails, "p4", "m.nii", env=TorchrunEnv(1, 2, 1))
    assert err.value.pair_id == "p4" and err.value.rank == 1 and isinstance(err.value.__cause__, FileNotFoundError)
    with pytest.raises(PairError, match=r"^pair 'p0' failed: ValueError"):  # one process: no rank to name
        run_pair(int, "p0", "x", env=TorchrunEnv())
    with process_group("cpu") as env:  # no torchrun: nothing to start
        assert env == TorchrunEnv() and not torch.distributed.is_initialized()
    assert rank_failures(None) == {}  # one process: only its own failure
    assert rank_failures(err.value) == {0: str(err.value)} and rank_failures(KeyError()) == {0: "KeyError"}


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from monai_icon.apps.distributed import (PairError, gather_in_order, process_group, rank_device,
                                             rank_failures, run_pair, shard_pairs)

    out, fail = sys.argv[1], sys.argv[2]
    pairs = [{"pair_id": f"p{i}", "size": i * i} for i in range(7)]

    def register(pair):
        if pair["pair_id"] == fail:
            raise RuntimeError("cannot read the moving image")
        time.sleep(0.05 * (pair["size"] % 3))  # ranks finish in no particular order
        return {"pair_id": pair["pair_id"], "value": pair["size"] + 0.5}

    with process_group(rank_device("cpu")) as env:
        mine = shard_pairs(pairs, env.rank, env.world_size)
        done, failure = [], None
        try:
            for i, p in mine:
                done.append((i, dict(run_pair(register, p["pair_id"], p), rank=env.rank)))
        except PairError as err:
            failure = err
        failed = rank_failures(failure)
        with open(f"{out}.rank{env.rank}", "w") as f:
            json.dump({"done": [s["pair_id"] for _, s in done], "failed": failed}, f)
        if failed:
            raise failure or RuntimeError(f"rank {env.rank} stopped: {failed}")
        merged = gather_in_order(done, len(pairs))
        if merged is not None:
            with open(out, "w") as f:
                json.dump(merged, f)
        else:
            assert env.rank != 0
    """
)


def torchrun_script(tmp_path, *args, nproc=2):
    script = tmp_path / "pairs_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_two_processes_do_each_pair_once_and_rank_0_gets_all_summaries_in_order(tmp_path):
    proc = torchrun_script(tmp_path, str(tmp_path / "merged.json"), "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [s["pair_id"] for s in merged] == [f"p{i}" for i in range(7)]
    assert [s["value"] for s in merged] == [i * i + 0.5 for i in range(7)]
    assert [s["rank"] for s in merged] == [i % 2 for i in range(7)]  # both ranks worked, round robin


def test_a_failing_pair_stops_its_rank_the_others_finish_and_every_rank_knows_the_pair_and_rank(tmp_path):
    proc = torchrun_script(tmp_path, str(tmp_path / "merged.json"), "p3")
    assert proc.returncode != 0
    message = "pair 'p3' failed on rank 1 of 2: RuntimeError: cannot read the moving image"
    assert f"PairError: {message}" in proc.stderr
    assert not (tmp_path / "merged.json").exists()
    ranks = [json.loads((tmp_path / f"merged.json.rank{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0]["done"] == ["p0", "p2", "p4", "p6"]  # rank 0 finished its share before the run stopped
    assert ranks[1]["done"] == ["p1"]  # rank 1 stopped at its failing pair
    assert ranks[0]["failed"] == ranks[1]["failed"] == {"1": message}  # both ranks know who failed
    assert "rank 0 stopped" in proc.stderr
