"""The weight-update group (grpo.weight_sync = "collective"), two real processes over gloo: a policy process
broadcasts `hf_weight_buckets` of a tiny Qwen3 and an engine process receives them into a NativeEngine built
from other weights. The engine ends with exactly the weights the object-store path gives it; a dead peer makes
the sender fail after the group's timeout instead of hanging; a closed group frees its rendezvous port."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from posttrain.rl.weight_group import bucket_layout, host_store, join_weight_group, receive_bucket, send_bucket
from posttrain.rl.weight_sync import hf_weight_buckets
from test_rl_weight_sync_and_batches import _tiny_model

BUCKET_BYTES = 64 * 1024


def _engine_process(port: int, queue, out_file: str, device: str, ready) -> None:
    """Rank 1: a native engine with seed-1 weights takes every bucket rank 0 broadcasts."""
    from posttrain.inference.native import NativeEngine

    torch.set_num_threads(1)
    engine = NativeEngine(_tiny_model(1).to(device))
    ready.set()  # about to join: rank 0's rendezvous timeout must not count this process's spawn and imports
    group = join_weight_group(1, 2, device=device, timeout_s=20, host="127.0.0.1", port=port)
    received = 0
    while (layout := queue.get()) is not None:
        named = receive_bucket(group, layout)
        engine.update_weights(named)
        received += 1
    group.close()
    torch.save({"received": received, "weights": engine.model.state_dict()}, out_file)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")


@pytest.mark.parametrize("devices", [("cpu", "cpu"), pytest.param(("cuda:0", "cuda:1"), marks=TWO_GPUS)],
                         ids=["gloo", "nccl"])
def test_collective_sync_gives_the_engine_the_policys_weights_bucket_by_bucket(tmp_path, devices) -> None:
    from posttrain.inference.native import NativeEngine

    policy_device, engine_device = devices
    ctx = mp.get_context("spawn")
    store, port = host_store(2, timeout_s=20)
    queue, out_file = ctx.Queue(), tmp_path / "engine.pt"
    ready = ctx.Event()
    engine_proc = ctx.Process(target=_engine_process, args=(port, queue, str(out_file), engine_device, ready))
    engine_proc.start()
    try:
        assert ready.wait(120), "the engine process did not start"
        group = join_weight_group(0, 2, device=policy_device, timeout_s=20, store=store)
        policy = _tiny_model(0).to(policy_device)
        buckets = 0
        for bucket in hf_weight_buckets(policy, bucket_bytes=BUCKET_BYTES, device=policy_device):
            layout = bucket_layout(bucket)
            assert layout[1] <= BUCKET_BYTES or len(bucket) == 1  # split as configured (a big tensor alone)
            queue.put(layout)
            send_bucket(group, bucket, layout)
            buckets += 1
        queue.put(None)
        group.close()
    finally:
        engine_proc.join(timeout=60)
    assert engine_proc.exitcode == 0
    result = torch.load(out_file, map_location="cpu")
    received, synced = result["received"], result["weights"]
    assert received == buckets > 2
    # the object-store path: the same buckets handed to an engine directly
    reference = NativeEngine(_tiny_model(1))
    for bucket in hf_weight_buckets(policy, bucket_bytes=BUCKET_BYTES):  # host copies
        reference.update_weights(bucket)
    expected = reference.model.state_dict()
    assert synced.keys() == expected.keys()
    assert all(torch.equal(synced[k], expected[k]) for k in expected)
    assert not torch.equal(expected["tok_embeddings.weight"], _tiny_model(1).state_dict()["tok_embeddings.weight"])
    # closed on both sides: nothing serves the rendezvous port any more
    del store
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _join_and_stall(port: int, ready) -> None:
    ready.set()  # about to join: rank 0's rendezvous timeout must not count this process's spawn and imports
    group = join_weight_group(1, 2, device="cpu", timeout_s=20, host="127.0.0.1", port=port)
    time.sleep(120)
    group.close()  # alive, but never takes part in the next broadcast (a hung engine)


def test_a_stalled_engine_fails_the_sender_after_the_group_timeout() -> None:
    ctx = mp.get_context("spawn")
    store, port = host_store(2, timeout_s=3)
    ready = ctx.Event()
    proc = ctx.Process(target=_join_and_stall, args=(port, ready))
    proc.start()
    try:
        assert ready.wait(120), "the engine process did not start"
        group = join_weight_group(0, 2, device="cpu", timeout_s=3, store=store)
        bucket = [("w", torch.ones(4, 4))]
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError):
            send_bucket(group, bucket, bucket_layout(bucket))
        assert 2.5 < time.perf_counter() - t0 < 30
        group.close()
    finally:
        proc.kill()
        proc.join()


def test_bucket_layout_views_keep_names_shapes_and_dtypes() -> None:
    bucket = [("a", torch.arange(6, dtype=torch.bfloat16).view(2, 3)), ("b", torch.tensor(3.5)),
              ("c", torch.arange(5, dtype=torch.int64)), ("d", torch.zeros(0, 4))]
    entries, size = bucket_layout(bucket)
    assert [e[0] for e in entries] == ["a", "b", "c", "d"] and all(e[3] % 16 == 0 for e in entries)
    assert size == 16 + 16 + 48 + 0


def test_grpo_config_takes_collective_with_either_placement_and_refuses_what_cannot_work() -> None:
    from posttrain.config.loader import parse_config
    from posttrain.rl.controller import check_grpo_config

    base = ["--config", "train_configs/debug_grpo.toml", "--grpo.weight_sync", "collective"]
    for placement in ("split", "colocated"):  # NCCL's one-rank-per-GPU rule is checked where GPUs are known
        check_grpo_config(parse_config([*base, "--grpo.placement", placement]))
    with pytest.raises(SystemExit, match="grpo.weight_sync_timeout_s"):
        check_grpo_config(parse_config([*base, "--grpo.weight_sync_timeout_s", "0"]))
    with pytest.raises(SystemExit, match="model.backend = 'hf'"):
        check_grpo_config(parse_config([*base, "--model.backend", "hf"]))
    with pytest.raises(SystemExit, match="'cuda_ipc' needs grpo.placement = 'colocated'"):
        check_grpo_config(parse_config([*base, "--grpo.weight_sync", "cuda_ipc", "--grpo.placement", "split"]))
    with pytest.raises(SystemExit, match="'collective' on GPUs needs grpo.placement = 'split'"):
        check_grpo_config(parse_config([*base, "--grpo.placement", "colocated", "--training.device", "cuda"]))
    check_grpo_config(parse_config([*base, "--grpo.placement", "split", "--training.device", "cuda"]))
